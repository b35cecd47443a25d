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
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"


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
