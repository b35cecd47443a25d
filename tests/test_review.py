"""The accept / reject / review policy and its calibration (m2u_jax.review)."""

import numpy as np
import pytest

from m2u_jax import review


def test_review_policy_hand_cases():
    thresholds = dict(score_threshold=0.5, uncertainty_threshold=0.2)
    scores = np.asarray([0.1, 0.9, 0.9, 0.5, 0.2])
    spread = np.asarray([0.0, 0.1, 0.3, 0.2, 0.25])
    decisions = review.review_policy(scores, spread, thresholds)
    np.testing.assert_array_equal(decisions, [0, 1, 2, 1, 2])
    assert decisions.dtype == np.int32
    assert [review.DECISION_NAMES[d] for d in decisions] == [
        "accept", "reject", "review", "reject", "review"
    ]  # fmt: skip


def test_calibrate_review_thresholds_hand_cases():
    scores = [0.1, 0.2, 0.35, 0.4, 0.8, 0.9, 0.7, 0.3, 0.6, 0.05]
    labels = [0, 0, 1, 0, 1, 1, 1, 0, 0, 0]
    spread = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.5]
    thresholds = review.calibrate_review_thresholds(scores, spread, labels, budget=0.2)
    # 0.8 quantile ('higher') of the spreads = 0.09: only the 0.5 image (> 0.09) is reviewed.
    assert thresholds["uncertainty_threshold"] == pytest.approx(0.09)
    # On the other nine, threshold 0.7 gives TP 3 (0.7, 0.8, 0.9), FP 0, FN 1 (0.35): F1 6/7;
    # 0.35 gives TP 4, FP 2 (0.4, 0.6): F1 0.8. The F1 optimum is 0.7.
    assert thresholds["score_threshold"] == pytest.approx(0.7)
    decisions = review.review_policy(np.asarray(scores), np.asarray(spread), thresholds)
    assert np.mean(np.asarray(decisions) == review.REVIEW) <= 0.2
    none = review.calibrate_review_thresholds(scores, spread, labels, budget=0.0)
    assert not np.any(np.asarray(spread) > none["uncertainty_threshold"])
    all_good = review.calibrate_review_thresholds([0.2, 0.4], [0, 0], [0, 0], budget=0.0)
    assert all_good["score_threshold"] > 0.4
    with pytest.raises(ValueError, match="budget 1.5"):
        review.calibrate_review_thresholds(scores, spread, labels, budget=1.5)
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        review.calibrate_review_thresholds(scores, spread[:3], labels, budget=0.1)
