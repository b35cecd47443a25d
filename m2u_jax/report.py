"""Evaluation outputs: plots (PNG), overlays, JSON files and the markdown report that links them.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never through pyplot: no
global backend switch for the importing program, no figure registry that leaks memory over
hundreds of overlays, and it works on headless machines. Every plot function writes one PNG of
a fixed pixel size (`FIGURE_SIZES[kind] * DPI`; no tight bounding box, so sizes are
predictable) and returns its path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from m2u_jax import metrics as metrics_lib
from m2u_jax.class_names import class_name

DPI = 100
# Width, height in inches of each kind of figure; pixels = inches * DPI.
FIGURE_SIZES = {
    "roc": (5.0, 5.0),
    "pr": (5.0, 5.0),
    "pro": (5.0, 5.0),
    "reliability": (5.0, 6.0),
    "review": (6.0, 4.5),
    "per_category": (10.0, 5.0),
    "overlay": (10.0, 5.2),
}

# Display names of metric keys in the report; other keys are shown as they are.
METRIC_LABELS = {
    "auroc": "AUROC",
    "ap": "AP",
    "average_precision": "AP",
    "f1_max": "F1-max",
    "f1_max_threshold": "F1-max threshold",
    "accuracy": "accuracy",
    "threshold": "decision threshold (from validation)",
    "threshold_rule": "decision threshold rule (f1 / fpr / fallback)",
    "aupro": "AUPRO (FPR ≤ 0.3)",
    "map50": "mAP@0.5",
    "map": "mAP@[.5:.95]",
    "per_class_ap50": "AP@0.5",
    "per_class_ap": "AP@[.5:.95]",
    "ece": "ECE",
    # The keys evaluate.py writes (metrics.json); a key missing here is shown as it is.
    "error_auroc": "error-detection AUROC of the uncertainty",
    "images_per_sec": "images/s (deterministic)",
    "latency_ms": "batch-1 latency (ms)",
    "mc_images_per_sec": "images/s (MC dropout)",
    "mc_latency_ms": "batch-1 latency, MC dropout (ms)",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "pixel_auroc": "pixel AUROC",
    "num_reviewed": "images reviewed",
    "fraction_reviewed": "fraction reviewed",
    "automatic_accuracy": "accuracy of the automatic decisions",
    "defect_recall": "defect recall",
    "missed_defects": "missed defects",
}

# Sections of the metrics dict, in report order, with their headings; other top-level keys
# follow under their own name.
SECTIONS = {
    "run": "Run",
    "image": "Image-level detection",
    "pixel": "Pixel-level localisation",
    "detection": "Box detection (COCO protocol)",
    "uncertainty": "Uncertainty and review",
    "speed": "Speed",
    "per_category": "Per category",
}

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _new_figure(kind: str) -> Figure:
    # Constrained layout fits labels, legends and colour bars into the fixed canvas.
    figure = Figure(figsize=FIGURE_SIZES[kind], dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _unit_square(axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)


def _undefined(axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)


# --------------------------------------------------------------------------- curves


def plot_roc(labels, scores, path, title: str = "Image-level ROC") -> str:
    """ROC curve with its AUROC and the chance diagonal.

    Args:
      labels: `[N]` 0/1; scores: `[N]` higher = more defective; path: PNG to write.
    Returns:
      `path`.
    """
    from sklearn.metrics import roc_curve

    auroc = metrics_lib.image_auroc(labels, scores)  # also checks the inputs
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    figure = _new_figure("roc")
    axes = figure.add_subplot()
    _unit_square(axes, "False positive rate", "True positive rate", title)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    if math.isnan(auroc):
        _undefined(axes, "ROC undefined: only one class")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr, color=_COLORS[0], linewidth=2, label=f"AUROC = {auroc:.4f}")
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_pr(labels, scores, path, title: str = "Image-level precision-recall") -> str:
    """Precision-recall curve with its AP, the F1-max point and the positive-rate baseline.

    Args:
      labels: `[N]` 0/1; scores: `[N]`; path: PNG to write.
    Returns:
      `path`.
    """
    from sklearn.metrics import precision_recall_curve

    ap = metrics_lib.average_precision(labels, scores)  # also checks the inputs
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    figure = _new_figure("pr")
    axes = figure.add_subplot()
    _unit_square(axes, "Recall", "Precision", title)
    if math.isnan(ap):
        _undefined(axes, "PR undefined: no defective image")
    else:
        precision, recall, _ = precision_recall_curve(labels, scores)
        axes.step(recall, precision, where="post", color=_COLORS[0], linewidth=2,
                  label=f"AP = {ap:.4f}")  # fmt: skip
        axes.axhline(labels.mean(), linestyle="--", color="grey",
                     label=f"defect rate = {labels.mean():.3f}")  # fmt: skip
        f1, threshold = metrics_lib.f1_max(labels, scores)
        decided = scores >= threshold
        f1_precision = float(np.mean(labels[decided]))
        f1_recall = float(np.mean(decided[labels]))
        axes.plot(f1_recall, f1_precision, "o", color=_COLORS[3], markersize=8,
                  label=f"F1-max = {f1:.4f} (t = {threshold:.3g})")  # fmt: skip
        axes.legend(loc="lower left")
    return _save(figure, path)


def plot_pro_curve(fpr, pro, fpr_limit: float, path, title: str = "Per-region overlap") -> str:
    """PRO curve with the normalised area up to `fpr_limit` (AUPRO) in the legend.

    Args:
      fpr, pro: `[P]` the curve from `metrics.aupro_curve` (it may run past the limit);
      fpr_limit: integration limit; path: PNG to write.
    Returns:
      `path`.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    figure = _new_figure("pro")
    axes = figure.add_subplot()
    axes.set_xlabel("False positive rate (normal pixels)")
    axes.set_ylabel("Per-region overlap (PRO)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.set_xlim(0.0, max(fpr_limit, float(fpr.max())) if fpr.size else fpr_limit)
    axes.set_ylim(0.0, 1.02)
    if fpr.size == 0:
        _undefined(axes, "PRO undefined: no anomalous region")
    else:
        area = metrics_lib.area_under_pro_curve(fpr, pro, fpr_limit)
        axes.plot(fpr, pro, color=_COLORS[0], linewidth=2,
                  label=f"AUPRO@{fpr_limit:g} = {area:.4f}")  # fmt: skip
        inside = fpr <= fpr_limit
        axes.fill_between(fpr[inside], pro[inside], alpha=0.2, color=_COLORS[0])
        axes.axvline(fpr_limit, linestyle="--", color="grey", label=f"FPR limit {fpr_limit:g}")
        axes.legend(loc="lower right")
    return _save(figure, path)


def plot_reliability(probs, labels, path, num_bins: int = 15) -> str:
    """Reliability diagram: accuracy per confidence bin against the diagonal, ECE in the
    title, and the number of images per bin below (bins as in `metrics.reliability_bins`).

    Args:
      probs: `[N]` probability of "defective"; labels: `[N]` 0/1; path: PNG to write.
    Returns:
      `path`.
    """
    bins = metrics_lib.reliability_bins(probs, labels, num_bins)
    ece = metrics_lib.expected_calibration_error(probs, labels, num_bins)
    edges = bins["edges"]
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = bins["count"] > 0
    figure = _new_figure("reliability")
    grid = figure.add_gridspec(2, 1, height_ratios=(3, 1))
    axes = figure.add_subplot(grid[0])
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.bar(centres[filled], bins["accuracy"][filled], width=width * 0.95,
             color=_COLORS[0], alpha=0.8, label="accuracy per bin")  # fmt: skip
    axes.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color=_COLORS[3],
              markersize=4, label="at mean confidence")  # fmt: skip
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_ylabel("Accuracy")
    axes.set_title(f"Reliability (ECE = {ece:.4f}, {num_bins} bins)")
    axes.tick_params(labelbottom=False)
    axes.grid(alpha=0.3)
    # Binary confidences are >= 0.5, so the upper left (above the diagonal) stays free.
    axes.legend(loc="upper left", fontsize=8)
    counts_axes = figure.add_subplot(grid[1], sharex=axes)
    counts_axes.bar(centres, bins["count"], width=width * 0.95, color="grey")
    counts_axes.set_xlabel("Confidence max(p, 1 - p)")
    counts_axes.set_ylabel("Images")
    return _save(figure, path)


def plot_review_curve(review_rows: Sequence[Mapping], path) -> str:
    """Accuracy of the automatic decisions and defect recall against the reviewed fraction.

    Args:
      review_rows: rows of `metrics.review_budget_curve`; path: PNG to write.
    Returns:
      `path`.
    """
    rows = sorted(review_rows, key=lambda row: row["fraction_reviewed"])
    reviewed = np.array([row["fraction_reviewed"] * 100 for row in rows])
    figure = _new_figure("review")
    axes = figure.add_subplot()
    for key, label, color in (
        ("automatic_accuracy", "accuracy of automatic decisions", _COLORS[0]),
        ("defect_recall", "defect recall (review catches)", _COLORS[1]),
    ):
        values = np.array([row[key] for row in rows], dtype=np.float64)
        axes.plot(reviewed, values, "o-", color=color, label=label)
    for row, x in zip(rows, reviewed):
        axes.annotate(str(row["num_reviewed"]), (x, row["automatic_accuracy"]),
                      textcoords="offset points", xytext=(0, 6), ha="center",
                      fontsize=7)  # fmt: skip
    axes.set_xlabel("Images sent to review (%)")
    axes.set_ylabel("Fraction")
    axes.set_title("Review budget (labels: images reviewed)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)


def plot_per_category(per_category: Mapping[str, Mapping[str, float]], path) -> str:
    """Grouped bars: one group per category, one bar per metric (nan values are left out).

    Args:
      per_category: category -> metric name -> value; path: PNG to write.
    Returns:
      `path`.
    """
    categories = list(per_category)
    names = []
    for values in per_category.values():
        names += [name for name in values if name not in names]
    figure = _new_figure("per_category")
    axes = figure.add_subplot()
    width = 0.8 / max(len(names), 1)
    positions = np.arange(len(categories))
    for index, name in enumerate(names):
        heights = np.array(
            [per_category[c].get(name, math.nan) for c in categories], dtype=np.float64
        )
        shown = np.isfinite(heights)
        axes.bar(positions[shown] + (index - (len(names) - 1) / 2) * width, heights[shown],
                 width=width, color=_COLORS[index % len(_COLORS)],
                 label=METRIC_LABELS.get(name, name))  # fmt: skip
    axes.set_xticks(positions)
    axes.set_xticklabels(categories, rotation=30 if len(categories) > 6 else 0, ha="right")
    axes.set_ylabel("Value")
    axes.set_title("Metrics per category", pad=24)
    axes.grid(axis="y", alpha=0.3)
    if names:
        # Above the bars, outside the axes, so that no bar is hidden.
        axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8,
                    ncols=min(len(names), 6), frameon=False)  # fmt: skip
    return _save(figure, path)


# --------------------------------------------------------------------------- overlay


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """`[H,W,C]` in [0,1] -> what imshow shows: C=1 or 2 grey (first channel), C>=3 the first
    three channels as RGB (callers put rgb first among the stacked modalities)."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 2:
        return image, "gray"
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    if image.shape[-1] >= 3:
        return image[..., :3], None
    return image[..., 0], "gray"


def plot_overlay(
    image,
    anomaly_map,
    mask,
    boxes_xyxy,
    box_scores,
    box_classes,
    class_names: Sequence[str] | None,
    title: str,
    path,
) -> str:
    """Two panels: the input with the ground-truth contour, and the anomaly heat map over the
    input with the predicted boxes labelled 'class score'.

    Args:
      image: `[H, W, C]` in [0, 1].
      anomaly_map: `[h, w]` anomaly probability (stretched over the image when h, w differ);
        coloured on a fixed [0, 1] scale when it lies in [0, 1], else from its min to max.
      mask: `[H, W]` ground truth in {0, 1}, or None.
      boxes_xyxy: `[k, 4]` predicted boxes in image pixels; box_scores: `[k]`;
      box_classes: `[k]` (0..K-1; -1 = unknown type).
      class_names: names of classes 0..K-1, or None to show numbers.
      title: figure title (e.g. path, label and score of the image).
      path: PNG to write.
    Returns:
      `path`.
    """
    shown, cmap = _display_image(image)
    height, width = shown.shape[:2]
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be [H, W], got shape {anomaly_map.shape}")
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(box_scores, dtype=np.float32).reshape(-1)
    classes = np.asarray(box_classes).reshape(-1).astype(int)
    if not (boxes.shape[0] == scores.shape[0] == classes.shape[0]):
        raise ValueError(
            f"boxes_xyxy ({boxes.shape[0]}), box_scores ({scores.shape[0]}) and box_classes "
            f"({classes.shape[0]}) must have the same length"
        )
    in_unit_range = anomaly_map.min() >= 0.0 and anomaly_map.max() <= 1.0
    value_range = (0.0, 1.0) if in_unit_range else (anomaly_map.min(), anomaly_map.max())
    # Pixel edges as coordinates, so that xyxy boxes (x1 = last pixel + 1) sit on the pixels.
    extent = (0, width, height, 0)

    figure = _new_figure("overlay")
    figure.suptitle(title, fontsize=10)
    left, right = figure.subplots(1, 2)
    for axes in (left, right):
        axes.imshow(shown, cmap=cmap, vmin=0, vmax=1, extent=extent, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
    left.set_title("input + ground truth", fontsize=9)
    right.set_title("anomaly map + detections", fontsize=9)
    heat = right.imshow(anomaly_map, cmap="jet", alpha=0.45, vmin=value_range[0],
                        vmax=value_range[1], extent=extent, interpolation="bilinear")  # fmt: skip
    figure.colorbar(heat, ax=right, fraction=0.046, pad=0.02, label="anomaly score")
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
        if mask.shape != (height, width):
            raise ValueError(f"mask has shape {mask.shape}, image is {(height, width)}")
        if mask.max() > 0.5:
            columns = np.arange(width) + 0.5
            rows = np.arange(height) + 0.5
            for axes in (left, right):
                axes.contour(columns, rows, mask, levels=[0.5], colors="lime", linewidths=1.5)
    for (x0, y0, x1, y1), score, class_id in zip(boxes, scores, classes):
        if class_id < 0:
            name = "defect"
        elif class_names is not None and class_id < len(class_names):
            name = class_names[class_id]
        else:
            name = str(class_id)
        right.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5)
        )
        right.text(x0, y0, f"{name} {score:.2f}", color="black", fontsize=7, va="bottom",
                   bbox=dict(facecolor="white", alpha=0.8, pad=1, linewidth=0))  # fmt: skip
    right.set_xlim(0, width)
    right.set_ylim(height, 0)
    legend = [("ground truth", "lime")] if mask is not None else []
    legend += [("predicted box", "white")] if boxes.shape[0] else []
    if legend:
        left.legend(
            [Rectangle((0, 0), 1, 1, fill=False, edgecolor=color) for _, color in legend],
            [label for label, _ in legend],
            loc="lower left",
            fontsize=7,
            facecolor="lightgrey",
        )
    return _save(figure, path)


# --------------------------------------------------------------------------- report


def format_value(value) -> str:
    """Number -> report text: nan 'n/a', ints as they are, |x| >= 100 with one decimal
    (throughput), other floats with 4 decimals."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4f}"
    return str(value)


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool, np.integer, np.floating, np.bool_))


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _is_flat_mapping(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(_is_scalar(v) for v in value.values())


def _is_row_list(value) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(row, Mapping) for row in value)
    )


def _matrix_lines(matrix: Mapping[str, Mapping], text) -> list[str]:
    """Rows = the keys of `matrix`, columns = the union of the inner keys (missing: n/a)."""
    columns = []
    for values in matrix.values():
        columns += [c for c in values if c not in columns]
    rows = [[str(r), *[text(v.get(c, math.nan)) for c in columns]] for r, v in matrix.items()]
    return _table(["", *[_label(c) for c in columns]], rows)


def _section_lines(section, detection: bool) -> list[str]:
    """Markdown tables of one metrics section.

    A dict of flat dicts (category -> metric -> value) is one matrix, a row per key. Otherwise
    the scalars form a metric/value table; flat dicts with the same keys are put side by side
    (per-class AP@0.5 and AP@[.5:.95], a row per class); nested dicts become matrices and lists
    of dicts row tables (review budgets), each under its bold name.
    """

    def text(value) -> str:
        # COCO marks a class without ground-truth boxes by AP = -1.
        if detection and isinstance(value, (float, int)) and value == -1:
            return "n/a (no GT)"
        return format_value(value)

    if _is_row_list(section):
        columns = []
        for row in section:
            columns += [c for c in row if c not in columns]
        rows = [[text(row.get(c, math.nan)) for c in columns] for row in section]
        return _table([_label(c) for c in columns], rows)
    if not isinstance(section, Mapping):
        return _table(["value"], [[text(section)]])
    if section and all(_is_flat_mapping(v) for v in section.values()):
        return _matrix_lines(section, text)
    lines = []
    scalars = [(k, v) for k, v in section.items() if _is_scalar(v)]
    if scalars:
        lines += _table(["metric", "value"], [[_label(k), text(v)] for k, v in scalars])
    side_by_side: dict[tuple, list[str]] = {}
    for key, value in section.items():
        if _is_flat_mapping(value):
            side_by_side.setdefault(tuple(value), []).append(key)
    for row_keys, column_keys in side_by_side.items():
        header = ["", *[_label(k) for k in column_keys]]
        lines += _table(
            header, [[str(r), *[text(section[c][r]) for c in column_keys]] for r in row_keys]
        )
    for key, value in section.items():
        if _is_scalar(value) or _is_flat_mapping(value):
            continue
        lines += [f"**{_label(key)}**", ""]
        if isinstance(value, Mapping) and all(_is_flat_mapping(v) for v in value.values()):
            lines += _matrix_lines(value, text)
        else:
            lines += _section_lines(value, detection)
    return lines


def _relative_link(out_dir: str, path, what: str) -> str:
    full = path if os.path.isabs(path) else os.path.join(out_dir, path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"write_report: {what} {path!r} does not exist (looked at {full})")
    return os.path.relpath(full, out_dir).replace(os.sep, "/")


def write_report(
    out_dir,
    metrics: Mapping,
    plots: Mapping[str, str],
    overlays: Sequence[str | Mapping] = (),
) -> str:
    """Writes `out_dir/report.md`: metric tables per section, then the plots and overlays.

    Args:
      out_dir: folder of the report; relative image paths are relative to it.
      metrics: section -> content. Known sections (in this order): 'run', 'image', 'pixel',
        'detection' (`metrics.box_map` output), 'uncertainty' (scalars and e.g. a 'review'
        list of `metrics.review_budget_curve` rows), 'speed', 'per_category' (category ->
        metric -> value); other sections follow under their own name. A section is a dict of
        scalars, of dicts of scalars (tables side by side when their keys match) or of lists
        of row dicts.
      plots: title -> PNG path (relative to `out_dir` or absolute).
      overlays: PNG paths, or dicts with 'path' and optional 'caption' and 'group' (overlays
        of one group are listed under a common heading).
    Returns:
      path of report.md. Raises FileNotFoundError when a linked image does not exist.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# m2u-jax evaluation report", ""]
    ordered = [k for k in SECTIONS if k in metrics] + [k for k in metrics if k not in SECTIONS]
    for key in ordered:
        lines += [f"## {SECTIONS.get(key, key)}", ""]
        lines += _section_lines(metrics[key], detection=key == "detection")
    if plots:
        lines += ["## Plots", ""]
        for title, path in plots.items():
            lines += [
                f"### {title}",
                "",
                f"![{title}]({_relative_link(out_dir, path, 'plot')})",
                "",
            ]
    if overlays:
        lines += ["## Overlays", ""]
        current_group = None
        for item in overlays:
            entry = {"path": item} if isinstance(item, (str, os.PathLike)) else dict(item)
            group = entry.get("group")
            if group is not None and group != current_group:
                lines += [f"### {group}", ""]
                current_group = group
            link = _relative_link(out_dir, os.fspath(entry["path"]), "overlay")
            caption = entry.get("caption", os.path.basename(link))
            lines += [f"![{caption}]({link})", "", f"*{caption}*", ""]
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return report_path


# ----------------------------------------------------------------------------- outputs


def to_json_value(value):
    """Metrics tree -> JSON-ready Python values: NaN/Inf -> None, numpy scalars -> Python."""
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: str, value) -> str:
    """Writes `value` (`to_json_value`) as indented JSON; returns `path`."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(to_json_value(value), file, indent=2, allow_nan=False)
        file.write("\n")
    return path


def boxes_of(row: Mapping, class_names: Sequence[str]) -> list[dict]:
    """The valid boxes of one prediction row as JSON-able dicts (xyxy, score, class name)."""
    keep = np.asarray(row["box_valid"]) > 0
    return [
        {
            "xyxy": [round(float(v), 2) for v in box],
            "score": float(score),
            "class": class_name(int(class_id), class_names),
        }
        for box, score, class_id in zip(
            row["boxes_xyxy"][keep], row["box_scores"][keep], row["box_classes"][keep]
        )
    ]


def plot_overlays(
    items: Sequence[dict], directory: str, prefix: str, group: str, class_names, caption
) -> list[dict]:
    """One overlay PNG per row of `items` (`prefix_NN.png`), captioned by `caption(row)`;
    returns the report entries."""
    entries = []
    for index, row in enumerate(items):
        path = os.path.join(directory, f"{prefix}_{index:02d}.png")
        keep = np.asarray(row["box_valid"]) > 0
        title = caption(row)
        plot_overlay(
            row["images"],
            row["anomaly_map"],
            row["masks"],
            row["boxes_xyxy"][keep],
            row["box_scores"][keep],
            row["box_classes"][keep],
            list(class_names),
            title,
            path,
        )
        entries.append({"path": path, "caption": title, "group": group})
    return entries


def scalar_leaves(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """Finite numeric leaves of a nested metrics dict as `{'a/b/c': value}` (lists, strings and
    NaN left out): the TensorBoard view of metrics.json."""
    leaves: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            leaves.update(scalar_leaves(value, name + "/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, bool
        ):
            if math.isfinite(float(value)):
                leaves[name] = float(value)
    return leaves


def write_tensorboard(logdir: str, step: int, metrics: Mapping, image_paths: Sequence[str]) -> bool:
    """Writes `metrics` (as `eval/...` scalars) and the PNGs at `image_paths` (as `eval/<file
    stem>` images) at `step` into the TensorBoard event files of `logdir`, next to the training
    scalars. Returns False (and writes nothing) when clu is not importable."""
    try:
        from clu import metric_writers
    except ImportError:
        return False
    from PIL import Image

    writer = metric_writers.create_default_writer(logdir, asynchronous=False)
    try:
        writer.write_scalars(step, scalar_leaves(metrics, "eval/"))
        images = {}
        for path in image_paths:
            with Image.open(path) as image:
                images[f"eval/{os.path.splitext(os.path.basename(path))[0]}"] = np.asarray(
                    image.convert("RGB")
                )[None]
        if images:
            writer.write_images(step, images)
        writer.flush()
    finally:
        writer.close()
    return True
