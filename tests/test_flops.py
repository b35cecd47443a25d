"""MFU helpers: FLOPs from the compiled cost analysis, the peak table, memory, profiles."""

import types

import jax
import jax.numpy as jnp
import pytest

from m2u_jax import flops


def _compiled(fn, *args, **jit_kwargs):
    return jax.jit(fn, **jit_kwargs).lower(*args).compile()


def test_compiled_flops_of_a_matmul_is_two_mnk():
    lhs, rhs = jnp.ones((64, 32)), jnp.ones((32, 16))
    compiled = _compiled(jnp.matmul, lhs, rhs)
    assert flops.compiled_flops(compiled) == 2 * 64 * 32 * 16
    cost = flops.compiled_cost(compiled)
    # Reads both operands and writes the result, float32.
    assert cost["bytes_accessed"] == 4 * (64 * 32 + 32 * 16 + 64 * 16)


def test_compiled_flops_is_none_without_cost_analysis():
    class NoAnalysis:
        def cost_analysis(self):
            raise NotImplementedError("backend without cost analysis")

    assert flops.compiled_flops(NoAnalysis()) is None
    assert flops.compiled_cost(NoAnalysis()) == {}


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("cpu", None),
    ],
)
def test_table_peak_flops(kind, expected):
    device = types.SimpleNamespace(device_kind=kind, platform="gpu")
    assert flops.table_peak_flops(device) == expected


def test_peak_flops_sources():
    assert flops.peak_flops(override=123.0) == (123.0, "given (train.peak_flops)")
    gpu = types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB", platform="gpu")
    peak, source = flops.peak_flops(gpu)
    assert peak == 312e12 and source.startswith("table:")
    unknown = types.SimpleNamespace(device_kind="Mystery NPU", platform="npu")
    peak, source = flops.peak_flops(unknown)
    assert peak is None and "Mystery NPU" in source
    cpu_peak, cpu_source = flops.peak_flops(jax.devices("cpu")[0], matmul_sizes=(64, 256))
    assert cpu_source.startswith("measured:") and "sizes 64,256" in cpu_source
    # A 2-core laptop-class CPU does between 1 GFLOP/s and 10 TFLOP/s.
    assert 1e9 < cpu_peak < 1e13


def test_measure_matmul_peak_reports_the_fastest_size():
    rate, size = flops.measure_matmul_peak((32, 128), repeats=2)
    assert size in (32, 128) and 1e7 < rate < 1e13


def test_mfu_arithmetic():
    assert flops.mfu(2e9, 10.0, 1e11) == pytest.approx(0.2)
    assert flops.mfu(None, 10.0, 1e11) is None
    assert flops.mfu(2e9, 10.0, None) is None
    assert flops.mfu(2e9, 10.0, 0.0) is None


def test_peak_memory_counts_donation():
    values = jnp.ones((1024,), jnp.float32)
    plain = _compiled(lambda x: x + 1.0, values)
    donated = _compiled(lambda x: x + 1.0, values, donate_argnums=0)
    plain_bytes, source = flops.peak_memory(plain, jax.devices("cpu")[0])
    donated_bytes, _ = flops.peak_memory(donated, jax.devices("cpu")[0])
    assert source.startswith("compiled memory_analysis")
    # In + out = 8 KiB; donating the input lets the output reuse its 4 KiB.
    assert plain_bytes - donated_bytes == 4096
    assert plain_bytes >= 8192


def test_peak_memory_falls_back_to_rss():
    rss, source = flops.peak_memory(None, jax.devices("cpu")[0])
    assert source == "process max RSS" and rss > 10 * 2**20


def test_has_loops():
    def scanned(x):
        return jax.lax.scan(lambda carry, _: (carry * 2.0, None), x, None, length=3)[0]

    assert flops.has_loops(_compiled(scanned, jnp.ones((4,))))
    assert not flops.has_loops(_compiled(lambda x: x * 2.0, jnp.ones((4,))))


def test_hlo_op_descriptions_parse_names_opcodes_and_sources():
    text = "\n".join(
        [
            "  %dot.3 = f32[8,8]{1,0} dot(f32[8,4]{1,0} %a, f32[4,8]{1,0} %b), "
            'metadata={op_name="jit(f)/dot_general" source_file="x.py"}',
            "  ROOT fusion.1 = f32[8]{0} fusion(f32[8,8]{1,0} %dot.3), kind=kLoop",
            "  %while.7 = (s32[], /*index=1*/f32[8]{0}) while((s32[], f32[8]{0}) %t), "
            "condition=%cond, body=%body",
        ]
    )
    descriptions = flops._hlo_op_descriptions(text)
    assert descriptions == {
        "dot.3": "dot: jit(f)/dot_general",
        "fusion.1": "fusion",
        "while.7": "while",
    }


def test_profile_ops_finds_the_matmul():
    # A 1024^3 matmul (2.1 GFLOP) next to an add over 1/128 of the input: the matmul stays the
    # top op even when a loaded machine preempts a thread during the add (a 512^3 matmul next
    # to a full-size add did not, once, in CI).
    lhs = jnp.ones((1024, 1024))
    compiled = _compiled(lambda a: (a @ a, a[:8] + 1.0), lhs)
    jax.block_until_ready(compiled(lhs))
    profile = flops.profile_ops(lambda: compiled(lhs), compiled.as_text(), calls=3)
    rows = profile["top"]
    assert rows, "the CPU trace has per-op events"
    fractions = [row["fraction"] for row in rows]
    assert fractions == sorted(fractions, reverse=True)
    assert all(0 < fraction <= 1 for fraction in fractions) and sum(fractions) <= 1 + 1e-9
    assert "dot_general" in rows[0]["what"] and rows[0]["ms_per_call"] > 0
    assert profile["by_kind"]["matmul"] > 0.5
    assert sum(profile["by_kind"].values()) == pytest.approx(1.0)
    assert sum(profile["by_part"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "what, kind, part",
    [
        ("fusion: jit(f)/M2UNet/backbone/block_03/mlp/fc1/dot_general", "matmul", "block_03"),
        (
            "fusion: jit(f)/vmap(M2UNet.stochastic_tail)/backbone.tail/block_01/mlp/Dropout_0/"
            "jit(_bernoulli)/jit(_uniform)/add",
            "rng",
            "block_01",
        ),
        ("convolution: jit(step)/transpose(jvp())/conv_general_dilated", "convolution",
         "outside the model"),
        ("fusion: jit(f)/M2UNet/anomaly_decoder/up_0/conv_general_dilated", "convolution",
         "anomaly_decoder"),
        ("while", "while loop", "unattributed"),
        ("fusion: jit(f)/reduce_sum", "other", "outside the model"),
    ],
)  # fmt: skip
def test_op_kind_and_model_part(what, kind, part):
    assert flops.op_kind(what) == kind
    assert flops.model_part(what) == part
