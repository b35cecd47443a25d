"""Throughput benchmark of every hot path: train step, inference, MC dropout, input pipeline,
ONNX Runtime vs JAX, a PyTorch reference backbone, and train-step compile time.

The measuring code of `m2u-benchmark` (m2u_jax/cli/benchmark.py: the options, the table, the
JSON file); `run_benchmark(config, modes)` returns the results dict. Modes:

- `train`: the jitted fine-tuning step of `m2u_jax.trainer.build_finetune_stage` (sharded over
  every device, state donated) on an in-memory batch of `train.batch_size` images:
  `images_per_sec_per_device`, `step_ms`, `mfu`, `compile_s`; with `Settings.all_defective`
  also the same program on a batch without a defect-free image, timed alternately with the
  default batch: `all_defective_step_ms`, `all_defective_ratio`.
- `infer`: `model.predict` (forward + image score + NMS) on `eval.batch_size` images on one
  device: `images_per_sec`, `latency_ms_batch1`, `mfu`; also the bare forward pass.
- `mc`: `uncertainty.mc_dropout_predict` with T = `eval.num_mc_samples` samples run
  `eval.mc_chunk_size` at a time, against one deterministic pass producing the same statistics
  on the same batch: `cost_ratio`.
- `pipeline`: `m2u_jax.data.pipeline.benchmark_pipeline` (tf.data; the only mode that imports
  TensorFlow): `images_per_sec`, and its ratio to the train step's images/s on this host. Uses
  `data.root`, or a synthetic set written to a temporary folder when that does not exist.
- `onnx`: the exported inference graph (`m2u_jax.export`, as `m2u-export` writes it) in ONNX
  Runtime against the same function jitted in JAX on the same batch.
- `tiled`: inference at real resolution through `m2u_jax.predictor.Predictor`, JAX against
  ONNX Runtime (one dynamic-batch export): at the model input, batch-1 latency and images/s at
  `eval.batch_size`; then one `--tile-image-size` square image predicted with tiling on
  (overlapping model-size tiles, `eval.batch_size` at a time, maps stitched, boxes merged):
  `tiles`, `tiled_ms` per backend, `onnx_over_jax`, `flops_ratio_of_tiles` and
  `tiling_overhead` (`bench_tiled`).
- `torch`: a PyTorch reference of the same backbone (m2u_jax/torch_reference.py) against the JAX
  backbone; skipped (with the reason in the JSON) when torch is not importable.
- `compile`: lowering and XLA compile time of the train step with `model.scan_blocks` False and
  True (from abstract shapes: nothing is allocated, so B at 256 compiles on a laptop).
- `edge`: FLOPs per image of the exported graph at batch 1 (T = 1 and T = `eval.num_mc_samples`)
  and the images/s they project to on Jetson GPUs (`EDGE_DEVICES`, `EDGE_UTILIZATION`).

Experiments (`Settings`, the command's flags of the same names): `--mc-chunk N` also times MC
dropout with another chunk size, the samples run N at a time (N = 0: all T in one vmap),
against the configured `eval.mc_chunk_size`; `--unrolled-threefry` installs `m2u_jax.cpu_prng`
(a loop-free CPU lowering of dropout's RNG, same bits); `--profile` adds a jax.profiler
breakdown.

Method: every program is lowered and compiled once (`compile_s`), then called through its
`jax.jit` function, which reuses that executable (`jit_cache_entries` = 1 shows no retrace);
`--warmup` calls are discarded, then `--repeats` timed repeats, each ended by
`jax.block_until_ready`; reported times are medians, ratios are timed alternately. MFU uses
the FLOPs of the compiled program (XLA cost analysis) and the peak of
`m2u_jax.flops.peak_flops` (the device table, or on CPU the fastest float32 matmul measured at
the start and the end of the same run). The train/infer/mc/torch/compile modes never
import TensorFlow (`tensorflow_imported` in the JSON says so), so they run on accelerator
machines that have only jax/flax/optax/orbax.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2u_jax import config as config_lib
from m2u_jax import cpu_prng, host_memory, sharding, trainer, uncertainty
from m2u_jax import flops as flops_lib
from m2u_jax import model as model_lib
from m2u_jax.export import graph as export_graph
from m2u_jax.modalities import num_channels

MODES = ("train", "infer", "mc", "pipeline", "onnx", "tiled", "torch", "compile", "edge")
# Edge projection (`edge` mode): the GPU's FP16 peak on its CUDA cores, FLOP/s = 2 x 2 x cores x
# boost clock (an FMA is 2 FLOPs; FP16 runs at twice the FP32 rate on Volta / Ampere). Tensor
# cores are left out on purpose: a model 64-384 wide at batch 1 does not keep them fed.
EDGE_DEVICES = {
    # 384 CUDA cores at 1.1 GHz (Volta GV10B; 15 W mode): 1.69 TFLOP/s FP16.
    "jetson_xavier_nx": 2 * 2 * 384 * 1.1e9,
    # 1,024 CUDA cores at 1.02 GHz (Ampere GA10B, JetPack 6.1 "Super" clocks): 4.18 TFLOP/s.
    "jetson_orin_nano_super": 2 * 2 * 1024 * 1.02e9,
    # 2,048 CUDA cores at 1.3 GHz (Ampere, MAXN): 10.6 TFLOP/s.
    "jetson_agx_orin_64gb": 2 * 2 * 2048 * 1.3e9,
}
# The fraction of that peak a small model's graph is assumed to reach under TensorRT at batch 1
# (the same graph reaches 27-33 % of the measured CPU matmul peak here: docs/performance.md).
EDGE_UTILIZATION = 0.3
DEFAULT_MODES = ("train", "infer", "mc")
# `tiled` mode: the Predictor's default tile overlap, and the targets the JSON is checked
# against (issue 17: ORT within 1.2x of JAX either way, tiling overhead <= 1.3).
BACKEND_RATIO_TARGET = 1.2
TILING_OVERHEAD_TARGET = 1.3


class Settings:
    """Measurement settings (command-line flags of the same names)."""

    def __init__(
        self,
        *,
        warmup: int = 2,
        repeats: int = 5,
        steps_per_repeat: int = 3,
        pipeline_batches: int = 20,
        matmul_sizes: tuple[int, ...] = flops_lib.MATMUL_PEAK_SIZES,
        profile: bool = False,
        onnx_path: str | None = None,
        unrolled_threefry: bool = False,
        mc_chunk: int | None = None,
        tile_image_size: int = 1024,
        all_defective: bool = False,
    ):
        if warmup < 1 or repeats < 1 or steps_per_repeat < 1 or pipeline_batches < 1:
            raise ValueError(
                "--warmup, --repeats, --steps-per-repeat and --pipeline-batches must be >= 1"
            )
        if mc_chunk is not None and mc_chunk < 0:
            raise ValueError(f"--mc-chunk {mc_chunk} must be >= 0 (0 = all samples at once)")
        if tile_image_size < 1:
            raise ValueError(f"--tile-image-size {tile_image_size} must be >= 1")
        self.warmup = warmup
        self.repeats = repeats
        self.steps_per_repeat = steps_per_repeat
        self.pipeline_batches = pipeline_batches
        self.matmul_sizes = tuple(matmul_sizes)
        self.profile = profile
        self.onnx_path = onnx_path
        self.unrolled_threefry = unrolled_threefry
        self.mc_chunk = mc_chunk
        self.tile_image_size = tile_image_size
        self.all_defective = all_defective


# ----------------------------------------------------------------------------- config


def describe_config(config: ml_collections.ConfigDict) -> dict:
    """The settings that decide the cost of the programs, for the JSON."""
    model = config.model
    return dict(
        variant=model.variant,
        image_size=int(config.data.image_size),
        modalities=str(config.data.modalities),
        scales=list(model.scales),
        patch_size=int(model.patch_size),
        patch_stride=int(model.patch_stride),
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        attention=model.attention,
        scan_blocks=bool(model.scan_blocks),
        remat=bool(model.remat),
        mc_dropout_blocks=int(model.mc_dropout_blocks),
        train_batch_size=int(config.train.batch_size),
        eval_batch_size=int(config.eval.batch_size),
        num_mc_samples=int(config.eval.num_mc_samples),
        mc_chunk_size=int(config.eval.mc_chunk_size),
    )


# ----------------------------------------------------------------------------- inputs


def synthetic_batch(
    config: ml_collections.ConfigDict, batch_size: int, seed: int = 0, all_defective: bool = False
) -> dict:
    """An in-memory fine-tuning batch with the keys, shapes and dtypes of docs/interfaces.md
    (numpy): random images; every other image (every image with `all_defective`) is
    "defective" with one square defect, its mask, box and class. Pixel values do not change the
    cost of any program; a batch without a defect-free image skips the reconstruction loss
    (`losses.reconstruction_loss`), as NEU-DET's batches do."""
    rng = np.random.default_rng(seed)
    side = int(config.data.image_size)
    channels = num_channels(config.data.modalities)
    max_boxes = int(config.data.max_boxes)
    num_classes = int(config.model.num_defect_classes)
    images = rng.random((batch_size, side, side, channels), dtype=np.float32)
    labels = (np.ones(batch_size) if all_defective else np.arange(batch_size) % 2).astype(np.int32)
    defect_types = np.where(labels == 1, np.arange(batch_size) % num_classes + 1, 0)
    masks = np.zeros((batch_size, side, side), np.float32)
    boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
    box_classes = np.zeros((batch_size, max_boxes), np.int32)
    box_valid = np.zeros((batch_size, max_boxes), np.float32)
    low, high = side // 4, side // 2
    for index in np.flatnonzero(labels):
        masks[index, low:high, low:high] = 1.0
        boxes[index, 0] = (low, low, high, high)
        box_classes[index, 0] = defect_types[index] - 1
        box_valid[index, 0] = 1.0
    return dict(
        images=images,
        clean_images=rng.random((batch_size, side, side, channels), dtype=np.float32),
        recon_valid=(1 - labels).astype(np.float32),
        masks=masks,
        labels=labels,
        defect_types=defect_types.astype(np.int32),
        boxes=boxes,
        box_classes=box_classes,
        box_valid=box_valid,
    )


def _images(config: ml_collections.ConfigDict, batch_size: int, seed: int = 1) -> jax.Array:
    side = int(config.data.image_size)
    channels = num_channels(config.data.modalities)
    rng = np.random.default_rng(seed)
    return jax.device_put(rng.random((batch_size, side, side, channels), dtype=np.float32))


# ----------------------------------------------------------------------------- timing


def time_calls(call: Callable[[], object], settings: Settings, calls_per_repeat: int = 1) -> dict:
    """Warm-up, then `settings.repeats` timed repeats of `calls_per_repeat` calls each (the
    last result blocked on). Returns `{'median_s', 'min_s', 'repeats_s'}`, all per call."""
    for _ in range(settings.warmup):
        jax.block_until_ready(call())
    per_call = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        result = None
        for _ in range(calls_per_repeat):
            result = call()
        jax.block_until_ready(result)
        per_call.append((time.perf_counter() - start) / calls_per_repeat)
    return dict(median_s=statistics.median(per_call), min_s=min(per_call), repeats_s=per_call)


def time_pair(
    numerator: Callable[[], object], denominator: Callable[[], object], settings: Settings
) -> dict:
    """Cost ratio of two programs timed alternately (a, b, a, b, ...), so that load changes on
    a shared machine hit both alike. Returns the median of the per-repeat ratios and each
    program's median and min seconds."""
    for _ in range(settings.warmup):
        jax.block_until_ready(numerator())
        jax.block_until_ready(denominator())
    times: tuple[list, list] = ([], [])
    for _ in range(settings.repeats):
        for call, bucket in ((numerator, times[0]), (denominator, times[1])):
            start = time.perf_counter()
            jax.block_until_ready(call())
            bucket.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(*times)]
    return dict(
        ratio=statistics.median(ratios),
        numerator_median_s=statistics.median(times[0]),
        numerator_min_s=min(times[0]),
        denominator_median_s=statistics.median(times[1]),
        denominator_min_s=min(times[1]),
    )


@dataclasses.dataclass
class Program:
    """A jitted function compiled for one set of argument shapes.

    Calls go through `jitted` (the user's path, C++ dispatch) and reuse the executable that
    `compile` built; `compiled` serves the cost and memory analyses.
    """

    jitted: Callable
    compiled: object
    lower_s: float
    compile_s: float
    compile_cpu_s: float  # process CPU seconds of the compile (steadier under load)

    def __call__(self, *args):
        return self.jitted(*args)

    def cache_entries(self) -> int | None:
        """Entries in the jit cache: 1 after any number of calls = never retraced."""
        size = getattr(self.jitted, "_cache_size", None)
        return None if size is None else int(size())


def compile_program(fn: Callable, *args) -> Program:
    """`jax.jit(fn)` (or `fn` if already jitted) lowered and compiled for `args`, timed."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at, cpu_start = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    return Program(
        jitted,
        compiled,
        lowered_at - start,
        time.perf_counter() - lowered_at,
        time.process_time() - cpu_start,
    )


def _memory_of(compiled) -> dict:
    bytes_, source = flops_lib.peak_memory(compiled)
    return dict(peak_memory_bytes=bytes_, peak_memory_source=source)


def _profile(call: Callable[[], object], compiled, settings: Settings) -> dict | None:
    if not settings.profile:
        return None
    return flops_lib.profile_ops(call, compiled.as_text(), calls=settings.repeats)


# ----------------------------------------------------------------------------- model


def build(config: ml_collections.ConfigDict):
    """(model, float32-initialised variables on the default device) of `config.model`."""
    model = model_lib.build_model(config.model)
    side = int(config.data.image_size)
    channels = num_channels(config.data.modalities)
    variables = jax.jit(
        lambda key: model.init(key, jnp.zeros((1, side, side, channels)), train=False)
    )(jax.random.PRNGKey(config.seed))
    return model, variables


def predict_fn(model) -> Callable:
    """`(variables, images) -> predictions` of `model.predict` (the infer mode's program)."""
    return lambda variables, images: model.apply(variables, images, method=model_lib.M2UNet.predict)


def forward_fn(model) -> Callable:
    """`(variables, images) -> outputs` of the bare deterministic forward (no post-processing)."""
    return lambda variables, images: model.apply(variables, images, train=False)[0]


def deterministic_statistics_fn(model) -> Callable:
    """One deterministic pass giving the statistics MC dropout gives (score, anomaly map, type
    probabilities; variances are 0): the reference of the MC cost ratio."""

    def statistics_of_one_pass(variables, images):
        outputs, _ = model.apply(variables, images, train=False)
        used = {key: outputs[key][None] for key in ("pixel_logits", "image_logits", "type_logits")}
        return uncertainty.sample_statistics(used, model.score_kwargs)

    return statistics_of_one_pass


def mc_fn(model, num_samples: int, chunk_size: int) -> Callable:
    """`(variables, images, rng) -> statistics` of `uncertainty.mc_dropout_predict` with the
    samples run `chunk_size` at a time (0 = all T in one vmap)."""
    return lambda variables, images, rng: uncertainty.mc_dropout_predict(
        model, variables, images, rng, num_samples, chunk_size=chunk_size
    )


# ----------------------------------------------------------------------------- modes


def bench_train(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """The fine-tuning train step (trainer.build_finetune_stage) on an in-memory batch."""
    mesh = sharding.config_mesh(config)
    config = config_lib.resolve_detach_aux_heads(config)  # the step train.py would run
    model = model_lib.build_model(config.model)
    stage = trainer.build_finetune_stage(config, model, mesh, jax.random.PRNGKey(config.seed))
    batch_size = int(config.train.batch_size)
    batch = jax.device_put(synthetic_batch(config, batch_size), sharding.batch_sharding(mesh))
    state = stage.init_state()
    program = compile_program(stage.train_step, state, batch)
    holder = [state]

    def one_step():
        holder[0] = program(holder[0], batch)  # the state is donated: thread it through
        return holder[0]

    timing = time_calls(one_step, settings, settings.steps_per_repeat)
    step_s = timing["median_s"]
    num_devices = mesh.size
    flops = flops_lib.compiled_flops(program.compiled)
    loss = float(jax.device_get(holder[0].metric_sums["loss"]))
    result = dict(
        batch_size=batch_size,
        num_devices=num_devices,
        step_ms=1e3 * step_s,
        step_ms_min=1e3 * timing["min_s"],
        step_ms_repeats=[1e3 * t for t in timing["repeats_s"]],
        images_per_sec=batch_size / step_s,
        images_per_sec_per_device=batch_size / step_s / num_devices,
        flops_per_step_per_device=flops,
        flops_note=(
            "XLA cost analysis; a while-loop body counts once"
            if flops_lib.has_loops(program.compiled)
            else "XLA cost analysis"
        ),
        lower_s=program.lower_s,
        compile_s=program.compile_s,
        compile_cpu_s=program.compile_cpu_s,
        jit_cache_entries=program.cache_entries(),
        loss_is_finite=math.isfinite(loss),
        **_memory_of(program.compiled),
    )
    if settings.all_defective:
        # NEU-DET's batches: no image has a reconstruction target, so the loss skips SSIM at
        # run time (`losses.reconstruction_loss`). Same program, batches alternated: the
        # machine's drift between two processes is larger than the difference.
        defective = synthetic_batch(config, batch_size, all_defective=True)
        defective = jax.device_put(defective, sharding.batch_sharding(mesh))

        def defective_step():
            holder[0] = program(holder[0], defective)
            return holder[0]

        pair = time_pair(defective_step, one_step, settings)
        result.update(
            all_defective_step_ms=1e3 * pair["numerator_median_s"],
            all_defective_step_ms_min=1e3 * pair["numerator_min_s"],
            alternated_step_ms=1e3 * pair["denominator_median_s"],
            all_defective_ratio=pair["ratio"],
        )
    profile = _profile(one_step, program.compiled, settings)
    if profile is not None:
        result["profile"] = profile
    return result


def bench_infer(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """`model.predict` at the eval batch and at batch 1 (latency), plus the bare forward."""
    model, variables = build(config)
    batch_size = int(config.eval.batch_size)
    images = _images(config, batch_size)
    program = compile_program(predict_fn(model), variables, images)
    timing = time_calls(lambda: program(variables, images), settings)
    flops = flops_lib.compiled_flops(program.compiled)
    single = _images(config, 1)
    single_program = compile_program(predict_fn(model), variables, single)
    latency = time_calls(lambda: single_program(variables, single), settings)
    forward = compile_program(forward_fn(model), variables, images)
    forward_timing = time_calls(lambda: forward(variables, images), settings)
    forward_flops = flops_lib.compiled_flops(forward.compiled)
    result = dict(
        batch_size=batch_size,
        images_per_sec=batch_size / timing["median_s"],
        batch_ms=1e3 * timing["median_s"],
        batch_ms_min=1e3 * timing["min_s"],
        batch_ms_repeats=[1e3 * t for t in timing["repeats_s"]],
        latency_ms_batch1=1e3 * latency["median_s"],
        latency_ms_batch1_min=1e3 * latency["min_s"],
        flops_per_batch=flops,
        forward_images_per_sec=batch_size / forward_timing["median_s"],
        forward_flops_per_batch=forward_flops,
        lower_s=program.lower_s,
        compile_s=program.compile_s,
        jit_cache_entries=program.cache_entries(),
        **_memory_of(program.compiled),
    )
    profile = _profile(lambda: program(variables, images), program.compiled, settings)
    if profile is not None:
        result["profile"] = profile
    return result


def bench_mc(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """MC dropout (T samples, trunk once) against one deterministic pass, same batch."""
    model, variables = build(config)
    num_samples = int(config.eval.num_mc_samples)
    chunk_size = int(config.eval.mc_chunk_size)
    batch_size = int(config.eval.batch_size)
    images = _images(config, batch_size)
    rng = jax.random.PRNGKey(1)
    mc = compile_program(mc_fn(model, num_samples, chunk_size), variables, images, rng)
    single = compile_program(deterministic_statistics_fn(model), variables, images)
    pair = time_pair(
        lambda: mc(variables, images, rng), lambda: single(variables, images), settings
    )
    # Every extra sample costs one tail, so 1 + (T - 1) x tail / pass is the ratio a
    # compute-bound device would reach; tail FLOPs = one pass - the trunk's.
    trunk = compile_program(
        lambda v, x: model.apply(v, x, train=False, method=model_lib.M2UNet.trunk)[0],
        variables,
        images,
    )
    # XLA's cost analysis counts a loop body once, so the FLOPs of chunked sampling (a loop
    # over chunks) are taken from the same statistics with all T samples in one vmap.
    all_at_once = (
        mc
        if chunk_size == 0
        else compile_program(mc_fn(model, num_samples, 0), variables, images, rng)
    )
    mc_flops = flops_lib.compiled_flops(all_at_once.compiled)
    single_flops = flops_lib.compiled_flops(single.compiled)
    trunk_flops = flops_lib.compiled_flops(trunk.compiled)
    tail_fraction = 1.0 - trunk_flops / single_flops if trunk_flops and single_flops else None
    result = dict(
        num_samples=num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        mc_dropout_blocks=int(config.model.mc_dropout_blocks),
        cost_ratio=pair["ratio"],
        cost_ratio_is="median over repeats of (MC time / deterministic time), timed alternately",
        # On a shared machine the fastest repeat of each is the least disturbed one.
        cost_ratio_of_minimums=pair["numerator_min_s"] / pair["denominator_min_s"],
        mc_ms=1e3 * pair["numerator_median_s"],
        mc_ms_min=1e3 * pair["numerator_min_s"],
        deterministic_ms=1e3 * pair["denominator_median_s"],
        deterministic_ms_min=1e3 * pair["denominator_min_s"],
        images_per_sec=batch_size / pair["numerator_median_s"],
        mc_flops=mc_flops,
        mc_flops_from="the program itself"
        if chunk_size == 0
        else "the same statistics with all T samples in one vmap (chunk_size=0)",
        deterministic_flops=single_flops,
        flops_ratio=mc_flops / single_flops if mc_flops and single_flops else None,
        tail_flops_fraction=tail_fraction,
        flops_bound_ratio=None if tail_fraction is None else 1 + (num_samples - 1) * tail_fraction,
        compile_s=mc.compile_s,
        jit_cache_entries=mc.cache_entries(),
        **_memory_of(mc.compiled),
    )
    if settings.mc_chunk is not None:
        chunked = compile_program(
            mc_fn(model, num_samples, settings.mc_chunk), variables, images, rng
        )
        reference, candidate = mc(variables, images, rng), chunked(variables, images, rng)
        chunked_pair = time_pair(
            lambda: chunked(variables, images, rng), lambda: single(variables, images), settings
        )
        result["chunked"] = dict(
            chunk=settings.mc_chunk,
            cost_ratio=chunked_pair["ratio"],
            cost_ratio_of_minimums=chunked_pair["numerator_min_s"]
            / chunked_pair["denominator_min_s"],
            mc_ms=1e3 * chunked_pair["numerator_median_s"],
            mc_ms_min=1e3 * chunked_pair["numerator_min_s"],
            deterministic_ms=1e3 * chunked_pair["denominator_median_s"],
            max_abs_difference=max(
                float(jnp.max(jnp.abs(reference[name] - candidate[name]))) for name in reference
            ),
            compile_s=chunked.compile_s,
        )
    profile = _profile(lambda: mc(variables, images, rng), mc.compiled, settings)
    if profile is not None:
        result["profile"] = profile
    return result


def _pipeline_root(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """(data root, where it comes from): `data.root` when it exists, else a synthetic set."""
    if os.path.isdir(config.data.root):
        return config.data.root, "data.root"
    from m2u_jax.data import synthetic  # the pipeline mode's data only (Pillow, worker pools)

    batch_size = int(config.train.batch_size)
    root = os.path.join(workdir, "synthetic")
    synthetic.generate(
        root,
        categories="fabric",
        image_size=int(config.data.image_size),
        num_train=max(4 * batch_size, 32),
        num_test_good=2,
        num_test_defect=1,
    )
    return root, f"synthetic (fabric, written to a temporary folder; {config.data.root} is absent)"


def bench_pipeline(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """Host input pipeline images/s (`pipeline.benchmark_pipeline`; imports TensorFlow)."""
    from m2u_jax.data import pipeline  # TensorFlow: only this mode imports it

    with tempfile.TemporaryDirectory() as workdir:
        root, source = _pipeline_root(config, workdir)
        pipeline_config = copy.deepcopy(config)
        pipeline_config.data.root = root
        runs = [
            pipeline.benchmark_pipeline(pipeline_config, settings.pipeline_batches)
            for _ in range(min(settings.repeats, 3))
        ]
    return dict(
        images_per_sec=statistics.median(runs),
        images_per_sec_runs=runs,
        batch_size=int(config.train.batch_size),
        num_batches=settings.pipeline_batches,
        data=source,
        cache=bool(config.data.cache),
    )


def _onnx_unavailable() -> dict | None:
    """The JSON of a skipped ONNX mode when the `export` extra is not importable, else None."""
    try:
        import onnxruntime  # noqa: F401

        from m2u_jax.export import convert, parity  # noqa: F401
    except ImportError as error:
        return dict(skipped=True, reason=f"ONNX export/runtime not importable: {error}")
    return None


@contextlib.contextmanager
def _exported_onnx(
    config: ml_collections.ConfigDict, variables: dict, settings: Settings, batch: int | None
) -> Iterator[tuple[str, dict]]:
    """Yields (path, report) of the inference graph exported as `m2u-export` writes it
    (`export.convert.convert`: jax2onnx, default options, T = 1; `batch` images, None =
    dynamic) to `settings.onnx_path`, or to a temporary folder removed on exit."""
    from m2u_jax.export import convert

    with tempfile.TemporaryDirectory() as workdir:
        path = settings.onnx_path or os.path.join(workdir, "model.onnx")
        yield path, convert.convert(config, variables, path, batch=batch, parity_count=2)


def bench_onnx(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """ONNX Runtime (CPU provider) on the exported inference graph (`_exported_onnx`, fixed
    batch) against the same function jitted in JAX, on the same images, timed alternately
    (`time_pair`).

    The main numbers use ONNX Runtime's default session, whose idle worker threads spin
    waiting for the next operator; `without_spinning` repeats the pair with
    `session.intra_op.allow_spinning=0`. Which is faster depends on the machine's load:
    spinning threads take cores from everything else, the next JAX call included (demo, batch
    32, 2 cores: at load ~1.7 spinning made ORT 1.2x faster and JAX 1.4x slower; at load ~4 it
    made ORT 1.8x slower)."""
    skipped = _onnx_unavailable()
    if skipped:
        return skipped
    import onnxruntime

    from m2u_jax.export import parity

    _, variables = build(config)
    batch_size = int(config.eval.batch_size)
    export_model, export_params = export_graph.build_export_model(config.model, variables["params"])
    images = _images(config, batch_size)
    jax_program = compile_program(
        export_graph.make_inference_fn(export_model, export_params), images
    )
    host_images = np.asarray(images)
    with _exported_onnx(config, variables, settings, batch_size) as (onnx_path, report):

        def onnxruntime_against_jax(allow_spinning: bool) -> tuple[dict, list[str]]:
            # One session at a time: it is freed (threads and all) when this returns.
            session = parity.onnx_session(onnx_path, allow_spinning=allow_spinning)
            pair = time_pair(
                lambda: parity.run_onnxruntime(session, host_images),
                lambda: jax_program(images),
                settings,
            )
            return pair, session.get_providers()

        pair, providers = onnxruntime_against_jax(allow_spinning=True)
        sleeping_pair, _ = onnxruntime_against_jax(allow_spinning=False)
    onnx_rate = batch_size / pair["numerator_median_s"]
    jax_rate = batch_size / pair["denominator_median_s"]
    slower_over_faster = max(pair["ratio"], 1.0 / pair["ratio"])
    return dict(
        batch_size=batch_size,
        images_per_sec=onnx_rate,
        jax_images_per_sec=jax_rate,
        onnx_time_over_jax_time=pair["ratio"],
        faster="jax" if pair["ratio"] > 1 else "onnxruntime",
        slower_over_faster=slower_over_faster,
        within_1_5x=slower_over_faster <= 1.5,
        onnxruntime_version=onnxruntime.__version__,
        providers=providers,
        without_spinning=dict(
            images_per_sec=batch_size / sleeping_pair["numerator_median_s"],
            jax_images_per_sec=batch_size / sleeping_pair["denominator_median_s"],
            onnx_time_over_jax_time=sleeping_pair["ratio"],
        ),
        attention=export_graph.export_model_config(config.model).attention,
        export_passed_checks=bool(report.get("passed")),
        onnx_nodes=report.get("num_nodes"),
    )


def bench_tiled(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """Inference at real resolution through `m2u_jax.predictor.Predictor`, JAX against ONNX
    Runtime (CPU provider, default session), each pair timed alternately (`time_pair`);
    `onnx_over_jax` ratios are ORT time / JAX time.

    Both predictors run the export graph (`export.graph.make_inference_fn`, T = 1) with the
    same thresholds and box merging: JAX through `Predictor.from_params` (the forward
    `Predictor.from_workdir` builds), ORT through `Predictor.from_onnx` on one dynamic-batch
    export (`_exported_onnx`), so every batch (a last partial batch of tiles too) runs
    unpadded on both.

    - native: each backend's `Predictor.forward` on host images at the model input (S px):
      `latency_ms_batch1`, and `batch_ms` / `images_per_sec` at B = `eval.batch_size`.
    - tiled: `Predictor.predict` of one `settings.tile_image_size` square image (H = W pixels)
      with tiling on (`predictor.TILE_OVERLAP`, B tiles per forward): cropping, the batches,
      stitching and box merging, as a user's call runs them: `tiles`, `tiled_ms`.
    - `flops_ratio_of_tiles` = tiles x S^2 / (H x W): the model FLOPs of the tiled call over
      those of the image's own pixels at the model's FLOPs per pixel (> 1: the overlaps are
      computed twice).
    - `tiling_overhead` = tiled_ms / (tiles x batch_ms / B): the tiled call's time over what
      as many model-size images cost in full batches (1: tiling costs nothing beyond its
      tiles' FLOPs; target <= TILING_OVERHEAD_TARGET).
    """
    skipped = _onnx_unavailable()
    if skipped:
        return skipped
    import onnxruntime

    from m2u_jax import predictor as predictor_lib
    from m2u_jax.export import onnx_runner

    _, variables = build(config)
    size, batch_size = int(config.data.image_size), int(config.eval.batch_size)
    side = int(settings.tile_image_size)
    channels = num_channels(config.data.modalities)
    rng = np.random.default_rng(1)
    batch = rng.random((batch_size, size, size, channels), dtype=np.float32)
    image = rng.random((side, side, channels), dtype=np.float32)
    with _exported_onnx(config, variables, settings, None) as (onnx_path, report):
        # A random model has no calibrated thresholds; they only pick the decision.
        onnx_predictor = predictor_lib.Predictor.from_onnx(
            onnx_path,
            thresholds=onnx_runner.DEFAULT_THRESHOLDS,
            providers=["CPUExecutionProvider"],
        )
        jax_predictor = predictor_lib.Predictor.from_params(
            config, variables["params"], thresholds=onnx_predictor.thresholds
        )
        predictors = dict(jax=jax_predictor, onnxruntime=onnx_predictor)

        def paired(call: Callable[[predictor_lib.Predictor], object]) -> dict:
            return time_pair(lambda: call(onnx_predictor), lambda: call(jax_predictor), settings)

        def predict_tiled(predictor: predictor_lib.Predictor) -> predictor_lib.Prediction:
            return predictor.predict(
                [image], batch_size=batch_size, tiling="on", overlap=predictor_lib.TILE_OVERLAP
            )[0]

        pairs = dict(
            batch1=paired(lambda predictor: predictor.forward(batch[:1])),
            batch=paired(lambda predictor: predictor.forward(batch)),
            tiled=paired(predict_tiled),
        )
        predictions = {name: predict_tiled(predictor) for name, predictor in predictors.items()}
    tiles = predictions["jax"].tiles
    backends = {}
    for name, key in (("onnxruntime", "numerator_median_s"), ("jax", "denominator_median_s")):
        batch_ms, tiled_ms = 1e3 * pairs["batch"][key], 1e3 * pairs["tiled"][key]
        overhead = tiled_ms / (tiles * batch_ms / batch_size)
        backends[name] = dict(
            latency_ms_batch1=1e3 * pairs["batch1"][key],
            batch_ms=batch_ms,
            images_per_sec=batch_size / pairs["batch"][key],
            tiled_ms=tiled_ms,
            tiling_overhead=overhead,
            tiling_overhead_within_target=overhead <= TILING_OVERHEAD_TARGET,
        )
    onnx_over_jax = {part: pair["ratio"] for part, pair in pairs.items()}
    return dict(
        image_size=size,
        batch_size=batch_size,
        tile_image_size=side,
        overlap=predictor_lib.TILE_OVERLAP,
        tiles=tiles,
        flops_ratio_of_tiles=tiles * size**2 / side**2,
        jax=backends["jax"],
        onnxruntime=backends["onnxruntime"],
        onnx_over_jax=onnx_over_jax,
        backends_within_target={
            part: max(ratio, 1.0 / ratio) <= BACKEND_RATIO_TARGET
            for part, ratio in onnx_over_jax.items()
        },
        targets=dict(
            slower_over_faster=BACKEND_RATIO_TARGET, tiling_overhead=TILING_OVERHEAD_TARGET
        ),
        anomaly_map_max_abs_difference=float(
            np.max(np.abs(predictions["jax"].anomaly_map - predictions["onnxruntime"].anomaly_map))
        ),
        image_score_abs_difference=abs(
            predictions["jax"].image_score - predictions["onnxruntime"].image_score
        ),
        onnx_batch="dynamic",
        onnxruntime_version=onnxruntime.__version__,
        export_passed_checks=bool(report.get("passed")),
    )


def bench_torch(config: ml_collections.ConfigDict, settings: Settings) -> dict:
    """PyTorch reference backbone (m2u_jax/torch_reference.py) vs the JAX backbone
    (`M2UNet.embed`), same batch and shapes, timed alternately. Skipped (with the reason) when
    torch is not importable."""
    try:  # torch is optional (imported by torch_reference)
        from m2u_jax import torch_reference
    except ImportError as error:  # torch itself missing lands here too
        return dict(skipped=True, reason=f"torch is not importable: {error}")
    model, variables = build(config)
    batch_size = int(config.eval.batch_size)
    images = _images(config, batch_size)
    embed = compile_program(
        lambda v, x: model.apply(v, x, train=False, method=model_lib.M2UNet.embed),
        variables,
        images,
    )
    torch_forward, info = torch_reference.make_forward(config, batch_size=batch_size)
    pair = time_pair(torch_forward, lambda: embed(variables, images), settings)
    jax_parameters = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]["backbone"]))
    return dict(
        batch_size=batch_size,
        images_per_sec=batch_size / pair["numerator_median_s"],
        jax_images_per_sec=batch_size / pair["denominator_median_s"],
        ratio=pair["ratio"],
        ratio_is="torch time / JAX time, timed alternately (> 1: JAX faster)",
        jax_parameter_count=int(jax_parameters),
        same_parameter_count=int(jax_parameters) == info["parameter_count"],
        **info,
    )


def bench_edge(config: ml_collections.ConfigDict) -> dict:
    """FLOPs per image of the exported inference graph (`export.graph.make_inference_fn`, batch
    1, XLA cost analysis) at T = 1 and at `eval.num_mc_samples`, and the projected images/s on
    each of `EDGE_DEVICES`: EDGE_UTILIZATION x peak / FLOPs per image. A projection, not a
    measurement: no Jetson was available."""
    model, variables = build(config)
    export_model, params = export_graph.build_export_model(config.model, variables["params"])
    single = _images(config, 1)
    result = dict(
        image_size=int(config.data.image_size),
        utilization=EDGE_UTILIZATION,
        formula="images/s = utilization x FP16 CUDA-core peak / FLOPs per image",
        peaks_flops=dict(EDGE_DEVICES),
    )
    for samples in sorted({1, int(config.eval.num_mc_samples)}):
        fn = export_graph.make_inference_fn(export_model, params, num_mc_samples=samples)
        flops = flops_lib.compiled_flops(jax.jit(fn).lower(single).compile())
        result[f"t{samples}"] = dict(
            flops_per_image=flops,
            projected_images_per_sec={
                name: None if not flops else EDGE_UTILIZATION * peak / flops
                for name, peak in EDGE_DEVICES.items()
            },
        )
    return result


def bench_compile(config: ml_collections.ConfigDict) -> dict:
    """Lower + compile seconds of the fine-tuning train step, `model.scan_blocks` False and
    True, from abstract (shape-only) state and batch: nothing is allocated or run."""
    mesh = sharding.config_mesh(config)
    batch = synthetic_batch(config, 1)
    batch_size = int(config.train.batch_size)
    abstract_batch = {
        key: jax.ShapeDtypeStruct(
            (batch_size, *value.shape[1:]), value.dtype, sharding=sharding.batch_sharding(mesh)
        )
        for key, value in batch.items()
    }
    result = {}
    for scan in (False, True):
        variant = copy.deepcopy(config)
        variant.model.scan_blocks = scan
        model = model_lib.build_model(variant.model)
        stage = trainer.build_finetune_stage(variant, model, mesh, jax.random.PRNGKey(0))
        start, cpu_start = time.perf_counter(), time.process_time()
        lowered = stage.train_step.lower(stage.abstract_state, abstract_batch)
        lowered_at, cpu_lowered_at = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        done, cpu_done = time.perf_counter(), time.process_time()
        result[f"scan_blocks_{str(scan).lower()}"] = dict(
            lower_s=lowered_at - start,
            compile_s=done - lowered_at,
            total_s=done - start,
            # CPU seconds of this process (all threads): steadier than wall time on a shared
            # machine; XLA's compiler is mostly single-threaded, so it is close to unloaded wall.
            lower_cpu_s=cpu_lowered_at - cpu_start,
            compile_cpu_s=cpu_done - cpu_lowered_at,
            flops_per_step_per_device=flops_lib.compiled_flops(compiled),
            **_memory_of(compiled),
        )
    result["batch_size"] = batch_size
    result["note"] = (
        "lowering + XLA compile of the train step on this machine's backend (on CPU: a proxy "
        "for the GPU compile time)"
    )
    return result


# ----------------------------------------------------------------------------- driver


def environment() -> dict:
    """Device, versions and host load, for the JSON header."""
    devices = jax.devices()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return dict(
        device=f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)}",
        device_kind=devices[0].device_kind,
        platform=devices[0].platform,
        num_devices=len(devices),
        jax_version=jax.__version__,
        flax_version=flax.__version__,
        python=sys.version.split()[0],
        host_cpus=os.cpu_count(),
        load_average_at_start=list(load) if load else None,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        host_memory_kept=host_memory.kept(),
    )


def run_benchmark(
    config: ml_collections.ConfigDict,
    modes: Sequence[str] = DEFAULT_MODES,
    *,
    batch_size: int | None = None,
    settings: Settings | None = None,
    config_name: str = "",
) -> dict:
    """Runs `modes` (see the module docstring) and returns the results dict (the JSON).

    `batch_size` overrides `train.batch_size` and `eval.batch_size`. Raises ValueError for an
    unknown mode and `m2u_jax.config.ConfigError` for a bad config.
    """
    settings = settings or Settings()
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"--modes: unknown mode(s) {unknown}; choose from {MODES}")
    config = copy.deepcopy(config)
    if batch_size is not None:
        config.train.batch_size = int(batch_size)
        config.eval.batch_size = int(batch_size)
    config_lib.validate(config, num_devices=jax.device_count())
    results = dict(config=config_name, settings=describe_config(config), **environment())
    if settings.unrolled_threefry:
        results["unrolled_threefry_on_cpu"] = cpu_prng.install()
    needs_peak = any(mode in modes for mode in ("train", "infer", "mc"))
    peak, peak_source = (
        flops_lib.peak_flops(override=config.train.peak_flops, matmul_sizes=settings.matmul_sizes)
        if needs_peak
        else (None, "not needed")
    )
    results["method"] = dict(
        warmup=settings.warmup,
        repeats=settings.repeats,
        steps_per_repeat=settings.steps_per_repeat,
        statistic="median over repeats; block_until_ready after each repeat",
    )
    for mode in modes:
        start = time.perf_counter()
        if mode == "train":
            results["train"] = bench_train(config, settings)
        elif mode == "infer":
            results["infer"] = bench_infer(config, settings)
        elif mode == "mc":
            results["mc"] = bench_mc(config, settings)
        elif mode == "pipeline":
            results["pipeline"] = bench_pipeline(config, settings)
        elif mode == "onnx":
            results["onnx"] = bench_onnx(config, settings)
        elif mode == "tiled":
            results["tiled"] = bench_tiled(config, settings)
        elif mode == "torch":
            results["torch"] = bench_torch(config, settings)
        elif mode == "compile":
            results["compile"] = bench_compile(config)
        elif mode == "edge":
            results["edge"] = bench_edge(config)
        results[mode]["mode_wall_s"] = time.perf_counter() - start
    if needs_peak and peak_source.startswith("measured"):
        # A peak measured on a busy machine can come out low; the best of a measurement before
        # and one after the modes is closer to what the programs could have had.
        peak = max(peak, flops_lib.measure_matmul_peak(settings.matmul_sizes)[0])
        peak_source += ", best of the start and the end of the run"
    results.update(peak_flops=peak, peak_flops_source=peak_source)
    fill_mfu(results, peak)
    if "pipeline" in results and "train" in results:
        host_rate = (
            results["train"]["images_per_sec"] * jax.local_device_count() / jax.device_count()
        )
        results["pipeline"]["train_images_per_sec_this_host"] = host_rate
        results["pipeline"]["ratio_to_train"] = results["pipeline"]["images_per_sec"] / host_rate
    compile_times = [results[m]["compile_s"] for m in ("train", "infer", "mc") if m in results]
    results["compile_s"] = compile_times[0] if compile_times else None
    results["compile_s_is"] = (
        f"XLA compile of the {[m for m in ('train', 'infer', 'mc') if m in results][0]} program"
        if compile_times
        else None
    )
    memories = [
        (results[m]["peak_memory_bytes"], results[m]["peak_memory_source"])
        for m in ("train", "infer", "mc")
        if m in results
    ]
    device_bytes, device_source = flops_lib.peak_memory(None)
    if device_source.startswith("device") or not memories:
        results["peak_memory_bytes"], results["peak_memory_source"] = device_bytes, device_source
    else:
        results["peak_memory_bytes"] = max(bytes_ for bytes_, _ in memories)
        results["peak_memory_source"] = memories[0][1] + " (largest program of the run)"
    results["process_max_rss_bytes"] = _max_rss_bytes()
    results["tensorflow_imported"] = "tensorflow" in sys.modules
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["load_average_at_end"] = list(load) if load else None
    return results


def fill_mfu(results: dict, peak: float | None) -> None:
    """Adds the MFU of every timed program (FLOPs per call x calls per second / peak)."""
    if "train" in results:
        train = results["train"]
        train["mfu"] = flops_lib.mfu(
            train["flops_per_step_per_device"], 1e3 / train["step_ms"], peak
        )
    if "infer" in results:
        infer = results["infer"]
        infer["mfu"] = flops_lib.mfu(infer["flops_per_batch"], 1e3 / infer["batch_ms"], peak)
        forward_batches_per_sec = infer["forward_images_per_sec"] / infer["batch_size"]
        infer["forward_mfu"] = flops_lib.mfu(
            infer["forward_flops_per_batch"], forward_batches_per_sec, peak
        )
    if "mc" in results:
        mc = results["mc"]
        mc["mfu"] = flops_lib.mfu(mc["mc_flops"], 1e3 / mc["mc_ms"], peak)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
