"""TensorRT-readiness check of an ONNX file, without TensorRT (`m2u_jax.export.trt_check`).

    python tools/convert_to_onnx/trt_check.py model.onnx [--trt 8.5|8.6|10]

Prints every finding and a count; exits 1 when there are errors, 2 when the file is unreadable.
"""

from __future__ import annotations

import argparse
import sys

import onnx

from m2u_jax.export import trt_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TensorRT-readiness check of an ONNX model.")
    parser.add_argument("model", help="path of the .onnx file")
    parser.add_argument(
        "--trt", default="8.5", choices=trt_check.TRT_TARGETS, help="TensorRT target"
    )
    args = parser.parse_args(argv)
    try:
        model = onnx.load(args.model)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        print(f"trt_check: cannot read {args.model}: {error}", file=sys.stderr)
        return 2
    findings = trt_check.check_model(model, args.trt)
    for finding in findings:
        print(finding)
    count = len(trt_check.errors(findings))
    warnings = len(findings) - count
    print(f"{args.model}: {count} error(s), {warnings} warning(s) for TensorRT {args.trt}")
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main())
