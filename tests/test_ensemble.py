"""Deep ensembles (`eval.ensemble_workdirs`): evaluation, export and the JAX predictor take the
uncertainty from E runs of one architecture instead of MC dropout, with the same statistics."""

import json
import os

import jax
import numpy as np
import onnx
import pytest

from configs import tiny
from m2u_jax import model as model_lib
from m2u_jax import predictions as predictions_lib
from m2u_jax import run_checkpoint, uncertainty
from m2u_jax.export import graph as export_graph
from m2u_jax.export import interface
from tests.runs import tiny_run_config


def _params(config, seed):
    model = model_lib.build_model(config.model)
    return jax.jit(lambda key: model_lib.init_params(model, config, key))(jax.random.PRNGKey(seed))


def test_exported_ensemble_equals_ensemble_predict():
    config = tiny.get_config()
    first, second = _params(config, 0), _params(config, 1)
    model, first_export = export_graph.build_export_model(config.model, first)
    second_export = export_graph.prepare_params(second)
    images = jax.random.uniform(jax.random.PRNGKey(2), (3, 32, 32, 3))
    outputs = jax.jit(export_graph.make_inference_fn(model, first_export, members=[second_export]))(
        images
    )
    named = dict(zip(interface.OUTPUT_NAMES, outputs))
    stats = uncertainty.ensemble_predict(
        model, uncertainty.stack_members([first_export, second_export]), images
    )
    np.testing.assert_allclose(named["image_score"], stats["score_mean"], atol=1e-6)
    np.testing.assert_allclose(named["uncertainty"], stats["score_var"], atol=1e-7)
    np.testing.assert_allclose(named["anomaly_map"], stats["map_mean"], atol=1e-6)
    assert np.all(named["uncertainty"] > 1e-9)  # two inits really disagree
    # The boxes are the first member's: those of its plain T = 1 graph.
    alone = jax.jit(export_graph.make_inference_fn(model, first_export))(images)
    np.testing.assert_array_equal(named["boxes"], alone[3])
    with pytest.raises(ValueError, match="--mc-samples 4 with a deep ensemble"):
        export_graph.make_inference_fn(model, first_export, num_mc_samples=4, members=[first])


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_eval_root):
    """Two tiny runs (seeds 0 and 1); the first names the second in eval.ensemble_workdirs and
    is evaluated with it."""
    from m2u_jax import evaluate, trainer

    configs, workdirs = [], []
    for seed in (1, 0):  # the member first: the main run's config.json names it
        config = tiny_run_config(tiny_eval_root, seed=seed)
        if workdirs:
            config.eval.ensemble_workdirs = workdirs[0]
        workdir = str(tmp_path_factory.mktemp(f"ensemble_run_{seed}"))
        trainer.train(config, workdir)
        configs.append(config)
        workdirs.append(workdir)
    metrics = evaluate.evaluate(configs[1], workdirs[1], with_speed=False)
    return {"config": configs[1], "main": workdirs[1], "member": workdirs[0], "metrics": metrics}


def _deterministic_scores(config, workdir):
    params, _ = run_checkpoint.restore_params(config, workdir)
    model = model_lib.build_model(config.model)

    def predict(images, batch_index):
        del batch_index
        return predictions_lib.to_host(
            {"image_score": model_lib.predict(model, {"params": params}, images)["image_score"]}
        )

    return predictions_lib.collect_split(config, "test", predict, keep_maps=False)["image_score"]


@pytest.mark.slow
def test_evaluation_takes_the_uncertainty_from_the_members(two_runs):
    config, main = two_runs["config"], two_runs["main"]
    thresholds = json.load(open(os.path.join(main, "eval", "thresholds.json")))
    assert thresholds["ensemble_members"] == 2 and thresholds["num_mc_samples"] == 1
    scores = np.stack(
        [_deterministic_scores(config, main), _deterministic_scores(config, two_runs["member"])]
    )
    with np.load(os.path.join(main, "eval", "predictions.npz")) as saved:
        np.testing.assert_allclose(saved["test/score_mean"], scores.mean(0), atol=1e-6)
        np.testing.assert_allclose(saved["test/score_var"], scores.var(0), atol=1e-7)
        np.testing.assert_allclose(saved["test/image_score"], scores[0], atol=1e-6)
    assert scores.var(0).max() > 1e-9  # the two seeds disagree


@pytest.mark.slow
def test_export_and_predictors_carry_the_ensemble(two_runs, tmp_path, capsys):
    from m2u_jax.cli import export as export_cli
    from m2u_jax.predictor import Predictor

    output = str(tmp_path / "ensemble.onnx")
    code = export_cli.main(["--workdir", two_runs["main"], "--output", output, "--batch", "2"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    assert "WARNING" not in stderr  # the export matches the calibration (E = 2, T = 1)
    metadata = {entry.key: entry.value for entry in onnx.load(output).metadata_props}
    assert metadata["m2u.ensemble_members"] == "2" and metadata["m2u.mc_samples"] == "1"
    assert json.load(open(output + ".parity.json"))["passed"]
    # Three images through both backends: the static batch of 2 runs as 2 + (1 padded).
    images = list(np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (3, 32, 32, 3))))
    on_jax = Predictor.from_workdir(two_runs["main"]).predict(images)
    on_onnx = Predictor.from_onnx(output).predict(images, batch_size=3)
    assert all(result.uncertainty > 1e-9 for result in on_jax)
    for jax_result, onnx_result in zip(on_jax, on_onnx, strict=True):
        np.testing.assert_allclose(onnx_result.image_score, jax_result.image_score, atol=1e-5)
        np.testing.assert_allclose(onnx_result.uncertainty, jax_result.uncertainty, atol=1e-6)
        assert onnx_result.decision == jax_result.decision
