"""Reliability of training: kill -9 at any point loses no progress (resume from the last
complete checkpoint, same final parameters), runs are bit-reproducible, a NaN stops the run
naming the step and the loss term with the last good checkpoint intact, a resume falls back past
damaged newest checkpoints (kept aside), and a full disk stops the run in one line with the
earlier checkpoints intact.

The kill test runs train.py three times (reference, killed, resumed) on the tiny config with
fine-tuning only (4 steps, a checkpoint every step), on one CPU device as on a laptop (the
sharded resume is tests/test_trainer.py's); the test run's compilation cache (tests/conftest.py)
compiles their programs once.
"""

import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from tests.commands import one_device_env

pytestmark = pytest.mark.slow  # kills and resumes training runs

_REPO = pathlib.Path(__file__).resolve().parents[1]
_STEPS = 4
_OVERRIDES = (
    "--config.train.pretrain_steps=0",
    f"--config.train.finetune_steps={_STEPS}",
    "--config.train.checkpoint_every=1",
    f"--config.train.keep_checkpoints={_STEPS}",
    "--config.eval.after_training=false",
)


def _command(workdir, data_root):
    return [
        sys.executable,
        str(_REPO / "train.py"),
        "--config",
        str(_REPO / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.root={data_root}",
        *_OVERRIDES,
    ]


def _train(workdir, data_root):
    result = subprocess.run(
        _command(workdir, data_root),
        cwd=_REPO,
        env=one_device_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _finished_steps(workdir):
    folder = pathlib.Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _restore_params(workdir, step):
    import orbax.checkpoint as ocp

    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    with warnings.catch_warnings():  # no target: orbax reads the saved shardings
        warnings.simplefilter("ignore", UserWarning)
        return jax.device_get(ocp.PyTreeCheckpointer().restore(path))["params"]


def _assert_bit_identical(actual, expected):
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e and len(leaves_e) > 10
    for leaf_a, leaf_e in zip(leaves_a, leaves_e, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_e))


@pytest.fixture(scope="module")
def runs(tiny_synthetic_root, tmp_path_factory):
    """(reference workdir, killed-then-resumed workdir, kill report, resume stderr)."""
    reference = tmp_path_factory.mktemp("reference")
    _train(reference, tiny_synthetic_root)

    killed = tmp_path_factory.mktemp("killed")
    process = subprocess.Popen(
        _command(killed, tiny_synthetic_root),
        cwd=_REPO,
        env=one_device_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as checkpoint 2's save has *started* (its temporary folder or the final one
    # appears): with asynchronous saves this lands inside or right after the write.
    deadline = time.monotonic() + 500
    checkpoints = killed / "checkpoints"
    seen = []
    while time.monotonic() < deadline and process.poll() is None:
        seen = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        if any(name.split(".")[0] == "2" for name in seen):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    complete_at_kill = _finished_steps(killed)
    resumed = _train(killed, tiny_synthetic_root)
    return reference, killed, (seen, complete_at_kill), resumed.stderr


def test_killed_run_resumes_from_the_last_complete_checkpoint(runs):
    reference, killed, (seen, complete_at_kill), stderr = runs
    assert process_killed_mid_run(complete_at_kill), (seen, complete_at_kill)
    last_complete = max(complete_at_kill)
    assert f"resuming from checkpoint {last_complete}" in stderr, stderr[-3000:]
    assert _finished_steps(killed) == [1, 2, 3, 4]
    # No half-written folder is left behind or read: only finished step folders count.
    _assert_bit_identical(_restore_params(killed, _STEPS), _restore_params(reference, _STEPS))


def process_killed_mid_run(complete_at_kill) -> bool:
    """The kill landed after checkpoint 1 and before the end of the run."""
    return 1 in complete_at_kill and _STEPS not in complete_at_kill


def test_same_config_and_seed_give_bit_identical_parameters(runs):
    reference, killed, _, _ = runs
    # Checkpoint 1 of the killed run was written by its first process, from scratch: two
    # independent processes, same config and seed.
    first, second = _restore_params(reference, 1), _restore_params(killed, 1)
    _assert_bit_identical(first, second)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(first), jax.tree.leaves(_restore_params(reference, 2)), strict=True
        )
    )  # and the parameters do move between steps, so equality is not vacuous


# train.py with the iterator's third batch poisoned: its reconstruction target becomes NaN.
# The data changes, not the program, so the compiled step comes from the shared cache.
_POISONED_TRAIN = """
import runpy, sys
import jax.numpy as jnp
from m2u_jax.data import pipeline

original = pipeline.make_train_iterator

def poisoned(config, mesh, stage="finetune", start_step=0):
    batches = original(config, mesh, stage=stage, start_step=start_step)
    for step, batch in enumerate(batches, start_step + 1):
        if step == 3:
            batch = dict(batch, clean_images=jnp.full_like(batch["clean_images"], jnp.nan))
        yield batch

pipeline.make_train_iterator = poisoned
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_nan_in_a_batch_stops_naming_step_and_term_with_the_last_checkpoint_intact(
    runs, tiny_synthetic_root, tmp_path
):
    reference, _, _, _ = runs
    workdir = tmp_path / "nan_run"
    command = _command(workdir, tiny_synthetic_root)
    result = subprocess.run(
        [command[0], "-c", _POISONED_TRAIN, *command[1:]],
        cwd=_REPO,
        env=one_device_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: non-finite value in "), last
    assert "recon" in last and "seg_dice" not in last and "det_box" not in last, last
    assert "finetune step 3 (global step 3)" in last, last
    assert f"checkpoint 2 in {workdir}/checkpoints is the last good one" in last, last
    assert _finished_steps(workdir) == [1, 2]
    good = _restore_params(workdir, 2)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(good))
    # And it is the same checkpoint an unpoisoned run writes: nothing of step 3 leaked into it.
    _assert_bit_identical(good, _restore_params(reference, 2))


def _damage(workdir, step, what):
    """Damages checkpoint `step` of `workdir`: its array files cut short (a crash mid-write, a
    disk error) or its meta JSON garbled."""
    folder = pathlib.Path(workdir) / "checkpoints" / str(step)
    if what == "arrays":
        for path in (folder / "state" / "d").iterdir():
            path.write_bytes(path.read_bytes()[:100])
    else:
        (folder / "meta" / "metadata").write_text("{garbage")


def _run_train(workdir, data_root, script=None):
    command = _command(workdir, data_root)
    if script is not None:  # train.py under a patch
        command = [command[0], "-c", script, *command[1:]]
    return subprocess.run(
        command, cwd=_REPO, env=one_device_env(), capture_output=True, text=True, timeout=600
    )


def test_resume_falls_back_past_corrupt_newest_checkpoints(runs, tiny_synthetic_root, tmp_path):
    reference, _, _, _ = runs
    workdir = tmp_path / "corrupt_run"
    shutil.copytree(reference, workdir)
    _damage(workdir, 4, "arrays")
    _damage(workdir, 3, "meta")
    result = _run_train(workdir, tiny_synthetic_root)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    warnings_ = [line for line in result.stderr.splitlines() if "is unreadable" in line]
    assert len(warnings_) == 1, warnings_
    assert f"checkpoint 4 in {workdir}/checkpoints is unreadable (OUT_OF_RANGE" in warnings_[0]
    assert "and so is 3; resuming from checkpoint 2 (checkpoints 4, 3 moved to " in warnings_[0]
    assert "resuming from checkpoint 2 ({'stage': 'finetune'" in result.stderr
    # Nothing deleted: the damaged checkpoints are kept aside, and the run wrote 3 and 4 again,
    # the same as the uninterrupted run's.
    aside = workdir / "checkpoints_unreadable"
    assert sorted(path.name for path in aside.iterdir()) == ["3", "4"]
    assert (aside / "3" / "meta" / "metadata").read_text() == "{garbage"
    assert _finished_steps(workdir) == [1, 2, 3, 4]
    _assert_bit_identical(_restore_params(workdir, _STEPS), _restore_params(reference, _STEPS))


def test_resume_without_an_intact_checkpoint_stops_in_one_line(runs, tiny_synthetic_root, tmp_path):
    reference, _, _, _ = runs
    workdir = tmp_path / "all_corrupt_run"
    shutil.copytree(reference, workdir)
    for step in range(1, _STEPS + 1):
        _damage(workdir, step, "meta" if step % 2 else "arrays")
    result = _run_train(workdir, tiny_synthetic_root)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"train.py: no intact checkpoint to resume from: checkpoint 4 in {workdir}/checkpoints "
        "is unreadable (OUT_OF_RANGE"
    ), last
    assert last.endswith(
        "and so are 3, 2, 1; start afresh with a new --workdir (the damaged checkpoints are left "
        "as they are)"
    ), last
    assert _finished_steps(workdir) == [1, 2, 3, 4]  # nothing moved or deleted
    assert not (workdir / "checkpoints_unreadable").exists()


# train.py on a disk that fills up while checkpoint 3 is written: orbax's (asynchronous) write of
# its meta JSON raises ENOSPC; the array writes of that save run on, as on a full disk.
_DISK_FULL_TRAIN = """
import errno, runpy, sys
import orbax.checkpoint as ocp

handler = ocp.handlers.JsonCheckpointHandler
original = handler._save_fn

async def disk_full_at_step_3(self, item, directory):
    if item.get("stage_step") == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return await original(self, item, directory)

handler._save_fn = disk_full_at_step_3
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_disk_full_during_a_checkpoint_save_stops_in_one_line_with_earlier_ones_intact(
    runs, tiny_synthetic_root, tmp_path
):
    reference, _, _, _ = runs
    workdir = tmp_path / "disk_full_run"
    result = _run_train(workdir, tiny_synthetic_root, script=_DISK_FULL_TRAIN)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if "cannot write" in line]
    assert lines == [
        f"train.py: cannot write checkpoint 3 to {workdir}/checkpoints: No space left on device "
        "(the last complete checkpoint is 2)"
    ], result.stderr[-4000:]
    assert result.stderr.strip().splitlines()[-1] == lines[0]
    assert _finished_steps(workdir) == [1, 2]  # 3 stays a temporary folder, never a step
    _assert_bit_identical(_restore_params(workdir, 2), _restore_params(reference, 2))
