"""Evaluation metrics on host-side numpy arrays: image, pixel, box and uncertainty quality.

Conventions shared by every function here:

- `labels` are binary, 1 = defective (the positive class); `scores` are "higher = more
  defective"; a decision is "defective" when `score >= threshold`.
- Metrics that are undefined for the given input (AUROC with one class only, AUPRO without any
  anomalous region, ...) return `nan` rather than raising, so per-category tables can still be
  built; malformed input (shape mismatch, non-binary labels, non-finite scores) raises
  `ValueError` naming the argument.
- Where a well-kept library computes the metric, it is used: scikit-learn for ROC/PR curves,
  pycocotools for COCO box mAP, scipy.ndimage for connected components. Own code exists only
  for AUPRO (no library implements the MVTec AD definition) and for pixel AUROC (scikit-learn
  needs gigabytes for ~10^8 pixels); both are tested against slow or library references.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# 8-connectivity (diagonal neighbours join a region), as in the official MVTec AD evaluation
# script (`scipy.ndimage.label(gt, np.ones((3, 3)))`).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Pixels scored per chunk in `pixel_auroc`; bounds the int64 temporaries to ~32 MiB.
_AUROC_CHUNK = 1 << 22


# --------------------------------------------------------------------------- input checks


def _as_binary(name: str, values, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(values)
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if array.dtype == bool:
        return array
    if array.size and not np.all((array == 0) | (array == 1)):
        bad = np.unique(array[(array != 0) & (array != 1)])[:5]
        raise ValueError(f"{name} must be binary (0/1); found values {bad.tolist()}")
    return array.astype(bool)


def _as_scores(name: str, values, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(values)
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {array.dtype}")
    if array.size and not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or Inf")
    return array


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_scores("scores", scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {scores.shape}")
    labels = _as_binary("labels", labels, shape=scores.shape)
    return labels, scores


def _masks_and_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    maps = _as_scores("maps", maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {maps.shape}")
    masks = _as_binary("masks", masks, shape=maps.shape)
    return masks, maps


# --------------------------------------------------------------------------- image level


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (scikit-learn `roc_auc_score`).

    Args:
      labels: `[N]` 0 good / 1 defective.
      scores: `[N]` higher = more defective.
    Returns:
      AUROC in [0, 1]; nan when `labels` holds only one class.
    """
    from sklearn.metrics import roc_auc_score

    labels, scores = _labels_and_scores(labels, scores)
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, scores))


def average_precision(labels, scores) -> float:
    """Average precision of image scores (scikit-learn: step-wise sum, no interpolation).

    Args:
      labels: `[N]` 0/1.
      scores: `[N]` higher = more defective.
    Returns:
      AP in [0, 1]; nan when there is no defective image.
    """
    from sklearn.metrics import average_precision_score

    labels, scores = _labels_and_scores(labels, scores)
    if not labels.any():
        return math.nan
    return float(average_precision_score(labels, scores))


def f1_max(labels, scores, ties: str = "lowest") -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold (a score value) that reaches it.

    Args:
      labels: `[N]` 0/1.
      scores: `[N]`.
      ties: which of several F1-tied thresholds to return: 'lowest' (more recall) or
        'highest' (fewer false rejects).
    Returns:
      `(f1, threshold)`: images with `score >= threshold` are called defective; the candidate
      thresholds are the distinct scores. `(nan, nan)` without any defective image.
    """
    if ties not in ("lowest", "highest"):
        raise ValueError(f"ties={ties!r} must be 'lowest' or 'highest'")
    labels, scores = _labels_and_scores(labels, scores)
    if not labels.any():
        return math.nan, math.nan
    candidates = np.unique(scores)  # ascending
    # Positives and negatives at or above each candidate, from sorted counts.
    true_positive = labels.sum() - np.searchsorted(np.sort(scores[labels]), candidates, "left")
    negatives = np.sort(scores[~labels])
    false_positive = negatives.size - np.searchsorted(negatives, candidates, "left")
    false_negative = labels.sum() - true_positive
    f1 = 2 * true_positive / np.maximum(2 * true_positive + false_positive + false_negative, 1)
    tied = np.flatnonzero(f1 == f1.max())
    best = int(tied[0] if ties == "lowest" else tied[-1])
    return float(f1[best]), float(candidates[best])


def f1_optimal_threshold(labels, scores) -> float:
    """Decision threshold chosen on validation data: the F1-max cut, moved to the middle of the
    gap below it.

    The F1-max threshold is a validation score itself, so a test image scoring a hair below it
    would flip; the midpoint between that score and the next lower distinct score keeps the
    same validation decisions (hence the same F1) with the widest margin.

    Args:
      labels: `[N]` 0/1 validation labels.
      scores: `[N]` validation scores.
    Returns:
      threshold (`score >= threshold` = defective); nan without any defective image.
    """
    labels, scores = _labels_and_scores(labels, scores)
    _, threshold = f1_max(labels, scores)
    if math.isnan(threshold):
        return threshold
    lower = scores[scores < threshold]
    if lower.size == 0:
        return threshold
    return float((threshold + lower.max()) / 2)


def fpr_threshold(labels, scores, target_fpr: float) -> float:
    """Decision threshold for a false-positive-rate target on the *good* validation images.

    With n good images (`labels` 0), at most k = floor(target_fpr * n) of them may score at or
    above the threshold (k is computed with a 1e-9 tolerance, so 0.2 * 10 gives 2). The
    threshold is the smallest good score s with #{good scores >= s} <= k, i.e. the k-th largest
    good score when it is strictly above the (k+1)-th. Ties: good images with equal scores fall
    on the same side of any threshold, so when a tied group would push the count past k the
    threshold moves up to the next larger distinct good score (the achieved FPR is then below
    the target); when no good score qualifies (k = 0, or ties at the top) it is the next float
    above the largest good score (no good image is called defective). Defective images
    (`labels` 1) are ignored.

    Example: good scores 0.1, 0.2, ..., 1.0 and target_fpr 0.2 -> k = 2 -> threshold 0.9
    (0.9 and 1.0 are the two false positives).

    Args:
      labels: `[N]` 0/1 validation labels.
      scores: `[N]` validation scores.
      target_fpr: in (0, 1).
    Returns:
      threshold (`score >= threshold` = defective); nan without any good image.
    """
    labels, scores = _labels_and_scores(labels, scores)
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr={target_fpr} must be in (0, 1)")
    good = np.sort(scores[~labels])
    if good.size == 0:
        return math.nan
    allowed = int(math.floor(target_fpr * good.size + 1e-9))
    candidates = np.unique(good)  # ascending
    at_or_above = good.size - np.searchsorted(good, candidates, side="left")
    fitting = np.flatnonzero(at_or_above <= allowed)
    if fitting.size == 0:
        return float(np.nextafter(good[-1], np.inf))
    return float(candidates[fitting[0]])


def accuracy(labels, scores, threshold: float) -> float:
    """Fraction of images whose decision `score >= threshold` equals the label.

    Args:
      labels: `[N]` 0/1.
      scores: `[N]`.
      threshold: scalar, usually `f1_optimal_threshold` on validation data.
    Returns:
      accuracy in [0, 1]; nan for N = 0.
    """
    labels, scores = _labels_and_scores(labels, scores)
    if labels.size == 0:
        return math.nan
    return float(np.mean((scores >= threshold) == labels))


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(masks, maps) -> float:
    """Exact pixel-level AUROC over all pixels of all images, without scikit-learn's memory use.

    AUROC = P(score of an anomalous pixel > score of a normal pixel) + 0.5 P(equal) (the
    Mann-Whitney form, identical to the trapezoidal ROC area with ties). The smaller class is
    sorted once and the larger one is looked up in it chunk by chunk, so memory stays at one
    sorted copy of the smaller class plus a few MiB, and the cost is one sort.

    Args:
      masks: `[N, H, W]` ground-truth anomaly masks in {0, 1}.
      maps: `[N, H, W]` anomaly scores, higher = more anomalous.
    Returns:
      AUROC in [0, 1]; nan when all pixels are normal or all anomalous.
    """
    masks, maps = _masks_and_maps(masks, maps)
    positives = maps[masks]
    negatives = maps[~masks]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    # Count, for each element of the larger set, the elements of the smaller set below / equal.
    smaller, larger, smaller_is_negative = (
        (negatives, positives, True)
        if negatives.size <= positives.size
        else (positives, negatives, False)
    )
    smaller = np.sort(smaller)
    below_total = 0
    equal_total = 0
    for start in range(0, larger.size, _AUROC_CHUNK):
        chunk = larger[start : start + _AUROC_CHUNK]
        left = np.searchsorted(smaller, chunk, side="left")
        right = np.searchsorted(smaller, chunk, side="right")
        below_total += int(left.sum(dtype=np.int64))
        equal_total += int((right - left).sum(dtype=np.int64))
    pairs = float(positives.size) * float(negatives.size)
    if smaller_is_negative:
        # below_total = #(negative < positive) pairs.
        wins = below_total
    else:
        # below_total = #(positive < negative) pairs; the rest of the unequal pairs are wins.
        wins = positives.size * negatives.size - below_total - equal_total
    return float((wins + 0.5 * equal_total) / pairs)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """`[N,H,W]` bool -> (`[num anomalous pixels]` 1 / size of the pixel's 8-connected region,
    in the order of `maps[masks]`; number of regions over all images)."""
    weights = []
    num_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        labeled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labeled.ravel()).astype(np.float64)
        weights.append(1.0 / sizes[labeled[mask]])
        num_regions += count
    return np.concatenate(weights) if weights else np.zeros(0), num_regions


def _truncate_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float):
    """Keeps the points with fpr <= limit and ends the curve exactly at fpr_limit, linearly
    interpolating between the neighbours of the limit (as the MVTec AD script does)."""
    inside = fpr <= fpr_limit
    fpr_kept, pro_kept = fpr[inside], pro[inside]
    if fpr_kept[-1] < fpr_limit and not inside.all():
        after = int(np.argmin(inside))  # first point beyond the limit (fpr is sorted)
        before = after - 1
        fraction = (fpr_limit - fpr[before]) / (fpr[after] - fpr[before])
        pro_at_limit = pro[before] + fraction * (pro[after] - pro[before])
        fpr_kept = np.append(fpr_kept, fpr_limit)
        pro_kept = np.append(pro_kept, pro_at_limit)
    return fpr_kept, pro_kept


def aupro_curve(
    masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap (PRO) curve of MVTec AD, from FPR 0 up to exactly `fpr_limit`.

    Regions are the 8-connected components of each ground-truth mask (the official MVTec AD
    script labels with a 3x3 structure of ones). For a threshold t, PRO(t) is the mean over all
    regions of all images of the fraction of the region's pixels with score >= t, and FPR(t) is
    the fraction of all normal pixels (of all images, good images included) with score >= t.

    Args:
      masks: `[N, H, W]` ground truth in {0, 1}.
      maps: `[N, H, W]` anomaly scores.
      fpr_limit: where the curve ends, in (0, 1].
      num_thresholds: None = exact, one point per distinct score (the official script's
        algorithm; costs one sort of the pixels above the `fpr_limit` quantile of the normal
        pixels). An int = that many evenly spaced thresholds between the smallest and largest
        score (no sort, approximate; the error shrinks with more thresholds).
    Returns:
      `(fpr [P], pro [P])`, fpr non-decreasing from 0 to `fpr_limit` (the last point is
      interpolated linearly when no threshold lands there); the curve starts at (0, 0).
      Both are empty when there is no anomalous region or no normal pixel.
    """
    masks, maps = _masks_and_maps(masks, maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be None or >= 2, got {num_thresholds}")
    anomalous_weights, num_regions = _region_weights(masks)
    num_normal = int(masks.size - masks.sum())
    if num_regions == 0 or num_normal == 0:
        return np.zeros(0), np.zeros(0)
    # Scores keep their dtype (ordering is all that matters): no float64 copy of every pixel.
    normal_scores = maps[~masks]
    anomalous_scores = maps[masks]

    if num_thresholds is None:
        # Only thresholds down to the first point past the limit matter: with m the smallest
        # normal count whose FPR exceeds the limit, the m-th largest normal score is that point.
        # (At fpr_limit = 1 every score is kept so that the curve climbs to PRO = 1.)
        needed = math.floor(fpr_limit * num_normal) + 1
        if needed > num_normal:
            cut = -np.inf
        else:
            cut = np.partition(normal_scores, num_normal - needed)[num_normal - needed]
        normal_sorted = np.sort(normal_scores[normal_scores >= cut])
        keep = anomalous_scores >= cut
        order = np.argsort(anomalous_scores[keep], kind="stable")
        anomalous_sorted = anomalous_scores[keep][order]
        weights_sorted = anomalous_weights[keep][order]
        thresholds = np.unique(np.concatenate([normal_sorted, anomalous_sorted]))[::-1]
        false_positives = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, "left")
        # weight_above[i] = total weight of the anomalous pixels from sorted index i upwards.
        weight_above = np.concatenate([np.cumsum(weights_sorted[::-1])[::-1], [0.0]])
        overlap = weight_above[np.searchsorted(anomalous_sorted, thresholds, "left")]
    else:
        thresholds = np.linspace(maps.min(), maps.max(), num_thresholds)
        # bin b of a pixel = number of thresholds <= its score; it is positive for the first b.
        normal_bins = np.searchsorted(thresholds, normal_scores, side="right")
        anomalous_bins = np.searchsorted(thresholds, anomalous_scores, side="right")
        normal_counts = np.bincount(normal_bins, minlength=num_thresholds + 1)
        anomalous_mass = np.bincount(
            anomalous_bins, weights=anomalous_weights, minlength=num_thresholds + 1
        )
        # Count at threshold j = sum over bins b > j; listed from the highest threshold down.
        false_positives = np.cumsum(normal_counts[::-1])[:-1]
        overlap = np.cumsum(anomalous_mass[::-1])[:-1]

    fpr = np.concatenate([[0.0], false_positives / num_normal])
    # min(): summed 1/size weights can overshoot 1 by a rounding error.
    pro = np.minimum(np.concatenate([[0.0], overlap / num_regions]), 1.0)
    return _truncate_curve(fpr, pro, fpr_limit)


def area_under_pro_curve(fpr, pro, fpr_limit: float) -> float:
    """Trapezoidal area of a PRO curve over FPR in [0, fpr_limit], divided by fpr_limit; the
    point at exactly fpr_limit is interpolated linearly when the curve runs past it.

    Args:
      fpr, pro: `[P]` a curve starting at FPR 0 with non-decreasing FPR (`aupro_curve`).
      fpr_limit: integration limit in (0, 1].
    Returns:
      normalised area; nan for an empty curve.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    if fpr.shape != pro.shape or fpr.ndim != 1:
        raise ValueError(f"fpr {fpr.shape} and pro {pro.shape} must be 1-D of the same length")
    if fpr.size == 0:
        return math.nan
    fpr, pro = _truncate_curve(fpr, pro, fpr_limit)
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2) / fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (MVTec AD).

    The curve is `aupro_curve` (8-connected regions, exact by default); the area is the
    trapezoidal rule with the point at exactly `fpr_limit` interpolated. A perfect map scores 1.

    Args:
      masks: `[N, H, W]` ground truth in {0, 1}.
      maps: `[N, H, W]` anomaly scores.
      fpr_limit: integration limit, 0.3 in the MVTec AD papers.
      num_thresholds: see `aupro_curve`.
    Returns:
      normalised AUPRO in [0, 1]; nan when there is no anomalous region or no normal pixel.
    """
    fpr, pro = aupro_curve(masks, maps, fpr_limit, num_thresholds)
    return area_under_pro_curve(fpr, pro, fpr_limit)


# --------------------------------------------------------------------------- boxes (COCO)


def _box_fields(kind: str, index: int, item: dict, with_scores: bool):
    required = ("boxes_xyxy", "scores", "classes") if with_scores else ("boxes_xyxy", "classes")
    missing = [key for key in required if key not in item]
    if missing:
        raise ValueError(f"{kind}[{index}] lacks key(s) {missing}; expected {list(required)}")
    boxes = np.asarray(item["boxes_xyxy"], dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(item["classes"]).reshape(-1).astype(np.int64)
    scores = np.asarray(item["scores"], dtype=np.float64).reshape(-1) if with_scores else None
    count = boxes.shape[0]
    if classes.shape[0] != count or (with_scores and scores.shape[0] != count):
        raise ValueError(
            f"{kind}[{index}]: boxes_xyxy has {count} rows but classes has {classes.shape[0]}"
            + (f" and scores {scores.shape[0]}" if with_scores else "")
        )
    if "valid" in item:
        keep = np.asarray(item["valid"]).reshape(-1) > 0
        if keep.shape[0] != count:
            raise ValueError(f"{kind}[{index}]: valid has {keep.shape[0]} entries, not {count}")
        boxes, classes = boxes[keep], classes[keep]
        scores = scores[keep] if with_scores else None
    if not np.all(np.isfinite(boxes)) or np.any(boxes[:, 2:] < boxes[:, :2]):
        raise ValueError(f"{kind}[{index}]: boxes_xyxy must be finite with x1 >= x0, y1 >= y0")
    return boxes, classes, scores


def _coco_annotations(boxes, classes, image_id, first_id, scores=None) -> list[dict]:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    annotations = []
    for row in range(boxes.shape[0]):
        annotation = {
            "id": first_id + row,
            "image_id": image_id,
            # COCO category ids start at 1 by convention; class k is category k + 1.
            "category_id": int(classes[row]) + 1,
            "bbox": [float(boxes[row, 0]), float(boxes[row, 1]), widths[row], heights[row]],
            "area": float(widths[row] * heights[row]),
            "iscrowd": 0,
        }
        if scores is not None:
            annotation["score"] = float(scores[row])
        annotations.append(annotation)
    return annotations


def _evaluated_coco(
    predictions: Sequence[dict],
    ground_truth: Sequence[dict],
    num_classes: int | None,
    class_names: Sequence[str] | None,
    class_agnostic: bool,
    iou_thresholds: Sequence[float] | None = None,
):
    """(accumulated `COCOeval` of the boxes, class names): `box_map`'s arguments checked and
    turned into COCO's records; `iou_thresholds` replaces COCO's ten (0.50:0.05:0.95)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(
            f"predictions has {len(predictions)} images but ground_truth has {len(ground_truth)}"
        )
    gt_fields = [_box_fields("ground_truth", i, g, False) for i, g in enumerate(ground_truth)]
    pred_fields = [_box_fields("predictions", i, p, True) for i, p in enumerate(predictions)]
    if class_agnostic:
        gt_fields = [(b, np.zeros_like(c), s) for b, c, s in gt_fields]
        pred_fields = [(b, np.zeros_like(c), s) for b, c, s in pred_fields]
        num_classes = 1
    all_classes = np.concatenate([c for _, c, _ in gt_fields + pred_fields] + [np.zeros(0, int)])
    if all_classes.size and all_classes.min() < 0:
        raise ValueError(
            "class ids must be >= 0 (class -1 marks an unknown defect type); "
            "pass class_agnostic=True to evaluate such boxes"
        )
    if num_classes is None:
        num_classes = int(all_classes.max()) + 1 if all_classes.size else 1
    if all_classes.size and all_classes.max() >= num_classes:
        raise ValueError(f"class id {int(all_classes.max())} >= num_classes={num_classes}")
    if class_agnostic:
        names = ["all"]
    elif class_names is None:
        names = [str(k) for k in range(num_classes)]
    else:
        names = list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names, num_classes is {num_classes}")

    images = [{"id": index} for index in range(len(ground_truth))]
    categories = [{"id": k + 1, "name": names[k]} for k in range(num_classes)]
    gt_annotations, dt_annotations = [], []
    for index, ((gt_boxes, gt_classes, _), (boxes, classes, scores)) in enumerate(
        zip(gt_fields, pred_fields)
    ):
        gt_annotations += _coco_annotations(gt_boxes, gt_classes, index, len(gt_annotations) + 1)
        dt_annotations += _coco_annotations(boxes, classes, index, len(dt_annotations) + 1, scores)

    # pycocotools prints progress on stdout at every step.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": gt_annotations,
            "categories": categories,
        }
        coco_gt.createIndex()
        coco_dt = COCO()
        # Built directly instead of `loadRes`, which rejects an empty result list.
        coco_dt.dataset = {
            "images": images,
            "annotations": dt_annotations,
            "categories": categories,
        }
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if iou_thresholds is not None:
            evaluator.params.iouThrs = np.asarray(iou_thresholds, np.float64)
        evaluator.evaluate()
        evaluator.accumulate()

    return evaluator, names


def box_map(
    predictions: Sequence[dict],
    ground_truth: Sequence[dict],
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    class_agnostic: bool = False,
) -> dict:
    """COCO box mAP with pycocotools (`COCOeval`, iouType 'bbox', 101-point interpolated
    precision, at most 100 detections per image, area range 'all', every box iscrowd=0).

    Args:
      predictions: one dict per image with `boxes_xyxy [k, 4]` (pixels), `scores [k]`,
        `classes [k]` (0..K-1) and optionally `valid [k]` (entries with valid <= 0 are dropped,
        so padded `batched_nms` outputs can be passed as they are).
      ground_truth: one dict per image (same order) with `boxes_xyxy [g, 4]`, `classes [g]` and
        optionally `valid [g]`. Images without boxes are fine.
      num_classes: K; None = 1 + the largest class id seen in either list.
      class_names: K names for `per_class_*` keys; default '0', '1', ...
      class_agnostic: map every class (also -1, the unknown class of synthetic anomalies) to 0:
        localisation quality regardless of the predicted defect type.
    Returns:
      dict with `map50` (AP at IoU 0.5 averaged over classes), `map` (AP averaged over IoU
      0.50:0.05:0.95 and classes), `per_class_ap50` and `per_class_ap` (name -> AP). As in
      COCO, a class without ground-truth boxes gets -1 and is left out of the means; the means
      are -1 when no class has a ground-truth box.
    """
    evaluator, names = _evaluated_coco(
        predictions, ground_truth, num_classes, class_names, class_agnostic
    )
    params = evaluator.params
    # precision: [iou thresholds T, recall points R, classes K, area ranges A, max dets M]
    precision = evaluator.eval["precision"]
    area_all = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    iou_50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    per_class = precision[:, :, :, area_all, max_dets]  # [T, R, K]
    has_gt = np.all(per_class > -1, axis=(0, 1))
    ap_per_class = np.where(has_gt, per_class.mean(axis=(0, 1)), -1.0)
    ap50_per_class = np.where(has_gt, per_class[iou_50].mean(axis=0), -1.0)
    return {
        "map50": float(ap50_per_class[has_gt].mean()) if has_gt.any() else -1.0,
        "map": float(ap_per_class[has_gt].mean()) if has_gt.any() else -1.0,
        "per_class_ap50": {name: float(ap50_per_class[k]) for k, name in enumerate(names)},
        "per_class_ap": {name: float(ap_per_class[k]) for k, name in enumerate(names)},
    }


def box_ap_by_iou(
    predictions: Sequence[dict],
    ground_truth: Sequence[dict],
    iou_thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.75),
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Per-class COCO AP and recall at each IoU threshold: whether a detector misses defects
    (low AP even at IoU 0.1) or finds them but fits their boxes loosely (AP falling between
    0.3 and 0.5). Same arguments and box rules as `box_map` (101-point precision, 100
    detections per image, area 'all').

    Returns `{'iou_thresholds': [T], 'ap': {name: [T]}, 'recall': {name: [T]}, 'map': [T]}`;
    a class without ground-truth boxes gets -1 and is left out of `map` (-1 when none has).
    """
    evaluator, names = _evaluated_coco(
        predictions, ground_truth, num_classes, class_names, False, iou_thresholds
    )
    params = evaluator.params
    area_all = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    precision = evaluator.eval["precision"][:, :, :, area_all, max_dets]  # [T, R, K]
    recall = evaluator.eval["recall"][:, :, area_all, max_dets]  # [T, K]
    has_gt = np.all(precision > -1, axis=(0, 1))
    ap = np.where(has_gt[None], precision.mean(axis=1), -1.0)  # [T, K]
    recall = np.where(has_gt[None], recall, -1.0)
    return {
        "iou_thresholds": [float(t) for t in params.iouThrs],
        "ap": {name: [float(v) for v in ap[:, k]] for k, name in enumerate(names)},
        "recall": {name: [float(v) for v in recall[:, k]] for k, name in enumerate(names)},
        "map": [float(row[has_gt].mean()) if has_gt.any() else -1.0 for row in ap],
    }


# --------------------------------------------------------------------------- uncertainty


def reliability_bins(probs, labels, num_bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability diagram data of binary probabilities (shared by the ECE and its plot).

    Confidence of a binary decision is `max(p, 1 - p)` (the probability of the predicted
    class, with `p >= 0.5` predicting defective); a decision is correct when it equals the
    label. Confidences fall in [0.5, 1], so with bins of equal width over [0, 1] (Guo et al.
    2017) the lower half of the bins stays empty. Bin b holds confidences in
    (b / num_bins, (b + 1) / num_bins]; the first bin also holds 0.

    Args:
      probs: `[N]` probability of "defective", in [0, 1].
      labels: `[N]` 0/1.
      num_bins: number of equal-width bins over [0, 1].
    Returns:
      dict of `[num_bins]` arrays: `confidence` (mean per bin, nan when empty), `accuracy`
      (nan when empty), `count`, and `edges` `[num_bins + 1]`.
    """
    labels, probs = _labels_and_scores(labels, probs)
    if probs.size and (probs.min() < 0 or probs.max() > 1):
        raise ValueError("probs must lie in [0, 1]")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    probs = probs.astype(np.float64)
    predicted = probs >= 0.5
    confidence = np.where(predicted, probs, 1.0 - probs)
    correct = (predicted == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, weights=confidence, minlength=num_bins) / count
        mean_accuracy = np.bincount(bins, weights=correct, minlength=num_bins) / count
    return {
        "confidence": mean_confidence,
        "accuracy": mean_accuracy,
        "count": count,
        "edges": edges,
    }


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """ECE of binary probabilities: sum over bins of (bin size / N) |accuracy - confidence|.

    Confidence = max(p, 1 - p), correctness = (p >= 0.5) == label; equal-width bins over
    [0, 1] (see `reliability_bins`).

    Args:
      probs: `[N]` probability of "defective".
      labels: `[N]` 0/1.
      num_bins: number of bins.
    Returns:
      ECE in [0, 1]; nan for N = 0.
    """
    bins = reliability_bins(probs, labels, num_bins)
    total = bins["count"].sum()
    if total == 0:
        return math.nan
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / total)


def error_detection_auroc(uncertainty, correct) -> float:
    """How well uncertainty flags wrong decisions: AUROC with the wrong decisions as positives
    and the uncertainty as score (1 = every error is more uncertain than every right call).

    Args:
      uncertainty: `[N]` higher = less sure.
      correct: `[N]` 1 where the automatic decision was right.
    Returns:
      AUROC; nan when every decision is right or every decision is wrong.
    """
    uncertainty = _as_scores("uncertainty", uncertainty)
    if uncertainty.ndim != 1:
        raise ValueError(f"uncertainty must be 1-D [N], got shape {uncertainty.shape}")
    correct = _as_binary("correct", correct, shape=uncertainty.shape)
    return image_auroc(~correct, uncertainty)


def review_budget_curve(
    scores,
    uncertainty,
    labels,
    threshold: float,
    budgets: Sequence[float] = (0.005, 0.01, 0.02, 0.05, 0.1),
) -> list[dict]:
    """What sending the most uncertain images to a person buys, per review budget.

    For a budget b, the `floor(b * N)` images with the highest uncertainty are reviewed (ties
    go to the lower index); the rest are decided automatically (`score >= threshold` =
    defective). A reviewed defective image counts as caught: the person is assumed right.

    Args:
      scores: `[N]` image scores.
      uncertainty: `[N]` higher = less sure.
      labels: `[N]` 0/1.
      threshold: decision threshold of the automatic path.
      budgets: fractions of the images a person may review, each in [0, 1].
    Returns:
      one dict per budget: `budget`, `num_reviewed`, `fraction_reviewed`,
      `automatic_accuracy` (accuracy of the non-reviewed decisions; nan when all are
      reviewed), `defect_recall` (defective images caught by review or by the automatic path,
      over all defective images; nan without defects) and `missed_defects` (defective images
      accepted as good by the automatic path).
    """
    labels, scores = _labels_and_scores(labels, scores)
    uncertainty = _as_scores("uncertainty", uncertainty, shape=scores.shape)
    num_images = scores.size
    review_order = np.argsort(-uncertainty.astype(np.float64), kind="stable")
    predicted = scores >= threshold
    rows = []
    for budget in budgets:
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"review budget {budget} is not a fraction in [0, 1]")
        # The epsilon keeps e.g. 0.29 * 100 = 28.999... from losing an image.
        num_reviewed = min(num_images, math.floor(budget * num_images + 1e-9))
        reviewed = np.zeros(num_images, dtype=bool)
        reviewed[review_order[:num_reviewed]] = True
        automatic = ~reviewed
        if automatic.any():
            automatic_accuracy = float(np.mean(predicted[automatic] == labels[automatic]))
        else:
            automatic_accuracy = math.nan
        missed = int(np.sum(labels & automatic & ~predicted))
        num_defects = int(labels.sum())
        rows.append(
            {
                "budget": float(budget),
                "num_reviewed": int(num_reviewed),
                "fraction_reviewed": num_reviewed / num_images if num_images else math.nan,
                "automatic_accuracy": automatic_accuracy,
                "defect_recall": (num_defects - missed) / num_defects if num_defects else math.nan,
                "missed_defects": missed,
            }
        )
    return rows
