"""The path a plant engineer walks, as commands: train with overrides, then evaluate, export and
predict from the run directory alone (no override repeated)."""

import json
import pathlib
import subprocess
import sys

import onnx
import pytest

from tests.commands import one_device_env

pytestmark = pytest.mark.slow  # trains, evaluates and exports in subprocesses

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    result = subprocess.run(
        [sys.executable, *args],
        cwd=_REPO,
        env=one_device_env(),  # a laptop's one CPU device
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_with_overrides_then_eval_export_predict_from_the_run(tiny_synthetic_root, tmp_path):
    run = tmp_path / "run"
    _run(
        "train.py", "--config", "configs/tiny.py", "--workdir", str(run),
        f"--config.data.root={tiny_synthetic_root}", "--config.data.image_size=48",
        "--config.train.pretrain_steps=0", "--config.train.finetune_steps=2",
        "--config.eval.after_training=true", "--config.eval.num_mc_samples=2",
    )  # fmt: skip
    thresholds = json.loads((run / "eval" / "thresholds.json").read_text())
    assert thresholds["num_mc_samples"] == 2 and thresholds["class_names"] == ["defect"]

    # Re-evaluate: the run's config (48 px, its data root) comes from DIR/config.json.
    (run / "eval" / "metrics.json").unlink()
    _run("eval.py", "--workdir", str(run))
    assert json.loads((run / "eval" / "metrics.json").read_text())["image"]["auroc"] is not None

    # Export: the model is 48 px and carries the calibrated thresholds, no flag repeated.
    model_path = run / "model.onnx"
    _run(
        "tools/convert_to_onnx/convert.py", "--workdir", str(run), "--output", str(model_path),
        "--dynamic-batch", "--mc-samples", "2",
    )  # fmt: skip
    exported = onnx.load(str(model_path))
    metadata = {prop.key: prop.value for prop in exported.metadata_props}
    assert metadata["m2u.image_size"] == "48"
    assert float(metadata["m2u.score_threshold"]) == pytest.approx(thresholds["score_threshold"])

    # Predict on a folder with both backends: the same decisions.
    images = pathlib.Path(tiny_synthetic_root) / "fabric" / "test"
    decisions = {}
    for name, source in (("jax", ["--workdir", str(run)]), ("onnx", ["--onnx", str(model_path)])):
        out = tmp_path / f"predict_{name}"
        result = _run("-m", "m2u_jax.cli.predict", *source, "--out", str(out), str(images))
        lines = (out / "predictions.jsonl").read_text().splitlines()
        decisions[name] = [json.loads(line)["decision"] for line in lines]
        assert f"{len(lines)} image(s):" in result.stdout
    assert len(decisions["jax"]) == 6 and decisions["jax"] == decisions["onnx"]

    # A deployment: a fresh environment with the package and its [deploy] extra only (numpy,
    # Pillow, onnxruntime; no JAX, SciPy or onnx) runs m2u-predict on the exported model.
    # The environment gets no pip of its own (ensurepip is a third of the setup time): this
    # process's pip installs into it with --python, as `pip` would from inside it.
    venv = tmp_path / "deploy_env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300
    )
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         f"{_REPO}[deploy]"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import jax"], capture_output=True, timeout=60
    )
    assert probe.returncode != 0  # JAX is not there
    out = tmp_path / "predict_deploy"
    result = subprocess.run(
        [str(venv / "bin" / "m2u-predict"), "--onnx", str(model_path), "--out", str(out),
         str(images)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["decision"] for line in lines] == decisions["onnx"]
