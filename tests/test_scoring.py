"""Image-score reductions (m2u_jax.scoring) and the model's score rule built on them."""

import jax.numpy as jnp
import numpy as np
import pytest

from m2u_jax import model as model_lib
from m2u_jax import scoring


def test_box_filter_matrix_rows_average_the_existing_neighbours():
    matrix = scoring.box_filter_matrix(5, 3)
    np.testing.assert_allclose(matrix[0], [0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(matrix[2], [0, 1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(matrix[4], [0, 0, 0, 0.5, 0.5])
    np.testing.assert_array_equal(scoring.box_filter_matrix(4, 1), np.eye(4))


def test_smooth_maps_matches_a_brute_force_clipped_mean_filter():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 7, 6)).astype(np.float32)
    expected = np.zeros_like(maps)
    for row in range(7):
        for col in range(6):
            window = maps[:, max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3]
            expected[:, row, col] = window.mean(axis=(1, 2))
    np.testing.assert_allclose(scoring.smooth_maps(maps, 5), expected, rtol=1e-5)
    # The jnp path (used in the jitted and exported model) gives the same numbers.
    np.testing.assert_allclose(scoring.smooth_maps(jnp.asarray(maps), 5), expected, rtol=1e-5)


def test_topk_mean_numpy_and_jnp_agree_with_hand_values():
    maps = np.array([[[1.0, 5.0], [3.0, 2.0]]], np.float32)
    assert scoring.topk_mean(maps, 0.5)[0] == pytest.approx(4.0)  # k = 2: (5 + 3) / 2
    assert scoring.topk_mean(maps, 0.0)[0] == pytest.approx(5.0)  # k = 1: the maximum
    assert float(scoring.topk_mean(jnp.asarray(maps), 0.5)[0]) == pytest.approx(4.0)


def test_a_single_hot_pixel_is_damped_by_smoothing_but_a_blob_is_not():
    """Why the filter helps: one noisy pixel no longer sets the score; a 3x3 defect still does."""
    noise = np.zeros((1, 9, 9), np.float32)
    noise[0, 4, 4] = 0.9
    blob = np.zeros((1, 9, 9), np.float32)
    blob[0, 3:6, 3:6] = 0.9
    for maps, expected in ((noise, 0.1), (blob, 0.9)):
        smoothed = scoring.smooth_maps(maps, 3)
        assert smoothed.max() == pytest.approx(expected, rel=1e-5)


def test_model_image_score_with_smoothing_and_classifier_weight():
    logits = np.full((1, 4, 4), -30.0, np.float32)  # sigmoid ≈ 0
    logits[0, 0, 0] = 30.0  # one pixel at probability ≈ 1
    outputs = {"pixel_logits": jnp.asarray(logits), "image_logits": jnp.asarray([0.0])}
    # No filter, maximum (top-k of 1 pixel), classifier weight ½: ½·1 + ½·sigmoid(0) = 0.75.
    score = model_lib.image_score(outputs, 0.0, smoothing=1, classifier_weight=0.5)
    assert float(score[0]) == pytest.approx(0.75, abs=1e-6)
    # A 3x3 filter clipped at the corner averages 4 pixels: max 1/4; map only.
    score = model_lib.image_score(outputs, 0.0, smoothing=3, classifier_weight=0.0)
    assert float(score[0]) == pytest.approx(0.25, abs=1e-6)
    # Classifier only.
    score = model_lib.image_score(outputs, 0.0, smoothing=3, classifier_weight=1.0)
    assert float(score[0]) == pytest.approx(0.5, abs=1e-6)


def test_score_variants_names_and_values():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2:5, 2:5] = 1.0
    variants = scoring.score_variants(maps, np.array([0.2, 0.6]), smoothing_widths=(1, 3))
    assert set(variants) == {"classifier", "max_s1", "top1pct_s1", "max_s3", "top1pct_s3", "mix"}
    np.testing.assert_allclose(variants["max_s1"], [1.0, 0.0])
    np.testing.assert_allclose(variants["max_s3"], [1.0, 0.0])  # the blob's centre stays 1
    np.testing.assert_allclose(variants["mix"], [0.5 * (1.0 + 0.2), 0.5 * 0.6])
