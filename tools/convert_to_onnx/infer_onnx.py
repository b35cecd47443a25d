"""Serve predictions from an exported model with ONNX Runtime (on a Jetson, a server or a laptop).

    python tools/convert_to_onnx/infer_onnx.py --model model.onnx --images DIR_OR_FILES... \\
        --out preds.jsonl [--thresholds thresholds.json] [--batch-size 8] [--maps-dir DIR] \\
        [--providers tensorrt,cuda,cpu]

The command line of `m2u_jax.export.onnx_runner.run` (no JAX needed): one JSON line per image
with the score, uncertainty, review decision and boxes; `--maps-dir` also writes each anomaly
map as an 8-bit PNG. Prints the model and end-to-end images/s. Exit status: 0, or 2 for a bad
model, image, threshold file or argument. See README.md in this folder.
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
    parser.add_argument("--thresholds", default=None, help="review thresholds JSON (eval)")
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=None,
        help=f"batch for a dynamic-batch model (default {onnx_runner.DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of tensorrt,cuda,cpu (default: all available)",
    )
    parser.add_argument("--maps-dir", "--maps_dir", default=None, help="write anomaly-map PNGs")
    args = parser.parse_args(argv)
    try:
        wanted = [name.strip() for name in args.providers.split(",")] if args.providers else None
        if wanted and any(name not in onnx_runner.PROVIDER_NAMES for name in wanted):
            raise ValueError(
                f"--providers {args.providers!r}: use names from {list(onnx_runner.PROVIDER_NAMES)}"
            )
        summary = onnx_runner.run(
            args.model,
            args.images,
            args.out,
            thresholds=onnx_runner.load_thresholds(args.thresholds),
            batch_size=args.batch_size,
            providers=onnx_runner.select_providers(wanted),
            maps_dir=args.maps_dir,
        )
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
        print(f"infer_onnx: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary['images']} images on {summary['provider']} (batch {summary['batch_size']}): "
        f"model {summary['model_images_per_sec']:.1f} images/s, end to end "
        f"{summary['end_to_end_images_per_sec']:.1f} images/s; decisions {summary['decisions']}; "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
