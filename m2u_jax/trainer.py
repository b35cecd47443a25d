"""Training: contrastive pretraining (SimCLR or MoCo v3), then multi-task fine-tuning.

`train.py` calls `main`, which starts `jax.distributed` when asked and runs
`train(config, workdir)`:

1. **pretrain** (`train.pretrain_steps`, 0 skips it): the model's backbone embedding feeds a
   projection MLP; SimCLR minimises NT-Xent over the global batch, MoCo v3 adds a predictor and a
   momentum encoder (an EMA of encoder + projector kept in the train state, momentum on a cosine
   from `train.moco_momentum` to 1) with the symmetric InfoNCE loss.
2. **finetune** (`train.finetune_steps`): `losses.multitask_loss` with `train.loss_weights`. The
   encoder starts from stage 1 (its params tree is the backbone part of the fine-tuning model's
   tree; the task heads start from scratch) or from a ViT `.npz` (`train.init_npz`).

Scale: one mesh over every device of every host (`m2u_jax.sharding`); parameters are created
already sharded (`jax.jit(init, out_shardings=...)` with shapes from `jax.eval_shape`); the step
is one `jax.jit` with explicit in/out shardings and the state donated. Nothing inside the step
syncs with the host: per-step metrics are summed on device in the train state and fetched only
at log and checkpoint steps.

Non-finite losses: the step records, on device, the first step whose loss, a loss term or the
gradient norm is NaN/Inf. The host reads that flag at log steps and right before every
checkpoint save (one scalar fetch each), so a run stops at most `train.log_every - 1` steps after
the first NaN (wasted compute, never a host sync per step) and a corrupted state is never
written: the last good checkpoint stays the newest.

Logging: clu's `create_default_writer` (TensorBoard events in WORKDIR plus log lines) and
`ReportProgress` (steps/s, ETA) when clu is importable; otherwise plain log lines. Either way
process 0 appends every logged scalar to WORKDIR/metrics.jsonl (one JSON object per log step), a
format that needs no TensorBoard to read. Throughput is logged as images/s/device (input images,
i.e. batch elements, per second per device) and MFU = per-device FLOPs of the compiled step (XLA
cost analysis) x steps/s / the device's peak dense bf16 FLOP/s (`train.peak_flops` when set,
else the table in `m2u_jax.flops`; null when unknown, e.g. on CPU: no invented peak). XLA counts
a loop body once, so the gradient-accumulation scan is scaled back up here, while a scanned
backbone (`model.scan_blocks`) makes the logged MFU a lower bound (a warning says so).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2u_jax import config as config_lib
from m2u_jax import contrastive, losses, optim, run_checkpoint, sharding
from m2u_jax import flops as flops_lib
from m2u_jax import model as model_lib
from m2u_jax.train_state import TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss, a loss term or the gradient norm became NaN/Inf; the message names them."""


# ---------------------------------------------------------------------------------- step


LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def _loss_and_grads(
    loss_fn: LossFn, params, ema_params, batch: dict, rng: jax.Array, accum_steps: int, mesh
):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        return grad_fn(params, ema_params, batch, rng)

    # Micro-batch k takes rows k, k + accum, k + 2 accum, ... so every device keeps its own rows
    # (a contiguous split would move micro-batch k onto a subset of the devices).
    micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

    def split(array):
        micro = array.reshape(array.shape[0] // accum_steps, accum_steps, *array.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(micro, 0, 1), micro_sharding)

    micro_batches = jax.tree.map(split, batch)
    zero = jax.tree.map(
        lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
        jax.eval_shape(
            grad_fn, params, ema_params, jax.tree.map(lambda a: a[0], micro_batches), rng
        ),
    )

    def accumulate(carry, inputs):
        micro_batch, index = inputs
        result = grad_fn(params, ema_params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, result), None

    total, _ = jax.lax.scan(accumulate, zero, (micro_batches, jnp.arange(accum_steps)))
    # Mean over micro-batches: equals the full-batch gradient when the loss is a batch mean.
    return jax.tree.map(lambda leaf: leaf / accum_steps, total)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    mesh,
    grad_accum_steps: int = 1,
    ema_momentum: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict], TrainState]:
    """The (un-jitted) train step `(state, batch) -> state` of one stage.

    Args:
      loss_fn: `(params, ema_params, batch, rng) -> (loss scalar, {term: scalar})`.
      optimizer: applied once per step to the gradient averaged over `grad_accum_steps`
        micro-batches (a `lax.scan` over micro-batches of the step's batch).
      mesh: the mesh the batch is sharded over (keeps micro-batches on their devices).
      ema_momentum: `step -> momentum`; when given, `state.ema_params` (a dict whose keys are a
        subset of `params`' keys) is updated as m * ema + (1 - m) * params after the update.
    With accumulation, a loss that is a batch mean gives the full-batch gradient; a contrastive
    loss sees each micro-batch's negatives only (a smaller effective batch for the negatives).
    Dropout keys are `fold_in(state.rng, state.step)` (then the micro-batch index), so a resumed
    run draws the same keys as an uninterrupted one.
    """

    def train_step(state: TrainState, batch: dict) -> TrainState:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, terms), grads = _loss_and_grads(
            loss_fn, state.params, state.ema_params, batch, rng, grad_accum_steps, mesh
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_momentum is not None:
            momentum = ema_momentum(state.step)
            ema_params = jax.tree.map(
                lambda ema, online: momentum * ema + (1.0 - momentum) * online,
                ema_params,
                {name: params[name] for name in ema_params},
            )
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
        )
        return new_state.record_metrics(
            {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}
        )

    return train_step


def jit_train_step(train_step, state_shardings, mesh, compiler_options: dict | None = None):
    """jax.jit of a train step with explicit shardings; the state (argument 0) is donated."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=state_shardings,
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )


# -------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stage:
    """One stage, ready to run.

    `init_state()` creates the fresh state directly in its sharded layout; `abstract_state`
    holds its shapes, dtypes and shardings (to restore a checkpoint into, without creating a
    fresh state first); `train_step(state, batch) -> state` is jitted and donates `state`.
    """

    name: str
    num_steps: int
    init_state: Callable[[], TrainState]
    abstract_state: Any
    train_step: Callable[[TrainState, dict], TrainState]
    learning_rate: Callable[[jax.Array], jax.Array]
    momentum: Callable[[jax.Array], jax.Array] | None = None


def _sharded_init(
    init_fn: Callable[..., TrainState], mesh, compiler_options, fsdp_min_size: int, *args
):
    """(init, abstract state with shardings, shardings): `init()` creates the state already
    sharded (no full copy on one device), with shapes from `jax.eval_shape`."""
    abstract_state = jax.eval_shape(init_fn, *args)
    state_shardings = sharding.state_shardings(abstract_state, mesh, fsdp_min_size)
    init = jax.jit(init_fn, out_shardings=state_shardings, compiler_options=compiler_options)
    return (
        lambda: init(*args),
        run_checkpoint.abstract_like(abstract_state, state_shardings),
        state_shardings,
    )


def _interleave_views(batch: dict) -> jax.Array:
    """views1, views2 `[B, H, W, C]` -> `[2B, H, W, C]` with rows (i, view 1), (i, view 2), ...

    Interleaving (not concatenating) keeps both views of image i on the device that holds
    image i, so the one forward pass over both views needs no resharding.
    """
    views = jnp.stack([batch["views1"], batch["views2"]], axis=1)
    return views.reshape(-1, *views.shape[2:])


def _split_views(outputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    pairs = outputs.reshape(-1, 2, *outputs.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def pretrain_loss_fn(config: ml_collections.ConfigDict, network: contrastive.ContrastiveModel):
    """`(params, ema_params, batch, rng) -> (loss, {})` of the contrastive stage.

    SimCLR: NT-Xent between the projections of the two views. MoCo v3: the online network's
    predictions q1, q2 against the momentum network's projections k1, k2 (EMA params, run in
    inference mode: the key encoder is a slowly moving teacher, so no dropout noise on it).
    """
    method = config.train.pretrain_method
    temperature = config.train.temperature

    def loss_fn(params, ema_params, batch, rng):
        images = _interleave_views(batch)
        online = network.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        if method == "simclr":
            return losses.nt_xent(*_split_views(online), temperature), {}
        keys = network.apply(
            {"params": ema_params}, images, train=False, method=contrastive.ContrastiveModel.project
        )
        q1, q2 = _split_views(online)
        k1, k2 = _split_views(keys)
        return losses.moco_v3_loss(q1, q2, k1, k2, temperature), {}

    return loss_fn


def finetune_loss_fn(config: ml_collections.ConfigDict, model):
    """`(params, ema_params, batch, rng) -> (total, terms)`: `losses.multitask_loss`."""
    weights = {name: float(value) for name, value in config.train.loss_weights.items()}
    det_obj_target = config.train.det_obj_target
    seg_focal_alpha = float(config.train.seg_focal_alpha)
    det_assigner = config.train.det_assigner
    det_box_loss = config.train.det_box_loss
    det_assign_rules = config_lib.assign_rules(config.train)

    def loss_fn(params, ema_params, batch, rng):
        del ema_params
        outputs, _ = model.apply(
            {"params": params}, batch["images"], train=True, rngs={"dropout": rng}
        )
        return losses.multitask_loss(
            outputs,
            batch,
            weights,
            det_obj_target,
            seg_focal_alpha,
            det_assigner=det_assigner,
            det_box_loss=det_box_loss,
            det_assign_rules=det_assign_rules,
        )

    return loss_fn


def build_pretrain_stage(
    config: ml_collections.ConfigDict,
    model,
    mesh,
    rng: jax.Array,
    compiler_options: dict | None = None,
    fsdp_min_size: int = sharding.DEFAULT_MIN_FSDP_SIZE,
) -> Stage:
    """Pretraining stage: `{'encoder', 'projector'[, 'predictor']}` params, fresh and sharded.

    The encoder's params come only from the modules its embedding uses (the task heads are not
    created), so they are the backbone subtree of the fine-tuning params. `compiler_options`
    (XLA options of the init and step programs, e.g. `{'xla_backend_optimization_level': 0}`
    to trade step speed for compile time) default to XLA's; state arrays with fewer than
    `fsdp_min_size` elements stay replicated on an 'fsdp' mesh axis.
    """
    train = config.train
    network = contrastive.build_network(config, model)
    optimizer, schedule = optim.make_optimizer(train, train.pretrain_steps)
    is_moco = train.pretrain_method == "mocov3"
    metric_names = ("loss", "grad_norm")

    def init_params(init_rng):
        return model_lib.init_params(network, config, init_rng)

    npz_encoder = None
    if train.init_npz:
        npz_encoder = npz_overlay(train.init_npz, jax.eval_shape(init_params, rng)["encoder"])

    def init_fn(init_rng, npz_encoder):
        params = init_params(init_rng)
        if npz_encoder is not None:
            encoder = overlay_params(
                params["encoder"], npz_encoder, f"train.init_npz {train.init_npz}"
            )
            params = dict(params, encoder=encoder)
        ema = {"encoder": params["encoder"], "projector": params["projector"]} if is_moco else None
        return TrainState.create(
            params, optimizer, jax.random.fold_in(init_rng, 1), metric_names, ema_params=ema
        )

    init_state, abstract_state, state_shardings = _sharded_init(
        init_fn, mesh, compiler_options, fsdp_min_size, rng, npz_encoder
    )
    momentum = None
    if is_moco:
        momentum = lambda step: optim.momentum_schedule(
            train.moco_momentum, step, train.pretrain_steps
        )
    step = make_train_step(
        pretrain_loss_fn(config, network),
        optimizer,
        mesh=mesh,
        grad_accum_steps=train.grad_accum_steps,
        ema_momentum=momentum,
    )
    return Stage(
        "pretrain",
        train.pretrain_steps,
        init_state,
        abstract_state,
        jit_train_step(step, state_shardings, mesh, compiler_options),
        schedule,
        momentum,
    )


def overlay_params(base, pretrained, where: str = "params"):
    """`base` with every leaf that `pretrained` also has replaced by the pretrained value.

    Both are nested dicts; `pretrained` may hold a subset of the paths. Raises ValueError naming
    the path when a leaf is missing in `base` or has another shape.
    """
    if not isinstance(pretrained, dict):
        base_shape = getattr(base, "shape", None)
        if base_shape != pretrained.shape:
            raise ValueError(
                f"{where}: pretrained shape {pretrained.shape} != model shape {base_shape}"
            )
        return pretrained.astype(base.dtype)
    if not isinstance(base, dict):
        raise ValueError(f"{where}: pretrained params have a subtree where the model has a leaf")
    merged = dict(base)
    for name, value in pretrained.items():
        if name not in base:
            raise ValueError(f"{where}/{name}: in the pretrained params but not in the model")
        merged[name] = overlay_params(base[name], value, f"{where}/{name}")
    return merged


def npz_overlay(path: str, abstract_params) -> dict:
    """The leaves of a ViT `.npz` (`train.init_npz`) mapped onto `abstract_params` (M2UNet params
    or the pretraining encoder's, both with a 'backbone'), as host numpy arrays: only the loaded
    leaves, for `overlay_params`. Loaded on the host and passed to the jitted init as an
    argument, so the weights never become constants of a compiled program."""
    from m2u_jax import checkpoint  # lazy: only needed with train.init_npz

    return _numpy_leaves(checkpoint.load_vit_npz(path, abstract_params)) or {}


def _numpy_leaves(tree):
    """The numpy leaves of a nested dict (None when there are none; empty subtrees dropped)."""
    if isinstance(tree, dict):
        kept = {name: _numpy_leaves(value) for name, value in tree.items()}
        kept = {name: value for name, value in kept.items() if value is not None}
        return kept or None
    return tree if isinstance(tree, np.ndarray) else None


def build_finetune_stage(
    config: ml_collections.ConfigDict,
    model,
    mesh,
    rng: jax.Array,
    pretrained_encoder=None,
    compiler_options: dict | None = None,
    fsdp_min_size: int = sharding.DEFAULT_MIN_FSDP_SIZE,
) -> Stage:
    """Fine-tuning stage: fresh sharded M2UNet params, the backbone overwritten by
    `pretrained_encoder` (stage 1's `params['encoder']`) or else by `train.init_npz`; the task
    heads always start from their initialisation. `compiler_options` and `fsdp_min_size` as in
    `build_pretrain_stage`."""
    train = config.train
    # Detached heads (config resolved by `resolve_detach_aux_heads`) may get a clip of their own.
    detached = config.model.detach_aux_heads == "always"
    optimizer, schedule = optim.make_optimizer(
        train,
        train.finetune_steps,
        clip_apart=model_lib.DETACHED_HEADS if detached and train.clip_heads_apart else (),
    )
    metric_names = ("loss", *losses.LOSS_TERMS, "grad_norm")

    def init_params(init_rng):
        return model_lib.init_params(model, config, init_rng)

    if pretrained_encoder is not None:
        overlay, where = pretrained_encoder, "pretrained encoder"
    elif train.init_npz:
        overlay = npz_overlay(train.init_npz, jax.eval_shape(init_params, rng))
        where = f"train.init_npz {train.init_npz}"
    else:
        overlay, where = None, ""

    decay = float(train.ema_decay)

    def init_fn(init_rng, overlay):
        params = init_params(init_rng)
        if overlay is not None:
            params = overlay_params(params, overlay, where)
        return TrainState.create(
            params,
            optimizer,
            jax.random.fold_in(init_rng, 1),
            metric_names,
            ema_params=params if decay > 0 else None,
        )

    init_state, abstract_state, state_shardings = _sharded_init(
        init_fn, mesh, compiler_options, fsdp_min_size, rng, overlay
    )
    step = make_train_step(
        finetune_loss_fn(config, model),
        optimizer,
        mesh=mesh,
        grad_accum_steps=train.grad_accum_steps,
        ema_momentum=(lambda step: optim.ema_momentum(decay, step)) if decay > 0 else None,
    )
    return Stage(
        "finetune",
        train.finetune_steps,
        init_state,
        abstract_state,
        jit_train_step(step, state_shardings, mesh, compiler_options),
        schedule,
    )


# ----------------------------------------------------------------------------- reporting


def peak_flops_per_device(config: ml_collections.ConfigDict, device: jax.Device) -> float | None:
    """`train.peak_flops` when set, else the device's dense bf16 peak from `flops.PEAK_FLOPS`;
    None when unknown (CPUs): the MFU is then reported as null, never against a guessed peak."""
    if config.train.peak_flops > 0:
        return float(config.train.peak_flops)
    return flops_lib.table_peak_flops(device)


class _LoggingWriter:
    """Stand-in for clu's metric writer when clu is not importable: scalars as log lines."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        logging.info(
            "[%d] %s", step, ", ".join(f"{name}={value:.6g}" for name, value in scalars.items())
        )

    def write_hparams(self, hparams: dict) -> None:
        logging.info("hparams %s", hparams)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricLog:
    """Scalar logging of a run: clu writer (or log lines), WORKDIR/metrics.jsonl, progress.

    Only process 0 writes files; every process logs. Degrades to plain logging writers when clu
    is not importable (the GPU machines lack it).
    """

    def __init__(self, workdir: str, total_steps: int, log_every: int):
        self.is_main = jax.process_index() == 0
        self.report_progress = None
        try:
            from clu import metric_writers, periodic_actions
        except ImportError:
            logging.warning("clu is not importable: metrics go to the log and metrics.jsonl only")
            self.writer = _LoggingWriter()
        else:
            self.writer = metric_writers.create_default_writer(
                workdir if self.is_main else None, just_logging=not self.is_main
            )
            self.report_progress = periodic_actions.ReportProgress(
                num_train_steps=total_steps,
                writer=self.writer,
                every_steps=log_every,
                every_secs=None,
            )
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_main else None

    def step(self, global_step: int) -> None:
        """Called after every step: clu's ReportProgress only reads the clock here."""
        if self.report_progress is not None:
            self.report_progress(global_step)

    def write(self, global_step: int, scalars: dict) -> None:
        finite = {
            name: float(value)
            for name, value in scalars.items()
            if value is not None and math.isfinite(float(value))
        }
        self.writer.write_scalars(global_step, finite)
        if self.jsonl is not None:
            record = {"step": global_step}
            for name, value in scalars.items():
                record[name] = None if value is None or not math.isfinite(value) else value
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class _Run:
    """What the stage loop needs besides the stage itself."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    manager: Any
    metric_log: MetricLog
    total_steps: int  # global steps of the whole schedule
    last_checkpoint: int | None = None
    profiling: bool = False
    # Validation during fine-tuning (`train.validate_every`): the validator, and the kept best
    # params' manager (WORKDIR/best) and value when `train.best_metric` is set.
    validate: Callable[[dict], dict[str, float]] | None = None
    best_manager: Any = None
    best_value: float | None = None
    # Wall-clock training time: seconds of earlier (resumed) segments, start of this one.
    seconds_before: float = 0.0
    segment_start: float = dataclasses.field(default_factory=time.perf_counter)

    def train_seconds(self) -> float:
        """Training wall time of the run so far (all segments, compiles included)."""
        return self.seconds_before + time.perf_counter() - self.segment_start


def _check_finite(run: _Run, stage: Stage, state: TrainState, offset: int) -> None:
    bad_step = int(jax.device_get(state.nonfinite_step))
    if bad_step < 0:
        return
    flags = jax.device_get(state.nonfinite_terms)
    bad_terms = sorted(name for name, flag in flags.items() if int(flag))
    run.manager.wait_until_finished()
    where = (
        f"checkpoint {run.last_checkpoint} in {run.workdir}/checkpoints is the last good one"
        if run.last_checkpoint is not None
        else "no checkpoint was written"
    )
    raise NonFiniteLossError(
        f"non-finite value in {', '.join(bad_terms)} at {stage.name} step {bad_step} "
        f"(global step {offset + bad_step}); stopping the run ({where})"
    )


def _run_stage(run: _Run, stage: Stage, state: TrainState, offset: int, start_step: int):
    """Runs `stage` from `start_step` to its end; returns (final state, last logged scalars)."""
    from m2u_jax.data import pipeline  # lazy: tf.data is heavy and only needed to train

    config = run.config
    train = config.train
    iterator: Iterator[dict] = pipeline.make_train_iterator(
        config, run.mesh, stage=stage.name, start_step=start_step
    )
    batch_sharding = sharding.batch_sharding(run.mesh)

    def next_batch():
        batch = next(iterator)
        arrays = {key: value for key, value in batch.items() if isinstance(value, jax.Array)}
        return jax.device_put(arrays, batch_sharding)

    batch = next_batch()
    compile_start = time.perf_counter()
    compiled = stage.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - compile_start
    flops = flops_lib.compiled_flops(compiled)
    if flops is not None:
        # The accumulation scan's body is counted once; this also counts the (tiny) optimizer
        # update grad_accum_steps times, an over-count of a few FLOPs per parameter.
        flops *= train.grad_accum_steps
        if config.model.scan_blocks:
            logging.warning(
                "model.scan_blocks: XLA counts the scanned blocks once, so MFU is a lower bound"
            )
    peak = peak_flops_per_device(config, jax.devices()[0])
    logging.info(
        "%s: compiled the step in %.1fs; %s GFLOP/device/step; peak %s",
        stage.name,
        compile_seconds,
        "?" if flops is None else f"{flops / 1e9:.4g}",
        "unknown (MFU null)" if peak is None else f"{peak:.3g} FLOP/s",
    )
    num_devices = run.mesh.size
    profile_start, profile_stop = train.profile_steps
    last_scalars: dict = {}
    interval_start, interval_steps = time.perf_counter(), 0

    for step in range(start_step + 1, stage.num_steps + 1):
        global_step = offset + step
        if step > start_step + 1:
            batch = next_batch()
        # Global steps count from 1, so a trace asked from step 0 starts at step 1.
        if global_step == max(profile_start, 1) and profile_stop > profile_start:
            jax.profiler.start_trace(os.path.join(run.workdir, "profile"))
            run.profiling = True
        state = compiled(state, batch)
        interval_steps += 1
        run.metric_log.step(global_step)
        if run.profiling and (global_step + 1 >= profile_stop or step == stage.num_steps):
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            run.profiling = False

        is_log = step % train.log_every == 0 or step == stage.num_steps
        is_checkpoint = step % train.checkpoint_every == 0 or step == stage.num_steps
        if is_log or is_checkpoint:
            _check_finite(run, stage, state, offset)
        if is_log:
            sums, count = jax.device_get((state.metric_sums, state.metric_count))
            elapsed = time.perf_counter() - interval_start
            steps_per_sec = interval_steps / elapsed if elapsed > 0 else float("nan")
            scalars = {name: float(value) / max(int(count), 1) for name, value in sums.items()}
            scalars["learning_rate"] = float(stage.learning_rate(step - 1))
            if stage.momentum is not None:
                scalars["moco_momentum"] = float(stage.momentum(step - 1))
            scalars["steps_per_sec"] = steps_per_sec
            scalars["images_per_sec_per_device"] = steps_per_sec * train.batch_size / num_devices
            scalars["mfu"] = flops_lib.mfu(flops, steps_per_sec, peak)
            run.metric_log.write(global_step, {f"{stage.name}/{k}": v for k, v in scalars.items()})
            eta = (run.total_steps - global_step) / steps_per_sec
            logging.info(
                "%s step %d/%d (global %d/%d): loss %.4f | %.2f steps/s | %.1f images/s/device"
                " | MFU %s | ETA %s",
                stage.name,
                step,
                stage.num_steps,
                global_step,
                run.total_steps,
                scalars["loss"],
                steps_per_sec,
                scalars["images_per_sec_per_device"],
                "n/a" if scalars["mfu"] is None else f"{100 * scalars['mfu']:.1f}%",
                _format_seconds(eta),
            )
            last_scalars = scalars
            state = _reset_metrics(state)
            interval_start, interval_steps = time.perf_counter(), 0
        if (
            run.validate is not None
            and stage.name == "finetune"
            and (step % train.validate_every == 0 or step == stage.num_steps)
        ):
            _validate(run, state, global_step, step)
            interval_start, interval_steps = time.perf_counter(), 0  # not in the step rate
        if is_checkpoint:
            meta = {
                "stage": stage.name,
                "stage_step": step,
                "pretrain_method": train.pretrain_method,
                # The quality-vs-time curves of tools/quality_study.py read this.
                "train_seconds": round(run.train_seconds(), 3),
            }
            run_checkpoint.save(run.manager, global_step, state, meta)
            run.last_checkpoint = global_step
    return state, last_scalars


def deployed_params(config: ml_collections.ConfigDict, state: TrainState):
    """The fine-tuning params that evaluation uses: the EMA when `config_lib.uses_params_ema`,
    else the trained params themselves."""
    if config_lib.uses_params_ema(config):
        return state.ema_params
    return state.params


def _validate(run: _Run, state: TrainState, global_step: int, stage_step: int) -> None:
    """One validation pass: `val/*` scalars in the log, and the params kept in WORKDIR/best
    when they beat the best so far on `train.best_metric`."""
    start = time.perf_counter()
    params = deployed_params(run.config, state)
    values = run.validate(params)
    run.metric_log.write(global_step, {f"val/{name}": value for name, value in values.items()})
    logging.info(
        "validation at finetune step %d (global %d, %.1fs): %s",
        stage_step,
        global_step,
        time.perf_counter() - start,
        ", ".join(f"{name} {value:.4f}" for name, value in values.items()),
    )
    metric = run.config.train.best_metric
    if not metric:
        return
    value = float(values[metric])
    if not math.isfinite(value):
        logging.warning(
            "train.best_metric=%s is undefined on this validation split (no defective image, "
            "mask or box for it): the params are not ranked at step %d",
            metric,
            global_step,
        )
        return
    if run_checkpoint.beats_best(value, run.best_value):
        meta = {
            "stage": "finetune",
            "stage_step": stage_step,
            "pretrain_method": run.config.train.pretrain_method,
            "train_seconds": round(run.train_seconds(), 3),
            "metric": metric,
            "value": value,
        }
        run_checkpoint.save_best(run.best_manager, global_step, params, meta)
        logging.info("best %s so far (%.4f): params of step %d kept", metric, value, global_step)
        run.best_value = value


@functools.partial(jax.jit, donate_argnums=(0,))
def _reset_metrics(state: TrainState) -> TrainState:
    # Donated: the untouched params and optimizer state are aliased, not copied.
    return state.reset_metrics()


def _initial_state(stage: Stage, manager, meta: dict | None) -> tuple[TrainState, int]:
    """(state, steps already done): restored from checkpoint `meta` when given, else fresh."""
    if meta is None:
        return stage.init_state(), 0
    state = run_checkpoint.restore_state(manager, meta["global_step"], stage.abstract_state)
    return state, int(meta["stage_step"])


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        config_lib.write_run_json(config, workdir)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    make_validator: Callable[[ml_collections.ConfigDict], Callable[[dict], dict]] | None = None,
) -> dict:
    """Runs (or resumes) the whole schedule in `workdir`; returns a short summary dict.
    Evaluation is the caller's (train.py runs `m2u_jax.evaluate` after it).

    With `train.validate_every` > 0, `make_validator(resolved config)` gives
    `validate(params) -> {name: value}` (`m2u_jax.validation.make_validator`), called every
    `validate_every` fine-tuning steps and at the end; with `train.best_metric` the params that
    score highest on it are kept in WORKDIR/best (`run_checkpoint.save_best`).

    `model.num_defect_classes` is checked against the data first
    (`m2u_jax.data.splits.resolve_num_defect_classes`; 0 = from the data, resolved into
    WORKDIR/config.json); a value that does not fit raises ConfigError before training.

    Resuming: the newest checkpoint in WORKDIR/checkpoints decides the stage and step; the data
    iterator skips the batches already consumed (`start_step`), and dropout keys depend only on
    the step, so the resumed run reproduces the losses of an uninterrupted one.
    Raises NonFiniteLossError when a loss goes NaN/Inf (the last good checkpoint is kept).
    """
    config_lib.validate(config, num_devices=jax.device_count())
    train = config.train
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise config_lib.ConfigError(f"--workdir {workdir} is a file, not a folder")
    # Keys that only the builders check (method, mesh, variant, dtypes, ...), before the data is
    # read or anything is written: one line naming the key.
    try:
        if train.pretrain_method not in contrastive.PRETRAIN_METHODS:
            raise ValueError(
                f"train.pretrain_method={train.pretrain_method!r}: use one of "
                f"{contrastive.PRETRAIN_METHODS}"
            )
        mesh = sharding.config_mesh(config)
        if train.batch_size % (train.grad_accum_steps * mesh.size):
            raise ValueError(
                f"train.batch_size={train.batch_size} must split into train.grad_accum_steps="
                f"{train.grad_accum_steps} micro-batches that each divide over the "
                f"{mesh.size} devices"
            )
        probe = config.model.copy_and_resolve_references()
        probe.num_defect_classes = max(1, int(probe.num_defect_classes))  # 0: from the data
        model_lib.build_model(probe)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from None
    # The model follows the data: model.num_defect_classes = 0 becomes the data's class count
    # (written to config.json, so eval and export rebuild this model); a set value that does not
    # fit the data stops here, before anything is built or written.
    from m2u_jax.data import splits as splits_lib  # lazy: file discovery, no TF

    requested = int(config.model.num_defect_classes)
    config = splits_lib.with_data_num_defect_classes(config)
    config = config_lib.resolve_detach_aux_heads(config)  # written resolved to config.json
    if requested == 0:
        logging.info(
            "model.num_defect_classes=0: %d class(es) from the data",
            config.model.num_defect_classes,
        )
    run_checkpoint.quiet_orbax()
    # A resumed run keeps its architecture: a changed key stops here, before config.json (which
    # must keep describing the checkpoints) is overwritten.
    config_lib.check_same_architecture(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    logging.info(
        "mesh %s over %d of %d devices on %d processes (%s)",
        dict(mesh.shape),
        mesh.size,
        jax.device_count(),
        jax.process_count(),
        jax.devices()[0].device_kind,
    )
    model = model_lib.build_model(config.model)
    rng = jax.random.PRNGKey(config.seed)
    total_steps = train.pretrain_steps + train.finetune_steps
    manager = run_checkpoint.make_manager(workdir, train.keep_checkpoints)
    run = _Run(
        config,
        workdir,
        mesh,
        manager,
        MetricLog(workdir, total_steps, train.log_every),
        total_steps,
    )
    if train.validate_every > 0 and train.finetune_steps > 0:
        if make_validator is None:
            raise config_lib.ConfigError(
                "train.validate_every > 0 needs a validator: run train.py (or pass "
                "make_validator=m2u_jax.validation.make_validator)"
            )
        run.validate = make_validator(config)
        if train.best_metric:
            run.best_manager = run_checkpoint.make_manager(workdir, 1, subdir="best")
            run.best_value = run_checkpoint.best_value(run.best_manager, train.best_metric)
    summary: dict = {"workdir": workdir}
    run_start = time.perf_counter()
    try:
        # The newest checkpoint that reads back; newer damaged ones are named in one warning
        # and moved aside, kept (UnreadableCheckpointError when none is intact).
        meta = run_checkpoint.resume_meta(manager)
        if meta is not None:
            run.last_checkpoint = meta["global_step"]
            run.seconds_before = float(meta.get("train_seconds", 0.0))
            if meta["stage"] == "pretrain" and meta["pretrain_method"] != train.pretrain_method:
                raise ValueError(
                    f"{workdir}/checkpoints holds a {meta['pretrain_method']} pretraining run but "
                    f"train.pretrain_method={train.pretrain_method!r}; use another --workdir"
                )
            logging.info("resuming from checkpoint %d (%s)", meta["global_step"], meta)

        pretrained_encoder = None
        resume_stage = None if meta is None else meta["stage"]
        if train.pretrain_steps > 0 and resume_stage != "finetune":
            stage = build_pretrain_stage(config, model, mesh, jax.random.fold_in(rng, 0))
            state, start = _initial_state(
                stage, manager, meta if resume_stage == "pretrain" else None
            )
            if start < stage.num_steps:
                state, scalars = _run_stage(run, stage, state, 0, start)
                summary["pretrain"] = scalars
            pretrained_encoder = state.params["encoder"]

        if train.finetune_steps > 0:
            stage = build_finetune_stage(
                config, model, mesh, jax.random.fold_in(rng, 1), pretrained_encoder
            )
            del pretrained_encoder
            resume = meta if resume_stage == "finetune" else None
            state, start = _initial_state(stage, manager, resume)
            if start < stage.num_steps:
                state, scalars = _run_stage(run, stage, state, train.pretrain_steps, start)
                summary["finetune"] = scalars
        manager.wait_until_finished()
    finally:
        if run.profiling:
            jax.profiler.stop_trace()
        manager.close()
        if run.best_manager is not None:
            run.best_manager.close()
        run.metric_log.close()

    summary["seconds"] = time.perf_counter() - run_start
    summary["checkpoint"] = run.last_checkpoint
    if run.best_value is not None:
        summary["best"] = {"metric": train.best_metric, "value": run.best_value}
    for stage_name in config_lib.STAGES:
        if stage_name in summary:
            scalars = summary[stage_name]
            logging.info(
                "summary %s: final loss %.4f, %.2f steps/s, %.1f images/s/device",
                stage_name,
                scalars["loss"],
                scalars["steps_per_sec"],
                scalars["images_per_sec_per_device"],
            )
    logging.info(
        "summary: %.0fs, last checkpoint %s in %s",
        summary["seconds"],
        run.last_checkpoint,
        os.path.join(workdir, "checkpoints"),
    )
    return summary


def main(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    multihost: bool = False,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    make_validator: Callable[[ml_collections.ConfigDict], Callable[[dict], dict]] | None = None,
) -> dict:
    """Entry point of train.py: optional `jax.distributed.initialize`, then training.

    `multihost` alone lets jax detect the cluster (TPU pods, SLURM, ...); `coordinator`,
    `num_processes` and `process_id` set it explicitly (e.g. several CPU processes on one
    machine; jax 0.10's default CPU collectives, gloo, then run the cross-process reductions).
    """
    if multihost or coordinator is not None:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
        logging.info(
            "jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    return train(config, workdir, make_validator=make_validator)
