"""The device mesh and the shardings of train states and batches.

One `Mesh` spans every device of every host (or, with `train.mesh_devices` N, the first N devices
of a single process) with two axes:

- `'data'`: pure data parallelism (parameters replicated along it);
- `'fsdp'` (size `train.mesh_fsdp`): batch *and* parameter sharding. Each big array of the
  train state (parameters, Adam moments, EMA parameters) is split along its largest dimension
  that `'fsdp'` divides; XLA inserts the all-gathers / reduce-scatters (ZeRO-3 style).

A batch is split along its leading axis over both axes, `('data', 'fsdp')`, so every device
holds `batch_size / device_count` examples whatever the split between the two axes.

The mesh uses `AxisType.Auto` (classic GSPMD propagation): the model code is written without
sharding-in-types annotations, which the jax 0.10 default (`Explicit`) would require.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays smaller than this (elements) stay replicated even with fsdp > 1: sharding a LayerNorm
# scale saves nothing and costs an all-gather per use.
DEFAULT_MIN_FSDP_SIZE = 2**14


def mesh_devices(count: int = 0) -> list[jax.Device]:
    """The devices of the run's mesh: every device of every process (`count` 0) or the first
    `count` of one process (`train.mesh_devices`). Raises ValueError naming the key when there are
    fewer devices, or several processes (each must feed its own devices)."""
    devices = jax.devices()
    if count == 0:
        return list(devices)
    if count < 0 or count > len(devices):
        raise ValueError(f"train.mesh_devices={count}: this process sees {len(devices)} devices")
    if jax.process_count() > 1:
        raise ValueError(
            f"train.mesh_devices={count} needs a single process; with "
            f"{jax.process_count()} processes use 0 (every device)"
        )
    return list(devices[:count])


def config_mesh(config) -> Mesh:
    """The mesh of a run: `train.mesh_fsdp` over `mesh_devices(train.mesh_devices)`."""
    train = config.train
    return make_mesh(train.mesh_fsdp, mesh_devices(train.mesh_devices))


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (len(devices) / fsdp, fsdp) named ('data', 'fsdp').

    `devices` defaults to `jax.devices()` (every device of every process). Raises ValueError when
    `fsdp` does not divide the device count (names `train.mesh_fsdp`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"train.mesh_fsdp={fsdp} must be a positive divisor of the {len(devices)} devices"
        )
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp),
        BATCH_AXES,
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array copied on every device (scalars, small state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array `[B, ...]`: B split over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_partition_spec(
    shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_MIN_FSDP_SIZE
) -> P:
    """PartitionSpec of a state array: its largest dimension divisible by `fsdp` over 'fsdp'.

    Replicated (`P()`) when fsdp == 1, the array has fewer than `min_size` elements, or no
    dimension is divisible. Ties go to the last such dimension (the output features of a Dense
    kernel, contiguous in memory).
    """
    if fsdp <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    best_axis = None
    for axis, size in enumerate(shape):
        if size % fsdp == 0 and (best_axis is None or size >= shape[best_axis]):
            best_axis = axis
    if best_axis is None:
        return P()
    spec = [None] * len(shape)
    spec[best_axis] = FSDP_AXIS
    return P(*spec)


def state_shardings(abstract_tree, mesh: Mesh, min_size: int = DEFAULT_MIN_FSDP_SIZE):
    """NamedSharding for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs).

    The rule depends only on the shape, so parameters and their Adam moments / EMA copies get the
    same layout and the optimizer update stays local to each device.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, fsdp_partition_spec(leaf.shape, fsdp, min_size)),
        abstract_tree,
    )


def host_batch_to_global(local_batch, mesh: Mesh):
    """Per-process numpy batch `{key: [B_local, ...]}` -> global jax.Arrays sharded like a batch.

    Each process passes only the rows its own devices hold (B_local = B * local_devices /
    devices); the global batch is their concatenation in process order. Non-numeric leaves
    (paths, category names) are dropped: they cannot live on a device.
    """
    sharding = batch_sharding(mesh)
    global_batch = {}
    for key, value in local_batch.items():
        array = np.asarray(value)
        if array.dtype.kind in "OSU":
            continue
        global_batch[key] = jax.make_array_from_process_local_data(sharding, array)
    return global_batch
