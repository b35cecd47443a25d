"""Feature-space scorer (m2u_jax.feature_memory): bank, nearest-neighbour distances, maps."""

import jax
import numpy as np
import pytest

from configs import tiny
from m2u_jax import feature_memory
from m2u_jax import model as model_lib


def test_nearest_distances_match_brute_force_across_bank_chunks():
    rng = np.random.default_rng(0)
    # More rows than one chunk, and not a multiple of it: the padding must never win.
    bank = rng.normal(size=(feature_memory._BANK_CHUNK + 37, 8)).astype(np.float32)
    features = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    expected = np.sqrt(((features.reshape(-1, 1, 8) - bank[None]) ** 2).sum(-1).min(-1)).reshape(
        2, 3, 4
    )
    got = np.asarray(feature_memory.nearest_distances(bank, features))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_feature_in_the_bank_has_distance_zero_and_an_outlier_does_not():
    bank = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    features = np.array([[[[1.0, 0.0], [3.0, 4.0]]]], np.float32)  # [1, 1, 2, 2]
    got = np.asarray(feature_memory.nearest_distances(bank, features))
    # (3, 4) is nearest to (0, 1): sqrt(3² + 3²).
    np.testing.assert_allclose(got, [[[0.0, np.sqrt(18.0)]]], atol=1e-3)


def test_build_bank_subsamples_deterministically():
    features = [np.arange(40, dtype=np.float32).reshape(2, 5, 4), np.ones((3, 4), np.float32)]
    full = feature_memory.build_bank(features, max_size=100, seed=0)
    assert full.shape == (13, 4)
    small = feature_memory.build_bank(features, max_size=6, seed=1)
    assert small.shape == (6, 4)
    np.testing.assert_array_equal(small, feature_memory.build_bank(features, 6, seed=1))
    # Every kept row is a row of the input.
    assert all(any(np.array_equal(row, other) for other in full) for row in small)
    with pytest.raises(ValueError, match="no defect-free"):
        feature_memory.build_bank([], 10, 0)
    # A split whose images are all defective leaves an empty selection: the same error.
    with pytest.raises(ValueError, match="no defect-free"):
        feature_memory.build_bank([np.zeros((0, 2, 2, 4), np.float32)], 10, 0)


def test_patch_features_are_the_neighbourhood_mean_of_the_token_grid():
    config = tiny.get_config()
    model = model_lib.build_model(config.model)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    # Generic parameter values from numpy (a real init compiles for tens of seconds on CPU).
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), images, train=False))
    rng = np.random.default_rng(2)
    variables = jax.tree.map(
        lambda leaf: (0.2 * rng.normal(size=leaf.shape)).astype(np.float32), shapes
    )
    features = np.asarray(feature_memory.patch_features(model, variables, images))
    _, aux = model.apply(variables, images, train=False)
    grid = np.asarray(aux["fine_grid"])
    assert features.shape == grid.shape == (2, 4, 4, 64)
    # Corner: mean of the 2x2 tokens that exist; interior: mean of the 3x3 neighbourhood.
    np.testing.assert_allclose(features[:, 0, 0], grid[:, :2, :2].mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(features[:, 1, 2], grid[:, 0:3, 1:4].mean((1, 2)), atol=1e-5)


def test_upsample_maps_keeps_a_constant_map_and_the_size():
    maps = np.full((1, 4, 4), 2.5, np.float32)
    up = feature_memory.upsample_maps(maps, (32, 32))
    assert up.shape == (1, 32, 32)
    np.testing.assert_allclose(up, 2.5, rtol=1e-6)
