"""m2u_jax.benchmark and its command (`m2u-benchmark`, m2u_jax/cli/benchmark.py) in CI-sized
form: the CLI writes complete JSON, modes skip cleanly, the timed programs never retrace. Speed
itself is measured by running the tool, not by tests."""

import json
import math
import os
import pathlib
import platform
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2u_jax
from configs import tiny
from m2u_jax import benchmark
from m2u_jax import config as config_lib
from m2u_jax.cli import benchmark as benchmark_cli
from tests.commands import one_device_env

pytestmark = pytest.mark.slow  # runs the benchmark command end to end

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """One CLI run (subprocess, 2 fake CPU devices) of the train, infer and mc modes.

    XLA's backend optimisation level 0 takes ~40 % off the compile time of the tiny train
    step; this test checks the tool's output, not the model's speed."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        PYTHONPATH=str(REPO_ROOT),  # this checkout's package, whichever one is installed
    )
    command = [
        sys.executable,
        "-m",
        "m2u_jax.cli.benchmark",
        "--config",
        str(REPO_ROOT / "configs" / "tiny.py"),
        "--modes",
        "train,infer,mc",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--steps-per-repeat",
        "1",
        "--matmul-sizes",
        "128,256",
        "--config.eval.num_mc_samples=3",
        "--unrolled-threefry",  # loop-free dropout RNG: a third of the compile time on CPU
        "--mc-chunk",
        "0",
        "--all-defective",
        "--out",
        str(out),
    ]
    # Run outside the checkout, as the installed `m2u-benchmark` is.
    completed = subprocess.run(
        command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def test_cli_json_has_every_required_number(cli_results):
    results, _ = cli_results
    assert results["device"] == "cpu:cpu x2" and results["num_devices"] == 2
    assert results["jax_version"] == jax.__version__
    # The CLI keeps freed host memory as train.py does (glibc's mallopt).
    assert results["host_memory_kept"] is (platform.libc_ver()[0] == "glibc")
    for key in (
        "train.images_per_sec_per_device",
        "train.step_ms",
        "train.mfu",
        "infer.images_per_sec",
        "infer.latency_ms_batch1",
        "infer.mfu",
        "mc.cost_ratio",
        "compile_s",
        "peak_memory_bytes",
        "peak_flops",
    ):
        section, _, name = key.rpartition(".")
        value = results[section][name] if section else results[name]
        assert _finite_positive(value), f"{key} = {value!r}"
    assert results["peak_flops_source"].startswith("measured:")
    assert results["peak_memory_source"].startswith("compiled memory_analysis")
    # MFU can never exceed 1 against a peak measured in the same run... by much.
    assert 0 < results["infer"]["mfu"] < 1.5


def test_cli_numbers_are_consistent(cli_results):
    results, stdout = cli_results
    train, infer, mc = results["train"], results["infer"], results["mc"]
    assert train["batch_size"] == 8 and infer["batch_size"] == 8
    # images/s/device = batch / step time / devices.
    assert train["images_per_sec_per_device"] == pytest.approx(
        8 / (train["step_ms"] / 1e3) / 2, rel=1e-6
    )
    assert infer["images_per_sec"] == pytest.approx(8 / (infer["batch_ms"] / 1e3), rel=1e-6)
    assert results["compile_s"] == train["compile_s"]
    assert mc["num_samples"] == 3 and mc["mc_dropout_blocks"] == 1
    # The trunk runs once: T samples cost fewer FLOPs than T deterministic passes, and exactly
    # one pass plus T - 1 tails up to the RNG and the statistics.
    assert 1.0 < mc["flops_ratio"] < 3.0
    assert mc["flops_bound_ratio"] == pytest.approx(1 + 2 * mc["tail_flops_fraction"])
    assert 0 < mc["tail_flops_fraction"] < 1
    assert train["loss_is_finite"]
    # --all-defective: the same program on a NEU-DET-like batch, alternated with the default.
    assert _finite_positive(train["all_defective_step_ms"])
    assert _finite_positive(train["alternated_step_ms"])
    assert _finite_positive(train["all_defective_ratio"])
    assert "train step, all defective" in stdout
    # Warm-up and every timed call reused one compiled program per jitted function (both
    # batches included).
    assert train["jit_cache_entries"] == 1
    assert infer["jit_cache_entries"] == 1
    assert mc["jit_cache_entries"] == 1
    # The configured chunks (eval.mc_chunk_size = 1 of T = 3: a loop) draw the same samples
    # as all T in one vmap (--mc-chunk 0): same dropout keys.
    assert mc["chunk_size"] == 1 and results["settings"]["mc_chunk_size"] == 1
    assert mc["chunked"]["chunk"] == 0 and _finite_positive(mc["chunked"]["cost_ratio"])
    assert mc["chunked"]["max_abs_difference"] < 1e-5
    assert results["unrolled_threefry_on_cpu"] is True
    # The in-memory modes never import TensorFlow (GPU machines have none).
    assert results["tensorflow_imported"] is False
    assert "train images/s/device" in stdout and "MC T=3 cost ratio" in stdout


def test_predict_program_does_not_retrace():
    config = tiny.get_config()
    model, variables = benchmark.build(config)
    predict = jax.jit(chex.assert_max_traces(benchmark.predict_fn(model), n=1))
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(3):  # new image values each call: same shapes, so one trace
        images = rng.random((2, 32, 32, 3), dtype=np.float32)
        predictions = predict(variables, images)
        assert predictions["anomaly_map"].shape == (2, 32, 32)
        scores.append(np.asarray(predictions["image_score"]))
    chex.clear_trace_counter()
    assert all(np.all((score >= 0) & (score <= 1)) for score in scores)
    assert not np.allclose(scores[0], scores[1])  # really ran on the new images


def test_synthetic_batch_follows_the_batch_contract():
    config = tiny.get_config()
    batch = benchmark.synthetic_batch(config, 4)
    assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.float32
    assert batch["masks"].shape == (4, 32, 32)
    assert batch["boxes"].shape == (4, 4, 4) and batch["box_valid"].shape == (4, 4)
    np.testing.assert_array_equal(batch["labels"], [0, 1, 0, 1])
    np.testing.assert_array_equal(batch["defect_types"], [0, 2, 0, 4])
    np.testing.assert_array_equal(batch["box_classes"][:, 0], [0, 1, 0, 3])
    np.testing.assert_array_equal(batch["box_valid"][:, 0], [0, 1, 0, 1])
    # The defect square [8, 16) x [8, 16) is both the mask and the box.
    assert batch["masks"][1].sum() == 64 and batch["masks"][0].sum() == 0
    np.testing.assert_array_equal(batch["boxes"][1, 0], [8, 8, 16, 16])
    np.testing.assert_array_equal(batch["recon_valid"], [1, 0, 1, 0])
    # --all-defective: a NEU-DET-like batch, every image defective, no reconstruction target.
    batch = benchmark.synthetic_batch(config, 4, all_defective=True)
    np.testing.assert_array_equal(batch["labels"], [1, 1, 1, 1])
    np.testing.assert_array_equal(batch["defect_types"], [1, 2, 3, 4])
    np.testing.assert_array_equal(batch["recon_valid"], [0, 0, 0, 0])
    assert batch["labels"].dtype == np.int32 and batch["masks"].sum() == 4 * 64


def test_load_config_settings_and_overrides():
    config = benchmark_cli.load_config(
        "configs/benchmark.py:B256_bf16",
        ["--config.model.scan_blocks=false", "--config.model.scales=(1.0,)", "--config.seed=3"],
    )
    assert config.model.variant == "B" and config.model.dtype == "bfloat16"
    assert config.model.scan_blocks is False and config.model.scales == (1.0,)
    assert config.seed == 3 and config.model.image_size == 256
    config_lib.validate(config)
    with pytest.raises(config_lib.ConfigError, match=r"model.varaint=S: no such config key"):
        benchmark_cli.load_config("configs/tiny.py", ["--config.model.varaint=S"])
    with pytest.raises(config_lib.ConfigError, match="config.model.remat=maybe"):
        benchmark_cli.load_config("configs/tiny.py", ["--config.model.remat=maybe"])
    with pytest.raises(config_lib.ConfigError, match="no such config file"):
        benchmark_cli.load_config("configs/nope.py")
    with pytest.raises(config_lib.ConfigError, match="unknown setting 'XL'"):
        benchmark_cli.load_config("configs/benchmark.py:XL")


def test_unknown_mode_and_bad_batch_are_rejected():
    with pytest.raises(ValueError, match="unknown mode"):
        benchmark.run_benchmark(tiny.get_config(), ("train", "warp"))
    with pytest.raises(ValueError, match="--tile-image-size 0"):
        benchmark.Settings(tile_image_size=0)
    with pytest.raises(config_lib.ConfigError, match="train.batch_size"):
        benchmark.run_benchmark(tiny.get_config(), ("torch",), batch_size=3)


def test_torch_mode_skips_cleanly_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.delitem(sys.modules, "m2u_jax.torch_reference", raising=False)
    monkeypatch.delattr(m2u_jax, "torch_reference", raising=False)  # else `from` finds it
    results = benchmark.run_benchmark(
        tiny.get_config(), ("torch",), settings=benchmark.Settings(warmup=1, repeats=1)
    )
    assert results["torch"]["skipped"] is True
    assert "torch is not importable" in results["torch"]["reason"]
    assert results["peak_flops"] is None  # nothing to normalise: no matmul was timed


def test_pipeline_mode_writes_a_synthetic_set_when_data_is_missing(tmp_path):
    config = tiny.get_config()
    config.data.root = str(tmp_path / "absent")
    config.train.batch_size = 8
    results = benchmark.run_benchmark(
        config,
        ("pipeline",),
        settings=benchmark.Settings(warmup=1, repeats=1, pipeline_batches=2),
    )
    pipeline = results["pipeline"]
    assert _finite_positive(pipeline["images_per_sec"])
    assert pipeline["data"].startswith("synthetic") and pipeline["batch_size"] == 8
    assert len(pipeline["images_per_sec_runs"]) == 1


def test_a_run_directory_gives_the_config(tmp_path, capsys):
    trained = tiny.get_config()
    trained.model.variant = "S"
    (tmp_path / "config.json").write_text(trained.to_json_best_effort())
    config = benchmark_cli.load_config(None, [], str(tmp_path))
    assert config.model.variant == "S"
    assert benchmark_cli.main(["--workdir", str(tmp_path / "nothing"), "--modes", "infer"]) == 2
    assert "nothing/config.json does not exist" in capsys.readouterr().err


def test_edge_mode_projects_from_the_exported_graph_flops():
    from m2u_jax import flops as flops_lib
    from m2u_jax.export import graph as export_graph

    config = tiny.get_config()  # eval.num_mc_samples = 4
    results = benchmark.run_benchmark(config, modes=("edge",))
    edge = results["edge"]
    assert edge["peaks_flops"]["jetson_xavier_nx"] == pytest.approx(1.6896e12)  # 2*2*384*1.1e9
    # The FLOPs are those of the exported function at batch 1, compiled afresh here.
    model, variables = benchmark.build(config)
    export_model, params = export_graph.build_export_model(config.model, variables["params"])
    image = jnp.zeros((1, 32, 32, 3))
    expected = flops_lib.compiled_flops(
        jax.jit(export_graph.make_inference_fn(export_model, params)).lower(image).compile()
    )
    assert edge["t1"]["flops_per_image"] == expected > 0
    assert edge["t4"]["flops_per_image"] > expected  # T tails cost more than one
    for name, peak in benchmark.EDGE_DEVICES.items():
        projected = edge["t1"]["projected_images_per_sec"][name]
        assert projected == pytest.approx(0.3 * peak / expected)


def test_tiled_mode_times_the_predictor_on_both_backends(tmp_path, capsys):
    """JAX and ONNX Runtime through the Predictor at the model input (32 px) and on an 80 px
    image tiled with the Predictor's own tiling: the CLI's JSON and table, in process."""
    from m2u_jax.predictor import TILE_OVERLAP, tile_origins

    out = tmp_path / "tiled.json"
    argv = ["--config", str(REPO_ROOT / "configs" / "tiny.py"), "--modes", "tiled"]
    argv += ["--tile-image-size", "80", "--warmup", "1", "--repeats", "2", "--out", str(out)]
    tensorflow_before = "tensorflow" in sys.modules  # an earlier test may have imported it
    assert benchmark_cli.main(argv) == 0
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    tiled = results["tiled"]
    tiles = len(tile_origins(80, 32, TILE_OVERLAP)) ** 2
    assert tiled["tiles"] == tiles == 9  # 3 x 3 tiles of 32 px at origins 0, 24, 48
    assert (tiled["image_size"], tiled["batch_size"], tiled["tile_image_size"]) == (32, 8, 80)
    assert tiled["flops_ratio_of_tiles"] == pytest.approx(9 * 32**2 / 80**2)
    for backend in ("jax", "onnxruntime"):
        part = tiled[backend]
        for key in ("latency_ms_batch1", "batch_ms", "images_per_sec", "tiled_ms"):
            assert _finite_positive(part[key]), f"{backend}.{key} = {part[key]!r}"
        assert part["images_per_sec"] == pytest.approx(8 / (part["batch_ms"] / 1e3))
        # Tiled time over the time of as many model-size images in full batches.
        per_image_ms = part["batch_ms"] / tiled["batch_size"]
        assert part["tiling_overhead"] == pytest.approx(part["tiled_ms"] / (tiles * per_image_ms))
        assert part["tiling_overhead_within_target"] == (part["tiling_overhead"] <= 1.3)
    for part in ("batch1", "batch", "tiled"):
        assert _finite_positive(tiled["onnx_over_jax"][part])
        assert isinstance(tiled["backends_within_target"][part], bool)
    # Both backends ran the same graph on the same tiles and stitched the same map.
    assert tiled["anomaly_map_max_abs_difference"] < 1e-3
    assert tiled["image_score_abs_difference"] < 1e-4
    assert tiled["export_passed_checks"] is True and tiled["onnx_batch"] == "dynamic"
    assert results["tensorflow_imported"] is tensorflow_before  # the mode imports none
    assert "tiled 80x80 (9 tiles)" in stdout and "(ORT/JAX time" in stdout
    assert "tiling overhead (target <= 1.3)" in stdout


def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    # tools/gpu_check.sh is the one command a lent GPU runs; its dry form (configs/tiny.py, one
    # repeat) runs the same steps here, so a broken script is found before device time is spent.
    out = tmp_path / "gpu_check"
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "gpu_check.sh")],
        # One device, as on the one lent GPU.
        env=one_device_env(GPU_CHECK_DRY="1", PYTHON=sys.executable, OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "devices: [CpuDevice(id=0)" in (out / "devices.txt").read_text()
    results = json.loads((out / "tiny.json").read_text())
    assert _finite_positive(results["infer"]["images_per_sec"])
    assert _finite_positive(results["mc"]["cost_ratio"])
    assert results["mc"]["num_samples"] == tiny.get_config().eval.num_mc_samples
    assert "== tiny: configs/tiny.py (infer,mc)" in completed.stdout
