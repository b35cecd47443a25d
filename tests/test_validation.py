"""Validation during fine-tuning (`train.validate_every`, `train.best_metric`): the metrics of
one pass, the best-params rule, WORKDIR/best as the run's default params, and the evaluation's
TensorBoard scalars and overlays."""

import json
import math
import os
import pathlib

import numpy as np
import pytest

from configs import tiny
from m2u_jax import config as config_lib
from m2u_jax import run_checkpoint, validation
from tests.runs import tiny_run_config


def _split(with_masks=True):
    masks = np.zeros((4, 2, 2), bool)
    maps = np.zeros((4, 2, 2), np.float32)
    if with_masks:
        masks[2, 0, 0] = masks[3, 1, 1] = True
        maps[2, 0, 0], maps[3, 1, 1] = 0.9, 0.5  # the two defect pixels
    maps[0, 0, 1] = 0.7  # one bright good pixel, above the weaker defect pixel
    return {
        "labels": np.array([0, 0, 1, 1], np.int32),
        "image_score": np.array([0.1, 0.4, 0.35, 0.8], np.float32),
        "masks": masks,
        "anomaly_map": maps,
        "gt_boxes": np.zeros((4, 2, 4), np.float32),
        "gt_box_classes": np.zeros((4, 2), np.int32),
        "gt_box_valid": np.zeros((4, 2), bool),
        "boxes_xyxy": np.zeros((4, 3, 4), np.float32),
        "box_scores": np.zeros((4, 3), np.float32),
        "box_classes": np.zeros((4, 3), np.int32),
        "box_valid": np.zeros((4, 3), bool),
    }


def test_split_metrics_hand_computed():
    values = validation.split_metrics(_split(), ("defect",), class_agnostic=True)
    # Image: 3 of the 4 (defective, good) pairs are ordered (0.35 < 0.4 is the miss).
    assert values["image_auroc"] == pytest.approx(0.75)
    # Pixels: 0.9 beats all 14 good pixels, 0.5 beats the 13 zeros but not 0.7: 27 / 28.
    assert values["pixel_auroc"] == pytest.approx(27 / 28)
    assert 0.0 <= values["aupro"] <= 1.0
    assert values["good_score_mean"] == pytest.approx(0.25)
    assert math.isnan(values["map50"])  # no ground-truth box: undefined, never a 0


def test_split_metrics_without_masks_leave_pixel_metrics_undefined():
    values = validation.split_metrics(_split(with_masks=False), ("defect",), True)
    assert math.isnan(values["pixel_auroc"]) and math.isnan(values["aupro"])
    assert values["image_auroc"] == pytest.approx(0.75)


def test_beats_best():
    assert run_checkpoint.beats_best(0.5, None)
    assert run_checkpoint.beats_best(0.7, 0.6)
    assert not run_checkpoint.beats_best(0.6, 0.6)  # ties keep the earlier params
    assert not run_checkpoint.beats_best(0.5, 0.6)
    assert not run_checkpoint.beats_best(math.nan, None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"best_metric": "loss", "validate_every": 2}, r"train.best_metric='loss' is not one of"),
        ({"best_metric": "image_auroc"}, r"train.best_metric='image_auroc' needs train.valid"),
        ({"validate_every": -1}, r"'train.validate_every'=-1 is outside its range"),
    ],
)
def test_validation_keys_are_checked(overrides, message):
    config = tiny.get_config()
    config.train.update(overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


# ----------------------------------------------------------------------------- real run


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, tiny_eval_root):
    from m2u_jax import evaluate, trainer

    workdir = tmp_path_factory.mktemp("validated_run")
    config = tiny_run_config(tiny_eval_root, finetune_steps=4)
    config.train.keep_checkpoints = 5
    config.train.validate_every = 1
    config.train.best_metric = "pixel_auroc"
    config.train.learning_rate = 3e-3  # the maps move between validations
    config.model.det_score_threshold = 0.0
    config.eval.figures = True  # the overlays go to TensorBoard too (checked below)
    trainer.train(config, str(workdir), make_validator=validation.make_validator)
    metrics = evaluate.evaluate(config, str(workdir), with_speed=False)
    return config, workdir, metrics


def _jsonl(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_validation_is_logged_and_the_best_params_are_kept(validated_run):
    config, workdir, _ = validated_run
    records = [r for r in _jsonl(workdir) if "val/pixel_auroc" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    values = [r["val/pixel_auroc"] for r in records]
    assert all(0.0 <= value <= 1.0 for value in values)
    assert {"val/image_auroc", "val/aupro", "val/map50", "val/good_score_mean"} <= set(records[0])
    best_step = records[int(np.argmax(values))]["step"]  # argmax: the first of equal values
    assert sorted(os.listdir(workdir / "best")) == [str(best_step)]
    meta = json.loads((workdir / "best" / str(best_step) / "meta" / "metadata").read_text())
    assert meta["metric"] == "pixel_auroc" and meta["stage"] == "finetune"
    assert meta["value"] == pytest.approx(max(values))


@pytest.mark.slow
def test_the_best_params_are_the_runs_default_and_equal_a_fresh_validation(validated_run):
    import jax

    config, workdir, _ = validated_run
    records = [r for r in _jsonl(workdir) if "val/pixel_auroc" in r]
    best_step = records[int(np.argmax([r["val/pixel_auroc"] for r in records]))]["step"]
    params, step = run_checkpoint.restore_params(config, str(workdir))
    assert step == best_step
    _, named = run_checkpoint.restore_params(config, str(workdir), "best")
    assert named == best_step
    newest = config.copy_and_resolve_references()
    newest.train.best_metric = ""  # a run without the rule: the newest checkpoint
    assert run_checkpoint.restore_params(newest, str(workdir))[1] == 4
    # The kept params reproduce the logged validation value.
    resolved = config.copy_and_resolve_references()
    resolved.model.num_defect_classes = json.loads((workdir / "config.json").read_text())["model"][
        "num_defect_classes"
    ]
    again = validation.make_validator(resolved)(jax.device_put(params))
    assert again["pixel_auroc"] == pytest.approx(max(r["val/pixel_auroc"] for r in records))


@pytest.mark.slow
def test_evaluation_uses_the_best_params_and_writes_tensorboard(validated_run):
    import tensorflow as tf

    _, workdir, metrics = validated_run
    records = [r for r in _jsonl(workdir) if "val/pixel_auroc" in r]
    best_step = records[int(np.argmax([r["val/pixel_auroc"] for r in records]))]["step"]
    thresholds = json.loads((workdir / "eval" / "thresholds.json").read_text())
    assert thresholds["checkpoint_step"] == best_step
    scalars, images = {}, set()
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if not value.tag.startswith("eval/"):
                    continue
                if value.metadata.plugin_data.plugin_name == "images":
                    images.add(value.tag)
                else:
                    scalars[value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
    assert scalars["eval/image/auroc"] == (best_step, pytest.approx(metrics["image"]["auroc"]))
    assert scalars["eval/pixel/aupro"][1] == pytest.approx(metrics["pixel"]["aupro"])
    assert "eval/worst_00" in images
