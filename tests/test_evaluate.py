"""Tests of m2u_jax.evaluate.

Unit tests of the aggregation pieces on hand-made numbers, then one real run: a tiny synthetic
dataset, two fine-tuning steps of the tiny config through the trainer, `evaluate` on its
checkpoint (module fixture). Every metric in metrics.json is recomputed from the saved
per-image predictions with scikit-learn / scipy / slow references, the saved predictions are
checked against a fresh forward pass, and the review queue against the calibrated policy.

The run compiles the same programs as tests/test_studies.py (the test run's persistent
compilation cache, tests/conftest.py, serves both).
"""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
)

from m2u_jax import evaluate, metrics, predictions, report, review, run_checkpoint, uncertainty
from tests.runs import tiny_run_config

pytestmark = pytest.mark.slow  # trains and evaluates a tiny run

NUM_OVERLAYS = 2


# ----------------------------------------------------------------------------- unit tests


def test_top_k_keeps_largest_keys_and_builds_only_kept_items():
    keeper = predictions.TopK(2)
    built = []

    def item(name):
        def make():
            built.append(name)
            return {"name": name}

        return make

    for key, name in [(0.1, "a"), (0.5, "b"), (0.3, "c"), (0.05, "d"), (0.5, "e"), (math.nan, "f")]:
        keeper.offer(key, item(name))
    # 'e' ties with 'b' at 0.5 and came later: the earlier item wins the tie.
    assert [entry["name"] for entry in keeper.items()] == ["b", "e"]
    assert "d" not in built and "f" not in built  # never among the top two: never built
    assert predictions.TopK(0).items() == []


def test_to_json_value_writes_nan_as_null(tmp_path):
    value = {"a": math.nan, "b": np.float32(0.25), "c": [np.int64(3), math.inf], "d": np.bool_(1)}
    assert report.to_json_value(value) == {"a": None, "b": 0.25, "c": [3, None], "d": True}
    path = report.write_json(str(tmp_path / "x.json"), value)
    assert json.load(open(path)) == {"a": None, "b": 0.25, "c": [3, None], "d": True}


def test_image_metrics_threshold_comes_from_validation():
    validation = {"labels": np.array([0, 0, 1, 1]), "image_score": np.array([0.1, 0.3, 0.6, 0.8])}
    test = {
        "labels": np.array([0, 1, 1, 0, 1]),
        "image_score": np.array([0.2, 0.5, 0.9, 0.55, 0.4]),
    }
    result = evaluate.image_metrics(validation, test)
    # Validation F1-max cut is 0.6; moved halfway down to the next validation score 0.3.
    assert result["threshold"] == pytest.approx(0.45)
    # Test decisions at 0.45: [0, 1, 1, 1, 0] vs labels [0, 1, 1, 0, 1] -> 3/5.
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["auroc"] == pytest.approx(roc_auc_score(test["labels"], test["image_score"]))
    assert result["ap"] == pytest.approx(
        average_precision_score(test["labels"], test["image_score"])
    )
    # Best test F1: threshold 0.4 calls [0,1,1,1,1] -> precision 3/4, recall 1 -> 6/7.
    assert result["f1_max"] == pytest.approx(6 / 7)
    assert result["threshold_rule"] == "f1"
    # The F1 path is the same with the rule named: every number unchanged.
    assert evaluate.image_metrics(validation, test, rule="f1", target_fpr=0.3) == result


def test_image_metrics_without_validation_defects_falls_back():
    validation = {"labels": np.array([0, 0]), "image_score": np.array([0.1, 0.2])}
    test = {"labels": np.array([0, 1]), "image_score": np.array([0.4, 0.6])}
    result = evaluate.image_metrics(validation, test)  # rule 'f1' asked, F1 undefined
    assert result["threshold"] == evaluate.FALLBACK_THRESHOLD
    assert result["threshold_rule"] == "fallback"
    assert result["accuracy"] == 1.0
    empty = {"labels": np.zeros(0, int), "image_score": np.zeros(0)}
    result = evaluate.image_metrics(empty, test, rule="auto")
    assert (result["threshold"], result["threshold_rule"]) == (0.5, "fallback")


@pytest.mark.parametrize(
    "labels, expected",
    [
        ([0] * 10, "fpr"),  # good-only validation (the unsupervised protocol)
        ([0] * 10 + [1] * 4, "fpr"),  # 4 defective < AUTO_F1_MIN_DEFECTIVE = 5
        ([0] * 10 + [1] * 5, "f1"),  # both classes, 5 defective
        ([0] + [1] * 40, "f1"),
        ([1] * 3, "f1"),  # no good image: an FPR is undefined
    ],
)
def test_auto_threshold_rule(labels, expected):
    assert evaluate.AUTO_F1_MIN_DEFECTIVE == 5
    assert evaluate.threshold_rule(np.array(labels), "auto") == expected
    assert evaluate.threshold_rule(np.array(labels), "f1") == "f1"
    assert evaluate.threshold_rule(np.array(labels), "fpr") == "fpr"


def test_unknown_threshold_rule_raises():
    with pytest.raises(ValueError, match="threshold rule 'youden'"):
        evaluate.threshold_rule(np.array([0, 1]), "youden")


def test_image_metrics_good_only_validation_uses_the_fpr_rule():
    # Good-only validation scores 0.1 ... 1.0, target FPR 0.2: at most 2 of the 10 good images
    # may score >= the threshold -> threshold 0.9 (metrics.fpr_threshold).
    validation = {"labels": np.zeros(10, int), "image_score": np.arange(1, 11) / 10}
    test = {
        "labels": np.array([0, 0, 0, 0, 1, 1]),
        "image_score": np.array([0.3, 0.6, 0.7, 0.95, 0.92, 0.99]),
    }
    result = evaluate.image_metrics(validation, test, rule="auto", target_fpr=0.2)
    assert result["threshold_rule"] == "fpr"
    assert result["threshold"] == pytest.approx(0.9)
    # Decisions at 0.9: [0, 0, 0, 1, 1, 1] vs labels [0, 0, 0, 0, 1, 1] -> 5/6.
    assert result["accuracy"] == pytest.approx(5 / 6)
    # The F1 rule on the same validation: no defective image, so the fallback 0.5:
    # decisions [0, 1, 1, 1, 1, 1] -> 3/6.
    old = evaluate.image_metrics(validation, test, rule="f1")
    assert (old["threshold"], old["threshold_rule"]) == (0.5, "fallback")
    assert old["accuracy"] == pytest.approx(3 / 6)


def test_image_metrics_auto_takes_f1_with_enough_validation_defects():
    validation = {
        "labels": np.array([0, 0, 0, 1, 1, 1, 1, 1]),
        "image_score": np.array([0.1, 0.2, 0.6, 0.5, 0.7, 0.8, 0.9, 0.95]),
    }
    test = {"labels": np.array([0, 1, 0, 1]), "image_score": np.array([0.3, 0.66, 0.62, 0.4])}
    auto = evaluate.image_metrics(validation, test, rule="auto", target_fpr=0.2)
    f1 = evaluate.image_metrics(validation, test, rule="f1")
    assert auto == f1 and auto["threshold_rule"] == "f1"
    # F1 per cut: 0.7 -> TP 4, FP 0, FN 1: 8/9; 0.6 -> 8/10; 0.5 -> TP 5, FP 1, FN 0: 10/11
    # (the best); 0.2 -> 10/12. The 0.5 cut moved halfway down to 0.2 -> 0.35.
    assert auto["threshold"] == pytest.approx(0.35)
    # With the FPR rule instead: 3 goods, k = floor(0.6) = 0 -> just above 0.6.
    fpr = evaluate.image_metrics(validation, test, rule="fpr", target_fpr=0.2)
    assert fpr["threshold_rule"] == "fpr" and fpr["threshold"] == np.nextafter(0.6, 1.0)
    # Test decisions at 0.35: [0, 1, 1, 1] -> 3/4; just above 0.6: [0, 1, 1, 0] -> 2/4.
    assert auto["accuracy"] == pytest.approx(0.75) and fpr["accuracy"] == pytest.approx(0.5)


def _box_split(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes):
    max_pred = max(len(p) for p in pred_boxes)
    max_gt = max(len(g) for g in gt_boxes)
    count = len(pred_boxes)
    split = {
        "labels": np.zeros(count, np.int32),
        "boxes_xyxy": np.zeros((count, max_pred, 4), np.float32),
        "box_scores": np.zeros((count, max_pred), np.float32),
        "box_classes": np.zeros((count, max_pred), np.int32),
        "box_valid": np.zeros((count, max_pred), np.float32),
        "gt_boxes": np.zeros((count, max_gt, 4), np.float32),
        "gt_box_classes": np.zeros((count, max_gt), np.int32),
        "gt_box_valid": np.zeros((count, max_gt), np.float32),
    }
    for i in range(count):
        n, g = len(pred_boxes[i]), len(gt_boxes[i])
        if n:
            split["boxes_xyxy"][i, :n] = pred_boxes[i]
            split["box_scores"][i, :n] = pred_scores[i]
            split["box_classes"][i, :n] = pred_classes[i]
            split["box_valid"][i, :n] = 1
        if g:
            split["gt_boxes"][i, :g] = gt_boxes[i]
            split["gt_box_classes"][i, :g] = gt_classes[i]
            split["gt_box_valid"][i, :g] = 1
    return split


def test_detection_metrics_per_class_and_agnostic():
    box_a = [0, 0, 10, 10]
    box_b = [20, 20, 30, 30]
    split = _box_split(
        pred_boxes=[[box_a, [40, 40, 50, 50]], [box_b]],
        pred_scores=[[0.9, 0.8], [0.7]],
        # Image 1's box has the right place but the wrong class.
        pred_classes=[[0, 1], [0]],
        gt_boxes=[[box_a], [box_b]],
        gt_classes=[[0], [1]],
    )
    per_class = evaluate.detection_metrics(split, ("crack", "hole", "stain"), class_agnostic=False)
    # crack: one GT found first -> AP 1; hole: one GT, its only prediction misses -> AP 0;
    # stain: no GT -> undefined (COCO -1 -> NaN), left out of the mean.
    assert per_class["per_class_ap50"]["crack"] == pytest.approx(1.0)
    assert per_class["per_class_ap50"]["hole"] == pytest.approx(0.0)
    assert math.isnan(per_class["per_class_ap50"]["stain"])
    assert per_class["map50"] == pytest.approx(0.5)
    assert set(per_class) == {"map50", "map", "per_class_ap50", "agnostic_map50", "agnostic_map"}
    agnostic = evaluate.detection_metrics(split, ("defect",), class_agnostic=True)
    # Class-agnostic: both GT boxes found; the false positive (0.8) ranks between the hits:
    # precision 1 up to recall 0.5, 2/3 at recall 1 -> 101-point AP = (51 + 50 * 2/3) / 101.
    expected = (51 + 50 * 2 / 3) / 101
    assert agnostic["per_class_ap50"] == {"all": pytest.approx(expected)}
    assert agnostic["map50"] == pytest.approx(expected)
    assert agnostic["agnostic_map50"] == agnostic["map50"]
    # The per-class metrics carry the same localisation-only score: the wrong class of image
    # 1's box costs 0.5 mAP@0.5 per class but nothing class-agnostic. The boxes match exactly,
    # so mAP@[.5:.95] is the AP@0.5 at every IoU threshold.
    assert per_class["agnostic_map50"] == pytest.approx(expected)
    assert per_class["agnostic_map"] == pytest.approx(expected)


def test_uncertainty_metrics_worked_case():
    validation = {
        "labels": np.array([0, 1, 0, 1]),
        "score_mean": np.array([0.2, 0.7, 0.3, 0.9]),
        "score_var": np.zeros(4),
    }
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 1, 0, 1] * 2)
    scores = np.array([0.1, 0.6, 0.4, 0.8, 0.9, 0.2, 0.45, 0.55, 0.3, 0.7] * 2)
    variances = np.linspace(0.0, 0.019, 20)
    test = {"labels": labels, "score_mean": scores, "score_var": variances}
    result, threshold = evaluate.uncertainty_metrics(validation, test)
    assert threshold == pytest.approx(0.5)  # midway between 0.7 and 0.3
    correct = (scores >= 0.5) == labels
    assert result["error_auroc"] == pytest.approx(roc_auc_score(~correct, variances))
    assert result["ece"] == pytest.approx(metrics.expected_calibration_error(scores, labels, 15))
    assert list(result["review"]) == ["0.5%", "1%", "2%", "5%", "10%"]
    # 10 % of 20 = the 2 most uncertain (the last two: 0.3 good -> right, 0.7 defect -> right).
    row = result["review"]["10%"]
    assert row["num_reviewed"] == 2
    assert row["automatic_accuracy"] == pytest.approx(correct[:18].mean())
    assert result["review"]["0.5%"]["num_reviewed"] == 0


def test_uncertainty_metrics_and_review_policy_follow_the_fpr_rule():
    # Good-only validation (MC mean scores 0.1 ... 1.0), target FPR 0.2 -> threshold 0.9.
    validation = {
        "labels": np.zeros(10, int),
        "score_mean": np.arange(1, 11) / 10,
        "score_var": np.zeros(10),
    }
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.5, 0.95, 0.92, 0.3])
    test = {"labels": labels, "score_mean": scores, "score_var": np.array([0.1, 0.2, 0.3, 0.4])}
    result, threshold = evaluate.uncertainty_metrics(validation, test, rule="auto", target_fpr=0.2)
    assert threshold == pytest.approx(0.9)
    # Decisions at 0.9: [0, 1, 1, 0]: wrong on images 1 and 3 (the two most uncertain but one).
    correct = np.array([True, False, True, False])
    assert result["error_auroc"] == pytest.approx(roc_auc_score(~correct, test["score_var"]))
    # The review policy's score threshold follows the same rule on the automatic images: the
    # most uncertain validation image (score 1.0) goes to review (budget 0.2), so 9 good ones
    # remain, k = floor(0.25 * 9) = 2 -> 0.8 (0.8 and 0.9 rejected).
    uncertainty_values = np.array([0.0] * 9 + [1.0])
    policy = review.calibrate_review_thresholds(
        validation["score_mean"], uncertainty_values, validation["labels"], 0.2, "fpr", 0.25
    )
    assert policy["uncertainty_threshold"] == 0.0
    assert policy["score_threshold"] == pytest.approx(0.8)
    # The F1 rule (as before): no defective image -> just above the largest automatic score.
    f1_policy = review.calibrate_review_thresholds(
        validation["score_mean"], uncertainty_values, validation["labels"], 0.2
    )
    assert f1_policy["score_threshold"] == np.nextafter(0.9, 1.0)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        review.calibrate_review_thresholds([0.1], [0.0], [0], 0.1, "auto")


def test_review_reason():
    assert evaluate.review_reason(0.52, 0.01, 0.5) == "near threshold"  # std 0.1 > 0.02
    assert evaluate.review_reason(0.9, 0.01, 0.5) == "uncertain"


# ----------------------------------------------------------------------------- real run


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_eval_root):
    from m2u_jax import trainer

    workdir = str(tmp_path_factory.mktemp("eval_run"))
    config = tiny_run_config(tiny_eval_root)
    config.eval.num_overlays = NUM_OVERLAYS
    config.eval.figures = True  # tests/runs.py turns them off; this module checks them
    config.eval.variant_metrics = True  # off by default; checked here
    trainer.train(config, workdir)
    result = evaluate.evaluate(config, workdir)
    out_dir = os.path.join(workdir, "eval")
    with np.load(os.path.join(out_dir, "predictions.npz")) as archive:
        saved = {key: archive[key] for key in archive.files}
    with np.load(os.path.join(out_dir, "pixel_maps.npz")) as archive:
        pixel = {key: archive[key] for key in archive.files}
    validation = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("validation/")}
    test = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("test/")}
    return {
        "config": config,
        "workdir": workdir,
        "out_dir": out_dir,
        "metrics": result,
        "json": json.load(open(os.path.join(out_dir, "metrics.json"))),
        "validation": validation,
        "test": test,
        "pixel": pixel,
    }


def test_writes_every_output(evaluated_run):
    out_dir = evaluated_run["out_dir"]
    for name in ("metrics.json", "report.md", "review_queue.jsonl", "thresholds.json"):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    plots = ["roc", "pr", "pro", "reliability", "review_budget", "per_category"]
    kinds = ["roc", "pr", "pro", "reliability", "review", "per_category"]
    for name, kind in zip(plots, kinds):
        with Image.open(os.path.join(out_dir, "plots", f"{name}.png")) as image:
            width, height = report.FIGURE_SIZES[kind]
            assert image.size == (round(width * report.DPI), round(height * report.DPI))
    overlays = sorted(os.listdir(os.path.join(out_dir, "overlays")))
    worst = [name for name in overlays if name.startswith("worst_")]
    assert worst == [f"worst_{i:02d}.png" for i in range(NUM_OVERLAYS)]
    queue = open(os.path.join(out_dir, "review_queue.jsonl")).read().splitlines()
    review = [name for name in overlays if name.startswith("review_")]
    assert len(review) == min(NUM_OVERLAYS, len(queue))
    markdown = open(os.path.join(out_dir, "report.md")).read()
    for name in plots:
        assert f"(plots/{name}.png)" in markdown
    for name in overlays:
        assert f"(overlays/{name})" in markdown
    assert (
        f"| accuracy | {report.format_value(evaluated_run['metrics']['image']['accuracy'])} |"
        in (markdown)
    )


def test_without_figures_and_variants_the_other_numbers_and_the_report_stay(
    evaluated_run, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(evaluated_run["workdir"], workdir, ignore=shutil.ignore_patterns("eval"))
    config = evaluated_run["config"].copy_and_resolve_references()
    config.eval.figures = False
    config.eval.variant_metrics = False
    evaluate.evaluate(config, str(workdir), with_speed=False)
    out_dir = workdir / "eval"
    assert not (out_dir / "plots").exists() and not (out_dir / "overlays").exists()
    assert not list(out_dir.rglob("*.png"))
    saved = json.load(open(out_dir / "metrics.json"))
    expected = json.loads(json.dumps(evaluated_run["json"]))
    # Only the two comparison entries go; every other number is the same.
    del expected["image"]["score_variants"], expected["pixel"]["smoothing_variants"]
    for section in ("image", "pixel", "detection", "uncertainty", "per_category"):
        assert saved[section] == expected[section], section
    markdown = (out_dir / "report.md").read_text()
    assert "| accuracy |" in markdown and ".png)" not in markdown


def test_the_run_trains_and_evaluates_on_the_devices_its_config_names(evaluated_run):
    # tests/runs.py: train.mesh_devices=1 of the 8 fake devices.
    config = evaluated_run["config"]
    assert config.train.mesh_devices == 1 and jax.device_count() == 8
    assert predictions.eval_batch_sharding(config).mesh.devices.size == 1
    lines = open(os.path.join(evaluated_run["workdir"], "metrics.jsonl")).read().splitlines()
    record = json.loads(lines[-1])
    # Batch 8 on one device: all 8 images per step count for that device.
    np.testing.assert_allclose(
        record["finetune/images_per_sec_per_device"], record["finetune/steps_per_sec"] * 8
    )


def test_metrics_json_has_the_documented_layout(evaluated_run):
    saved = evaluated_run["json"]
    assert list(saved) == ["image", "pixel", "detection", "uncertainty", "speed", "per_category"]
    assert set(saved["image"]) == {
        "accuracy",
        "auroc",
        "ap",
        "f1_max",
        "threshold",
        "threshold_rule",
        "score_variants",
    }
    variants = saved["image"]["score_variants"]
    assert {"classifier", "mix", "max_s1", "max_s9", "top1pct_s17"} <= set(variants)
    # 'mix' recomputes the model's own rule (½ top-1 % of the map + ½ classifier) from the
    # kept maps and probabilities: the same AUROC as the deterministic image score.
    assert variants["mix"] == pytest.approx(saved["image"]["auroc"], abs=1e-6)
    assert set(saved["pixel"]) == {"auroc", "aupro", "smoothing_variants"}
    assert set(saved["pixel"]["smoothing_variants"]) == {"s5", "s9", "s17"}
    assert set(saved["detection"]) == {
        "map50",
        "map",
        "per_class_ap50",
        "agnostic_map50",
        "agnostic_map",
    }
    assert saved["detection"]["agnostic_map50"] == saved["detection"]["map50"]
    # Unsupervised protocol: class-agnostic boxes, one 'all' class.
    assert list(saved["detection"]["per_class_ap50"]) == ["all"]
    assert set(saved["uncertainty"]) == {"ece", "error_auroc", "review"}
    assert list(saved["uncertainty"]["review"]) == ["0.5%", "1%", "2%", "5%", "10%"]
    speed = saved["speed"]
    assert set(speed) == {
        "images_per_sec",
        "latency_ms",
        "device",
        "mc_images_per_sec",
        "mc_latency_ms",
    }
    assert speed["images_per_sec"] > 0 and speed["latency_ms"] > 0
    assert speed["mc_images_per_sec"] > 0 and speed["mc_latency_ms"] > 0
    assert speed["device"].startswith(jax.devices()[0].device_kind)
    assert list(saved["per_category"]) == ["fabric"]


def _reference_threshold(labels, scores):
    """F1-max over every candidate cut (lowest cut among ties), moved halfway down."""
    candidates = np.unique(scores)
    f1 = [f1_score(labels, scores >= t, zero_division=0) for t in candidates]
    best = candidates[int(np.argmax(f1))]
    lower = scores[scores < best]
    return (best + lower.max()) / 2 if lower.size else best


def _reference_fpr_threshold(labels, scores):
    """eval.target_fpr = 0.05 of a validation with one good image: no good image may score at
    or above the threshold -> the next float above the good image's score."""
    (good,) = scores[labels == 0]
    return np.nextafter(good, np.inf)


def _reference_aupro(masks, maps, fpr_limit=0.3):
    """Slow PRO curve: every distinct score as a threshold, 8-connected regions."""
    regions = []
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labeled == r) for r in range(1, count + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= threshold))
        pros.append(np.mean([np.mean(maps[i][region] >= threshold) for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    after = int(np.argmax(fprs > fpr_limit))
    pro_at_limit = np.interp(fpr_limit, fprs[after - 1 : after + 1], pros[after - 1 : after + 1])
    keep = fprs <= fpr_limit
    fprs = np.append(fprs[keep], fpr_limit)
    pros = np.append(pros[keep], pro_at_limit)
    return np.trapezoid(pros, fprs) / fpr_limit


def test_metrics_equal_reference_computations(evaluated_run):
    saved, validation, test = (
        evaluated_run["json"],
        evaluated_run["validation"],
        evaluated_run["test"],
    )
    pixel = evaluated_run["pixel"]
    labels, scores = test["labels"], test["image_score"]
    assert len(labels) == 7 and labels.sum() == 4  # 3 good + one per defect kind
    assert len(validation["labels"]) == 5

    # Validation holds 1 good and 4 defective images: fewer than AUTO_F1_MIN_DEFECTIVE = 5, so
    # eval.threshold_rule='auto' takes the FPR rule; with one good image, k = floor(0.05) = 0:
    # the threshold lies just above that image's score.
    assert validation["labels"].tolist().count(0) == 1
    threshold = _reference_fpr_threshold(validation["labels"], validation["image_score"])
    image = saved["image"]
    assert image["threshold_rule"] == "fpr"
    assert image["threshold"] == pytest.approx(threshold)
    assert image["accuracy"] == pytest.approx(accuracy_score(labels, scores >= threshold))
    assert image["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert image["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert image["f1_max"] == pytest.approx(max(f1_score(labels, scores >= t) for t in scores))
    # eval.threshold_rule='f1' on the same predictions: the F1-optimal reference.
    f1_rule = evaluate.image_metrics(validation, test, rule="f1")
    f1_threshold = _reference_threshold(validation["labels"], validation["image_score"])
    assert f1_rule["threshold_rule"] == "f1"
    assert f1_rule["threshold"] == pytest.approx(f1_threshold)
    assert f1_rule["accuracy"] == pytest.approx(accuracy_score(labels, scores >= f1_threshold))

    np.testing.assert_array_equal(pixel["paths"], test["paths"])
    masks, maps = pixel["masks"], pixel["anomaly_map"]
    assert maps.shape == masks.shape == (7, 32, 32)
    assert saved["pixel"]["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert saved["pixel"]["aupro"] == pytest.approx(_reference_aupro(masks, maps), abs=1e-6)
    # The 5x5 mean filter by hand (windows clipped at the borders): each pixel averages the
    # in-image pixels within 2 rows and 2 columns of it.
    padded = np.pad(maps.astype(np.float64), ((0, 0), (2, 2), (2, 2)))
    counts = np.pad(np.ones(maps.shape[1:]), 2)

    def window_sum(a):
        return sum(a[..., dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5))

    smoothed = window_sum(padded) / window_sum(counts)
    s5 = saved["pixel"]["smoothing_variants"]["s5"]
    assert s5["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), smoothed.ravel()), abs=1e-4)
    assert s5["aupro"] == pytest.approx(_reference_aupro(masks, smoothed), abs=1e-4)

    predictions, ground_truth = evaluate.box_lists(test)
    assert sum(int(p["valid"].sum()) for p in predictions) > 0  # the boxes were really scored
    assert sum(int(g["valid"].sum()) for g in ground_truth) >= 4  # one region per defect at least
    coco = metrics.box_map(predictions, ground_truth, class_agnostic=True)
    assert saved["detection"]["map50"] == pytest.approx(coco["map50"])
    assert saved["detection"]["map"] == pytest.approx(coco["map"])

    mc_threshold = _reference_fpr_threshold(validation["labels"], validation["score_mean"])
    probs, variances = test["score_mean"], test["score_var"]
    correct = (probs >= mc_threshold) == labels
    confidence = np.where(probs >= 0.5, probs, 1 - probs)
    right = (probs >= 0.5) == labels
    bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)
    ece = sum(
        np.sum(bins == b) / len(probs) * abs(right[bins == b].mean() - confidence[bins == b].mean())
        for b in range(15)
        if np.any(bins == b)
    )
    assert saved["uncertainty"]["ece"] == pytest.approx(ece)
    if correct.all() or not correct.any():
        assert saved["uncertainty"]["error_auroc"] is None
    else:
        assert saved["uncertainty"]["error_auroc"] == pytest.approx(
            roc_auc_score(~correct, variances)
        )
    for row in saved["uncertainty"]["review"].values():
        assert row["num_reviewed"] == 0  # 10 % of 7 images is less than one
        assert row["automatic_accuracy"] == pytest.approx(correct.mean())

    category = saved["per_category"]["fabric"]  # one category: the global numbers
    assert category["image_auroc"] == pytest.approx(image["auroc"])
    assert category["pixel_auroc"] == pytest.approx(saved["pixel"]["auroc"])
    assert category["aupro"] == pytest.approx(saved["pixel"]["aupro"])
    assert category["accuracy"] == pytest.approx(image["accuracy"])


def test_saved_predictions_match_a_fresh_forward_pass(evaluated_run):
    from m2u_jax import model as model_lib
    from m2u_jax.data import pipeline

    config, test = evaluated_run["config"], evaluated_run["test"]
    params, step = run_checkpoint.restore_params(config, evaluated_run["workdir"])
    assert step == 2
    model = model_lib.build_model(config.model)
    batch = next(pipeline.iterate_eval(config, "test"))
    valid = batch["valid"]
    np.testing.assert_array_equal(batch["paths"][valid], test["paths"])
    # Same layout as in `evaluate` (batch split over the devices): the compiled program is reused.
    images = jax.device_put(batch["images"], predictions.eval_batch_sharding(config))
    fresh = model_lib.predict(model, {"params": params}, images)
    np.testing.assert_allclose(np.asarray(fresh["image_score"])[valid], test["image_score"], 1e-5)
    np.testing.assert_allclose(
        np.asarray(fresh["anomaly_map"])[valid], evaluated_run["pixel"]["anomaly_map"], atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(fresh["box_scores"])[valid], test["box_scores"], 1e-5)
    assert test["score_var"].min() >= 0 and test["score_var"].max() > 0  # dropout really sampled
    assert test["mutual_info"].min() >= 0
    np.testing.assert_allclose(
        test["entropy"], np.asarray(uncertainty.binary_entropy(test["score_mean"])), atol=1e-5
    )
    # eval.num_mc_samples = 1: no sampling, the deterministic score with zero variance.
    deterministic = config.copy_and_resolve_references()
    deterministic.eval.num_mc_samples = 1
    sharding = predictions.eval_batch_sharding(config)
    predict = predictions.make_model_predict_fn(deterministic, model, {"params": params}, sharding)
    single = predict(batch["images"], 0)
    np.testing.assert_array_equal(single["score_mean"], single["image_score"])
    np.testing.assert_array_equal(single["score_var"], 0.0)
    np.testing.assert_array_equal(single["mutual_info"], 0.0)


def test_review_queue_follows_the_validation_policy(evaluated_run):
    out_dir, validation, test = (
        evaluated_run["out_dir"],
        evaluated_run["validation"],
        evaluated_run["test"],
    )
    config = evaluated_run["config"]
    thresholds = json.load(open(os.path.join(out_dir, "thresholds.json")))
    policy = review.calibrate_review_thresholds(
        validation["score_mean"],
        validation["score_var"],
        validation["labels"],
        config.eval.review_budget,
        rule="fpr",  # 'auto' on 1 good + 4 defective validation images
        target_fpr=config.eval.target_fpr,
    )
    assert thresholds["threshold_rule"] == "fpr"
    assert thresholds["target_fpr"] == config.eval.target_fpr
    assert thresholds["score_threshold"] == pytest.approx(policy["score_threshold"])
    assert thresholds["uncertainty_threshold"] == pytest.approx(policy["uncertainty_threshold"])
    assert thresholds["uncertainty_measure"] == "score_var"
    assert thresholds["budget"] == config.eval.review_budget
    assert thresholds["checkpoint_step"] == 2 and thresholds["test_time_flips"] == 1
    assert thresholds["class_names"] == ["defect"]  # unsupervised: the class-agnostic class

    lines = [json.loads(line) for line in open(os.path.join(out_dir, "review_queue.jsonl"))]
    queued = test["score_var"] > policy["uncertainty_threshold"]
    assert [line["path"] for line in lines] == test["paths"][queued].tolist()
    for line, index in zip(lines, np.flatnonzero(queued)):
        assert line["score"] == pytest.approx(test["score_mean"][index])
        assert line["uncertainty"]["variance"] == pytest.approx(test["score_var"][index])
        assert line["uncertainty"]["entropy"] == pytest.approx(test["entropy"][index])
        assert line["uncertainty"]["mutual_information"] == pytest.approx(
            test["mutual_info"][index]
        )
        assert line["reason"] == evaluate.review_reason(
            line["score"], line["uncertainty"]["variance"], policy["score_threshold"]
        )
        valid = test["box_valid"][index] > 0
        assert len(line["boxes"]) == int(valid.sum())
        for box, xyxy, score in zip(
            line["boxes"], test["boxes_xyxy"][index][valid], test["box_scores"][index][valid]
        ):
            assert box["class"] == "defect"
            assert box["score"] == pytest.approx(score)
            np.testing.assert_allclose(box["xyxy"], xyxy, atol=0.01)


def test_bad_step_and_missing_run_are_named(evaluated_run, tmp_path):
    config = evaluated_run["config"]
    with pytest.raises(ValueError, match=r"checkpoint step 7 is not in .* \(have \[2\]\)"):
        evaluate.evaluate(config, evaluated_run["workdir"], step=7)
    with pytest.raises(FileNotFoundError, match="checkpoints does not exist"):
        evaluate.evaluate(config, str(tmp_path / "nothing"))
