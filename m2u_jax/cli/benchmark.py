"""`m2u-benchmark` (also `python tools/benchmark.py`): throughput of every hot path.

    m2u-benchmark --config configs/demo.py --modes train,infer,mc --out bench.json
    m2u-benchmark --config configs/benchmark.py:S256_bf16 --modes train,infer,mc
    m2u-benchmark --config configs/benchmark.py:B256_bf16 --modes compile
    m2u-benchmark --config configs/tiny.py --config.model.scan_blocks=True ...
    m2u-benchmark --workdir runs/demo --modes infer,mc   # a trained run's model
    m2u-benchmark --config configs/cpu_real.py --config.model.num_defect_classes=5 --modes tiled

The command line of `m2u_jax.benchmark.run_benchmark` (its docstring: the modes, what each
times, the method): prints a table and writes the results as JSON (`--out`). The config is
`--config FILE[:setting]`, or else the run's WORKDIR/config.json, plus `--config.a.b=value`
overrides. Exit status: 0 done; 2 bad config, mode or arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np

from m2u_jax import benchmark, host_memory
from m2u_jax import config as config_lib
from m2u_jax import flops as flops_lib

PROGRAM = "m2u-benchmark"


def load_config(
    spec: str | None, overrides: Sequence[str] = (), workdir: str | None = None
) -> ml_collections.ConfigDict:
    """`path/to/config.py[:setting]` (configs/benchmark.py takes a setting), or else
    WORKDIR/config.json, + `--config.a.b=value` overrides (ml_collections' config_flags, as
    m2u-train) → a ConfigDict. Raises ConfigError naming the file or the key."""
    return config_lib.config_from_args(PROGRAM, spec, overrides, workdir)


def _fmt(value, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:,.{digits}f}{unit}"


def format_table(results: dict) -> str:
    """The human-readable summary of `run_benchmark`'s results printed by `main`."""
    rows = [("device", results["device"]), ("jax", results["jax_version"])]
    rows.append(
        (
            "peak FLOP/s",
            f"{_fmt(results['peak_flops'], ' G', 1e-9)} ({results['peak_flops_source']})",
        )
    )
    if "train" in results:
        train = results["train"]
        rows += [
            ("train images/s/device", _fmt(train["images_per_sec_per_device"])),
            ("train step", _fmt(train["step_ms"], " ms", digits=2)),
            ("train MFU", _fmt(train["mfu"], " %", 100)),
            ("train compile", _fmt(train["compile_s"], " s", digits=2)),
        ]
        if "all_defective_step_ms" in train:
            rows.append(
                (
                    "train step, all defective",
                    f"{_fmt(train['all_defective_step_ms'], ' ms', digits=2)} against "
                    f"{_fmt(train['alternated_step_ms'], ' ms', digits=2)} alternated "
                    f"(ratio {train['all_defective_ratio']:.3f})",
                )
            )
    if "infer" in results:
        infer = results["infer"]
        rows += [
            (f"infer images/s (batch {infer['batch_size']})", _fmt(infer["images_per_sec"])),
            ("infer latency batch 1", _fmt(infer["latency_ms_batch1"], " ms", digits=2)),
            ("infer MFU", _fmt(infer["mfu"], " %", 100)),
            ("forward images/s (no NMS)", _fmt(infer["forward_images_per_sec"])),
            ("forward MFU", _fmt(infer["forward_mfu"], " %", 100)),
        ]
    if "mc" in results:
        mc = results["mc"]
        rows += [
            (f"MC T={mc['num_samples']} cost ratio", _fmt(mc["cost_ratio"], "x", digits=2)),
            ("MC FLOPs ratio", _fmt(mc["flops_ratio"], "x", digits=2)),
        ]
        if "chunked" in mc:
            rows.append(
                (
                    f"MC cost ratio, {mc['chunked']['chunk']} at a time",
                    _fmt(mc["chunked"]["cost_ratio"], "x", digits=2),
                )
            )
    if "pipeline" in results:
        pipe = results["pipeline"]
        rows.append(("pipeline images/s", _fmt(pipe["images_per_sec"])))
        if "ratio_to_train" in pipe:
            rows.append(("pipeline / train images/s", _fmt(pipe["ratio_to_train"], "x", digits=2)))
    for name in ("onnx", "tiled", "torch"):
        if name in results:
            part = results[name]
            if part.get("skipped"):
                rows.append((name, f"skipped: {part['reason']}"))
            elif name == "tiled":
                rows += _tiled_rows(part)
            elif name == "onnx":
                rows.append(("onnxruntime images/s", _fmt(part["images_per_sec"])))
                rows.append(("jax (same graph) images/s", _fmt(part["jax_images_per_sec"])))
                sleeping = part["without_spinning"]
                rows.append(
                    (
                        "  ORT threads not spinning",
                        f"{_fmt(sleeping['images_per_sec'])} vs jax "
                        f"{_fmt(sleeping['jax_images_per_sec'])}",
                    )
                )
            else:
                rows.append(("torch images/s", _fmt(part["images_per_sec"])))
                rows.append(("jax / torch", _fmt(part["ratio"], "x", digits=2)))
    if "compile" in results:
        for key in ("scan_blocks_false", "scan_blocks_true"):
            rows.append(
                (f"compile {key}", _fmt(results["compile"][key]["total_s"], " s", digits=1))
            )
    rows.append(
        (
            "peak memory",
            f"{_fmt(results['peak_memory_bytes'], ' MB', 1e-6)} ({results['peak_memory_source']})",
        )
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _tiled_rows(tiled: dict) -> list[tuple[str, str]]:
    """The `tiled` mode's table lines: each 'jax X, ORT Y (ORT/JAX time r)'."""
    jax_part, onnx_part, ratios = tiled["jax"], tiled["onnxruntime"], tiled["onnx_over_jax"]

    def both(key: str, part: str, unit: str, digits: int) -> str:
        return (
            f"jax {_fmt(jax_part[key], unit, digits=digits)}, "
            f"ORT {_fmt(onnx_part[key], unit, digits=digits)} "
            f"(ORT/JAX time {_fmt(ratios[part], 'x', digits=2)})"
        )

    side, size, batch = tiled["tile_image_size"], tiled["image_size"], tiled["batch_size"]
    return [
        (f"{size} px latency batch 1", both("latency_ms_batch1", "batch1", " ms", 2)),
        (f"{size} px images/s (batch {batch})", both("images_per_sec", "batch", "", 1)),
        (f"tiled {side}x{side} ({tiled['tiles']} tiles)", both("tiled_ms", "tiled", " ms", 1)),
        (
            f"tiling overhead (target <= {tiled['targets']['tiling_overhead']:g})",
            f"jax {_fmt(jax_part['tiling_overhead'], 'x', digits=2)}, "
            f"ORT {_fmt(onnx_part['tiling_overhead'], 'x', digits=2)}; "
            f"tile FLOP ratio {_fmt(tiled['flops_ratio_of_tiles'], 'x', digits=2)}",
        ),
    ]


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _parse(argv):
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=None,
        help="config file (configs/*.py[:setting]); default: the run's WORKDIR/config.json. "
        "--config.a.b=value overrides apply to either",
    )
    parser.add_argument(
        "--workdir", default=None, help="a run directory: benchmark its config.json's model"
    )
    parser.add_argument(
        "--modes",
        default=",".join(benchmark.DEFAULT_MODES),
        help=f"comma-separated subset of {','.join(benchmark.MODES)}",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="train and eval batch size")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-per-repeat", type=int, default=3)
    parser.add_argument("--pipeline-batches", type=int, default=20)
    parser.add_argument(
        "--matmul-sizes",
        default=",".join(str(size) for size in flops_lib.MATMUL_PEAK_SIZES),
        help="sides of the square matmuls timed for the CPU peak (the fastest counts)",
    )
    parser.add_argument("--profile", action="store_true", help="top HLO ops by time (jax.profiler)")
    parser.add_argument("--onnx-path", default=None, help="keep the exported ONNX file here")
    parser.add_argument(
        "--mc-chunk",
        type=int,
        default=None,
        help="also time MC dropout with samples run N at a time (0 = all in one vmap), "
        "against the configured eval.mc_chunk_size",
    )
    parser.add_argument(
        "--tile-image-size",
        type=int,
        default=1024,
        help="tiled mode: side in pixels of the square image predicted with tiling",
    )
    parser.add_argument(
        "--all-defective",
        action="store_true",
        help="train mode: also time the step on a batch with no defect-free image (a set "
        "like NEU-DET: no reconstruction target), alternated with the half defect-free one",
    )
    parser.add_argument(
        "--unrolled-threefry",
        action="store_true",
        help="m2u_jax.cpu_prng.install(): loop-free dropout RNG on CPU (same bits)",
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [item for item in overrides if not item.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = overrides
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    args = _parse(argv)
    try:
        config = load_config(args.config, args.overrides, args.workdir)
        settings = benchmark.Settings(
            warmup=args.warmup,
            repeats=args.repeats,
            steps_per_repeat=args.steps_per_repeat,
            pipeline_batches=args.pipeline_batches,
            matmul_sizes=tuple(int(size) for size in args.matmul_sizes.split(",")),
            profile=args.profile,
            onnx_path=args.onnx_path,
            unrolled_threefry=args.unrolled_threefry,
            mc_chunk=args.mc_chunk,
            all_defective=args.all_defective,
            tile_image_size=args.tile_image_size,
        )
        modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
        results = benchmark.run_benchmark(
            config,
            modes,
            batch_size=args.batch_size,
            settings=settings,
            config_name=" ".join([args.config or f"{args.workdir}/config.json", *args.overrides]),
        )
    except (ValueError, config_lib.ConfigError) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(_json_safe(results), file, indent=2)
            file.write("\n")
        print(f"wrote {args.out}")
    return 0


def run() -> None:
    """Console-script entry point (`m2u-benchmark`)."""
    # As train.py does, so the train step is timed as it runs there; M2U_HOST_MALLOC=system
    # times glibc's defaults (the JSON's `host_memory_kept`).
    host_memory.keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
