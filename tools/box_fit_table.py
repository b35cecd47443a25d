"""Missed defects or loose boxes? Per-class AP and recall of an evaluated run at several IoUs.

    python tools/box_fit_table.py --workdir runs/quality/neu_sup [--ious 0.1,0.3,0.5,0.75]

Reads WORKDIR/eval/predictions.npz and the class names in WORKDIR/eval/thresholds.json (both
written by eval.py) and prints, for the test split, COCO AP and recall per class at each IoU
threshold (`metrics.box_ap_by_iou`). AP that stays high down to IoU 0.1 but falls between 0.3
and 0.5 means the defects are found and their boxes drawn loosely (box fit, or boxes that the
annotation draws differently); AP low even at 0.1 means they are missed.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

if __package__ in (None, ""):  # `python tools/box_fit_table.py` from anywhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from m2u_jax import evaluate, metrics  # noqa: E402
from tools import nms_table  # noqa: E402

DEFAULT_IOUS = (0.1, 0.3, 0.5, 0.75)


def box_fit(predictions, class_names, ious, split: str = "test") -> dict:
    """`metrics.box_ap_by_iou` of one split of an eval.py `predictions.npz` mapping."""
    prefix = f"{split}/"
    arrays = {key[len(prefix) :]: predictions[key] for key in predictions if key.startswith(prefix)}
    found, truth = evaluate.box_lists(arrays)
    return metrics.box_ap_by_iou(
        found, truth, ious, num_classes=len(class_names), class_names=class_names
    )


def markdown(result: dict) -> str:
    """One row per class (then their mean): AP at each IoU, then recall at each IoU."""
    ious = [f"{iou:g}" for iou in result["iou_thresholds"]]
    lines = [
        "| class | "
        + " | ".join(f"AP@{iou}" for iou in ious)
        + " | "
        + " | ".join(f"recall@{iou}" for iou in ious)
        + " |",
        "|---" * (1 + 2 * len(ious)) + "|",
    ]
    for name in result["ap"]:
        values = result["ap"][name] + result["recall"][name]
        lines.append(f"| {name} | " + " | ".join(f"{value:.3f}" for value in values) + " |")
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{value:.3f}**" for value in result["map"])
        + " |"
        + " |" * len(ious)
    )
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    del argv
    ious = nms_table.parse_ious(_IOUS.value)
    if ious is None:
        print(f"box_fit_table.py: --ious {_IOUS.value}: use numbers in (0, 1]", file=sys.stderr)
        return 2
    folder = os.path.join(_WORKDIR.value, "eval")
    try:
        with open(os.path.join(folder, "thresholds.json"), encoding="utf-8") as file:
            class_names = json.load(file)["class_names"]
        with np.load(os.path.join(folder, "predictions.npz")) as predictions:
            result = box_fit(predictions, class_names, ious)
    except (OSError, KeyError, ValueError) as error:
        print(f"box_fit_table.py: {folder}: {error} (run eval.py first)", file=sys.stderr)
        return 2
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory evaluated by eval.py.")
    _IOUS = flags.DEFINE_list(
        "ious", [str(iou) for iou in DEFAULT_IOUS], "IoU thresholds of the rows."
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
