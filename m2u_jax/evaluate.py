"""Evaluation of a trained run: `python eval.py --workdir DIR [--step N]`.

`evaluate(config, workdir, step=None)` restores the fine-tuned parameters of checkpoint `step`
(default: the newest) from DIR/checkpoints, predicts the validation and test splits
(`m2u_jax.predictions`), computes the metrics here, decides the review queue with
`m2u_jax.review`'s policy and writes DIR/eval/ (`m2u_jax.report`: plots, overlays, JSON):

- `metrics.json` — `image` (accuracy at the decision threshold chosen on *validation* by
  `eval.threshold_rule`, AUROC, AP, F1-max, that threshold and `threshold_rule`, the rule
  used: 'f1' = F1-optimal, 'fpr' = at most `eval.target_fpr` of the good validation images
  rejected; 'auto' takes 'f1' when validation holds a good image and at least
  `AUTO_F1_MIN_DEFECTIVE` = 5 defective ones, else 'fpr'), `pixel` (AUROC, AUPRO up to FPR
  0.3; with `eval.variant_metrics`, also `image.score_variants` and `pixel.smoothing_variants`:
  the comparisons behind the image-score and smoothing defaults), `detection` (COCO mAP@0.5,
  mAP@[.5:.95], AP@0.5 per class; class-agnostic under the
  unsupervised protocol or a single class; and both means with every class as one, the
  localisation alone), `uncertainty` (ECE with 15 bins, AUROC of the
  uncertainty for catching wrong decisions, review budgets 0.5/1/2/5/10 %, decisions at the
  same rule's threshold of the MC mean score), `speed` (images/s and batch-1 latency of the
  jitted inference, deterministic and MC dropout) and `per_category` (accuracy at the image
  threshold). NaN is written as null.
- `report.md` with the tables, `plots/*.png` (ROC, PR, PRO, reliability, review budget,
  per-category bars) and `overlays/*.png` (worst test images and the review queue), unless
  `eval.figures` is off.
- `review_queue.jsonl` — one line per test image the review policy sends to a person.
- `thresholds.json` — the review policy calibrated on validation for `eval.review_budget`
  (its score threshold by the same threshold rule) and the class names, for the exporter and
  the predictors to apply the same decisions.
- `predictions.npz` (per image: scores, uncertainties, labels, boxes) and `pixel_maps.npz`
  (test anomaly maps and masks) so that every number can be recomputed.

Which prediction feeds which metric:
- image / pixel / box metrics use the deterministic forward (`model.predict`: dropout off), the
  same numbers the exported model gives without sampling;
- uncertainty metrics and the review policy use MC dropout (`eval.num_mc_samples` samples,
  `uncertainty.mc_dropout_predict`): the MC mean score is the probability of "defective" (ECE)
  and its variance across samples (`score_var`, `UNCERTAINTY_MEASURE`) is the uncertainty. The
  variance is what the exported graph returns next to the mean, so the ONNX runner can apply
  `thresholds.json` as it is. With `eval.num_mc_samples <= 1` the deterministic score is used
  and the variance is zero. With `eval.ensemble_workdirs` the mean and variance are over the
  deep ensemble (this run and those) instead (`uncertainty.ensemble_predict`).

Memory: per image only scores and boxes are kept, except the test split's anomaly maps and masks
(`N x H x W` float32 + bool), which the exact pixel AUROC / AUPRO need. That is ~0.3 MB per
256 px image (a few hundred MB for the largest sets used here); images themselves are kept only
for the few overlays (bounded top-k lists while streaming).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from m2u_jax import config as config_lib
from m2u_jax import feature_memory, run_checkpoint, scoring
from m2u_jax import metrics as metrics_lib
from m2u_jax import predictions as predictions_lib
from m2u_jax import report as report_lib
from m2u_jax import review as review_lib
from m2u_jax import uncertainty as uncertainty_lib
from m2u_jax.modalities import num_channels

# Review budgets of the `uncertainty.review` table (fractions of the test images).
REVIEW_BUDGETS = (0.005, 0.01, 0.02, 0.05, 0.1)
ECE_BINS = 15
AUPRO_FPR_LIMIT = 0.3
# The per-image uncertainty that the review policy thresholds (see module docstring).
UNCERTAINTY_MEASURE = "score_var"
# Timed calls per speed measurement (after two warm-up calls); the median is reported.
SPEED_REPEATS = 5
# Overlays of each group (worst cases, review queue) also written to TensorBoard.
TENSORBOARD_OVERLAYS = 3
# Fallback decision threshold when the threshold rule cannot be applied on validation (F1
# without a defective image, FPR without a good image).
FALLBACK_THRESHOLD = 0.5
# `eval.threshold_rule = 'auto'` takes the F1-optimal threshold only when validation holds at
# least this many defective images (and a good one); else the FPR threshold on the good images.
AUTO_F1_MIN_DEFECTIVE = 5
# `eval.target_fpr` of configs/default.py, the default of the functions below.
DEFAULT_TARGET_FPR = 0.05


# ----------------------------------------------------------------------------- metrics


def threshold_rule(labels, rule: str) -> str:
    """The rule `decision_threshold` applies for `rule` ('f1' | 'fpr' | 'auto') on validation
    `labels`: 'auto' is 'f1' when validation holds at least one good image and at least
    `AUTO_F1_MIN_DEFECTIVE` defective ones, else 'fpr' (good-only or nearly good-only
    validation, e.g. the unsupervised protocol); 'f1' and 'fpr' are returned as they are."""
    if rule not in config_lib.THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {config_lib.THRESHOLD_RULES}")
    if rule != "auto":
        return rule
    labels = np.asarray(labels).astype(bool)
    num_defective = int(labels.sum())
    num_good = int(labels.size - num_defective)
    if num_good == 0:
        return "f1"  # No good image: an FPR is undefined.
    return "f1" if num_defective >= AUTO_F1_MIN_DEFECTIVE else "fpr"


def decision_threshold(
    labels, scores, rule: str = "f1", target_fpr: float = DEFAULT_TARGET_FPR
) -> tuple[float, str]:
    """(threshold, rule used) of the image decision `score >= threshold`, from validation.

    `rule` (`eval.threshold_rule`, resolved by `threshold_rule`): 'f1' = the F1-optimal
    threshold (`metrics.f1_optimal_threshold`), 'fpr' = the false-positive-rate threshold on
    the good images (`metrics.fpr_threshold` with `target_fpr`). When the rule cannot be
    applied (F1 without a defective image, FPR without a good image, empty validation) the
    threshold is `FALLBACK_THRESHOLD` and the rule used is 'fallback'."""
    used = threshold_rule(labels, rule)
    threshold = math.nan
    if len(labels):
        if used == "f1":
            threshold = metrics_lib.f1_optimal_threshold(labels, scores)
        else:
            threshold = metrics_lib.fpr_threshold(labels, scores, target_fpr)
    if math.isnan(threshold):
        logging.warning(
            "validation has no %s image: decision threshold falls back to %s",
            "defective" if used == "f1" else "good",
            FALLBACK_THRESHOLD,
        )
        return FALLBACK_THRESHOLD, "fallback"
    return threshold, used


def threshold_settings(config: ml_collections.ConfigDict) -> dict:
    """`{rule, target_fpr}` of `config.eval` (`eval.threshold_rule`, `eval.target_fpr`), the
    keyword arguments of `image_metrics` and `uncertainty_metrics`."""
    return {"rule": str(config.eval.threshold_rule), "target_fpr": float(config.eval.target_fpr)}


def image_metrics(
    validation: Mapping,
    test: Mapping,
    score_key: str = "image_score",
    *,
    rule: str = "f1",
    target_fpr: float = DEFAULT_TARGET_FPR,
) -> dict:
    """`{accuracy, auroc, ap, f1_max, threshold, threshold_rule}` of `test[score_key]`; the
    accuracy uses the threshold that `rule` chooses on the *validation* scores
    (`decision_threshold`); `threshold_rule` is the rule used ('f1' | 'fpr' | 'fallback')."""
    threshold, used = decision_threshold(
        validation["labels"], validation[score_key], rule, target_fpr
    )
    labels, scores = test["labels"], test[score_key]
    f1, _ = metrics_lib.f1_max(labels, scores)
    return {
        "accuracy": metrics_lib.accuracy(labels, scores, threshold),
        "auroc": metrics_lib.image_auroc(labels, scores),
        "ap": metrics_lib.average_precision(labels, scores),
        "f1_max": f1,
        "threshold": threshold,
        "threshold_rule": used,
    }


def pixel_metrics(test: Mapping) -> dict:
    """`{auroc, aupro}` of `test['anomaly_map']` against `test['masks']` (AUPRO to FPR 0.3)."""
    return {
        "auroc": metrics_lib.pixel_auroc(test["masks"], test["anomaly_map"]),
        "aupro": metrics_lib.aupro(test["masks"], test["anomaly_map"], AUPRO_FPR_LIMIT),
    }


def pixel_smoothing_variants(test: Mapping, widths=(5, 9, 17)) -> dict[str, dict[str, float]]:
    """`{s{w}: {auroc, aupro}}`: the pixel metrics of the test maps mean-filtered with a w×w
    window (`scoring.smooth_maps`): whether a map spread over its neighbourhood (as
    PatchCore-style methods blur theirs) covers regions that the head flags in part."""
    variants = {}
    for width in widths:
        smoothed = scoring.smooth_maps(np.asarray(test["anomaly_map"], np.float32), width)
        variants[f"s{width}"] = pixel_metrics({"masks": test["masks"], "anomaly_map": smoothed})
    return variants


def score_variant_aurocs(test: Mapping) -> dict[str, float]:
    """Image AUROC of each map-to-score reduction of `scoring.score_variants` on the test
    split (the comparison behind `model.image_score_*`; docs/quality.md)."""
    variants = scoring.score_variants(test["anomaly_map"], test["image_prob"])
    return {
        name: metrics_lib.image_auroc(test["labels"], values) for name, values in variants.items()
    }


def feature_knn_metrics(config, model, variables, batch_sharding, test: Mapping) -> dict:
    """The feature-space scorer (`m2u_jax.feature_memory`) on the test split: a bank of
    `eval.feature_memory_size` patch features of the defect-free training images, then image
    AUROC / AP (per-image score = maximum of the distance map after a mean filter about one
    token wide: the odd width nearest H/16, at least 3) and pixel AUROC / AUPRO of the distance
    maps upsampled to the image size."""

    def features_of(images, batch_index):
        del batch_index
        images = jax.device_put(images, batch_sharding)
        return {
            "features": predictions_lib.to_host(
                feature_memory.patch_features(model, variables, images)
            )
        }

    train = predictions_lib.collect_split(config, "train", features_of, keep_maps=False)
    if not (train["labels"] == 0).any():
        logging.info("feature-space scorer skipped: the training split has no defect-free image")
        return {"skipped": "the training split has no defect-free image"}
    bank = feature_memory.build_bank(
        [train["features"][train["labels"] == 0]],
        int(config.eval.feature_memory_size),
        int(config.seed),
    )

    def distances_of(images, batch_index):
        features = features_of(images, batch_index)["features"]
        grid_maps = np.asarray(feature_memory.nearest_distances(bank, features))
        return {"anomaly_map": feature_memory.upsample_maps(grid_maps, images.shape[1:3])}

    scored = predictions_lib.collect_split(config, "test", distances_of, keep_maps=True)
    maps = scored["anomaly_map"]
    side = max(3, (maps.shape[1] // 16) | 1)  # about one token neighbourhood
    scores = scoring.topk_mean(scoring.smooth_maps(maps, side), 0.0)
    return {
        "image_auroc": metrics_lib.image_auroc(scored["labels"], scores),
        "image_ap": metrics_lib.average_precision(scored["labels"], scores),
        "pixel_auroc": metrics_lib.pixel_auroc(scored["masks"], maps),
        "aupro": metrics_lib.aupro(scored["masks"], maps, AUPRO_FPR_LIMIT),
        "bank_size": int(len(bank)),
    }


def box_lists(split: Mapping) -> tuple[list[dict], list[dict]]:
    """(predictions, ground truth) of a split as the per-image dicts of `metrics.box_map`."""
    predictions = [
        {
            "boxes_xyxy": split["boxes_xyxy"][i],
            "scores": split["box_scores"][i],
            "classes": split["box_classes"][i],
            "valid": split["box_valid"][i],
        }
        for i in range(len(split["labels"]))
    ]
    ground_truth = [
        {
            "boxes_xyxy": split["gt_boxes"][i],
            "classes": split["gt_box_classes"][i],
            "valid": split["gt_box_valid"][i],
        }
        for i in range(len(split["labels"]))
    ]
    return predictions, ground_truth


def detection_metrics(
    test: Mapping, class_names: Sequence[str], class_agnostic: bool
) -> dict[str, object]:
    """`{map50, map, per_class_ap50, agnostic_map50, agnostic_map}` (COCO, `metrics.box_map`);
    `agnostic_*` score the boxes with every class as one (localisation alone: how much of the
    mAP the class labels lose; equal to `map50`/`map` when `class_agnostic`). A -1 from COCO (no
    ground-truth box) becomes NaN."""
    predictions, ground_truth = box_lists(test)
    result = metrics_lib.box_map(
        predictions,
        ground_truth,
        num_classes=len(class_names),
        class_names=None if class_agnostic else list(class_names),
        class_agnostic=class_agnostic,
    )
    agnostic = (
        result
        if class_agnostic
        else metrics_lib.box_map(predictions, ground_truth, class_agnostic=True)
    )

    def undefined_as_nan(value: float) -> float:
        return math.nan if value == -1.0 else value

    return {
        "map50": undefined_as_nan(result["map50"]),
        "map": undefined_as_nan(result["map"]),
        "per_class_ap50": {k: undefined_as_nan(v) for k, v in result["per_class_ap50"].items()},
        "agnostic_map50": undefined_as_nan(agnostic["map50"]),
        "agnostic_map": undefined_as_nan(agnostic["map"]),
    }


def budget_name(budget: float) -> str:
    """0.005 -> '0.5%' (the keys of `uncertainty.review`)."""
    return f"{budget * 100:g}%"


def uncertainty_metrics(
    validation: Mapping,
    test: Mapping,
    *,
    rule: str = "f1",
    target_fpr: float = DEFAULT_TARGET_FPR,
) -> tuple[dict, float]:
    """MC-dropout quality on the test split: `{ece, error_auroc, review}` and the decision
    threshold of the MC mean score that they use (chosen on validation by `rule`, as in
    `image_metrics`; 'auto' depends only on the validation labels, so it resolves the same).

    - `ece`: `metrics.expected_calibration_error(score_mean, labels, 15)`;
    - `error_auroc`: AUROC of `score_var` for catching wrong decisions
      (`score_mean >= threshold`);
    - `review`: budget name -> the `metrics.review_budget_curve` row (without `budget`).
    """
    threshold, _ = decision_threshold(
        validation["labels"], validation["score_mean"], rule, target_fpr
    )
    labels, scores = test["labels"], test["score_mean"]
    uncertainty = test[UNCERTAINTY_MEASURE]
    correct = (scores >= threshold) == labels.astype(bool)
    rows = metrics_lib.review_budget_curve(scores, uncertainty, labels, threshold, REVIEW_BUDGETS)
    review = {
        budget_name(row["budget"]): {k: v for k, v in row.items() if k != "budget"} for row in rows
    }
    return {
        "ece": metrics_lib.expected_calibration_error(scores, labels, ECE_BINS),
        "error_auroc": metrics_lib.error_detection_auroc(uncertainty, correct),
        "review": review,
    }, threshold


def per_category_metrics(test: Mapping, threshold: float) -> dict[str, dict[str, float]]:
    """category -> `{image_auroc, image_ap, pixel_auroc, aupro, accuracy}` (the accuracy at the
    global validation threshold); pixel metrics only when the maps were kept."""
    result = {}
    for category in sorted(set(test["categories"].tolist())):
        rows = test["categories"] == category
        labels, scores = test["labels"][rows], test["image_score"][rows]
        values = {
            "image_auroc": metrics_lib.image_auroc(labels, scores),
            "image_ap": metrics_lib.average_precision(labels, scores),
        }
        if "anomaly_map" in test:
            values["pixel_auroc"] = metrics_lib.pixel_auroc(
                test["masks"][rows], test["anomaly_map"][rows]
            )
            values["aupro"] = metrics_lib.aupro(
                test["masks"][rows], test["anomaly_map"][rows], AUPRO_FPR_LIMIT
            )
        values["accuracy"] = metrics_lib.accuracy(labels, scores, threshold)
        result[category] = values
    return result


# ----------------------------------------------------------------------------- speed


def time_call(function: Callable[[], object], repeats: int = SPEED_REPEATS) -> float:
    """Median wall time (s) of `function()` over `repeats` calls, after two warm-up calls
    (compilation and first-run allocation excluded); each call is `block_until_ready`."""
    for _ in range(2):
        jax.block_until_ready(function())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def device_description() -> str:
    """'<device kind> x<count>' of the devices jax runs on, e.g. 'NVIDIA H100 80GB HBM3 x1'."""
    devices = jax.devices()
    return f"{devices[0].device_kind} x{len(devices)} ({devices[0].platform})"


def measure_speed(
    config: ml_collections.ConfigDict,
    model,
    variables,
    batch_sharding,
    *,
    repeats: int = SPEED_REPEATS,
) -> dict[str, object]:
    """Throughput and latency of the jitted inference on random images.

    - `images_per_sec`: `model.predict` on `eval.batch_size` images split over every device
      (the evaluation layout); `latency_ms`: batch 1 on the first device alone.
    - `mc_images_per_sec` / `mc_latency_ms`: the same for `uncertainty.mc_dropout_predict` with
      `eval.num_mc_samples` samples (only when > 1): trunk once + T tails with every head, but
      no box post-processing (NMS), so at batch 1 it can be faster than `model.predict`.
    Host-device transfers are excluded (inputs are placed first); medians of `repeats` calls.
    """
    from m2u_jax import model as model_lib

    side = int(config.data.image_size)
    channels = num_channels(config.data.modalities)
    batch_size = int(config.eval.batch_size)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        rng.random((batch_size, side, side, channels), dtype=np.float32), batch_sharding
    )
    first_device = jax.devices()[0]
    single = jax.device_put(rng.random((1, side, side, channels), dtype=np.float32), first_device)
    single_variables = jax.device_put(variables, first_device)
    result: dict[str, object] = {}
    seconds = time_call(lambda: model_lib.predict(model, variables, batch), repeats)
    result["images_per_sec"] = batch_size / seconds
    seconds = time_call(lambda: model_lib.predict(model, single_variables, single), repeats)
    result["latency_ms"] = 1e3 * seconds
    result["device"] = device_description()
    num_samples = int(config.eval.num_mc_samples)
    if num_samples > 1:
        key = jax.random.PRNGKey(0)
        seconds = time_call(
            lambda: uncertainty_lib.mc_dropout_predict(
                model, variables, batch, key, num_samples, chunk_size=int(config.eval.mc_chunk_size)
            ),
            repeats,
        )
        result["mc_images_per_sec"] = batch_size / seconds
        single_key = jax.device_put(key, first_device)
        seconds = time_call(
            lambda: uncertainty_lib.mc_dropout_predict(
                model,
                single_variables,
                single,
                single_key,
                num_samples,
                chunk_size=int(config.eval.mc_chunk_size),
            ),
            repeats,
        )
        result["mc_latency_ms"] = 1e3 * seconds
    return result


# ----------------------------------------------------------------------------- outputs


def review_reason(score: float, variance: float, score_threshold: float) -> str:
    """Why an image is in the review queue. Every queued image is more uncertain than the
    calibrated limit ('uncertain'); it is 'near threshold' when one MC standard deviation
    around its mean score reaches across the decision threshold (the samples disagree on the
    decision, not only on the score)."""
    if abs(score - score_threshold) <= math.sqrt(max(variance, 0.0)):
        return "near threshold"
    return "uncertain"


def _image_loss(label: int, score: float) -> float:
    """Binary cross-entropy of the image score against the label (the worst-case ranking)."""
    probability = min(max(float(score), 1e-7), 1.0 - 1e-7)
    return -math.log(probability if label else 1.0 - probability)


# ----------------------------------------------------------------------------- main


@dataclasses.dataclass
class EvalContext:
    """What `evaluate` derives from the config and dataset before predicting."""

    class_names: tuple[str, ...]
    class_agnostic: bool
    info: object
    num_defect_classes: int = 0  # the model's class count (model.num_defect_classes resolved)


def eval_context(config: ml_collections.ConfigDict) -> EvalContext:
    """Dataset class map and the box protocol; resolves `model.num_defect_classes` (0 = from
    the data) and raises ConfigError (a ValueError) naming both numbers when the model's class
    count does not fit the data (`splits.resolve_num_defect_classes`, as the trainer checks)."""
    from m2u_jax.data import splits

    info = splits.load_dataset_info(config)
    num_model_classes = splits.resolve_num_defect_classes(config.model.num_defect_classes, info)
    class_agnostic = info.protocol == "unsupervised" or info.num_classes == 1
    class_names = ("defect",) if class_agnostic else tuple(info.class_names)
    return EvalContext(
        class_names=class_names,
        class_agnostic=class_agnostic,
        info=info,
        num_defect_classes=num_model_classes,
    )


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | str | None = None,
    *,
    with_speed: bool = True,
) -> dict:
    """Evaluates checkpoint `step` (default: the newest fine-tuned one) of WORKDIR and writes
    WORKDIR/eval (module docstring). Returns the metrics dict of metrics.json (with NaN)."""
    from m2u_jax import model as model_lib

    config_lib.validate(config, num_devices=jax.device_count())
    context = eval_context(config)
    if context.num_defect_classes != int(config.model.num_defect_classes):  # 0: from the data
        config = config.copy_and_resolve_references()
        config.model.num_defect_classes = context.num_defect_classes
    # The resolved class count against the run's (its heads' shapes): one line naming the key.
    config_lib.check_same_architecture(config, workdir)
    batch_sharding = predictions_lib.eval_batch_sharding(config)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    params, step = run_checkpoint.restore_params(config, workdir, step, sharding=replicated)
    model = model_lib.build_model(config.model)
    variables = {"params": params}
    members = run_checkpoint.restore_members(config, sharding=replicated)
    ensemble = uncertainty_lib.stack_members([params, *members]) if members else None
    out_dir = os.path.join(os.path.abspath(workdir), "eval")
    plots_dir = os.path.join(out_dir, "plots")
    overlays_dir = os.path.join(out_dir, "overlays")
    figures = bool(config.eval.figures)
    os.makedirs(out_dir, exist_ok=True)
    if figures:
        os.makedirs(plots_dir, exist_ok=True)
        os.makedirs(overlays_dir, exist_ok=True)
    predict_batch = predictions_lib.make_model_predict_fn(
        config, model, variables, batch_sharding, ensemble=ensemble
    )
    if context.class_agnostic:
        predict_batch = predictions_lib.without_classes(predict_batch)

    logging.info("evaluating checkpoint %d of %s on the validation split", step, workdir)
    counts = context.info.counts
    validation = predictions_lib.collect_split(
        config,
        "validation",
        predict_batch,
        keep_maps=False,
        total=counts["validation"]["images"],
    )
    settings = threshold_settings(config)
    # 'auto' depends only on the validation labels: one rule for every threshold below.
    rule = threshold_rule(validation["labels"], settings["rule"])
    policy = review_lib.calibrate_review_thresholds(
        validation["score_mean"],
        validation[UNCERTAINTY_MEASURE],
        validation["labels"],
        float(config.eval.review_budget),
        rule=rule,
        target_fpr=settings["target_fpr"],
    )
    num_overlays = int(config.eval.num_overlays)
    worst = predictions_lib.TopK(num_overlays)
    queued = predictions_lib.TopK(num_overlays)
    queue_lines: list[dict] = []

    def on_rows(rows: dict) -> None:
        decisions = np.asarray(
            review_lib.review_policy(rows["score_mean"], rows[UNCERTAINTY_MEASURE], policy)
        )
        for index in range(len(rows["labels"])):
            loss = _image_loss(int(rows["labels"][index]), float(rows["image_score"][index]))
            worst.offer(loss, lambda index=index: predictions_lib.single_row(rows, index))
            if decisions[index] != review_lib.REVIEW:
                continue
            score = float(rows["score_mean"][index])
            variance = float(rows["score_var"][index])
            queue_lines.append(
                {
                    "path": str(rows["paths"][index]),
                    "category": str(rows["categories"][index]),
                    "score": score,
                    "deterministic_score": float(rows["image_score"][index]),
                    "uncertainty": {
                        "variance": variance,
                        "entropy": float(rows["entropy"][index]),
                        "mutual_information": float(rows["mutual_info"][index]),
                    },
                    "reason": review_reason(score, variance, policy["score_threshold"]),
                    "automatic_decision": "reject"
                    if score >= policy["score_threshold"]
                    else "accept",
                    "ground_truth": {
                        "label": int(rows["labels"][index]),
                        "defect": str(rows["defect_names"][index]),
                    },
                    "boxes": report_lib.boxes_of(
                        {key: rows[key][index] for key in predictions_lib.BOX_KEYS},
                        context.class_names,
                    ),
                }
            )
            queued.offer(
                float(rows[UNCERTAINTY_MEASURE][index]),
                lambda index=index: predictions_lib.single_row(rows, index),
            )

    logging.info("evaluating on the test split")
    test = predictions_lib.collect_split(
        config,
        "test",
        predict_batch,
        keep_maps=True,
        on_rows=on_rows,
        total=counts["test"]["images"],
    )

    image = image_metrics(validation, test, **settings)
    uncertainty, mc_threshold = uncertainty_metrics(validation, test, **settings)
    speed = {}
    if with_speed:
        logging.info("measuring inference speed")
        speed = measure_speed(config, model, variables, batch_sharding)
    pixel = pixel_metrics(test)
    if config.eval.variant_metrics:  # a few more AUROC / AUPRO passes over the test maps
        image["score_variants"] = score_variant_aurocs(test)
        pixel["smoothing_variants"] = pixel_smoothing_variants(test)
    metrics = {
        "image": image,
        "pixel": pixel,
        "detection": detection_metrics(test, context.class_names, context.class_agnostic),
        "uncertainty": uncertainty,
        "speed": speed,
        "per_category": per_category_metrics(test, image["threshold"]),
    }

    if int(config.eval.feature_memory_size) > 0:
        logging.info("feature-space scorer: memory of normal patch features")
        metrics["feature_knn"] = feature_knn_metrics(config, model, variables, batch_sharding, test)
    report_lib.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    thresholds = {
        "score_threshold": policy["score_threshold"],
        "uncertainty_threshold": policy["uncertainty_threshold"],
        "uncertainty_measure": UNCERTAINTY_MEASURE,
        "budget": float(config.eval.review_budget),
        # The uncertainty's source: T MC-dropout samples, or (T = 1) E ensemble members.
        "num_mc_samples": 1 if members else int(config.eval.num_mc_samples),
        "ensemble_members": 1 + len(members),
        # The scores were means over this many flipped views (model.test_time_flips).
        "test_time_flips": int(config.model.test_time_flips),
        "image_decision_threshold": image["threshold"],
        "mc_decision_threshold": mc_threshold,
        "threshold_rule": image["threshold_rule"],
        "target_fpr": settings["target_fpr"],
        "checkpoint_step": step,
        # The names of the model's box / defect-type classes, in class-index order: export
        # and the predictors label boxes with them.
        "class_names": list(context.class_names),
        "policy": (
            "review if uncertainty > uncertainty_threshold, else reject (defective) if "
            "MC mean score >= score_threshold, else accept"
        ),
    }
    report_lib.write_json(os.path.join(out_dir, "thresholds.json"), thresholds)
    with open(os.path.join(out_dir, "review_queue.jsonl"), "w", encoding="utf-8") as file:
        for line in queue_lines:
            file.write(json.dumps(report_lib.to_json_value(line), allow_nan=False) + "\n")
    predictions_lib.save_predictions(out_dir, {"validation": validation, "test": test})

    # Matplotlib figures cost seconds per evaluation (more than the tiny model's predictions):
    # `eval.figures` off skips them for scripted evaluations that read only the numbers.
    plots = _write_plots(plots_dir, test, metrics) if figures else {}
    overlays = _write_overlays(overlays_dir, worst, queued, image, context) if figures else []
    run = {
        "workdir": os.path.abspath(workdir),
        "checkpoint step": step,
        "data": f"{config.data.format} {config.data.root} ({context.info.protocol})",
        "validation images": len(validation["labels"]),
        "test images": len(test["labels"]),
        "test defective images": int(test["labels"].sum()),
        "detection protocol": "class-agnostic" if context.class_agnostic else "per class",
        "MC-dropout samples": int(config.eval.num_mc_samples),
        "deep-ensemble members (uncertainty from them when > 1)": 1 + len(members),
        "review budget (validation)": float(config.eval.review_budget),
        "review score threshold": policy["score_threshold"],
        f"review uncertainty threshold ({UNCERTAINTY_MEASURE})": policy["uncertainty_threshold"],
        "test images sent to review": len(queue_lines),
        "MC decision threshold (uncertainty section)": mc_threshold,
        "threshold rule (eval.threshold_rule)": (
            f"{settings['rule']} -> {image['threshold_rule']}"
            + (f" (eval.target_fpr={settings['target_fpr']:g})" if rule == "fpr" else "")
        ),
    }
    report_lib.write_report(out_dir, {"run": run, **metrics}, plots, overlays)
    # A few overlays of each group beside the scalars, at the checkpoint's step.
    groups: dict[str, list[str]] = {}
    for entry in overlays:
        groups.setdefault(entry["group"], []).append(entry["path"])
    shown = [path for paths in groups.values() for path in paths[:TENSORBOARD_OVERLAYS]]
    if report_lib.write_tensorboard(os.path.abspath(workdir), step, metrics, shown):
        logging.info("eval metrics and %d overlays in TensorBoard (%s)", len(shown), workdir)
    logging.info(
        "eval step %d: image AUROC %.4f, accuracy %.4f, pixel AUROC %.4f, AUPRO %.4f, "
        "mAP@0.5 %.4f -> %s",
        step,
        image["auroc"],
        image["accuracy"],
        metrics["pixel"]["auroc"],
        metrics["pixel"]["aupro"],
        metrics["detection"]["map50"],
        out_dir,
    )
    return metrics


def _write_plots(plots_dir: str, test: Mapping, metrics: Mapping) -> dict:
    labels = test["labels"]
    plots = {
        "Image-level ROC (test)": report_lib.plot_roc(
            labels, test["image_score"], os.path.join(plots_dir, "roc.png")
        ),
        "Image-level precision-recall (test)": report_lib.plot_pr(
            labels, test["image_score"], os.path.join(plots_dir, "pr.png")
        ),
    }
    fpr, pro = metrics_lib.aupro_curve(test["masks"], test["anomaly_map"], AUPRO_FPR_LIMIT)
    plots["Per-region overlap (test pixels)"] = report_lib.plot_pro_curve(
        fpr, pro, AUPRO_FPR_LIMIT, os.path.join(plots_dir, "pro.png")
    )
    plots["Reliability of the MC-dropout score (test)"] = report_lib.plot_reliability(
        test["score_mean"], labels, os.path.join(plots_dir, "reliability.png"), ECE_BINS
    )
    review_rows = [
        {"budget": budget, **metrics["uncertainty"]["review"][budget_name(budget)]}
        for budget in REVIEW_BUDGETS
    ]
    plots["Review budget (test)"] = report_lib.plot_review_curve(
        review_rows, os.path.join(plots_dir, "review_budget.png")
    )
    plots["Per category (test)"] = report_lib.plot_per_category(
        metrics["per_category"], os.path.join(plots_dir, "per_category.png")
    )
    return plots


def _write_overlays(overlays_dir: str, worst, queued, image: Mapping, context) -> list[dict]:
    """The worst test images and the review queue drawn over their inputs (`worst`, `queued`:
    the evaluation's row selections)."""
    overlays = report_lib.plot_overlays(
        worst.items(),
        overlays_dir,
        "worst",
        "Worst test images (highest image-level cross-entropy)",
        context.class_names,
        lambda row: (
            f"{os.path.basename(str(row['paths']))} ({row['defect_names']}): "
            f"score {float(row['image_score']):.3f}, threshold {image['threshold']:.3f}"
        ),
    )
    overlays += report_lib.plot_overlays(
        queued.items(),
        overlays_dir,
        "review",
        "Review queue (most uncertain first)",
        context.class_names,
        lambda row: (
            f"{os.path.basename(str(row['paths']))} ({row['defect_names']}): MC score "
            f"{float(row['score_mean']):.3f} ± {math.sqrt(max(float(row['score_var']), 0)):.3f}"
        ),
    )
    return overlays
