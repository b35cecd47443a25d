"""Tests of m2u_jax.metrics against worked cases with exact values and library/slow references."""

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from m2u_jax import metrics

# --------------------------------------------------------------------------- image level

# The classic 4-image case: AUROC 0.75, AP 0.8333.
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_image_metrics_worked_case():
    assert metrics.image_auroc(LABELS, SCORES) == pytest.approx(0.75)
    # Ranked by score: TP (P=1, R=.5), FP, TP (P=2/3, R=1) -> AP = .5*1 + .5*2/3.
    assert metrics.average_precision(LABELS, SCORES) == pytest.approx(5 / 6)
    # Thresholds 0.8: F1 2/3, 0.4: 1/2, 0.35: P=2/3, R=1 -> F1 0.8, 0.1: 2/3.
    f1, threshold = metrics.f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    # Midway between 0.35 and the next lower score 0.1.
    assert metrics.f1_optimal_threshold(LABELS, SCORES) == pytest.approx(0.225)
    assert metrics.accuracy(LABELS, SCORES, 0.225) == pytest.approx(0.75)
    assert metrics.accuracy(LABELS, SCORES, 0.5) == pytest.approx(0.75)
    assert metrics.accuracy(LABELS, SCORES, 0.9) == pytest.approx(0.5)


def test_f1_optimal_threshold_keeps_validation_decisions():
    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.3
    scores = rng.random(200) + 0.4 * labels
    f1, cut = metrics.f1_max(labels, scores)
    threshold = metrics.f1_optimal_threshold(labels, scores)
    assert threshold < cut
    np.testing.assert_array_equal(scores >= threshold, scores >= cut)
    predicted = scores >= threshold
    precision = np.mean(labels[predicted])
    recall = np.mean(predicted[labels])
    assert 2 * precision * recall / (precision + recall) == pytest.approx(f1)


GOOD_TENTHS = np.round(np.arange(1, 11) / 10, 1)  # good scores 0.1, 0.2, ..., 1.0


@pytest.mark.parametrize(
    "target_fpr, expected",
    [
        # k = floor(target * 10) good images may score >= the threshold; the threshold is the
        # smallest good score with at most k goods at or above it: the k-th largest.
        (0.2, 0.9),  # k = 2: 0.9 and 1.0 are the false positives (FPR exactly 0.2)
        (0.25, 0.9),  # k = floor(2.5) = 2
        (0.3, 0.8),  # k = 3
        (0.5, 0.6),  # k = 5
        (0.95, 0.2),  # k = floor(9.5) = 9: only 0.1 is below
    ],
)
def test_fpr_threshold_hand_cases(target_fpr, expected):
    labels = np.zeros(10, int)
    assert metrics.fpr_threshold(labels, GOOD_TENTHS, target_fpr) == pytest.approx(expected)
    # Defective images do not count: adding some anywhere changes nothing.
    with_defects = np.concatenate([GOOD_TENTHS, [0.05, 0.95, 2.0]])
    labels = np.concatenate([labels, [1, 1, 1]])
    assert metrics.fpr_threshold(labels, with_defects, target_fpr) == pytest.approx(expected)


def test_fpr_threshold_no_false_positive_allowed_is_just_above_the_largest_good_score():
    # 0.05 * 10 = 0.5 -> k = 0: no good image may be called defective.
    threshold = metrics.fpr_threshold(np.zeros(10, int), GOOD_TENTHS, 0.05)
    assert threshold > 1.0 and threshold == np.nextafter(1.0, 2.0)
    assert metrics.accuracy(np.zeros(10, int), GOOD_TENTHS, threshold) == 1.0


def test_fpr_threshold_ties_stay_on_one_side():
    # k = floor(0.4 * 5) = 2, but three goods tie at 0.4: a threshold of 0.4 would make 4 false
    # positives, so it moves up to the next distinct good score 0.8 (achieved FPR 1/5 < 0.4).
    labels = np.zeros(5, int)
    assert metrics.fpr_threshold(labels, [0.1, 0.4, 0.4, 0.4, 0.8], 0.4) == pytest.approx(0.8)
    # Ties at the top beyond k: no good score qualifies -> just above the largest.
    top_tie = metrics.fpr_threshold(labels, [0.1, 0.2, 0.3, 0.3, 0.3], 0.4)
    assert top_tie == np.nextafter(0.3, 1.0)
    # A tie group that fits the budget is taken whole: k = 3, 0.4 has 3 goods at or above.
    assert metrics.fpr_threshold(labels, [0.1, 0.2, 0.4, 0.4, 0.4], 0.6) == pytest.approx(0.4)


def test_fpr_threshold_count_is_robust_to_float_products():
    # 0.57 * 100 = 56.99999999999999 in floats: still k = 57, threshold = the 57th largest.
    scores = np.arange(100) / 100
    assert metrics.fpr_threshold(np.zeros(100, int), scores, 0.57) == pytest.approx(0.43)


def test_fpr_threshold_is_the_smallest_within_the_target():
    rng = np.random.default_rng(5)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.random(300), 2)  # many ties
    good = scores[~labels]
    for target in (0.01, 0.05, 0.1, 0.33):
        threshold = metrics.fpr_threshold(labels, scores, target)
        assert np.mean(good >= threshold) <= target
        lower = good[good < threshold]
        if lower.size:  # the next lower good score would exceed the target
            assert np.mean(good >= lower.max()) > target


def test_fpr_threshold_without_good_images_or_bad_target():
    assert math.isnan(metrics.fpr_threshold([1, 1], [0.1, 0.2], 0.05))
    for target in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="target_fpr"):
            metrics.fpr_threshold([0, 1], [0.1, 0.2], target)


def test_image_metrics_one_class_is_nan():
    assert math.isnan(metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))
    assert all(math.isnan(v) for v in metrics.f1_max([0, 0], [0.1, 0.2]))
    assert math.isnan(metrics.f1_optimal_threshold([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], "labels must be binary"),
        ([0, 1], [0.1, 0.2, 0.3], "labels has shape"),
        ([0, 1], [0.1, np.nan], "scores contains NaN"),
        ([[0, 1]], [[0.1, 0.2]], "scores must be 1-D"),
    ],
)
def test_image_metrics_reject_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.image_auroc(labels, scores)


# --------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("anomalous_fraction", [0.1, 0.8])
@pytest.mark.parametrize("decimals", [1, None])
def test_pixel_auroc_matches_sklearn(anomalous_fraction, decimals, monkeypatch):
    # A tiny chunk size runs the chunked loop many times; rounding makes many ties.
    monkeypatch.setattr(metrics, "_AUROC_CHUNK", 37)
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 9, 11)) < anomalous_fraction).astype(np.float32)
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    if decimals is not None:
        maps = np.round(maps, decimals)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_worked_cases():
    masks = np.zeros((2, 4, 4), np.float32)
    masks[0, 1:3, 1:3] = 1
    assert metrics.pixel_auroc(masks, masks) == 1.0
    assert metrics.pixel_auroc(masks, 1 - masks) == 0.0
    assert metrics.pixel_auroc(masks, np.full(masks.shape, 0.3)) == 0.5
    # One anomalous pixel ties with one of 3 normal pixels and beats the other two: 2.5 / 3.
    masks = np.array([[[1, 0], [0, 0]]])
    maps = np.array([[[0.5, 0.5], [0.2, 0.1]]])
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(2.5 / 3)
    assert math.isnan(metrics.pixel_auroc(np.zeros((1, 2, 2)), maps[:, :2, :2]))


def test_pixel_inputs_are_checked():
    with pytest.raises(ValueError, match=r"maps must be \[N, H, W\]"):
        metrics.pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="masks has shape"):
        metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="masks must be binary"):
        metrics.aupro(np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4)))


# --------------------------------------------------------------------------- AUPRO


def slow_pro_curve(masks, maps, thresholds):
    """Reference: one pass over all pixels per threshold, one loop per region."""
    regions = []
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labeled == k) for k in range(1, count + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(thresholds, reverse=True):
        above = maps >= threshold
        fprs.append(above[normal].mean())
        pros.append(np.mean([above[index][region].mean() for index, region in regions]))
    return np.array(fprs), np.array(pros)


def slow_area(fprs, pros, limit):
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_masks_and_maps(seed, decimals):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 16, 16), np.float32)
    for index in range(3):  # image 3 stays good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 12, size=2)
            h, w = rng.integers(1, 5, size=2)
            masks[index, y : y + h, x : x + w] = 1
    masks[1] = np.maximum(masks[1], rng.random((16, 16)) < 0.05)  # specks, odd shapes
    maps = rng.random(masks.shape) + 0.5 * masks * rng.random(masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 2), (2, 1)])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_exact_matches_slow_reference(seed, decimals, fpr_limit):
    masks, maps = random_masks_and_maps(seed, decimals)
    fprs, pros = slow_pro_curve(masks, maps, np.unique(maps))
    expected = slow_area(fprs, pros, fpr_limit)
    assert 0.05 < expected < 0.95  # a case where the value means something
    assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-10)
    fpr, pro = metrics.aupro_curve(masks, maps, fpr_limit)
    assert fpr[0] == 0 and pro[0] == 0
    assert fpr[-1] == pytest.approx(fpr_limit)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    if fpr_limit == 1.0:  # the whole curve: identical to the reference point by point
        np.testing.assert_allclose(fpr, fprs, atol=1e-12)
        np.testing.assert_allclose(pro, pros, atol=1e-12)
    # The full reference curve, cut at the limit by the public area function.
    assert metrics.area_under_pro_curve(fprs, pros, fpr_limit) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("num_thresholds", [2, 17, 200])
def test_aupro_binned_matches_slow_reference_at_same_thresholds(num_thresholds):
    masks, maps = random_masks_and_maps(4, None)
    thresholds = np.linspace(maps.min(), maps.max(), num_thresholds)
    fprs, pros = slow_pro_curve(masks, maps, thresholds)
    got = metrics.aupro(masks, maps, 0.3, num_thresholds=num_thresholds)
    assert got == pytest.approx(slow_area(fprs, pros, 0.3), abs=1e-10)
    if num_thresholds == 200:  # and close to the exact value
        assert got == pytest.approx(metrics.aupro(masks, maps, 0.3), abs=0.01)


def test_aupro_perfect_inverse_and_undefined():
    masks, _ = random_masks_and_maps(5, None)
    assert metrics.aupro(masks, masks) == pytest.approx(1.0)
    assert metrics.aupro(masks, 1 - masks) == 0.0
    assert metrics.aupro(masks, masks, num_thresholds=10) == pytest.approx(1.0)
    assert math.isnan(metrics.aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4))))
    assert math.isnan(metrics.aupro(np.ones((1, 4, 4)), np.ones((1, 4, 4))))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, masks, fpr_limit=0.0)


def test_aupro_worked_case_with_region_constant_map():
    """Two regions scored 0.8 (4 px) and 0.3 (6 px); 190 normal pixels: 19 at 0.6, 76 at 0.3,
    95 at 0.1. Curve: (0,0) (0,.5) (.1,.5) (.5,1) (1,1); PRO at FPR .3 = .75 by
    interpolation; area = .1*.5 + .2*(.5+.75)/2 = .175 -> AUPRO = .175/.3 = 7/12."""
    masks = np.zeros((2, 10, 10), np.float32)
    maps = np.zeros((2, 10, 10))
    masks[0, 1:3, 1:3] = 1
    masks[0, 6:8, 5:8] = 1
    normal_scores = np.concatenate([np.full(19, 0.6), np.full(76, 0.3), np.full(95, 0.1)])
    maps[masks == 0] = normal_scores
    maps[0, 1:3, 1:3] = 0.8
    maps[0, 6:8, 5:8] = 0.3
    assert metrics.aupro(masks, maps, 0.3) == pytest.approx(7 / 12, abs=1e-12)
    fpr, pro = metrics.aupro_curve(masks, maps, 0.3)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.3], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75], atol=1e-12)
    # Up to FPR 0.1 exactly: 0.1 * 0.5 / 0.1.
    assert metrics.aupro(masks, maps, 0.1) == pytest.approx(0.5, abs=1e-12)
    full_fpr, full_pro = metrics.aupro_curve(masks, maps, 1.0)
    np.testing.assert_allclose(full_fpr, [0, 0, 0.1, 0.5, 1], atol=1e-12)
    np.testing.assert_allclose(full_pro, [0, 0.5, 0.5, 1, 1], atol=1e-12)
    # PRO 1 from FPR .5 on: (.05 + .4 * .75 + .5) / 1.
    assert metrics.area_under_pro_curve(full_fpr, full_pro, 1.0) == pytest.approx(0.85)
    assert metrics.area_under_pro_curve(full_fpr, full_pro, 0.3) == pytest.approx(7 / 12)


def test_aupro_uses_eight_connectivity():
    """A pixel touching a 3-pixel blob diagonally belongs to it (one region of 4 px). The map
    hits the blob only: PRO jumps to 3/4 at FPR 0, then rises linearly to 1 at FPR 1
    (all normal pixels score 0 like the missed pixel): AUPRO@.3 = (.75 + .825) / 2 = .7875.
    With 4-connectivity it would be (.5 + .65) / 2."""
    masks = np.zeros((1, 5, 5), np.float32)
    masks[0, 1, 1] = 1
    masks[0, 2, 2] = masks[0, 2, 3] = masks[0, 3, 2] = 1
    maps = np.zeros((1, 5, 5))
    maps[0, 2, 2] = maps[0, 2, 3] = maps[0, 3, 2] = 1.0
    assert metrics.aupro(masks, maps, 0.3) == pytest.approx(0.7875, abs=1e-12)


def test_metrics_import_does_not_pull_sklearn_or_pycocotools():
    code = (
        "import sys, m2u_jax.metrics; "
        "assert 'sklearn' not in sys.modules and 'pycocotools' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- boxes


def gt(boxes, classes):
    return {"boxes_xyxy": np.asarray(boxes, np.float32).reshape(-1, 4), "classes": classes}


def pred(boxes, scores, classes):
    return {
        "boxes_xyxy": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": scores,
        "classes": classes,
    }


def test_box_map_perfect_predictions(capsys):
    ground_truth = [
        gt([[0, 0, 10, 10], [20, 20, 40, 30]], [0, 1]),
        gt([], []),  # a good image
        gt([[5, 5, 15, 25]], [1]),
    ]
    predictions = [
        pred([[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.8], [0, 1]),
        pred([], [], []),
        pred([[5, 5, 15, 25]], [0.7], [1]),
    ]
    result = metrics.box_map(predictions, ground_truth, class_names=["crack", "hole"])
    assert result["map50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(1.0)
    assert result["per_class_ap50"] == pytest.approx({"crack": 1.0, "hole": 1.0})
    assert result["per_class_ap"] == pytest.approx({"crack": 1.0, "hole": 1.0})
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are swallowed


def test_box_map_worked_101_point_ap():
    """One class, 2 GT boxes. TP at 0.9 then FP at 0.8: precision 1 up to recall 0.5, so 51 of
    the 101 recall points (0.00..0.50) have precision 1: AP = 51/101. FP first: precision 1/2
    on the same 51 points: AP = 25.5/101."""
    ground_truth = [gt([[0, 0, 10, 10]], [0]), gt([[20, 20, 30, 30]], [0])]
    tp_first = [pred([[0, 0, 10, 10]], [0.9], [0]), pred([[50, 50, 60, 60]], [0.8], [0])]
    result = metrics.box_map(tp_first, ground_truth)
    assert result["map50"] == pytest.approx(51 / 101)
    assert result["map"] == pytest.approx(51 / 101)
    fp_first = [pred([[0, 0, 10, 10]], [0.8], [0]), pred([[50, 50, 60, 60]], [0.9], [0])]
    assert metrics.box_map(fp_first, ground_truth)["map50"] == pytest.approx(25.5 / 101)


def test_box_map_iou_thresholds_and_missing_classes():
    # IoU = 62.5 / 100: a match at IoU 0.50, 0.55, 0.60 only -> mAP@[.5:.95] = 3/10.
    ground_truth = [gt([[0, 0, 10, 10]], [1])]
    predictions = [pred([[0, 0, 10, 6.25]], [0.9], [1])]
    result = metrics.box_map(predictions, ground_truth, num_classes=3, class_names="abc")
    assert result["map50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(0.3)
    # Classes a and c have no GT: -1 like COCO, left out of the means.
    assert result["per_class_ap50"] == pytest.approx({"a": -1.0, "b": 1.0, "c": -1.0})
    # A false positive of a class without GT changes nothing; a missed class scores 0.
    predictions = [pred([[0, 0, 10, 6.25], [30, 30, 40, 40]], [0.9, 0.95], [1, 2])]
    assert metrics.box_map(predictions, ground_truth, num_classes=3)["map50"] == pytest.approx(1.0)
    ground_truth = [gt([[0, 0, 10, 10], [30, 30, 40, 40]], [1, 0])]
    result = metrics.box_map(predictions, ground_truth, num_classes=3)
    assert result["per_class_ap50"]["0"] == 0.0
    assert result["map50"] == pytest.approx(0.5)


def test_box_ap_by_iou_tells_loose_boxes_from_misses():
    # Class a: its one box found with IoU 0.2 (20 / 100); class b: IoU 0.625; class c: no GT.
    ground_truth = [gt([[0, 0, 10, 10]], [0]), gt([[0, 0, 10, 10]], [1])]
    predictions = [pred([[0, 0, 10, 2]], [0.9], [0]), pred([[0, 0, 10, 6.25]], [0.8], [1])]
    result = metrics.box_ap_by_iou(
        predictions, ground_truth, (0.1, 0.3, 0.5, 0.75), num_classes=3, class_names="abc"
    )
    assert result["iou_thresholds"] == pytest.approx([0.1, 0.3, 0.5, 0.75])
    assert result["ap"]["a"] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert result["ap"]["b"] == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert result["ap"]["c"] == pytest.approx([-1.0] * 4)
    assert result["recall"]["a"] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert result["recall"]["b"] == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert result["map"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    # At 0.5 it agrees with box_map's mAP@0.5.
    assert metrics.box_map(predictions, ground_truth, num_classes=3)["map50"] == pytest.approx(0.5)


def test_box_map_class_agnostic_and_valid_entries():
    ground_truth = [gt([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]], [0, -1, 0])]
    ground_truth[0]["valid"] = [1, 1, 0]  # padding row
    predictions = [pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 2])]
    with pytest.raises(ValueError, match="class_agnostic=True"):
        metrics.box_map(predictions, ground_truth)
    result = metrics.box_map(predictions, ground_truth, class_agnostic=True)
    assert result["map50"] == pytest.approx(1.0)
    assert result["per_class_ap50"] == pytest.approx({"all": 1.0})
    # The same boxes with the wrong classes are worth nothing class-aware.
    ground_truth[0]["classes"] = [0, 0, 0]
    result = metrics.box_map(predictions, ground_truth, num_classes=3)
    assert result["per_class_ap50"] == pytest.approx({"0": 0.0, "1": -1.0, "2": -1.0})
    assert result["map50"] == 0.0


def test_box_map_edge_cases():
    empty = metrics.box_map([pred([], [], [])], [gt([], [])])
    assert empty == {
        "map50": -1.0,
        "map": -1.0,
        "per_class_ap50": {"0": -1.0},
        "per_class_ap": {"0": -1.0},
    }
    no_predictions = metrics.box_map([pred([], [], [])], [gt([[0, 0, 4, 4]], [0])])
    assert no_predictions["map50"] == 0.0 and no_predictions["map"] == 0.0
    with pytest.raises(ValueError, match="predictions has 1 images but ground_truth has 2"):
        metrics.box_map([pred([], [], [])], [gt([], []), gt([], [])])
    with pytest.raises(ValueError, match=r"predictions\[0\] lacks key\(s\) \['scores'\]"):
        metrics.box_map([gt([], [])], [gt([], [])])
    with pytest.raises(ValueError, match="x1 >= x0"):
        metrics.box_map([pred([[5, 0, 1, 4]], [0.5], [0])], [gt([], [])])
    with pytest.raises(ValueError, match="class id 3 >= num_classes=2"):
        metrics.box_map([pred([[0, 0, 1, 1]], [0.5], [3])], [gt([], [])], num_classes=2)


# --------------------------------------------------------------------------- uncertainty


def test_expected_calibration_error_worked_case():
    # Confidences .95 (right), .85 (wrong), .70 (wrong), .58 (right), each alone in a bin:
    # ECE = (.05 + .85 + .70 + .42) / 4.
    probs = np.array([0.95, 0.15, 0.7, 0.42])
    labels = np.array([1, 1, 0, 0])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.505)
    # Two more in bin (13/15, 14/15]: confidences .91 and .93, one right -> gap |.5 - .92|.
    probs2 = np.concatenate([probs, [0.91, 0.07]])
    labels2 = np.concatenate([labels, [1, 1]])
    assert metrics.expected_calibration_error(probs2, labels2) == pytest.approx(
        (2.02 + 2 * 0.42) / 6
    )
    # One bin: |mean accuracy - mean confidence| = |.5 - 3.08 / 4|.
    assert metrics.expected_calibration_error(probs, labels, num_bins=1) == pytest.approx(0.27)
    # Calibrated: confidence .75 and 3 of 4 right.
    calibrated = metrics.expected_calibration_error([0.75, 0.75, 0.25, 0.25], [1, 1, 0, 1])
    assert calibrated == pytest.approx(0.0)
    bins = metrics.reliability_bins(probs2, labels2)
    assert bins["count"].tolist() == [0] * 8 + [1, 0, 1, 0, 1, 2, 1]
    assert bins["accuracy"][13] == pytest.approx(0.5)
    assert bins["confidence"][13] == pytest.approx(0.92)
    assert math.isnan(bins["accuracy"][0])
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        metrics.expected_calibration_error([1.5], [1])


def test_error_detection_auroc():
    # Wrong decisions have uncertainty .9 and .3, right ones .1 and .5: 3 of 4 pairs ordered.
    value = metrics.error_detection_auroc([0.9, 0.1, 0.5, 0.3], [0, 1, 1, 0])
    assert value == pytest.approx(0.75)
    assert math.isnan(metrics.error_detection_auroc([0.9, 0.1], [1, 1]))


def test_review_budget_curve_worked_case():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.4, 0.1, 0.2, 0.6, 0.3, 0.1, 0.2])
    # Decisions at 0.5: wrong for images 2, 3 (missed defects) and 6 (false alarm).
    uncertainty = np.array([0.1, 0.2, 0.9, 0.5, 0.05, 0.3, 0.8, 0.4, 0.0, 0.35])
    # Review order: 2, 6, 3, 7, ...
    rows = metrics.review_budget_curve(scores, uncertainty, labels, 0.5, (0, 0.1, 0.2, 0.3, 1))
    assert [row["num_reviewed"] for row in rows] == [0, 1, 2, 3, 10]
    assert [row["fraction_reviewed"] for row in rows] == pytest.approx([0, 0.1, 0.2, 0.3, 1])
    accuracies = [row["automatic_accuracy"] for row in rows]
    assert accuracies[:4] == pytest.approx([0.7, 7 / 9, 7 / 8, 1.0])
    assert math.isnan(accuracies[4])
    assert [row["defect_recall"] for row in rows] == pytest.approx([0.5, 0.75, 0.75, 1, 1])
    assert [row["missed_defects"] for row in rows] == [2, 1, 1, 0, 0]
    assert [row["budget"] for row in rows] == [0.0, 0.1, 0.2, 0.3, 1.0]


def test_review_budget_curve_counts_and_ties():
    # Equal uncertainty: the lower index is reviewed first (defect 0, not good image 3).
    rows = metrics.review_budget_curve([0, 0, 0, 0], [0.5] * 4, [1, 1, 0, 0], 0.5, budgets=(0.25,))
    assert rows[0]["defect_recall"] == 0.5
    n = 100
    rows = metrics.review_budget_curve(
        np.zeros(n), np.arange(n), np.zeros(n), 0.5, budgets=(0.005, 0.29)
    )
    assert [row["num_reviewed"] for row in rows] == [0, 29]
    assert math.isnan(rows[0]["defect_recall"])  # no defects at all
    with pytest.raises(ValueError, match="review budget 1.5"):
        metrics.review_budget_curve([0.1], [0.1], [0], 0.5, budgets=(1.5,))
