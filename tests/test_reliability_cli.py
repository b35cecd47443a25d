"""Reliability of the command-line tools under bad input: one clear line on stderr and a
non-zero exit before any heavy work (no model is built, no data is read)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.commands import one_device_env, subprocess_env
from tests.data_trees import write_defect_classes

pytestmark = pytest.mark.slow  # runs the command-line tools in subprocesses

_REPO = pathlib.Path(__file__).resolve().parents[1]
_TINY = str(_REPO / "configs" / "tiny.py")


def _run(*args, timeout=240, env=None, prefix=()):
    """(exit code, last non-empty stderr line, stderr) of `python ARGS` in the checkout. `env`:
    changes to the environment (None removes a variable); `prefix`: a command to run it under
    (`_unprivileged`)."""
    environment = subprocess_env(**(env or {}))
    result = subprocess.run(
        [*prefix, sys.executable, *args],
        cwd=_REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
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
            "train.py: bad config: model.variant='XL' is not one of ['B', 'S', 'tiny', 'tiny4']",
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


# ----------------------------------------------------------------------------- issue 18, round 2

_CONVERT = str(_REPO / "tools" / "convert_to_onnx" / "convert.py")
_INFER = str(_REPO / "tools" / "convert_to_onnx" / "infer_onnx.py")
_PREDICT = ("-m", "m2u_jax.cli.predict")


def _files(folder) -> dict:
    """Every file below `folder` with the SHA-256 of its bytes: what a failed command leaves."""
    folder = pathlib.Path(folder)
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _unprivileged(tmp_path) -> list[str]:
    """A command prefix under which file permissions hold: none for a normal user. Root passes
    every permission check, so as root the tool runs under `setpriv` without CAP_DAC_OVERRIDE
    and CAP_DAC_READ_SEARCH (still root, but file modes apply); skipped where that fails."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    probe = tmp_path / "permission_probe"
    probe.mkdir()
    probe.chmod(0o555)
    write = "import sys; open(sys.argv[1] + '/x', 'w')"
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-c", write, str(probe)], capture_output=True, text=True
        )
    except OSError:
        result = None
    finally:
        probe.chmod(0o755)
    if result is None or "PermissionError" not in result.stderr:
        pytest.skip(
            "runs as root, which ignores file permissions, and setpriv cannot drop "
            "CAP_DAC_OVERRIDE here to make them apply"
        )
    return prefix


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_synthetic_root):
    """A finished tiny run of train.py on generated data: pretraining checkpoint 2, fine-tuning
    checkpoint 4 (about a minute). Tests that could change it work on a copy."""
    workdir = tmp_path_factory.mktemp("trained_run")
    code, _, stderr = _run(
        "train.py", "--config", _TINY, "--workdir", str(workdir),
        f"--config.data.root={tiny_synthetic_root}", "--config.train.pretrain_steps=2",
        "--config.train.finetune_steps=2", "--config.train.checkpoint_every=2",
        timeout=900, env={"XLA_FLAGS": one_device_env()["XLA_FLAGS"]},  # as on a laptop
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.grad_accum_steps=0", "'train.grad_accum_steps'=0 is outside its range [1, inf)"),
        ("train.checkpoint_every=0", "'train.checkpoint_every'=0 is outside its range [1, inf)"),
        ("train.log_every=0", "'train.log_every'=0 is outside its range [1, inf)"),
        ("eval.batch_size=0", "'eval.batch_size'=0 is outside its range [1, inf)"),
        ("eval.review_budget=2", "'eval.review_budget'=2.0 is outside its range (0, 1)"),
        ("train.keep_checkpoints=0", "'train.keep_checkpoints'=0 is outside its range [1, inf)"),
        ("data.val_fraction=1.5", "'data.val_fraction'=1.5 is outside its range [0, 1)"),
        ("train.finetune_steps=-1", "'train.finetune_steps'=-1 is outside its range [0, inf)"),
    ],
)
def test_train_rejects_an_out_of_range_number_in_one_line(override, message, trained_run, tmp_path):
    # Values that passed validation and crashed later; keep_checkpoints=0 deleted every
    # checkpoint of the run it resumed. Now config.validate stops them, before anything is read.
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    before = _files(workdir)
    code, last, stderr = _run(
        "train.py", "--config", _TINY, "--workdir", str(workdir), f"--config.{override}",
        timeout=120,
    )  # fmt: skip
    assert code == 2 and last == f"train.py: bad config: config key {message}", stderr
    assert "Traceback" not in stderr
    assert _files(workdir) == before  # checkpoints and config.json untouched


_CONFIG_FILES = {
    "raises": ('def get_config():\n    raise RuntimeError("no plant")\n', "get_config() raised "
               "RuntimeError: no plant"),
    "syntax error": ("def get_config(:\n    pass\n", "syntax error on line 1: "),
    "wrong type": (
        "from m2u_jax import default_config\n\n\ndef get_config():\n"
        "    config = default_config.get_config()\n    config.train.batch_size = 'eight'\n"
        "    return config\n",
        "get_config() raised TypeError: Could not override field 'batch_size'",
    ),
    "no get_config": ("CONFIG = {}\n", "has no get_config()"),
    "not a ConfigDict": (
        "def get_config():\n    return {'train': {}}\n",
        "get_config() returned dict, not an ml_collections.ConfigDict",
    ),
    "missing": (None, None),
}  # fmt: skip


@pytest.mark.parametrize("tool", ["train.py", "convert.py"])
@pytest.mark.parametrize("kind", sorted(_CONFIG_FILES))
def test_a_config_file_that_cannot_load_is_one_line(tool, kind, tmp_path):
    body, message = _CONFIG_FILES[kind]
    path = tmp_path / "plant_config.py"
    if body is not None:
        path.write_text(body)
    output = tmp_path / "run" if tool == "train.py" else tmp_path / "model.onnx"
    if tool == "train.py":
        args = ("train.py", "--config", str(path), "--workdir", str(output))
    else:
        args = (_CONVERT, "--config", str(path), "--random-init", "--output", str(output))
    code, last, stderr = _run(*args, timeout=120)
    assert code == 2 and "Traceback" not in stderr, stderr
    prefix = f"{tool}: bad config: " if tool == "train.py" else f"{tool}: "
    if body is None:  # the file is named; convert.py keeps its --config wording
        assert last in (
            f"{prefix}config file {path} does not exist",
            f"{prefix}--config {path}: no such config file",
        ), last
    else:
        assert last.startswith(f"{prefix}config file {path}") and message in last, last
    assert not output.exists()


@pytest.mark.parametrize("tool", ["train.py", "convert.py"])
def test_a_config_setting_is_parsed_or_named(tool, tmp_path):
    # FILE:SETTING (configs/benchmark.py takes one): applied (S128_cpu: 128 px, 16 px patches,
    # so a 12 px stride is what fails), and an unknown setting is one line.
    if tool == "train.py":
        args = ("train.py", "--workdir", str(tmp_path / "run"))
        prefix = "train.py: bad config: "
    else:
        args = (_CONVERT, "--random-init", "--output", str(tmp_path / "model.onnx"))
        prefix = "convert.py: "
    spec = "configs/benchmark.py:S128_cpu"
    code, last, stderr = _run(*args, "--config", spec, "--config.model.patch_stride=12")
    assert code == 2 and last == (
        f"{prefix}data.image_size=128 at scale 1.0 is not covered exactly by patches of 16px at "
        "stride 12"
    ), stderr
    code, last, stderr = _run(*args, "--config", "configs/benchmark.py:S999")
    assert code == 2 and last.startswith(
        f"{prefix}config file configs/benchmark.py: get_config('S999') raised ValueError: "
    ), stderr
    assert "unknown setting 'S999'" in last and "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_convert_output_that_cannot_be_a_file_is_named_before_the_export(where, tmp_path):
    if where == "a folder":
        output = tmp_path / "exports"
        output.mkdir()
        (output / "model.onnx").write_text("an earlier export")
        expected = f"convert.py: --output {output} is a folder; name a file"
    else:
        (tmp_path / "notes").write_text("notes")
        output = tmp_path / "notes" / "model.onnx"
        expected = f"convert.py: --output {output}: {tmp_path / 'notes'} is a file, not a folder"
    before = _files(tmp_path)
    code, last, stderr = _run(
        _CONVERT, "--config", _TINY, "--random-init", "--output", str(output), timeout=120
    )
    assert code == 2 and last == expected, stderr
    # Found first: no export progress line before it (was found after the export).
    assert [line for line in stderr.splitlines() if line.startswith("convert.py:")] == [last]
    assert _files(tmp_path) == before


def _write_onnx(path, outputs=None) -> pathlib.Path:
    """A valid ONNX model on a [1, 32, 32, 3] image input: with `outputs` None a graph of
    another kind (one Identity output `y`), else constant outputs of those names shaped like
    the export's (a stand-in that passes the runner's checks without a trained model)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 32, 32, 3])
    if outputs is None:
        nodes = [helper.make_node("Identity", ["images"], ["y"])]
        values = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 32, 3])]
    else:
        shapes = {"anomaly_map": (1, 32, 32), "boxes": (1, 8, 4), "box_scores": (1, 8)}
        shapes.update(box_classes=(1, 8), image_score=(1,), uncertainty=(1,), num_boxes=(1,))
        nodes, values = [], []
        for name in outputs:
            dtype = np.int32 if name in ("box_classes", "num_boxes") else np.float32
            array = np.zeros(shapes[name], dtype)
            tensor = numpy_helper.from_array(array, name=f"{name}_value")
            nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            values.append(helper.make_tensor_value_info(name, tensor.data_type, array.shape))
    graph = helper.make_graph(nodes, "stand_in", [image], values)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("tool", ["infer_onnx", "m2u-predict"])
@pytest.mark.parametrize("case", ["another graph", "thresholds list", "pickled npy"])
def test_onnx_tools_name_a_foreign_model_a_list_of_thresholds_and_a_pickled_array(
    tool, case, tmp_path
):
    import numpy as np
    from PIL import Image

    from m2u_jax.export import interface

    model = _write_onnx(tmp_path / "model.onnx", interface.OUTPUT_NAMES)
    image = tmp_path / "part.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"score_threshold": 0.5, "uncertainty_threshold": 0.01}))
    if case == "another graph":  # was KeyError: 'image_score'
        model = _write_onnx(tmp_path / "other.onnx")
        expected = (
            f"{model}: not a model exported by convert.py: it lacks the output(s) anomaly_map, "
            "image_score, uncertainty, boxes, box_scores, box_classes, num_boxes (it has y)"
        )
    elif case == "thresholds list":
        thresholds.write_text("[1, 2]")
        expected = f"{thresholds}: not a JSON object of thresholds"
    else:
        image = tmp_path / "part.npy"
        np.save(image, np.array([{"score": 1}], dtype=object), allow_pickle=True)
        expected = f"{image}: not a readable .npy array (Object arrays cannot be loaded"
    previous = tmp_path / "out" / "predictions.jsonl"
    previous.parent.mkdir()
    previous.write_text('{"path": "an earlier run"}\n')
    before = _files(tmp_path / "out")
    common = ("--thresholds", str(thresholds))
    if tool == "infer_onnx":
        args = (_INFER, "--model", str(model), "--images", str(image), "--out", str(previous))
    else:
        args = (*_PREDICT, "--onnx", str(model), "--out", str(previous.parent), str(image))
    code, last, stderr = _run(*args, *common, timeout=120)
    assert code == 2 and last.startswith(f"{tool}: {expected}"), stderr
    assert "Traceback" not in stderr and stderr.count(str(expected.split(":")[0])) == 1, stderr
    assert _files(tmp_path / "out") == before  # no partial file, the earlier result kept


@pytest.mark.parametrize(
    "tool, kind", [("infer_onnx", "a folder"), ("infer_onnx", "under a file"),
                   ("m2u-predict", "a file"), ("m2u-predict", "under a file")],
)  # fmt: skip
def test_onnx_tools_name_an_out_of_the_wrong_kind_before_the_model_runs(tool, kind, tmp_path):
    from m2u_jax.export import interface

    model = _write_onnx(tmp_path / "model.onnx", interface.OUTPUT_NAMES)
    image = tmp_path / "part.png"
    image.write_bytes(b"never read: the --out check comes first")
    (tmp_path / "notes").write_text("notes")
    if kind == "a folder":
        out = tmp_path / "results"
        out.mkdir()
        expected = f"--out {out} is a folder; name the predictions file"
    elif kind == "a file":
        out = tmp_path / "notes"
        expected = f"--out {out} is a file, not a folder"
    else:
        out = tmp_path / "notes" / "results"
        expected = f"--out {out}: {tmp_path / 'notes'} is a file, not a folder"
    before = _files(tmp_path)
    if tool == "infer_onnx":
        args = (_INFER, "--model", str(model), "--images", str(image), "--out", str(out))
    else:
        args = (*_PREDICT, "--onnx", str(model), "--out", str(out), str(image))
    code, last, stderr = _run(*args, "--uncalibrated" if tool == "infer_onnx" else "--no-overlays")
    assert code == 2 and last == f"{tool}: {expected}", stderr
    assert "Traceback" not in stderr and _files(tmp_path) == before


@pytest.mark.parametrize(
    "case", ["train: new folder in a read-only one", "train: read-only", "train: unreadable",
             "eval: read-only finished run", "eval: unreadable run", "convert: read-only folder"],
)  # fmt: skip
def test_folders_without_permission_are_one_line(case, trained_run, tmp_path):
    prefix = _unprivileged(tmp_path)
    tool = case.split(":")[0]
    folder = tmp_path / "run"
    if tool == "train":
        folder.mkdir()
        workdir = folder / "new" if "new folder" in case else folder
        args = ("train.py", "--config", _TINY, "--workdir", str(workdir))
        mode = 0o333 if "unreadable" in case else 0o555
        if "unreadable" in case:
            expected = f"train.py: bad config: --workdir {workdir}: cannot read {folder} ("
        else:
            expected = f"train.py: bad config: --workdir {workdir}: cannot write in {folder} ("
    elif tool == "eval":  # eval.py writes DIR/eval
        shutil.copytree(trained_run, folder)
        args = ("eval.py", "--workdir", str(folder))
        mode = 0o000 if "unreadable" in case else 0o555
        if "unreadable" in case:
            expected = f"eval.py: --workdir {folder}: cannot read it ("
        else:
            expected = f"eval.py: evaluation folder {folder / 'eval'}: cannot write in {folder} ("
    else:
        folder.mkdir()
        output = folder / "model.onnx"
        args = (_CONVERT, "--config", _TINY, "--random-init", "--output", str(output))
        mode = 0o555
        expected = f"convert.py: --output {output}: cannot write in {folder} ("
    before = _files(folder)
    folder.chmod(mode)  # the folder itself: what the tool writes in or lists
    try:
        code, last, stderr = _run(*args, prefix=prefix, timeout=120)
    finally:
        folder.chmod(0o755)
    assert code == 2 and last.startswith(expected) and "Permission denied" in last, stderr
    assert "Traceback" not in stderr and _files(folder) == before


@pytest.mark.parametrize(
    "case", ["eval: missing step", "eval: pretraining-only run", "convert: pretraining-only run",
             "eval: more classes in the data"],
)  # fmt: skip
def test_eval_names_a_missing_step_a_pretraining_only_run_and_a_class_mismatch(
    case, trained_run, tmp_path
):
    workdir = trained_run
    extra: tuple = ()
    if case == "eval: missing step":
        extra = ("--step", "7")
        expected = f"eval.py: checkpoint step 7 is not in {workdir}/checkpoints (have [2, 4])"
    elif case.endswith("pretraining-only run"):  # the run as train.finetune_steps=0 leaves it
        workdir = tmp_path / "pretrained"
        shutil.copytree(trained_run, workdir)
        shutil.rmtree(workdir / "checkpoints" / "4")
        tool = case.split(":")[0] + ".py"
        expected = (
            f"{tool}: {workdir}/checkpoints has no finetune checkpoint (steps [2]); evaluation "
            "and export need a fine-tuned run (train.finetune_steps > 0)"
        )
    else:  # the run has 4 defect classes, this data 5
        root = tmp_path / "plates"
        write_defect_classes(root, ("crack", "hole", "pit", "scratch", "stain"))
        extra = (
            "--config.data.format=mask_folder", f"--config.data.root={root}",
            "--config.data.protocol=supervised",
        )  # fmt: skip
        expected = (
            f"eval.py: bad config: model.num_defect_classes=4 but the data in {root} has 5 "
            "defect classes (crack, hole, pit, scratch, stain) under the supervised protocol"
        )
    before = _files(workdir)
    if case.startswith("convert"):
        output = tmp_path / "model.onnx"
        args = (_CONVERT, "--workdir", str(workdir), "--output", str(output))
    else:
        args = ("eval.py", "--workdir", str(workdir), *extra)
    code, last, stderr = _run(*args, timeout=180)
    assert code == 2 and last.startswith(expected), stderr
    assert "Traceback" not in stderr and _files(workdir) == before  # no eval/ written


def test_a_truncated_png_met_in_training_is_one_line_without_tensorflow_tracebacks(tmp_path):
    # The header is sound, so discovery keeps the file and the tf.data pipeline meets it. TF
    # logged two Python tracebacks (~80 lines) before train.py's line, and the exit could hang
    # releasing the failed pipeline. TF_CPP_MIN_LOG_LEVEL is left unset, as a user runs it.
    from m2u_jax.data import synthetic

    root = tmp_path / "data"
    synthetic.generate(
        root, categories="fabric", image_size=32, num_train=8, num_test_good=2, num_test_defect=1
    )
    good = root / "fabric" / "train" / "good"
    full = (good / "000.png").read_bytes()
    bad = good / "100.png"
    bad.write_bytes(full[: len(full) // 2])
    code, last, stderr = _run(
        "train.py", "--config", _TINY, "--workdir", str(tmp_path / "run"),
        f"--config.data.root={root}", "--config.train.pretrain_steps=0",
        "--config.train.finetune_steps=2", env={"TF_CPP_MIN_LOG_LEVEL": None}, timeout=300,
    )  # fmt: skip
    assert code == 2 and last.startswith(
        f"train.py: bad data: {bad}: truncated or corrupt image"
    ), stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count(str(bad)) == 1, stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints"
    )
