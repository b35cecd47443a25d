"""Reliability of the command-line tools under bad input: one clear line on stderr and a
non-zero exit before any heavy work (no model is built, no data is read)."""

import os
import pathlib
import subprocess
import sys

import pytest

from tests.data_trees import write_defect_classes

pytestmark = pytest.mark.slow  # runs the command-line tools in subprocesses

_REPO = pathlib.Path(__file__).resolve().parents[1]
_TINY = str(_REPO / "configs" / "tiny.py")


def _run(*args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, *args], cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.returncode, lines[-1] if lines else "", result.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "--config.train.foo=1",
            "train.py: bad config override in --config.train.foo=1: no config key 'foo'",
        ),
        ("--config.train.batch_size=abc", None),
        (
            "--config.data.image_size=36",
            "train.py: bad config: data.image_size=36 at scale 1.0 is not covered exactly by "
            "patches of 8px at stride 8",
        ),
        (
            "--config.data.modalities=rgb,sonar",
            "train.py: bad config: data.modalities has unknown modality 'sonar'",
        ),
        # Keys only the builders know, checked before the data is read (data.root is bad too).
        (
            "--config.train.pretrain_method=byol",
            "train.py: bad config: train.pretrain_method='byol': use one of ('simclr', 'mocov3')",
        ),
        (
            "--config.model.variant=XL",
            "train.py: bad config: model.variant='XL' is not one of ['B', 'S', 'tiny']",
        ),
        (
            "--config.train.mesh_fsdp=3",
            "train.py: bad config: train.mesh_fsdp=3 must be a positive divisor of the 8 devices",
        ),
    ],
)
def test_train_rejects_a_bad_config_in_one_line(override, expected, tmp_path):
    code, last, stderr = _run(
        "train.py", "--config", _TINY, "--workdir", str(tmp_path), override,
        "--config.data.root=/nonexistent", timeout=120,
    )  # fmt: skip
    assert code != 0, stderr
    if expected is None:  # absl's own flag errors: name the flag, no traceback
        key = override.split("=")[0].removeprefix("--")
        assert "Traceback" not in stderr, stderr
        assert key.split(".")[-1] in last or key in stderr, stderr
    else:
        assert code == 2 and last.startswith(expected), last
        assert "Traceback" not in stderr, stderr
    assert not (tmp_path / "checkpoints").exists()


def test_train_rejects_a_batch_the_devices_cannot_split(tmp_path):
    # 8 fake devices; 12 is divisible by grad_accum_steps (1) but not by 8.
    code, last, stderr = _run(
        "train.py",
        "--config",
        _TINY,
        "--workdir",
        str(tmp_path),
        "--config.train.batch_size=12",
        "--config.data.root=/nonexistent",
    )
    assert code == 2, stderr
    assert last == (
        "train.py: bad config: train.batch_size=12 is not divisible by the 8 devices; "
        "pick a multiple of 8"
    ), stderr


def test_eval_without_checkpoints_says_train_first(tmp_path, tiny_synthetic_root):
    code, last, stderr = _run(
        "eval.py",
        "--config",
        _TINY,
        "--workdir",
        str(tmp_path),
        f"--config.data.root={tiny_synthetic_root}",
    )
    assert code != 0, stderr
    assert last.startswith("eval.py: ") and "checkpoints" in last and "train first" in last, last
    assert "Traceback" not in stderr, stderr


def test_eval_of_a_folder_that_is_no_run_names_it(tmp_path):
    code, last, stderr = _run("eval.py", "--workdir", str(tmp_path))
    assert code == 2, stderr
    assert last == (
        f"eval.py: {tmp_path}/config.json not found: pass the run directory of train.py as "
        "--workdir, or a config file as --config"
    ), stderr


def test_export_without_checkpoints_exits_2(tmp_path):
    code, last, stderr = _run(
        str(_REPO / "tools" / "convert_to_onnx" / "convert.py"),
        "--config",
        _TINY,
        "--workdir",
        str(tmp_path),
        "--output",
        str(tmp_path / "model.onnx"),
    )
    assert code == 2, stderr
    assert last.startswith("convert.py: ") and str(tmp_path) in last, last
    assert "checkpoint" in last and not (tmp_path / "model.onnx").exists()


def test_train_rejects_fewer_model_classes_than_the_data_in_one_line(tmp_path):
    # The real-data failure: 5 defect kinds under model.num_defect_classes=4 used to train and
    # stop at fine-tune step 1 with "non-finite value in cls"; now it stops before training.
    root = tmp_path / "plates"
    write_defect_classes(root, ("crack", "hole", "pit", "scratch", "stain"))
    workdir = tmp_path / "run"
    code, last, stderr = _run(
        "train.py",
        "--config",
        _TINY,
        "--workdir",
        str(workdir),
        "--config.data.format=mask_folder",
        f"--config.data.root={root}",
        "--config.data.protocol=supervised",
        "--config.model.num_defect_classes=4",
    )
    assert code == 2, stderr
    assert last == (
        f"train.py: bad config: model.num_defect_classes=4 but the data in {root} has 5 defect "
        "classes (crack, hole, pit, scratch, stain) under the supervised protocol: set "
        "--config.model.num_defect_classes=5 or 0 (from the data)"
    ), stderr
    assert "Traceback" not in stderr, stderr
    assert not workdir.exists()


def test_train_into_a_workdir_that_is_a_file_names_it(tmp_path):
    target = tmp_path / "run"
    target.write_text("notes")
    code, last, stderr = _run("train.py", "--config", _TINY, "--workdir", str(target))
    assert code == 2 and last == f"train.py: bad config: --workdir {target} is a file, not a folder"
    assert target.read_text() == "notes"  # nothing lost
