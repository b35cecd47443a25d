"""Quality of an evaluated run per defect type: where the model finds defects and where not.

    python tools/defect_type_table.py --workdir runs/quality/mt_unsup

Reads WORKDIR/eval/predictions.npz and WORKDIR/eval/pixel_maps.npz (written by eval.py). For
each defect type of the test split: its image count, the image AUROC of its images against all
defect-free test images, the pixel AUROC over its images, and its mean mask area.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from m2u_jax import metrics


def per_type_rows(predictions, pixel_maps) -> list[dict]:
    """Rows of the table (sorted by defect type) from the two archives' mappings."""
    names = np.asarray(predictions["test/defect_names"]).astype(str)
    labels = np.asarray(predictions["test/labels"])
    scores = np.asarray(predictions["test/image_score"], np.float64)
    index = {path: i for i, path in enumerate(np.asarray(pixel_maps["paths"]).astype(str))}
    order = [index[path] for path in np.asarray(predictions["test/paths"]).astype(str)]
    maps = np.asarray(pixel_maps["anomaly_map"])[order]
    masks = np.asarray(pixel_maps["masks"])[order] > 0.5
    good = labels == 0
    rows = []
    for kind in sorted(set(names[~good])):
        chosen = (names == kind) & ~good
        both = good | chosen
        rows.append(
            dict(
                defect=kind,
                images=int(chosen.sum()),
                image_auroc=metrics.image_auroc(chosen[both], scores[both]),
                pixel_auroc=metrics.pixel_auroc(masks[chosen], maps[chosen]),
                mask_area=float(masks[chosen].mean()),
            )
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| defect | test images | image AUROC | pixel AUROC | mask area |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['defect']} | {row['images']} | {row['image_auroc']:.3f} | "
            f"{row['pixel_auroc']:.3f} | {100 * row['mask_area']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    del argv
    folder = os.path.join(_WORKDIR.value, "eval")
    try:
        with (
            np.load(os.path.join(folder, "predictions.npz")) as predictions,
            np.load(os.path.join(folder, "pixel_maps.npz")) as pixel_maps,
        ):
            rows = per_type_rows(predictions, pixel_maps)
    except (OSError, KeyError) as error:
        print(f"defect_type_table.py: {folder}: {error} (run eval.py first)", file=sys.stderr)
        return 2
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory evaluated by eval.py.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
