"""Run checkpoints: an orbax CheckpointManager over `WORKDIR/checkpoints`.

Each checkpoint (named by the *global* step: pretraining steps count first, fine-tuning steps
continue after them, so the numbering is monotonic across stages) holds two items:

- `state`: the `TrainState` pytree (params, opt state, EMA params, rng, metric accumulators),
  saved and restored sharded (every process writes/reads its own shards);
- `meta`: JSON `{'stage': 'pretrain'|'finetune', 'stage_step', 'global_step',
  'pretrain_method', 'train_seconds'}` (training wall time up to this checkpoint), read
  first so the caller can build the right abstract state (the two stages have different trees)
  before restoring `state`.

Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the write
to disk proceeds in the background (so the donated state can be reused at once). A write that
fails (disk full, ...) raises CheckpointWriteError wherever it surfaces; a resume
(`resume_meta`) passes over damaged newest checkpoints, keeping them aside.

`restore_params` is the one way from a run directory to parameters (evaluation, export,
prediction, benchmarks): a params-only partial restore that never builds an optimizer.
"""

from __future__ import annotations

import contextlib
import json
import logging as python_logging
import os
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from m2u_jax import config as config_lib
from m2u_jax import contrastive
from m2u_jax import model as model_lib

_STATE = "state"
_META = "meta"
# Error texts of tensorstore / orbax when checkpoint files are damaged or missing (not when the
# shapes differ from the config).
_UNREADABLE_MARKS = ("OUT_OF_RANGE", "DATA_LOSS", "Error reading", "Error opening", "NOT_FOUND")
# Error texts of tensorstore when a checkpoint cannot be written (Python's own raise OSError).
_UNWRITABLE_MARKS = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Error writing",
)


class UnreadableCheckpointError(ValueError):
    """No intact checkpoint to resume from; the message names the folder and the bad steps."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, ...); the message names the step, the
    folder, the problem and the last complete checkpoint, which is left intact."""


class _BadMeta(ValueError):
    """A checkpoint's `meta` JSON that parses but does not describe a checkpoint."""


def unreadable_problem(error: BaseException) -> str | None:
    """The first line of `error` (at most 200 characters) when it says that checkpoint files
    are damaged or missing; None for other errors (e.g. shapes that differ from the config)."""
    text = str(error).strip()
    if not (
        isinstance(error, (json.JSONDecodeError, FileNotFoundError, _BadMeta))
        or any(mark in text for mark in _UNREADABLE_MARKS)
    ):
        return None
    return (text.splitlines()[0] if text else repr(error))[:200]


def _is_late_read_callback(error: BaseException | None, trace) -> bool:
    """Whether `error` (raised along `trace`) is tensorstore failing to hand a finished read to a
    closed asyncio loop: asyncio's `call_soon_threadsafe` raising 'Event loop is closed'."""
    return (
        isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"
        and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(trace))
    )


def _drop_late_read_callbacks() -> None:
    """Call before reading checkpoint files that may be damaged. Orbax runs a read in `asyncio.run`,
    which closes its loop at the first error while tensorstore's other reads are still in
    flight; those end later on tensorstore's threads and cannot deliver their (already useless)
    results to the closed loop. Tensorstore's C++ reports that through `PyErr_WriteUnraisable`
    (`sys.unraisablehook`, whose default prints a bare traceback; the path CI hit with only the
    `sys.excepthook` filter in place) or `PyErr_Print` (`sys.excepthook`), after the caller has
    handled the failure, or even before: on a loaded machine one arrived while the error was
    still on its way to the caller. From now on this process drops exactly those reports
    (`_is_late_read_callback`) in both hooks; every other exception reaches the previous hook.
    Idempotent."""
    previous_excepthook = sys.excepthook
    if not getattr(previous_excepthook, "drops_late_read_callbacks", False):

        def excepthook(kind, error, trace):
            if not _is_late_read_callback(error, trace):
                previous_excepthook(kind, error, trace)

        excepthook.drops_late_read_callbacks = True
        sys.excepthook = excepthook

    previous_unraisablehook = sys.unraisablehook
    if not getattr(previous_unraisablehook, "drops_late_read_callbacks", False):

        def unraisablehook(unraisable):
            if not _is_late_read_callback(unraisable.exc_value, unraisable.exc_traceback):
                previous_unraisablehook(unraisable)

        unraisablehook.drops_late_read_callbacks = True
        sys.unraisablehook = unraisablehook


def _write_problem(error: BaseException) -> str | None:
    """What `error` says went wrong writing a checkpoint (`No space left on device`); None when
    it is not a write failure."""
    if isinstance(error, OSError):
        return error.strerror or str(error) or repr(error)
    text = str(error).strip()
    if any(mark in text for mark in _UNWRITABLE_MARKS):
        return text.splitlines()[0][:200]
    return None


class _DropOrbaxInfo:
    """absl-logger filter: orbax logs a dozen INFO lines per checkpoint; keep its warnings, but
    not its error logs (with tracebacks) of a failed write: `_Manager` raises that failure as
    one CheckpointWriteError."""

    def filter(self, record) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if record.exc_info and _write_problem(record.exc_info[1]) is not None:
            return False
        return record.levelno >= python_logging.WARNING


def quiet_orbax() -> None:
    """Drops orbax's INFO lines from the absl log (idempotent)."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(existing, _DropOrbaxInfo) for existing in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxInfo())


def _let_orbax_writers_end(timeout: float = 60.0) -> None:
    """After a failed save: waits (at most `timeout` seconds) for orbax's other writer threads of
    that save, which fail or finish into its temporary folder (never renamed to a step), rather
    than be cut off with errors at interpreter exit."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith(
            "orbax."
        ):
            # Thread.join itself: orbax's join re-raises the thread's error.
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


class _Manager(ocp.CheckpointManager):
    """A CheckpointManager whose write failures (disk full, ...) raise CheckpointWriteError
    naming the step, wherever the asynchronous save surfaces them: in `save` itself, in the next
    `save`, in `wait_until_finished` or in `close`. A failed step never becomes a step folder
    (orbax writes into a temporary one), and the older checkpoints stay: orbax deletes the ones
    past `max_to_keep` only after a save succeeded."""

    _writing: int | None = None  # the step of the latest save started

    @contextlib.contextmanager
    def _naming_write_errors(self, step: int | None):
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as error:
            problem = _write_problem(error)
            if problem is None:
                raise
            _let_orbax_writers_end()
            directory = str(self.directory)
            complete = [
                int(name) for name in os.listdir(directory) if name.isdigit() and int(name) != step
            ]
            raise CheckpointWriteError(
                f"cannot write checkpoint {step} to {directory}: {problem} ("
                + (
                    f"the last complete checkpoint is {max(complete)})"
                    if complete
                    else "no checkpoint was completed)"
                )
            ) from error

    def save(self, step: int, *args, **kwargs) -> bool:
        # A failure of the save in flight surfaces first, from the `wait_until_finished` that
        # orbax's save begins with (so it is named with its own step).
        with self._naming_write_errors(step):
            saved = super().save(step, *args, **kwargs)
        self._writing = step
        return saved

    def wait_until_finished(self) -> None:
        with self._naming_write_errors(self._writing):
            super().wait_until_finished()

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:  # orbax raises a failed save once: this second wait just closes the rest
            super().close()


def make_manager(
    workdir: str, keep: int, async_save: bool = True, subdir: str = "checkpoints"
) -> ocp.CheckpointManager:
    """CheckpointManager of `workdir/subdir` keeping the newest `keep` checkpoints (`subdir`
    'best': the params that validated best, see `save_best`). A save that cannot write (disk
    full, ...) raises CheckpointWriteError (see `_Manager`)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    return _Manager(
        os.path.join(os.path.abspath(workdir), subdir),
        options=options,
        item_names=(_STATE, _META),
    )


def save(manager: ocp.CheckpointManager, global_step: int, state, meta: dict) -> None:
    """Starts an (async) save of `state` and `meta` as checkpoint `global_step`."""
    manager.save(
        global_step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
        ),
        force=True,
    )


def latest_meta(manager: ocp.CheckpointManager) -> dict | None:
    """`meta` of the newest checkpoint (with `global_step`), or None when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    meta = dict(restored[_META])
    meta["global_step"] = step
    return meta


def all_metas(manager: ocp.CheckpointManager, unreadable: dict | None = None) -> list[dict]:
    """`meta` of every kept checkpoint (with `global_step`), oldest first. A checkpoint whose
    meta is damaged is left out: into `unreadable` ({step: problem}) when given, else named in
    a warning."""
    metas, bad = [], {}
    for step in sorted(manager.all_steps()):
        try:
            metas.append(_read_meta(manager, step))
        except Exception as error:  # orbax / json raise many types for one cause
            problem = unreadable_problem(error)
            if problem is None:
                raise
            bad[step] = problem
    if unreadable is not None:
        unreadable.update(bad)
    elif bad:
        logging.warning(
            "%s: left out checkpoint(s) with a damaged meta: %s",
            manager.directory,
            "; ".join(f"{step} ({problem})" for step, problem in bad.items()),
        )
    return metas


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """`meta` of checkpoint `step` (with `global_step`); raises `_BadMeta` when the JSON is not
    a checkpoint's description."""
    restored = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    meta = restored[_META]
    if not (
        isinstance(meta, dict)
        and meta.get("stage") in config_lib.STAGES
        and isinstance(meta.get("stage_step"), int)
    ):
        raise _BadMeta(f"meta is not a checkpoint description: {str(meta)[:80]}")
    return {**meta, "global_step": step}


def _read_state_on_host(manager: ocp.CheckpointManager, step: int) -> None:
    """Reads all of checkpoint `step`'s `state` into host memory and drops it: the sure test
    that its files are intact (the restore in the training layout needs the abstract state of
    the stage that the meta names, and the meta may point to a damaged checkpoint). A checkpointer
    of its own: the manager's `state` item stays bound to `StandardSave`/`StandardRestore`."""
    path = manager.directory / str(step) / _STATE
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def resume_meta(manager: ocp.CheckpointManager) -> dict | None:
    """`meta` (with `global_step`) of the newest checkpoint whose meta and state both read back,
    to resume from; None when there is no checkpoint.

    Newer damaged checkpoints (truncated or missing files, bad meta JSON) are named in one
    warning and moved to a sibling folder `<dir>_unreadable/<step>`: kept for inspection, never
    deleted, and out of the way of the resumed run, which writes those steps again. When no
    checkpoint is intact, raises UnreadableCheckpointError (and moves nothing). Costs one extra
    read of the resumed checkpoint (into host memory), before the stage restores it sharded.
    """
    directory = str(manager.directory)
    bad: dict[int, str] = {}
    meta = None
    _drop_late_read_callbacks()  # before the reads: a failed one's late reports can come early
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = _read_meta(manager, step)
            _read_state_on_host(manager, step)
            break
        except Exception as error:  # orbax / tensorstore raise many types for one cause
            problem = unreadable_problem(error)
            if problem is None:
                raise
            bad[step], meta = problem, None
    if not bad:
        return meta
    newest, *others = sorted(bad, reverse=True)
    unreadable = f"checkpoint {newest} in {directory} is unreadable ({bad[newest]})" + (
        f", and so {'is' if len(others) == 1 else 'are'} {', '.join(map(str, others))}"
        if others
        else ""
    )
    if meta is None:
        raise UnreadableCheckpointError(
            f"no intact checkpoint to resume from: {unreadable}; start afresh with a new "
            "--workdir (the damaged checkpoints are left as they are)"
        )
    aside = f"{directory}_unreadable"
    if jax.process_index() == 0:
        for step in bad:
            target = os.path.join(aside, str(step))
            suffix = 0
            while os.path.exists(target):  # damaged before, at the same step
                suffix += 1
                target = os.path.join(aside, f"{step}-{suffix}")
            os.makedirs(aside, exist_ok=True)
            os.rename(os.path.join(directory, str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("run_checkpoint.resume_meta")
    manager.reload()
    logging.warning(
        "%s; resuming from checkpoint %d (%s %s moved to %s)",
        unreadable,
        meta["global_step"],
        "checkpoints" if others else "checkpoint",
        ", ".join(map(str, sorted(bad, reverse=True))),
        aside,
    )
    return meta


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state,
        shardings,
    )


# TrainState fields keyed by metric name (`losses.LOSS_TERMS` and the rest): a run saved before a
# loss term was added, or after one was dropped, holds other names there.
_PER_METRIC_FIELDS = ("metric_sums", "nonfinite_terms")


def restore_state(manager: ocp.CheckpointManager, global_step: int, abstract_state):
    """Restores checkpoint `global_step`'s `state` into the layout of `abstract_state`
    (a pytree of ShapeDtypeStructs with shardings, see `abstract_like`).

    The per-metric bookkeeping (`metric_sums`, `nonfinite_terms`) follows the names the
    checkpoint holds: names it lacks start at zero and names the code no longer has are
    dropped, so a run resumes across a release that added or removed a loss term."""
    saved = ocp.PyTreeCheckpointHandler().metadata(manager.directory / str(global_step) / _STATE)
    layout, changed = abstract_state, []
    for field in _PER_METRIC_FIELDS:
        wanted = getattr(abstract_state, field)
        saved_names = set(saved.tree.get(field, {}))
        if saved_names and saved_names != set(wanted):
            template = next(iter(wanted.values()))
            layout = layout.replace(
                **{field: {name: wanted.get(name, template) for name in sorted(saved_names)}}
            )
            changed.append(field)
    restored = manager.restore(
        global_step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(layout)})
    )[_STATE]
    for field in changed:
        values = getattr(restored, field)
        filled = {
            name: values[name]
            if name in values
            else jax.device_put(jnp.zeros(spec.shape, spec.dtype), spec.sharding)
            for name, spec in getattr(abstract_state, field).items()
        }
        restored = restored.replace(**{field: filled})
    return restored


def abstract_params(config: ml_collections.ConfigDict, stage: str = "finetune"):
    """ShapeDtypeStructs of the params a `stage` checkpoint of `config` holds under `state`:
    the M2UNet params (finetune) or `{'encoder', 'projector'[, 'predictor']}` (pretrain)."""
    model = model_lib.build_model(config.model)
    network = model if stage == "finetune" else contrastive.build_network(config, model)
    return jax.eval_shape(
        lambda key: model_lib.init_params(network, config, key), jax.random.PRNGKey(0)
    )


def restore_params(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | str | None = None,
    *,
    stage: str = "finetune",
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[dict, int]:
    """`(params, global step)` of one checkpoint in WORKDIR/checkpoints, params only.

    An orbax partial restore of `state.params`: the optimizer state is never built nor read, so
    `train.*` keys (optimizer, `init_npz`) do not matter. `step=None` takes the newest
    checkpoint of `stage`: 'finetune' gives the M2UNet params, 'pretrain' the contrastive
    encoder's (the backbone subtree of the M2UNet params). `step='best'` takes the params that
    validated best (WORKDIR/best, `save_best`), and so does `step=None` for a run trained with
    `train.best_metric` that kept some. A run with `train.ema_decay` > 0 gives the params' EMA
    (unless `eval.use_ema` is false). Every leaf is placed with `sharding`
    (default: the first device). Raises FileNotFoundError / ValueError naming the folder, the
    step and the problem (no checkpoint, unknown step, other stage, shapes not of config.model).
    """
    if stage not in config_lib.STAGES:
        raise ValueError(f"stage={stage!r} is not one of {config_lib.STAGES}")
    quiet_orbax()
    subdir = "checkpoints"
    best_dir = os.path.join(os.path.abspath(workdir), "best")
    if step == "best":
        if not os.path.isdir(best_dir) or not _has_checkpoint(best_dir):
            raise FileNotFoundError(
                f"{best_dir} holds no best params: train with --config.train.validate_every=N "
                "--config.train.best_metric=NAME, or pick a --step"
            )
        subdir, step = "best", None
    elif step is None and stage == "finetune" and config.train.get("best_metric"):
        if _has_checkpoint(best_dir):
            subdir = "best"
            logging.info("restoring the best-validating params (%s)", best_dir)
    directory = os.path.join(os.path.abspath(workdir), subdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} does not exist: train first (python train.py --workdir {workdir})"
        )
    manager = make_manager(workdir, keep=1, async_save=False, subdir=subdir)
    try:
        damaged: dict[int, str] = {}
        metas = {meta["global_step"]: meta for meta in all_metas(manager, damaged)}
        if step is not None and int(step) in damaged:
            raise ValueError(
                f"checkpoint {int(step)} in {directory} is unreadable (corrupt or incomplete: "
                f"{damaged[int(step)]}); pick another with --step (intact steps {sorted(metas)})"
            )
        if damaged:
            logging.warning(
                "%s: checkpoint(s) %s are unreadable (damaged meta), left out",
                directory,
                ", ".join(map(str, sorted(damaged))),
            )
        if not metas:
            raise FileNotFoundError(f"{directory} holds no checkpoint: train first")
        steps = sorted(metas)
        if step is None:
            candidates = [s for s in steps if metas[s]["stage"] == stage]
            if not candidates:
                raise ValueError(
                    f"{directory} has no {stage} checkpoint (steps {steps}); "
                    + (
                        "evaluation and export need a fine-tuned run (train.finetune_steps > 0)"
                        if stage == "finetune"
                        else "the run had no pretraining (train.pretrain_steps = 0)"
                    )
                )
            step = candidates[-1]
        step = int(step)
        if step not in metas:
            raise ValueError(f"checkpoint step {step} is not in {directory} (have {steps})")
        if metas[step]["stage"] != stage:
            raise ValueError(
                f"checkpoint {step} in {directory} is from the {metas[step]['stage']} stage, not "
                f"{stage}; pick a {stage} step (available: {steps})"
            )
        on_host = sharding is None
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract_params(config, stage),
        )
        if stage == "pretrain":  # the projector and predictor are not needed downstream
            abstract = {"encoder": abstract["encoder"]}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), abstract)
        # A fine-tuning checkpoint of a run with train.ema_decay > 0 also holds the params' EMA,
        # which is what evaluation uses (eval.use_ema); WORKDIR/best keeps the chosen ones.
        use_ema = (
            stage == "finetune" and subdir == "checkpoints" and config_lib.uses_params_ema(config)
        )
        key = "ema_params" if use_ema else "params"
        _drop_late_read_callbacks()  # before the read: a failed one's late reports can come early
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.PyTreeRestore(
                            item={key: abstract},
                            restore_args={key: restore_args},
                            partial_restore=True,
                        )
                    }
                ),
            )[_STATE]
        except Exception as error:  # orbax / tensorstore raise many types for one cause
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            problem = unreadable_problem(error)
            if problem is not None:
                others = [s for s in steps if s != step and metas[s]["stage"] == stage]
                raise ValueError(
                    f"checkpoint {step} in {directory} is unreadable (corrupt or incomplete: "
                    f"{problem}); pick another with --step (intact {stage} steps may be "
                    f"{others})"
                ) from None
            raise ValueError(
                f"checkpoint {step} in {directory} does not match config.model "
                f"(variant, sizes, classes, scan_blocks?): {first[:300]}"
            ) from None
    finally:
        manager.close()
    params = restored[key]
    if on_host:
        params = jax.device_get(params)
    return (params if stage == "finetune" else params["encoder"]), step


def ensemble_workdirs(config: ml_collections.ConfigDict) -> list[str]:
    """The other runs of a deep ensemble (`eval.ensemble_workdirs`, comma-separated)."""
    text = config.eval.get("ensemble_workdirs", "")
    return [entry.strip() for entry in text.split(",") if entry.strip()]


def restore_members(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding | None = None
) -> list[dict]:
    """The params of every run in `eval.ensemble_workdirs` (each one's default checkpoint, as
    `restore_params`), after checking that each was trained with `config`'s architecture
    (ConfigError naming the key and the run otherwise); [] without an ensemble."""
    members = []
    for workdir in ensemble_workdirs(config):
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"eval.ensemble_workdirs: {workdir} is not a run directory")
        config_lib.check_same_architecture(config, workdir)
        params, step = restore_params(config, workdir, sharding=sharding)
        logging.info("ensemble member %s (step %d)", workdir, step)
        members.append(params)
    return members


# ------------------------------------------------------------------ best validated params


def _has_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a finished orbax step folder (a number, not a temporary)."""
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def save_best(manager: ocp.CheckpointManager, global_step: int, params, meta: dict) -> None:
    """Keeps `params` as WORKDIR/best/<global_step> (the manager of `make_manager(...,
    subdir='best')`, keep 1): the layout of a run checkpoint with `state` = `{'params'}`, so
    `restore_params(..., step='best')` reads it with the same partial restore. `meta` names the
    stage, `metric` and `value`."""
    save(manager, global_step, {"params": params}, meta)


def best_value(manager: ocp.CheckpointManager, metric: str) -> float | None:
    """The `value` of the kept best params when they were ranked by `metric`; None when none
    are kept (or another metric ranked them: the new metric starts afresh)."""
    meta = latest_meta(manager)
    if meta is None or meta.get("metric") != metric:
        return None
    return float(meta["value"])


def beats_best(value: float, best: float | None) -> bool:
    """Whether a validation `value` (higher is better) beats `best` (None: nothing kept)."""
    return value == value and (best is None or value > best)  # value == value: not NaN
