"""Model FLOPs utilisation (MFU) helpers: FLOPs of compiled programs, device peaks, memory.

MFU = (FLOPs of one call of the compiled program, from XLA's cost analysis) x (calls per
second) / (the device's peak FLOP/s). Three sources of the peak, in this order:

1. an explicit value (`train.peak_flops` or a caller's argument);
2. `PEAK_FLOPS`, dense bf16 tensor-core / MXU peaks per accelerator (matched on
   `jax.Device.device_kind`), the usual MFU convention even for float32 programs;
3. on CPU, `measure_matmul_peak`: the FLOP/s of the fastest of several float32 matmuls timed
   in the same process, i.e. what XLA's own dot kernel reaches on this machine right now. It
   moves with the load of a shared machine, so it is measured in the same run as the numbers
   it normalises.

XLA's cost analysis counts every HLO op (elementwise too), and counts a loop body (`lax.scan`,
`fori_loop`) once, not once per trip; `has_loops` says when a program has loops.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import resource
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (one GPU, or one TPU chip as JAX sees it), matched as a
# case-insensitive substring of `device_kind`; first match wins, so specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
)


def table_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default: the first device) from `PEAK_FLOPS`; None
    for devices not in the table (every CPU)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind:
            return flops
    return None


MATMUL_PEAK_SIZES = (512, 768, 1024, 1536, 2048)


def measure_matmul_peak(
    sizes: Sequence[int] = MATMUL_PEAK_SIZES,
    repeats: int = 10,
    dtype=jnp.float32,
    device: jax.Device | None = None,
) -> tuple[float, int]:
    """(FLOP/s, side) of the fastest square float32 matmul over `sizes` x `repeats` timed calls
    (each size jitted, compiled and warmed up first) on `device`: the practical dot-kernel peak
    of this machine. Several sizes, because the fastest one depends on the caches (on a Zen
    CPU a 768² matmul ran ~3x faster per FLOP than a 2048² one)."""
    device = device or jax.devices()[0]
    best_rate, best_size = 0.0, 0
    for size in sizes:
        keys = jax.random.split(jax.random.PRNGKey(size))
        lhs, rhs = (
            jax.device_put(jax.random.normal(key, (size, size), dtype), device) for key in keys
        )
        matmul = jax.jit(jnp.matmul).lower(lhs, rhs).compile()
        jax.block_until_ready(matmul(lhs, rhs))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(lhs, rhs))
            rate = 2.0 * size**3 / (time.perf_counter() - start)
            if rate > best_rate:
                best_rate, best_size = rate, size
    return best_rate, best_size


def peak_flops(
    device: jax.Device | None = None,
    override: float = 0.0,
    matmul_sizes: Sequence[int] = MATMUL_PEAK_SIZES,
) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) by the order in the module docstring.

    `override` > 0 wins; then the table; then, on CPU only, `measure_matmul_peak` now. Other
    unknown accelerators get (None, reason): an MFU against a guessed peak would mislead.
    """
    device = device or jax.devices()[0]
    if override > 0:
        return float(override), "given (train.peak_flops)"
    table = table_peak_flops(device)
    if table is not None:
        return table, f"table: {device.device_kind} dense bf16 peak"
    if device.platform == "cpu":
        measured, size = measure_matmul_peak(matmul_sizes, device=device)
        return measured, (
            f"measured: fastest float32 matmul on this CPU ({size}x{size}; sizes "
            f"{','.join(str(s) for s in matmul_sizes)}, best of 10 each)"
        )
    return None, f"unknown device kind {device.device_kind!r}: add it to flops.PEAK_FLOPS"


def compiled_cost(compiled) -> dict[str, float]:
    """`{'flops': ..., 'bytes_accessed': ...}` from a compiled program's cost analysis (one
    device's share of an SPMD program); missing entries are absent (some backends have none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # backends without a cost analysis raise assorted errors
        return {}
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return {}
    result = {}
    for source, name in (("flops", "flops"), ("bytes accessed", "bytes_accessed")):
        if source in analysis and float(analysis[source]) > 0:
            result[name] = float(analysis[source])
    return result


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of `compiled` (per device), None when the backend does not say."""
    return compiled_cost(compiled).get("flops")


def has_loops(compiled) -> bool:
    """Whether the optimised HLO has a `while` loop, whose body the cost analysis counts once
    (a scanned backbone, gradient accumulation, NMS's fori_loop)."""
    return bool(re.search(r"\swhile\(", compiled.as_text()))


def mfu(flops_per_call: float | None, calls_per_sec: float, peak: float | None) -> float | None:
    """flops_per_call x calls_per_sec / peak, or None when either is unknown."""
    if flops_per_call is None or peak is None or peak <= 0:
        return None
    return flops_per_call * calls_per_sec / peak


# ------------------------------------------------------------------------------ memory


def peak_memory(compiled=None, device: jax.Device | None = None) -> tuple[int | None, str]:
    """(peak bytes, source) of the program's memory.

    - 'device memory_stats': `peak_bytes_in_use` of the device allocator (GPU/TPU), the real
      high-water mark of the process so far;
    - 'compiled memory_analysis': arguments + outputs + temporaries - aliased (donated) bytes
      of `compiled`, XLA's static plan (CPU has no allocator statistics);
    - 'process max RSS': the resident-set high-water mark of this process (everything the
      Python process ever held, an upper bound), when neither is available.
    """
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator statistics raise
        stats = None
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device memory_stats peak_bytes_in_use"
    if compiled is not None:
        try:
            analysis = compiled.memory_analysis()
        except Exception:
            analysis = None
        if analysis is not None:
            total = (
                analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes
                - analysis.alias_size_in_bytes
            )
            return int(total), "compiled memory_analysis (arguments + outputs + temp - aliased)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


# ------------------------------------------------------------------------------ profiles


def _hlo_op_descriptions(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'opcode: jax op_name' from the optimised HLO text, so that
    profile rows say which part of the model an op (or fusion) came from."""
    descriptions = {}
    assignment = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s")
    # The opcode is the first lowercase word followed by '(' after the result type (a tuple
    # type may hold '/*index=5*/' comments, so the type itself is skipped, not parsed).
    opcode_pattern = re.compile(r"\s([a-z][\w\-]*)\(")
    for line in hlo_text.splitlines():
        match = assignment.match(line)
        opcode = opcode_pattern.search(line, match.end() - 1) if match else None
        if not opcode:
            continue
        name, opcode = match.group(1), opcode.group(1)
        op_name = re.search(r'op_name="([^"]+)"', line)
        descriptions[name] = f"{opcode}: {op_name.group(1)}" if op_name else opcode
    return descriptions


# Profile rows are grouped by what kind of work an op does (first matching pattern of its
# opcode + jax op_name) and by the model part it belongs to (last matching path component).
_OP_KINDS = (
    ("rng", re.compile(r"_bernoulli|_uniform|threefry|random_bits|random_split|random_fold_in")),
    ("while loop", re.compile(r"^while")),
    ("attention", re.compile(r"dot_product_attention|/attention/.*(softmax|einsum)")),
    ("matmul", re.compile(r"dot_general|einsum")),
    ("convolution", re.compile(r"conv_general_dilated|^convolution")),
)
_MODEL_PARTS = re.compile(
    r"(block_\d+|fusion_\d+|scan_\d+|embed|anomaly_decoder|detection_head|image_head|"
    r"encoder_norm|projector|predictor)"
)


def op_kind(what: str) -> str:
    """'rng', 'while loop', 'attention', 'matmul', 'convolution' or 'other' for a profile row's
    `what` ('opcode: op_name')."""
    for kind, pattern in _OP_KINDS:
        if pattern.search(what):
            return kind
    return "other"


def model_part(what: str) -> str:
    """The model part an op came from (`block_03`, `anomaly_decoder`, ...; the innermost named
    one), 'outside the model' for ops with a jax source outside the network (losses,
    optimizer, statistics, NMS), or 'unattributed' for ops without a source."""
    if ":" not in what:
        return "unattributed"
    parts = _MODEL_PARTS.findall(what)
    return parts[-1] if parts else "outside the model"


def profile_ops(
    call: Callable[[], object], hlo_text: str = "", *, calls: int = 3, top: int = 12
) -> dict:
    """Runs `call()` (one call of a compiled program; warmed up by the caller) `calls` times
    under `jax.profiler` and sums the device time of every HLO op (or fusion).

    Returns `{'busy_ms_per_call', 'top': [{'op', 'what', 'ms_per_call', 'fraction'}],
    'by_kind': {kind: fraction}, 'by_part': {part: fraction}}` (`op_kind`, `model_part`).
    `what` is the op's opcode and the jax op_name of its source, looked up in `hlo_text` (the
    compiled program's `as_text()`), e.g. 'fusion: jit(step)/.../dot_general'. On CPU the times
    are thunk times summed over the worker threads, so fractions are of busy time, not of wall
    time, and `busy_ms_per_call` can exceed the wall time.
    """
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(calls):
                jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        durations: collections.Counter = collections.Counter()
        if paths:
            profile = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
            for plane in profile.planes:
                for line in plane.lines:
                    for event in line.events:
                        stats = dict(event.stats)
                        if "hlo_op" in stats:
                            durations[str(stats["hlo_op"])] += event.duration_ns
    total = sum(durations.values()) or 1
    descriptions = _hlo_op_descriptions(hlo_text)
    by_kind: collections.Counter = collections.Counter()
    by_part: collections.Counter = collections.Counter()
    for name, nanoseconds in durations.items():
        what = descriptions.get(name, name)
        by_kind[op_kind(what)] += nanoseconds / total
        by_part[model_part(what)] += nanoseconds / total
    return dict(
        busy_ms_per_call=sum(durations.values()) / calls / 1e6,
        top=[
            dict(
                op=name,
                what=descriptions.get(name, ""),
                ms_per_call=nanoseconds / calls / 1e6,
                fraction=nanoseconds / total,
            )
            for name, nanoseconds in durations.most_common(top)
        ],
        by_kind=dict(by_kind.most_common()),
        by_part=dict(by_part.most_common()),
    )
