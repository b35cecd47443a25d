"""Tests of tools/scorer_study.py: the fusion rule by hand, then the whole study on a tiny
trained run with a detail stem (its own module, so the test runs beside tests/test_studies.py)."""

import jax
import numpy as np
import pytest

from configs import tiny
from m2u_jax import model as model_lib
from m2u_jax import predictor
from tests.runs import tiny_run_config
from tools import scorer_study


def test_standardise_uses_the_reference_pixels():
    reference = np.array([[1.0, 3.0], [1.0, 3.0]])  # mean 2, std 1
    maps = np.array([[[2.0, 4.0], [0.0, 2.0]]])
    np.testing.assert_allclose(scorer_study.standardise(maps, reference), [[[0, 2], [-2, 0]]])


def test_gaussian_distances_by_hand():
    # Mean 0; variances (ddof 1) 2/3 and 8/3, no covariance.
    normal = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    queries = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(
        scorer_study.gaussian_distances(normal, queries, shrinkage=0.0), [1.5, 1.5, 3.0, 0.0]
    )
    # Half-way to the mean variance 5/3: variances 7/6 and 13/6.
    np.testing.assert_allclose(
        scorer_study.gaussian_distances(normal, queries, shrinkage=0.5),
        [6 / 7, 4 * 6 / 13, 6 / 7 + 24 / 13, 0.0],
    )
    # A degenerate direction (all normal points on a line) stays finite with shrinkage.
    line = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    distances = scorer_study.gaussian_distances(line, np.array([[1.0, 1.0]]), shrinkage=0.1)
    np.testing.assert_allclose(distances, [1.0 / (0.1 * 0.5)])


def test_tiled_maps_are_the_tiles_maps_stitched():
    config = tiny.get_config()
    model = model_lib.build_model(config.model)
    variables = {"params": model_lib.init_params(model, config, jax.random.PRNGKey(0))}
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)

    def head(crops):
        return np.asarray(model_lib.predict(model, variables, crops)["anomaly_map"])

    # One tile of the whole image: the model's own map.
    whole = scorer_study.tiled_anomaly_maps(model, variables, images, 32)
    np.testing.assert_allclose(whole, head(images), atol=1e-6)
    # 16-px tiles at overlap 0.25: origins 0, 8, 16 per axis (stride 12, spread evenly).
    assert predictor.tile_origins(32, 16, predictor.TILE_OVERLAP) == [0, 8, 16]
    tiled = scorer_study.tiled_anomaly_maps(model, variables, images, 16)
    assert tiled.shape == (2, 32, 32)
    first, last = head(images[:, :16, :16]), head(images[:, 16:, 16:])
    # Pixels only one tile covers are that tile's map.
    np.testing.assert_allclose(tiled[:, :8, :8], first[:, :8, :8], atol=1e-6)
    np.testing.assert_allclose(tiled[:, 24:, 24:], last[:, 8:, 8:], atol=1e-6)
    # Pixel (12, 12): the tiles at (0, 0), (0, 8), (8, 0), (8, 8) cover it, weighted by the
    # blend window at the pixel's place in each (ramps over 4 px: 0.5/4 ... 1 in the middle).
    ramp = np.minimum(np.minimum(np.arange(16), np.arange(16)[::-1]) + 0.5, 4) / 4
    total = weight = 0.0
    for top in (0, 8):
        for left in (0, 8):
            values = head(images[:, top : top + 16, left : left + 16])[:, 12 - top, 12 - left]
            w = ramp[12 - top] * ramp[12 - left]
            total, weight = total + w * values, weight + w
    np.testing.assert_allclose(tiled[:, 12, 12], total / weight, rtol=1e-5)


@pytest.mark.slow  # trains a run
def test_scorer_study_on_tiny(tiny_synthetic_root, tmp_path):
    from m2u_jax import evaluate, trainer

    config = tiny_run_config(tiny_synthetic_root)
    config.model.detail_channels = 8
    config.model.pixel_head_recon = True
    config.eval.feature_memory_size = 64
    config.eval.num_mc_samples = 1
    config.data.train_crop = 16  # trained on 16-px crops: the tiled row appears
    workdir = str(tmp_path / "scorers")
    trainer.train(config, workdir)
    evaluated = evaluate.evaluate(config, workdir, with_speed=False)
    step, results = scorer_study.run_study(config, workdir)
    assert step == 2
    expected = {
        "pixel head",
        "pixel head, tiled",
        "pixel head, 4 flips",
        "reconstruction error",
        "memory: tokens",
        "memory: tokens + detail",
        "memory: detail",
    } | {" + ".join(parts) for parts in scorer_study.FUSIONS}
    image_only = set(scorer_study.GAUSSIAN_SETS)
    image_only |= {f"pixel head + {name}" for name in scorer_study.GAUSSIAN_SETS}
    expected |= image_only
    assert set(results) == expected
    # The pixel head's maps are evaluation's: same pixel AUROC and AUPRO (the study runs the
    # trunk and the tail as two calls, equal to the whole forward within float rounding).
    pixel = results["pixel head"]
    assert pixel["pixel_auroc"] == pytest.approx(evaluated["pixel"]["auroc"], abs=1e-5)
    assert pixel["aupro"] == pytest.approx(evaluated["pixel"]["aupro"], abs=1e-5)
    # The flips row is what evaluation reports under model.test_time_flips=4.
    config.model.test_time_flips = 4
    flipped = evaluate.evaluate(config, workdir, with_speed=False)
    flips = results["pixel head, 4 flips"]
    assert flips["pixel_auroc"] == pytest.approx(flipped["pixel"]["auroc"], abs=1e-5)
    assert flips["aupro"] == pytest.approx(flipped["pixel"]["aupro"], abs=1e-5)
    assert flips["pixel_auroc"] != pytest.approx(pixel["pixel_auroc"], abs=1e-6)
    for name, row in results.items():
        if name in image_only:  # no map: image AUROC only
            assert row["pixel_auroc"] is None and row["aupro"] is None
            assert 0.0 <= row["image_auroc"] <= 1.0
            continue
        for value in row.values():
            assert 0.0 <= value <= 1.0
    text = scorer_study.markdown(step, workdir, results)
    assert text.count("\n| ") == len(expected) + 1  # header + one row per scorer
