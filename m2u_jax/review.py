"""The accept / reject / review policy and its calibration, in numpy only (no JAX), so that
evaluation and the ONNX runner on an edge device decide alike.

Decision per image: REVIEW where `uncertainty > uncertainty_threshold`, else REJECT where
`score >= score_threshold`, else ACCEPT; names in `DECISION_NAMES`.
"""

from __future__ import annotations

import numpy as np

ACCEPT, REJECT, REVIEW = 0, 1, 2
DECISION_NAMES = ("accept", "reject", "review")


def review_policy(scores, uncertainty, thresholds: dict[str, float]) -> np.ndarray:
    """Per-image decision `[B]` int32 (module docstring). `uncertainty` is whichever measure the
    thresholds were calibrated on (e.g. `score_var`); `thresholds` = dict(score_threshold=...,
    uncertainty_threshold=...)."""
    scores = np.asarray(scores, np.float32)
    uncertainty = np.asarray(uncertainty, np.float32)
    review = uncertainty > thresholds["uncertainty_threshold"]
    reject = scores >= thresholds["score_threshold"]
    return np.where(review, REVIEW, np.where(reject, REJECT, ACCEPT)).astype(np.int32)


def calibrate_review_thresholds(
    scores, uncertainty, labels, budget: float, rule: str = "f1", target_fpr: float = 0.05
) -> dict[str, float]:
    """Chooses review thresholds on validation data (host-side numpy).

    - `uncertainty_threshold`: the (1 - budget) quantile of `uncertainty` (numpy 'higher'
      method), so that `uncertainty > threshold` sends at most a `budget` fraction of the
      images to review (fewer with ties); budget 0 reviews nothing.
    - `score_threshold`: the F1-optimal threshold for "defective" (`labels` 1) among the images
      the policy decides automatically (not sent to review), over the candidate thresholds =
      their distinct scores (predict defective where score >= threshold). Ties in F1 keep the
      highest threshold (fewer false rejects). With no positive label among them, the
      threshold is just above the largest score (accept everything).
    - With `rule='fpr'` (`eval.threshold_rule` resolved to 'fpr', e.g. good-only validation),
      `score_threshold` is instead `metrics.fpr_threshold` of the automatic images' scores:
      at most `target_fpr` of the automatically decided good images are rejected (the F1
      rule above when none of them is good).

    Args: scores, uncertainty `[N]` float; labels `[N]` in {0, 1}; budget in [0, 1];
      rule 'f1' | 'fpr'; target_fpr in (0, 1).
    """
    # metrics (scipy, scikit-learn) only for calibration: deciding runs with numpy alone.
    from m2u_jax import metrics

    if rule not in ("f1", "fpr"):
        raise ValueError(f"rule={rule!r} must be 'f1' or 'fpr' (resolve 'auto' first)")
    scores = np.asarray(scores, np.float64)
    uncertainty = np.asarray(uncertainty, np.float64)
    labels = np.asarray(labels).astype(bool)
    if not (scores.shape == uncertainty.shape == labels.shape) or scores.ndim != 1:
        raise ValueError(
            f"scores {scores.shape}, uncertainty {uncertainty.shape} and labels {labels.shape} "
            "must be equal 1-D shapes"
        )
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"review budget {budget} must be in [0, 1]")
    if scores.size == 0:
        raise ValueError("cannot calibrate review thresholds on an empty validation set")
    if budget == 0.0:
        uncertainty_threshold = float(np.max(uncertainty))
    else:
        uncertainty_threshold = float(np.quantile(uncertainty, 1.0 - budget, method="higher"))
        if budget == 1.0:
            uncertainty_threshold = float(np.min(uncertainty)) - 1.0
    automatic = uncertainty <= uncertainty_threshold
    auto_scores, auto_labels = scores[automatic], labels[automatic]
    if rule == "fpr" and not auto_labels.all():
        return dict(
            score_threshold=metrics.fpr_threshold(auto_labels, auto_scores, target_fpr),
            uncertainty_threshold=uncertainty_threshold,
        )
    if auto_scores.size == 0 or not auto_labels.any():
        top = float(np.max(auto_scores)) if auto_scores.size else float(np.max(scores))
        return dict(
            score_threshold=float(np.nextafter(top, np.inf)),
            uncertainty_threshold=uncertainty_threshold,
        )
    _, score_threshold = metrics.f1_max(auto_labels, auto_scores, ties="highest")
    return dict(score_threshold=score_threshold, uncertainty_threshold=uncertainty_threshold)
