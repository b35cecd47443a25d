"""Prints the closing table of `make demo` from the files the earlier steps wrote.

python tools/demo_summary.py --config configs/demo.py --workdir runs/demo \
    --onnx runs/demo/model.onnx

Reads DIR/eval/metrics.json (eval), DIR/eval/review_queue.jsonl and PATH.onnx.parity.json
(export), and measures ONNX Runtime images/s on this machine at the eval batch size. Exits
non-zero when a file is missing, naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run the step that writes it first")
    with open(path) as file:
        return json.load(file)


def _format(value, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f} %" if percent else f"{value:.3f}"


def review_rate(workdir: str, metrics: dict) -> tuple[float | None, float | None]:
    """Fraction of test images the policy calibrated on validation (DIR/eval/thresholds.json)
    sends to a person (lines of review_queue.jsonl), and the budget it was calibrated for."""
    thresholds = _read_json(os.path.join(workdir, "eval", "thresholds.json"))
    with open(os.path.join(workdir, "eval", "review_queue.jsonl")) as file:
        queued = sum(1 for line in file if line.strip())
    # The review-budget table knows the test-set size: num_reviewed / fraction_reviewed.
    num_test = None
    for row in metrics["uncertainty"]["review"].values():
        if row["num_reviewed"] and row["fraction_reviewed"]:
            num_test = round(row["num_reviewed"] / row["fraction_reviewed"])
    return (queued / num_test if num_test else None), thresholds["budget"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--onnx", required=True)
    args = parser.parse_args(argv)

    from m2u_jax.export.convert import load_config
    from m2u_jax.export.onnx_runner import onnx_images_per_sec

    config = load_config(args.config)
    try:
        metrics = _read_json(os.path.join(args.workdir, "eval", "metrics.json"))
        parity = _read_json(args.onnx + ".parity.json")
    except FileNotFoundError as error:
        print(f"demo_summary: {error}", file=sys.stderr)
        return 2
    from m2u_jax.modalities import num_channels

    onnx_speed = onnx_images_per_sec(
        args.onnx,
        batch=config.eval.batch_size,
        image_size=config.data.image_size,
        channels=num_channels(config.data.modalities),
        repeats=10,
    )
    rate, budget = review_rate(args.workdir, metrics)
    # The rule eval.py used for the validation threshold (eval.threshold_rule after 'auto').
    rule = metrics["image"].get("threshold_rule", "f1")
    rows = [
        (
            f"image accuracy (threshold from validation, {rule})",
            _format(metrics["image"]["accuracy"]),
        ),
        ("image AUROC", _format(metrics["image"]["auroc"])),
        ("pixel AUROC", _format(metrics["pixel"]["auroc"])),
        ("AUPRO (FPR <= 0.3)", _format(metrics["pixel"]["aupro"])),
        ("box mAP@0.5", _format(metrics["detection"]["map50"])),
        ("ECE (15 bins)", _format(metrics["uncertainty"]["ece"])),
        (f"review rate (budget {_format(budget, True)})", _format(rate, True)),
        ("images/s JAX (jit, CPU)", f"{metrics['speed']['images_per_sec']:.1f}"),
        ("images/s ONNX Runtime (CPU)", f"{onnx_speed:.1f}"),
        ("ONNX parity", "passed" if parity.get("passed") else "FAILED"),
        ("report", os.path.join(args.workdir, "eval", "report.md")),
        ("ONNX model", args.onnx),
    ]
    width = max(len(name) for name, _ in rows)
    print("\nm2u-jax demo — held-back synthetic test split")
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 24))
    return 0


if __name__ == "__main__":
    sys.exit(main())
