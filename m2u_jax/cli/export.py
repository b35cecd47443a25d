"""`m2u-export` (also `python tools/convert_to_onnx/convert.py`): export a trained M2U-InspectNet
checkpoint to ONNX for ONNX Runtime and TensorRT.

    python tools/convert_to_onnx/convert.py --workdir runs/demo --output runs/demo/model.onnx \\
        [--config FILE] [--config.a.b=value] [--backend jax2onnx|jax2tf] \\
        [--batch N | --dynamic-batch] [--mc-samples T] [--fp16] [--step STEP] \\
        [--trt 8.5|8.6|10] [--attention matmul|einsum] [--thresholds FILE]

The command line of `m2u_jax.export.convert`: restores the fine-tuned params (the newest
checkpoint or `--step`; `--random-init` exports fresh ones), exports, finalises and checks the
graph, and writes PATH and PATH.parity.json. From a run it also stores the calibrated decision
thresholds and class names of WORKDIR/eval/thresholds.json (eval.py; `--thresholds FILE`
instead) in the model's `m2u.*` metadata, where infer_onnx.py finds them; without that file it
still exports, with a `WARNING:` line. The steps and options: README.md in this folder.

Exit status: 0 success; 1 parity failed; 2 bad config, checkpoint or arguments; 3 the graph
fails the checker or the TensorRT check; 4 the jax2tf subprocess failed.
"""

from __future__ import annotations

import argparse
import sys

from m2u_jax import config as config_lib
from m2u_jax.cli import checkpoint_step, file_problem
from m2u_jax.data import splits
from m2u_jax.export import convert, trt_check
from m2u_jax.export import graph as export_graph

EXIT_PARITY, EXIT_INPUT, EXIT_GRAPH, EXIT_BACKEND = 1, 2, 3, 4


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Export a trained checkpoint to ONNX (TensorRT-ready) and check parity.",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="config file (configs/*.py[:setting]); default: the run's WORKDIR/config.json. "
        "--config.a.b=value overrides apply to either",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run directory with checkpoints/ (train.py)")
    source.add_argument(
        "--random-init", action="store_true", help="export fresh params (benchmarks, smoke tests)"
    )
    parser.add_argument(
        "--step",
        type=checkpoint_step,
        default=None,
        help="checkpoint step or 'best' (default: the run's best or newest)",
    )
    parser.add_argument(
        "--thresholds",
        default=None,
        help="calibrated thresholds.json to store in the model (default: "
        "WORKDIR/eval/thresholds.json, written by eval.py)",
    )
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--backend", default="jax2onnx", choices=convert.BACKENDS)
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument(
        "--dynamic-batch",
        "--dynamic_batch",
        action="store_true",
        help="symbolic batch dimension 'batch'",
    )
    parser.add_argument(
        "--mc-samples",
        "--mc_samples",
        type=int,
        default=None,
        help="MC-dropout samples T fixed in the graph (1 = deterministic; default: the T the "
        "run's thresholds were calibrated at, else 1)",
    )
    parser.add_argument(
        "--mc-seed", "--mc_seed", type=int, default=0, help="seed of the T dropout masks"
    )
    parser.add_argument("--fp16", action="store_true", help="float16 compute (see --help text)")
    parser.add_argument("--parity-images", type=int, default=4, help="images for the parity check")
    parser.add_argument(
        "--trt",
        default="8.5",
        choices=trt_check.TRT_TARGETS,
        help="TensorRT version the graph is checked against",
    )
    parser.add_argument(
        "--attention",
        default="matmul",
        choices=export_graph.EXPORT_ATTENTION_FORMS,
        help="attention as batched MatMuls (default; faster in ONNX Runtime) or as "
        "explicit-letter Einsums (the form of earlier exports); TensorRT parses both",
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [item for item in overrides if not item.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.random_init and not args.config:
        parser.error("--random-init needs --config FILE (there is no run to read it from)")
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    metadata, warnings = {}, []
    try:
        problem = file_problem(args.output, "--output")  # before minutes of export
        if problem:
            raise ValueError(problem)
        if args.random_init and args.thresholds:
            raise ValueError("--thresholds needs --workdir: random weights have no calibration")
        # The run's own config by default; overrides through ml_collections config_flags.
        config = config_lib.config_from_args(
            "convert.py", args.config, args.overrides, args.workdir
        )
        config_lib.validate(config)
        if args.workdir:  # an override that changes parameter shapes is named here
            config_lib.check_same_architecture(config, args.workdir)
        if args.random_init:
            if int(config.model.num_defect_classes) == 0:  # 0 = from the data
                config = splits.with_data_num_defect_classes(config)
            variables = convert.random_inference_variables(config, int(config.seed))
            source = "random init"
            args.mc_samples = 1 if args.mc_samples is None else args.mc_samples
        else:
            # 0 = from the data: the number the run resolved (WORKDIR/config.json).
            config = config_lib.with_run_num_defect_classes(config, args.workdir)
            variables = convert.load_inference_variables(config, args.workdir, args.step)
            source = f"{args.workdir} step {variables['step']}"
            if args.mc_samples is None:  # the run directory is the unit: its calibrated T
                args.mc_samples = convert.calibrated_mc_samples(args.workdir, args.thresholds)
            metadata, warnings = convert.calibration_metadata(
                config.model,
                workdir=args.workdir,
                thresholds_path=args.thresholds,
                mc_samples=args.mc_samples,
                checkpoint_step=variables["step"],
                ensemble_members=1 + len(variables.get("members", ())),
            )
    except (FileNotFoundError, ValueError) as error:
        print(f"convert.py: {error}", file=sys.stderr)
        return EXIT_INPUT
    for line in warnings:  # before the export (it may take minutes), and again at the end
        print(line, file=sys.stderr)
    try:
        report = convert.convert(
            config,
            variables,
            args.output,
            backend=args.backend,
            batch=None if args.dynamic_batch else args.batch,
            mc_samples=args.mc_samples,
            fp16=args.fp16,
            mc_seed=args.mc_seed,
            parity_count=args.parity_images,
            trt=args.trt,
            attention=args.attention,
            extra_metadata=dict(metadata, checkpoint=source, config=args.config),
            progress=lambda line: print(f"convert.py: {line}", file=sys.stderr, flush=True),
        )
    except ValueError as error:
        print(f"convert.py: {error}", file=sys.stderr)
        return EXIT_INPUT
    except convert.ExportError as error:
        print(f"convert.py: {error}", file=sys.stderr)
        return EXIT_BACKEND
    _print_summary(report)
    for line in warnings:
        print(line, file=sys.stderr)
    if not report["graph_ok"]:
        return EXIT_GRAPH
    return 0 if report["passed"] else EXIT_PARITY


def _print_summary(report: dict) -> None:
    print(
        f"wrote {report['onnx']} ({report['bytes'] / 1e6:.2f} MB, {report['num_nodes']} nodes, "
        f"opset {report['opset']}, IR {report['ir_version']}, {report['precision']}, "
        f"batch {report['batch']}, T={report['mc_samples']}, {report['backend']}, "
        f"{report['export_seconds']:.1f}s)"
    )
    if "saved_model" in report:
        print(f"wrote {report['saved_model']}/ (TF SavedModel, signature serving_default)")
    print(f"onnx.checker: {report['checker']}")
    tensorrt = report["tensorrt"]
    print(
        f"TensorRT {tensorrt['target']} check: {len(tensorrt['errors'])} error(s), "
        f"{len(tensorrt['warnings'])} warning(s)"
    )
    for line in tensorrt["errors"]:
        print(f"  {line}")
    result = report["parity"]
    for batch in result.get("batches", []):
        diffs = ", ".join(f"{name} {value:.2e}" for name, value in batch["max_abs_diff"].items())
        boxes = batch.get("boxes", {})
        print(
            f"parity batch {batch['batch_size']}: max |ONNX-JAX| {diffs}; boxes matched "
            f"{boxes.get('matched')}, unmatched {boxes.get('unmatched')}, borderline "
            f"{boxes.get('borderline')} -> {'ok' if batch['passed'] else 'FAILED'}"
        )
    if "error" in result:
        print(f"parity: {result['error']}")
    print(f"images: {report['images']}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; details in {report['onnx']}.parity.json")


def run() -> None:
    """Console-script entry point (`m2u-export`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
