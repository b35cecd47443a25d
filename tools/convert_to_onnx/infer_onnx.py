"""Serve predictions from an exported model with ONNX Runtime (on a Jetson, a server or a laptop).

    python tools/convert_to_onnx/infer_onnx.py --model model.onnx --images DIR_OR_FILES... \\
        --out preds.jsonl [--thresholds thresholds.json | --uncalibrated] [--batch-size 8] \\
        [--maps-dir DIR] [--providers tensorrt,cuda,cpu]

The command line of `m2u_jax.export.onnx_runner.run` (no JAX needed): one JSON line per image
with the score, uncertainty, review decision and boxes (class index and name); `--maps-dir` also
writes each anomaly map as an 8-bit PNG, at the image's path below the inputs' common folder.
Decisions use the calibrated thresholds stored in the model at export (`m2u.*` metadata);
`--thresholds FILE` (eval.py's thresholds.json) overrides them; a model without any is refused
unless `--uncalibrated` (the 0.5 / 0.01 defaults, with a warning). `--out` is replaced only
when every image succeeded (else the partial result is left in OUT.partial). Prints the model
and end-to-end images/s. Exit status: 0, or 2 for a bad model, image, threshold file or
argument, or a model without thresholds. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import json
import sys

from m2u_jax.export import onnx_runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ONNX Runtime inference on exported models.")
    parser.add_argument("--model", required=True, help="exported .onnx file")
    parser.add_argument("--images", required=True, nargs="+", help="image files or directories")
    parser.add_argument("--out", required=True, help="predictions JSONL to write")
    thresholds = parser.add_mutually_exclusive_group()
    thresholds.add_argument(
        "--thresholds",
        default=None,
        help="review thresholds JSON (eval.py's DIR/eval/thresholds.json); default: the "
        "calibrated thresholds stored in the model at export",
    )
    thresholds.add_argument(
        "--uncalibrated",
        action="store_true",
        help="decide with the uncalibrated defaults (score 0.5, uncertainty 0.01), e.g. for a "
        "--random-init export; prints a warning",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=None,
        help=f"batch for a dynamic-batch model (>= 1, default {onnx_runner.DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of tensorrt,cuda,cpu (default: all available)",
    )
    parser.add_argument(
        "--maps-dir",
        "--maps_dir",
        default=None,
        help="write anomaly-map PNGs (folder layout of the inputs kept)",
    )
    args = parser.parse_args(argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        wanted = [name.strip() for name in args.providers.split(",")] if args.providers else None
        if wanted and any(name not in onnx_runner.PROVIDER_NAMES for name in wanted):
            raise ValueError(
                f"--providers {args.providers!r}: use names from {list(onnx_runner.PROVIDER_NAMES)}"
            )
        summary = onnx_runner.run(
            args.model,
            args.images,
            args.out,
            thresholds=onnx_runner.load_thresholds(args.thresholds) if args.thresholds else None,
            uncalibrated=args.uncalibrated,
            batch_size=args.batch_size,
            providers=onnx_runner.select_providers(wanted),
            maps_dir=args.maps_dir,
        )
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
        print(f"infer_onnx: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. --out or --maps-dir not writable: names the file
        print(f"infer_onnx: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    used = summary["thresholds"]
    print(
        f"{summary['images']} images on {summary['provider']} (batch {summary['batch_size']}): "
        f"model {summary['model_images_per_sec']:.1f} images/s, end to end "
        f"{summary['end_to_end_images_per_sec']:.1f} images/s; thresholds from "
        f"{summary['thresholds_source']} (score {used['score_threshold']:.6g}, uncertainty "
        f"{used['uncertainty_threshold']:.6g}); decisions {summary['decisions']}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
