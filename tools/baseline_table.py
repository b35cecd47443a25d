"""The seed paper's Table 2 in one harness: M2U-InspectNet and three baselines trained and
measured on the same data, split and hardware.

    python tools/baseline_table.py --config configs/tiny.py --workdir /tmp/m2u_baselines \
        [--methods full,autoencoder,detection,svm] [--config.train.finetune_steps=200 ...]

Methods (each trained in WORKDIR/<method> with `trainer.train`):

- `full`: the config as given (contrastive pretraining + multi-task fine-tuning), measured by
  `evaluate.evaluate` (image score, boxes of the detection head).
- `autoencoder`: only the reconstruction loss (every other `train.loss_weights` entry 0), no
  pretraining. Anomaly map = squared reconstruction error averaged over channels; image score
  = mean of its top `model.image_score_topk` fraction. Boxes = connected components of the map
  above the pixel threshold with the best pixel F1 on validation, scored by their peak error,
  evaluated class-agnostically (an autoencoder has no notion of defect type).
- `detection`: only the detection losses (det_obj, det_cls, det_box, det_dfl), no pretraining: the
  YOLO-style head alone. Image score = the highest anchor score sigmoid(obj) x max sigmoid(cls).
- `svm`: contrastive pretraining only; the frozen encoder's pooled embedding of the training
  images (standardised) trains a linear SVM (scikit-learn `LinearSVC`, balanced classes);
  image score = its decision value. No boxes (mAP n/a).

Every method's accuracy uses the F1-optimal threshold of its own validation scores. images/s is
the jitted inference of that method on `eval.batch_size` images over all devices (median of a
few calls after warm-up). The table is forced onto the supervised protocol (the paper's setting:
labelled defects, per-class mAP) with `model.num_defect_classes` = the dataset's defect types.

Outputs: WORKDIR/baselines.{md,json}; the paper's own numbers (Jetson Xavier NX) are printed
beside ours for reference only: other data, other hardware.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import sys

if __package__ in (None, ""):  # `python tools/baseline_table.py` from anywhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from tools.study_setup import (  # noqa: E402
    enable_compilation_cache,
    supervised_config,
    with_supervised_protocol,
)

METHODS = ("full", "autoencoder", "detection", "svm")
METHOD_NAMES = {
    "full": "M2U-InspectNet (full model, ours)",
    "autoencoder": "Autoencoder only (reconstruction error)",
    "detection": "Detection head only (YOLO-style, no pretraining)",
    "svm": "Frozen self-supervised encoder + linear SVM",
}
# The seed paper's Table 2: accuracy %, mAP@0.5 %, FPS on an NVIDIA Jetson Xavier NX, for the
# baseline each of our methods stands in for. Quoted for reference; not measured here.
PAPER_TABLE = {
    "full": ("M2U-InspectNet", 94.8, 91.7, 52),
    "autoencoder": ("Autoencoder", 85.4, 74.8, 45),
    "detection": ("YOLOv5", 91.6, 85.0, 56),
    "svm": ("ResNet-50 + SVM", 88.3, 70.2, 32),
}
LOSS_TERMS_OF = {
    "autoencoder": ("recon",),
    "detection": ("det_obj", "det_cls", "det_box", "det_dfl"),
}
# Candidate pixel thresholds (quantiles of the validation map) for the autoencoder's boxes.
_PIXEL_THRESHOLD_QUANTILES = np.linspace(0.5, 0.9999, 200)


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(part.strip() for part in str(text).split(",") if part.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods={text!r}: use a comma-separated subset of {METHODS}")
    return methods


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The training config of `method` (see module docstring); `config` is already supervised."""
    copy = config.copy_and_resolve_references()
    # Each method is measured by its own evaluation below, not by the trainer's.
    copy.eval.after_training = False
    if method in LOSS_TERMS_OF:
        kept = LOSS_TERMS_OF[method]
        for name in copy.train.loss_weights:
            if name not in kept:
                copy.train.loss_weights[name] = 0.0
            elif copy.train.loss_weights[name] <= 0:
                copy.train.loss_weights[name] = 1.0
        if all(copy.train.loss_weights[name] <= 0 for name in kept):
            raise ValueError(f"{method}: every loss weight of {kept} is zero")
        copy.train.pretrain_steps = 0
    elif method == "svm":
        if copy.train.pretrain_steps <= 0:
            raise ValueError("svm needs contrastive pretraining: train.pretrain_steps must be > 0")
        copy.train.finetune_steps = 0
    return copy


# ----------------------------------------------------------------------------- predictions


@functools.partial(jax.jit, static_argnums=(0, 1))
def _autoencoder_forward(model, topk_fraction: float, variables, images):
    outputs, _ = model.apply(variables, images, train=False)
    error = jnp.mean(jnp.square(outputs["recon"].astype(jnp.float32) - images), axis=-1)
    flat = error.reshape(error.shape[0], -1)
    k = max(1, int(round(topk_fraction * flat.shape[1])))
    top, _ = jax.lax.top_k(flat, k)
    return {"anomaly_map": error, "image_score": jnp.mean(top, axis=-1)}


@functools.partial(jax.jit, static_argnums=0)
def _detection_forward(model, variables, images):
    from m2u_jax import model as model_lib

    outputs, _ = model.apply(variables, images, train=False)
    det = outputs["det"]
    anchor_scores = jax.nn.sigmoid(det["obj_logits"].astype(jnp.float32)) * jnp.max(
        jax.nn.sigmoid(det["cls_logits"].astype(jnp.float32)), axis=-1
    )
    predictions = model_lib.predictions_from_outputs(
        outputs,
        score_kwargs=model.score_kwargs,
        nms_kwargs=model.nms_kwargs,
    )
    keys = ("boxes_xyxy", "box_scores", "box_classes", "box_valid")
    return {"image_score": jnp.max(anchor_scores, axis=-1), **{k: predictions[k] for k in keys}}


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, variables, images):
    from m2u_jax.model import M2UNet

    return model.apply(variables, images, train=False, method=M2UNet.embed)


@functools.partial(jax.jit, static_argnums=0)
def _svm_forward(model, variables, weights, bias, images):
    return _embed(model, variables, images) @ weights + bias


def best_pixel_threshold(masks: np.ndarray, maps: np.ndarray) -> float:
    """The pixel threshold (a quantile of the validation maps) with the best pixel F1."""
    positives = np.sort(maps[masks].ravel())
    negatives = np.sort(maps[~masks].ravel())
    candidates = np.unique(np.quantile(maps, _PIXEL_THRESHOLD_QUANTILES))
    if positives.size == 0:
        return float(candidates[-1])
    true_positive = positives.size - np.searchsorted(positives, candidates, "left")
    false_positive = negatives.size - np.searchsorted(negatives, candidates, "left")
    false_negative = positives.size - true_positive
    f1 = 2 * true_positive / np.maximum(2 * true_positive + false_positive + false_negative, 1)
    return float(candidates[int(np.argmax(f1))])


def component_boxes(maps: np.ndarray, threshold: float, max_boxes: int) -> dict[str, np.ndarray]:
    """Per image, boxes around the connected components of `map > threshold`, scored by the
    component box's peak value; padded to `max_boxes` (highest scores kept)."""
    from m2u_jax.data import decode

    count = maps.shape[0]
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    scores = np.zeros((count, max_boxes), np.float32)
    valid = np.zeros((count, max_boxes), np.float32)
    for index, error_map in enumerate(maps):
        found = decode.boxes_from_mask(error_map, threshold)
        if not len(found):
            continue
        peaks = np.array(
            [error_map[int(y0) : int(y1), int(x0) : int(x1)].max() for x0, y0, x1, y1 in found]
        )
        order = np.argsort(-peaks, kind="stable")[:max_boxes]
        boxes[index, : order.size] = found[order]
        scores[index, : order.size] = peaks[order]
        valid[index, : order.size] = 1.0
    return {
        "boxes_xyxy": boxes,
        "box_scores": scores,
        "box_classes": np.zeros((count, max_boxes), np.int32),
        "box_valid": valid,
    }


def _throughput(config, function, *args) -> float:
    """images/s of `function(*args, images)` on eval.batch_size random images over the mesh."""
    from m2u_jax import evaluate, predictions
    from m2u_jax.modalities import num_channels

    batch_sharding = predictions.eval_batch_sharding(config)
    side = int(config.data.image_size)
    channels = num_channels(config.data.modalities)
    batch_size = int(config.eval.batch_size)
    images = jax.device_put(
        np.random.default_rng(0).random((batch_size, side, side, channels), dtype=np.float32),
        batch_sharding,
    )
    return batch_size / evaluate.time_call(lambda: function(*args, images))


def _image_row(config, validation, test) -> dict:
    from m2u_jax import evaluate

    # The threshold rule of eval.py (eval.threshold_rule / eval.target_fpr).
    return evaluate.image_metrics(validation, test, **evaluate.threshold_settings(config))


def evaluate_autoencoder(config, workdir: str) -> dict:
    from m2u_jax import evaluate, predictions, run_checkpoint
    from m2u_jax import model as model_lib

    params, _ = run_checkpoint.restore_params(config, workdir)
    model = model_lib.build_model(config.model)
    variables = {"params": params}
    batch_sharding = predictions.eval_batch_sharding(config)
    topk = float(config.model.image_score_topk)

    def predict(images, batch_index):
        del batch_index
        return predictions.to_host(
            _autoencoder_forward(model, topk, variables, jax.device_put(images, batch_sharding))
        )

    validation = predictions.collect_split(config, "validation", predict, keep_maps=True)
    test = predictions.collect_split(config, "test", predict, keep_maps=True)
    threshold = best_pixel_threshold(validation["masks"], validation["anomaly_map"])
    test.update(
        component_boxes(test["anomaly_map"], threshold, int(config.model.det_max_detections))
    )
    detection = evaluate.detection_metrics(test, ("defect",), class_agnostic=True)
    return {
        "image": _image_row(config, validation, test),
        "pixel": evaluate.pixel_metrics(test),
        "detection": detection,
        "images_per_sec": _throughput(
            config, lambda v, x: _autoencoder_forward(model, topk, v, x), variables
        ),
        "notes": "boxes from the error map, class-agnostic mAP",
    }


def evaluate_detection(config, workdir: str, context) -> dict:
    from m2u_jax import evaluate, predictions, run_checkpoint
    from m2u_jax import model as model_lib

    params, _ = run_checkpoint.restore_params(config, workdir)
    model = model_lib.build_model(config.model)
    variables = {"params": params}
    batch_sharding = predictions.eval_batch_sharding(config)

    def predict(images, batch_index):
        del batch_index
        return predictions.to_host(
            _detection_forward(model, variables, jax.device_put(images, batch_sharding))
        )

    validation = predictions.collect_split(config, "validation", predict, keep_maps=False)
    test = predictions.collect_split(config, "test", predict, keep_maps=False)
    return {
        "image": _image_row(config, validation, test),
        "detection": evaluate.detection_metrics(test, context.class_names, context.class_agnostic),
        "images_per_sec": _throughput(
            config, lambda v, x: _detection_forward(model, v, x), variables
        ),
        "notes": "image score = highest anchor score",
    }


def evaluate_svm(config, workdir: str) -> dict:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from m2u_jax import model as model_lib
    from m2u_jax import predictions, run_checkpoint

    encoder_params, _ = run_checkpoint.restore_params(config, workdir, stage="pretrain")
    model = model_lib.build_model(config.model)
    variables = {"params": encoder_params}
    batch_sharding = predictions.eval_batch_sharding(config)

    def embed(images, batch_index):
        del batch_index
        features = _embed(model, variables, jax.device_put(images, batch_sharding))
        return {"embedding": np.asarray(jax.device_get(features), np.float32)}

    splits = {
        split: predictions.collect_split(config, split, embed, keep_maps=False)
        for split in ("train", "validation", "test")
    }
    train = splits["train"]
    if np.unique(train["labels"]).size < 2:
        raise ValueError(
            "svm: the training split needs good and defective images (supervised protocol)"
        )
    scaler = StandardScaler().fit(train["embedding"])
    classifier = LinearSVC(C=1.0, class_weight="balanced", max_iter=20000)
    classifier.fit(scaler.transform(train["embedding"]), train["labels"])
    # The scaler and the SVM folded into one affine map, so inference is a single jitted call.
    weights = (classifier.coef_[0] / scaler.scale_).astype(np.float32)
    bias = np.float32(classifier.intercept_[0] - np.sum(weights * scaler.mean_))
    for split in ("validation", "test"):
        splits[split]["image_score"] = splits[split]["embedding"] @ weights + bias
    return {
        "image": _image_row(config, splits["validation"], splits["test"]),
        "detection": {"map50": math.nan, "map": math.nan},
        "images_per_sec": _throughput(
            config,
            lambda v, w, b, x: _svm_forward(model, v, w, b, x),
            variables,
            jnp.asarray(weights),
            jnp.asarray(bias),
        ),
        "notes": "no boxes: mAP n/a",
    }


def evaluate_full(config, workdir: str) -> dict:
    from m2u_jax import evaluate

    metrics = evaluate.evaluate(config, workdir)
    return {
        "image": metrics["image"],
        "pixel": metrics["pixel"],
        "detection": metrics["detection"],
        "images_per_sec": metrics["speed"]["images_per_sec"],
        "notes": f"full report in {os.path.join(workdir, 'eval', 'report.md')}",
    }


def run_table(config, workdir: str, methods=METHODS) -> list[dict]:
    """Trains and measures every method; returns a row per method with `method`, `name`,
    `accuracy`, `auroc`, `map50`, `images_per_sec`, `notes` and the paper's numbers."""
    from m2u_jax import evaluate, trainer

    base = supervised_config(config)
    context = evaluate.eval_context(base)
    rows = []
    for method in methods:
        run_config = method_config(base, method)
        run_dir = os.path.join(workdir, method)
        train_counts = context.info.counts["train"]
        if method == "svm" and not (train_counts["good"] and train_counts["defective"]):
            # e.g. NEU-DET: every image is defective, so there is no good/defective SVM to fit;
            # skipped before training rather than failing after it.
            print("baseline table: svm skipped (one image class in the training split)")
            result = {
                "image": {"accuracy": math.nan, "auroc": math.nan},
                "detection": {"map50": math.nan},
                "images_per_sec": math.nan,
                "notes": "skipped: the training split has "
                + ("no defect-free image" if train_counts["defective"] else "no defective image")
                + ", so no good/defective SVM can be fitted",
            }
            rows.append(_table_row(method, result))
            continue
        print(f"baseline table: {method} -> {run_dir}", flush=True)
        trainer.train(run_config, run_dir)
        if method == "full":
            result = evaluate_full(run_config, run_dir)
        elif method == "autoencoder":
            result = evaluate_autoencoder(run_config, run_dir)
        elif method == "detection":
            result = evaluate_detection(run_config, run_dir, context)
        else:
            result = evaluate_svm(run_config, run_dir)
        rows.append(_table_row(method, result))
    return rows


def _table_row(method: str, result: dict) -> dict:
    paper_name, paper_accuracy, paper_map, paper_fps = PAPER_TABLE[method]
    return {
        "method": method,
        "name": METHOD_NAMES[method],
        "accuracy": float(result["image"]["accuracy"]),
        "auroc": float(result["image"]["auroc"]),
        "map50": float(result["detection"]["map50"]),
        "images_per_sec": float(result["images_per_sec"]),
        "notes": result["notes"],
        "paper_method": paper_name,
        "paper_accuracy_percent": paper_accuracy,
        "paper_map50_percent": paper_map,
        "paper_fps_jetson_xavier_nx": paper_fps,
    }


def _percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f}"


def markdown_table(rows: list[dict], note: str = "") -> str:
    """Ours (accuracy %, mAP@0.5 %, images/s) beside the paper's reported numbers."""
    header = [
        "method (ours)",
        "accuracy %",
        "mAP@0.5 %",
        "images/s",
        "image AUROC",
        "paper's method",
        "paper: accuracy %",
        "paper: mAP@0.5 %",
        "paper: FPS (Jetson Xavier NX)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        auroc = "n/a" if not math.isfinite(row["auroc"]) else f"{row['auroc']:.4f}"
        cells = [
            row["name"],
            _percent(row["accuracy"]),
            _percent(row["map50"]),
            "n/a" if not math.isfinite(row["images_per_sec"]) else f"{row['images_per_sec']:.1f}",
            auroc,
            row["paper_method"],
            f"{row['paper_accuracy_percent']:.1f}",
            f"{row['paper_map50_percent']:.1f}",
            str(row["paper_fps_jetson_xavier_nx"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "The three `paper:` columns are the numbers the M2U-InspectNet paper reports in its "
        "Table 2 (its own data, an NVIDIA Jetson Xavier NX); they are printed for reference "
        "only and were not measured by this harness."
    )
    if note:
        lines += ["", note]
    notes = [f"- {row['name']}: {row['notes']}" for row in rows if row["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def table_note(config) -> str:
    """Where the numbers come from; warns when the test split has one image class (then the
    good/defective accuracy says nothing, e.g. NEU-DET where every image is defective)."""
    from m2u_jax.data import pipeline

    test_counts = pipeline.load_dataset_info(config).counts["test"]
    note = (
        f"Ours: {config.data.format} `{config.data.root}` (supervised protocol, seed "
        f"{config.seed}), test split; {config.train.pretrain_steps} pretraining + "
        f"{config.train.finetune_steps} fine-tuning steps (baselines without pretraining skip "
        f"it), batch {config.train.batch_size}; images/s on {jax.devices()[0].device_kind} "
        f"x{jax.device_count()} at batch {config.eval.batch_size}. Accuracy at the "
        "F1-optimal threshold of each method's validation scores."
    )
    if not (test_counts["good"] and test_counts["defective"]):
        note += (
            f" Caution: the test split has {test_counts['good']} defect-free and "
            f"{test_counts['defective']} defective images, so the good/defective accuracy is "
            "degenerate (AUROC undefined); mAP@0.5 is the meaningful column here."
        )
    return note


def write_outputs(workdir: str, rows: list[dict], note: str = "") -> dict[str, str]:
    from m2u_jax import report

    os.makedirs(workdir, exist_ok=True)
    paths = {
        "markdown": os.path.join(workdir, "baselines.md"),
        "json": os.path.join(workdir, "baselines.json"),
    }
    report.write_json(paths["json"], {"rows": rows, "note": note})
    with open(paths["markdown"], "w", encoding="utf-8") as file:
        file.write("# Baselines (the paper's Table 2 in one harness)\n\n")
        file.write(markdown_table(rows, note))
    return paths


def main(argv) -> int:
    del argv
    from m2u_jax import config as config_lib

    config = _CONFIG.value
    workdir = _WORKDIR.value
    try:
        methods = parse_methods(_METHODS.value)
        config_lib.validate(with_supervised_protocol(config))
    except (ValueError, config_lib.ConfigError) as error:
        print(f"baseline_table.py: {error}", file=sys.stderr)
        return 2
    enable_compilation_cache(
        os.path.join(workdir, "jax_cache") if _CACHE_DIR.value is None else _CACHE_DIR.value
    )
    rows = run_table(config, workdir, methods)
    paths = write_outputs(workdir, rows, table_note(supervised_config(config)))
    print(markdown_table(rows))
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from m2u_jax import host_memory

    host_memory.keep_freed_memory()  # first, before JAX's threads start (as train.py)

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Table directory (one run per method).")
    _METHODS = flags.DEFINE_string("methods", ",".join(METHODS), "Methods to run.")
    _CACHE_DIR = flags.DEFINE_string(
        "compilation_cache_dir",
        None,
        "XLA compilation cache ('' = off; default WORKDIR/jax_cache).",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
