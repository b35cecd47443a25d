"""Tests of tools/scorer_study.py: the fusion rule by hand, then the whole study on a tiny
trained run with a detail stem (its own module, so the test runs beside tests/test_studies.py)."""

import numpy as np
import pytest

from tests.runs import tiny_run_config
from tools import scorer_study


def test_standardise_uses_the_reference_pixels():
    reference = np.array([[1.0, 3.0], [1.0, 3.0]])  # mean 2, std 1
    maps = np.array([[[2.0, 4.0], [0.0, 2.0]]])
    np.testing.assert_allclose(scorer_study.standardise(maps, reference), [[[0, 2], [-2, 0]]])


@pytest.mark.slow  # trains a run
def test_scorer_study_on_tiny(tiny_synthetic_root, tmp_path):
    from m2u_jax import evaluate, trainer

    config = tiny_run_config(tiny_synthetic_root)
    config.model.detail_channels = 8
    config.model.pixel_head_recon = True
    config.eval.feature_memory_size = 64
    config.eval.num_mc_samples = 1
    workdir = str(tmp_path / "scorers")
    trainer.train(config, workdir)
    evaluated = evaluate.evaluate(config, workdir, with_speed=False)
    step, results = scorer_study.run_study(config, workdir)
    assert step == 2
    expected = {
        "pixel head",
        "reconstruction error",
        "memory: tokens",
        "memory: tokens + detail",
        "memory: detail",
    } | {" + ".join(parts) for parts in scorer_study.FUSIONS}
    assert set(results) == expected
    # The pixel head's maps are evaluation's: same pixel AUROC and AUPRO (the study runs the
    # trunk and the tail as two calls, equal to the whole forward within float rounding).
    pixel = results["pixel head"]
    assert pixel["pixel_auroc"] == pytest.approx(evaluated["pixel"]["auroc"], abs=1e-5)
    assert pixel["aupro"] == pytest.approx(evaluated["pixel"]["aupro"], abs=1e-5)
    for row in results.values():
        for value in row.values():
            assert 0.0 <= value <= 1.0
    text = scorer_study.markdown(step, workdir, results)
    assert text.count("\n| ") == len(expected) + 1  # header + one row per scorer
