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
to disk proceeds in the background (so the donated state can be reused at once).

`restore_params` is the one way from a run directory to parameters (evaluation, export,
prediction, benchmarks): a params-only partial restore that never builds an optimizer.
"""

from __future__ import annotations

import logging as python_logging
import os

import jax
import ml_collections
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


class _DropOrbaxInfo:
    """absl-logger filter: orbax logs a dozen INFO lines per checkpoint; keep its warnings."""

    def filter(self, record) -> bool:
        return record.levelno >= python_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Drops orbax's INFO lines from the absl log (idempotent)."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(existing, _DropOrbaxInfo) for existing in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxInfo())


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager of `workdir/checkpoints` keeping the newest `keep` checkpoints."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
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


def all_metas(manager: ocp.CheckpointManager) -> list[dict]:
    """`meta` of every kept checkpoint (with `global_step`), oldest first."""
    metas = []
    for step in sorted(manager.all_steps()):
        restored = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        metas.append({**dict(restored[_META]), "global_step": step})
    return metas


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state,
        shardings,
    )


def restore_state(manager: ocp.CheckpointManager, global_step: int, abstract_state):
    """Restores checkpoint `global_step`'s `state` into the layout of `abstract_state`
    (a pytree of ShapeDtypeStructs with shardings, see `abstract_like`)."""
    restored = manager.restore(
        global_step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)})
    )
    return restored[_STATE]


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
    step: int | None = None,
    *,
    stage: str = "finetune",
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[dict, int]:
    """`(params, global step)` of one checkpoint in WORKDIR/checkpoints, params only.

    An orbax partial restore of `state.params`: the optimizer state is never built nor read, so
    `train.*` keys (optimizer, `init_npz`) do not matter. `step=None` takes the newest
    checkpoint of `stage`: 'finetune' gives the M2UNet params, 'pretrain' the contrastive
    encoder's (the backbone subtree of the M2UNet params). Every leaf is placed with `sharding`
    (default: the first device). Raises FileNotFoundError / ValueError naming the folder, the
    step and the problem (no checkpoint, unknown step, other stage, shapes not of config.model).
    """
    if stage not in config_lib.STAGES:
        raise ValueError(f"stage={stage!r} is not one of {config_lib.STAGES}")
    quiet_orbax()
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} does not exist: train first (python train.py --workdir {workdir})"
        )
    manager = make_manager(workdir, keep=1, async_save=False)
    try:
        metas = {meta["global_step"]: meta for meta in all_metas(manager)}
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
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.PyTreeRestore(
                            item={"params": abstract},
                            restore_args={"params": restore_args},
                            partial_restore=True,
                        )
                    }
                ),
            )[_STATE]
        except Exception as error:  # orbax / tensorstore raise many types for one cause
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            if any(mark in str(error) for mark in _UNREADABLE_MARKS):
                others = [s for s in steps if s != step and metas[s]["stage"] == stage]
                raise ValueError(
                    f"checkpoint {step} in {directory} is unreadable (corrupt or incomplete: "
                    f"{first[:200]}); pick another with --step (intact {stage} steps may be "
                    f"{others})"
                ) from None
            raise ValueError(
                f"checkpoint {step} in {directory} does not match config.model "
                f"(variant, sizes, classes, scan_blocks?): {first[:300]}"
            ) from None
    finally:
        manager.close()
    params = restored["params"]
    if on_host:
        params = jax.device_get(params)
    return (params if stage == "finetune" else params["encoder"]), step
