"""Validation during fine-tuning: a deterministic pass (no MC dropout) over the validation split
that gives the training log its `val/*` scalars and `train.best_metric` its ranking.

The entry point (cli/train.py) hands `make_validator` to the trainer, which builds the
validator from the run's resolved config and calls it with the current params every
`train.validate_every` fine-tuning steps: the trainer never imports the evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
import numpy as np

from m2u_jax import evaluate
from m2u_jax import metrics as metrics_lib
from m2u_jax import model as model_lib
from m2u_jax import predictions as predictions_lib

Validator = Callable[[dict], dict[str, float]]


def split_metrics(split: dict, class_names, class_agnostic: bool) -> dict[str, float]:
    """The metrics of `config.BEST_METRICS` (NaN where the split cannot define one: no defective
    image, no mask, no box) plus `good_score_mean`, from a `collect_split` result with maps."""
    labels = split["labels"]
    scores = split["image_score"]
    has_masks = bool(np.asarray(split["masks"]).any())
    pixel = evaluate.pixel_metrics(split) if has_masks else {"auroc": math.nan, "aupro": math.nan}
    has_boxes = bool(np.asarray(split["gt_box_valid"]).any())
    map50 = (
        evaluate.detection_metrics(split, class_names, class_agnostic)["map50"]
        if has_boxes
        else math.nan
    )
    good = labels == 0
    return {
        "image_auroc": metrics_lib.image_auroc(labels, scores),
        "pixel_auroc": float(pixel["auroc"]),
        "aupro": float(pixel["aupro"]),
        "map50": float(map50),
        "good_score_mean": float(scores[good].mean()) if good.any() else math.nan,
    }


def make_validator(config: ml_collections.ConfigDict) -> Validator:
    """`validate(params) -> {name: value}` over the validation split of `config` (resolved:
    `model.num_defect_classes` > 0), with the keys of `split_metrics`."""
    context = evaluate.eval_context(config)
    deterministic = config.copy_and_resolve_references()
    deterministic.eval.num_mc_samples = 1  # the scores, not the uncertainty, rank checkpoints
    model = model_lib.build_model(deterministic.model)
    batch_sharding = predictions_lib.eval_batch_sharding(deterministic)
    total = context.info.counts["validation"]["images"]

    def validate(params: dict) -> dict[str, float]:
        predict_batch = predictions_lib.make_model_predict_fn(
            deterministic, model, {"params": params}, batch_sharding
        )
        if context.class_agnostic:
            predict_batch = predictions_lib.without_classes(predict_batch)
        split = predictions_lib.collect_split(
            deterministic, "validation", predict_batch, keep_maps=True, total=total
        )
        return split_metrics(split, context.class_names, context.class_agnostic)

    return validate
