"""Positives per annotated box under the detection target assignment, per defect class.

    python tools/assignment_table.py --config configs/cpu_real.py --config.data.format=voc \
        --config.data.root=../shared/data/neu_det --config.data.protocol=supervised

Reads the training split's annotated boxes (VOC records; no image is decoded), scales them to
the model's input as the pipeline does (per axis to `data.image_size`), and runs
`boxes.assign_targets` at the head's points (`model.det_strides`) under the config's rules
(`config.assign_rules`: `train.det_level_size`, ...) with each `train.det_fallback`. Per
class: the boxes, the median positives per box and the share of boxes left with a single
positive under each fallback, the share that 'inside' gives more positives (boxes that no
level's size range took), and how the class's positives spread over the levels under the
configured fallback.
"""

from __future__ import annotations

import collections
import functools
import pathlib
import sys

if __package__ in (None, ""):  # `python tools/assignment_table.py` from anywhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from m2u_jax import boxes as box_ops  # noqa: E402
from m2u_jax import heads  # noqa: E402
from m2u_jax.config import ASSIGN_FALLBACKS, assign_rules  # noqa: E402


def positives_per_level(boxes: np.ndarray, points, point_strides, rules: dict) -> np.ndarray:
    """`[G, L]`: positive points of each of one image's `[G, 4]` boxes on each level (levels
    in ascending stride), under `rules` (`boxes.assign_targets` keyword arguments)."""
    targets = _assign(points, point_strides, boxes[None], tuple(sorted(rules.items())))
    fg = np.asarray(targets["fg_mask"][0]) > 0
    assigned = np.asarray(targets["box_targets"][0])[fg]  # [P, 4]
    fg_strides = np.asarray(point_strides)[fg]
    levels = np.unique(np.asarray(point_strides))
    return np.array(
        [
            [np.sum(np.all(assigned == box, axis=-1) & (fg_strides == s)) for s in levels]
            for box in boxes
        ],
        np.int64,
    ).reshape(len(boxes), len(levels))


@functools.partial(jax.jit, static_argnames=("rules",))
def _assign(points, point_strides, boxes, rules: tuple):
    count = boxes.shape[1]
    classes = np.zeros((1, count), np.int32)
    return box_ops.assign_targets(
        points,
        point_strides,
        boxes,
        classes,
        np.ones((1, count), np.float32),
        1,
        **dict(rules),
    )


def class_rows(image_boxes, image_size: int, strides, rules: dict | None = None) -> list[dict]:
    """`image_boxes`: (names [G], boxes [G, 4] at `image_size`) per image → one row per class,
    under `rules` (`config.assign_rules`; 'inside' fallback when it names none) with each
    fallback in turn; `level_shares` {stride: share of the class's positives} under the rules'
    own fallback."""
    rules = {"fallback": "inside", **(rules or {})}
    counts = {name: collections.defaultdict(list) for name in ASSIGN_FALLBACKS}
    per_level = collections.defaultdict(list)
    points, point_strides = heads.anchor_points((image_size, image_size), tuple(strides))
    for names, boxes in image_boxes:
        for name in ASSIGN_FALLBACKS:
            positives = positives_per_level(
                boxes, points, point_strides, {**rules, "fallback": name}
            )
            for defect, count in zip(names, positives):
                counts[name][defect].append(int(count.sum()))
                if name == rules["fallback"]:
                    per_level[defect].append(count)
    levels = sorted(int(s) for s in strides)
    rows = []
    for name in sorted(counts["nearest"]):
        nearest = np.array(counts["nearest"][name])
        inside = np.array(counts["inside"][name])
        on_levels = np.sum(per_level[name], axis=0)
        rows.append(
            dict(
                defect=name,
                boxes=len(nearest),
                median_nearest=float(np.median(nearest)),
                single_nearest=float(np.mean(nearest == 1)),
                median_inside=float(np.median(inside)),
                single_inside=float(np.mean(inside == 1)),
                gains_inside=float(np.mean(inside > nearest)),
                level_shares={
                    s: float(n / max(on_levels.sum(), 1)) for s, n in zip(levels, on_levels)
                },
            )
        )
    return rows


def markdown(rows: list[dict], fallback: str = "inside") -> str:
    levels = list(rows[0]["level_shares"]) if rows else []
    shares = " / ".join(str(s) for s in levels)
    lines = [
        "| defect | boxes | positives per box, 'nearest' (median) | one positive | "
        f"'inside' (median) | one positive | more positives with 'inside' | "
        f"positives on stride {shares} ('{fallback}') |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = " / ".join(f"{row['level_shares'][s]:.0%}" for s in levels)
        lines.append(
            f"| {row['defect']} | {row['boxes']} | {row['median_nearest']:g} | "
            f"{row['single_nearest']:.1%} | {row['median_inside']:g} | "
            f"{row['single_inside']:.1%} | {row['gains_inside']:.1%} | {spread} |"
        )
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    del argv
    from m2u_jax.data import decode, splits

    config = _CONFIG.value
    split_records, _ = splits.load_splits(config)
    size = int(config.data.image_size)
    image_boxes = []
    for record in split_records["train"]:
        if not record.boxes:
            continue
        boxes = decode.scale_boxes(record.boxes, record.width, record.height, size)
        image_boxes.append((list(record.box_names), boxes))
    rules = assign_rules(config.train)
    rows = class_rows(image_boxes, size, config.model.det_strides, rules)
    print(markdown(rows, rules["fallback"]))
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
