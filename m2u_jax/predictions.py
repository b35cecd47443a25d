"""Predictions of a split: the per-batch predict function of evaluation (deterministic forward
and MC-dropout statistics), streamed over a split into host arrays, and `predictions.npz`.

`collect_split(config, split, predict_batch)` returns per-image arrays over the valid images
(paths, labels, ground-truth boxes, scores, uncertainties, boxes and, for the test split, the
anomaly maps and masks); `evaluate` turns them into metrics.
"""

from __future__ import annotations

import heapq
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from m2u_jax import model as model_lib
from m2u_jax import sharding
from m2u_jax import uncertainty as uncertainty_lib

# Seconds between the progress lines of a split's prediction.
PROGRESS_SECONDS = 15.0
PER_IMAGE_KEYS = ("image_score", "score_mean", "score_var", "entropy", "mutual_info")
BOX_KEYS = ("boxes_xyxy", "box_scores", "box_classes", "box_valid")


def eval_batch_sharding(config: ml_collections.ConfigDict):
    """Sharding of an evaluation batch over the trainer's mesh (`sharding.config_mesh`); checks
    that `eval.batch_size` splits evenly."""
    mesh = sharding.config_mesh(config)
    batch = int(config.eval.batch_size)
    if batch % mesh.size:
        raise ValueError(
            f"eval.batch_size={batch} is not divisible by the {mesh.size} devices; "
            f"pick a multiple of {mesh.size}"
        )
    return sharding.batch_sharding(mesh)


def to_host(tree) -> dict:
    """Device arrays -> float32/int numpy (bf16 outputs become float32)."""

    def convert(leaf):
        array = np.asarray(jax.device_get(leaf))
        return array.astype(np.float32) if jnp.issubdtype(array.dtype, jnp.floating) else array

    return jax.tree.map(convert, tree)


def make_model_predict_fn(
    config: ml_collections.ConfigDict, model, variables, batch_sharding, ensemble=None
) -> Callable[[np.ndarray, int], dict]:
    """The per-batch prediction of `evaluate`: images `[B, H, W, C]` (host) and the batch
    index → host numpy dict with `image_score [B]`, `anomaly_map [B, H, W]`, the four box
    arrays of `model.predict` and the MC statistics `score_mean, score_var, entropy,
    mutual_info [B]` (dropout key: `fold_in(PRNGKey(seed), batch index)`). With `ensemble`
    (stacked member variables, `uncertainty.stack_members`) the statistics are the deep
    ensemble's instead of MC dropout's."""
    num_samples = int(config.eval.num_mc_samples)
    base_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5EED)

    def predict_batch(images: np.ndarray, batch_index: int) -> dict:
        images = jax.device_put(images, batch_sharding)
        predictions = model_lib.predict(model, variables, images)
        wanted = ("image_score", "image_prob", "anomaly_map", *BOX_KEYS)
        result = to_host({key: predictions[key] for key in wanted})
        if ensemble is not None:
            statistics = uncertainty_lib.ensemble_predict(model, ensemble, images)
            result.update(to_host({key: statistics[key] for key in PER_IMAGE_KEYS[1:]}))
        elif num_samples > 1:
            statistics = uncertainty_lib.mc_dropout_predict(
                model,
                variables,
                images,
                jax.random.fold_in(base_rng, batch_index),
                num_samples,
                chunk_size=int(config.eval.mc_chunk_size),
            )
            result.update(to_host({key: statistics[key] for key in PER_IMAGE_KEYS[1:]}))
        else:
            scores = result["image_score"]
            result["score_mean"] = scores
            result["score_var"] = np.zeros_like(scores)
            result["entropy"] = np.asarray(uncertainty_lib.binary_entropy(scores), np.float32)
            result["mutual_info"] = np.zeros_like(scores)
        return result

    return predict_batch


def without_classes(predict_batch):
    """Class-agnostic protocol: every predicted box becomes class 0 ('defect'); the class
    head's output carries no meaning when the data has one class or no labelled types."""

    def predict(images, batch_index):
        result = predict_batch(images, batch_index)
        result["box_classes"] = np.zeros_like(result["box_classes"])
        return result

    return predict


class TopK:
    """The k items with the largest keys seen in a stream (ties: the earlier item wins)."""

    def __init__(self, k: int):
        self.k = int(k)
        self._heap: list = []
        self._count = 0

    def offer(self, key: float, make_item: Callable[[], dict]) -> None:
        """Keeps `make_item()` when `key` is among the k largest; builds it only then."""
        if self.k <= 0 or not math.isfinite(key):
            return
        self._count += 1
        entry = (key, -self._count)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, (*entry, make_item()))
        elif entry > self._heap[0][:2]:
            heapq.heapreplace(self._heap, (*entry, make_item()))

    def items(self) -> list[dict]:
        """Kept items, largest key first."""
        return [item for *_, item in sorted(self._heap, key=lambda e: e[:2], reverse=True)]


def collect_split(
    config: ml_collections.ConfigDict,
    split: str,
    predict_batch: Callable[[np.ndarray, int], dict],
    *,
    keep_maps: bool,
    on_rows: Callable[[dict], None] | None = None,
    batches: Iterator[dict] | None = None,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Runs `predict_batch` over a split and gathers the per-image results on the host.

    Args:
      config: full config (`iterate_eval` reads data.* and eval.batch_size).
      split: 'validation' | 'test' | 'train'.
      predict_batch: `(images [B,H,W,C], batch index) -> dict` of host arrays with a leading
        batch axis (see `make_model_predict_fn`); extra keys are kept as they are.
      keep_maps: keep `anomaly_map [N, H, W]` and the ground-truth `masks [N, H, W]` (bool).
      on_rows: called per batch with the valid rows of the batch and its predictions (images
        included), e.g. to keep overlay candidates.
      batches: an iterator of eval batches to use instead of `pipeline.iterate_eval`.
      total: the split's image count, for the progress lines (logged every
        `PROGRESS_SECONDS` with images/s and the time left).
    Returns:
      dict of arrays over the N valid images: `paths`, `categories`, `defect_names` (str),
      `labels` (int32), `gt_boxes [N, G, 4]`, `gt_box_classes`, `gt_box_valid`, every key of
      the predictions except `anomaly_map` unless `keep_maps` (then also `masks`).
    """
    # tf.data only when the split is read here (callers may pass their own batches).
    from m2u_jax.data import pipeline

    if batches is None:
        batches = pipeline.iterate_eval(config, split)
    gathered: dict[str, list] = {}
    start = last_report = time.perf_counter()
    done = 0
    for batch_index, batch in enumerate(batches):
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            continue
        predictions = predict_batch(batch["images"], batch_index)
        done += int(valid.sum())
        now = time.perf_counter()
        if now - last_report >= PROGRESS_SECONDS:  # MC dropout on a CPU takes minutes
            last_report = now
            rate = done / (now - start)
            left = f", about {(total - done) / rate:.0f} s left" if total and rate else ""
            of = f" of {total}" if total else ""
            logging.info("%s: %d%s images, %.1f images/s%s", split, done, of, rate, left)
        rows = {
            "paths": batch["paths"][valid],
            "categories": batch["categories"][valid],
            "defect_names": batch["defect_names"][valid],
            "labels": batch["labels"][valid].astype(np.int32),
            "gt_boxes": batch["boxes"][valid],
            "gt_box_classes": batch["box_classes"][valid],
            "gt_box_valid": batch["box_valid"][valid],
        }
        rows.update({key: np.asarray(value)[valid] for key, value in predictions.items()})
        if on_rows is not None:
            on_rows({**rows, "images": batch["images"][valid], "masks": batch["masks"][valid]})
        if keep_maps:
            rows["masks"] = batch["masks"][valid] > 0.5
        else:
            rows.pop("anomaly_map", None)
        for key, value in rows.items():
            gathered.setdefault(key, []).append(value)
    if not gathered:
        raise ValueError(
            f"the {split} split of data.root={config.data.root!r} is empty "
            f"(format {config.data.format}, protocol {config.data.protocol})"
        )
    return {key: np.concatenate(values) for key, values in gathered.items()}


def save_predictions(out_dir: str, splits: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """`predictions.npz` (`<split>/<key>` per-image arrays) and `pixel_maps.npz` (test
    `anomaly_map`, `masks`)."""
    per_image = {}
    for split, arrays in splits.items():
        for key, value in arrays.items():
            if key in ("anomaly_map", "masks"):
                continue
            per_image[f"{split}/{key}"] = value
    np.savez(os.path.join(out_dir, "predictions.npz"), **per_image)
    test = splits["test"]
    if "anomaly_map" in test:
        np.savez(
            os.path.join(out_dir, "pixel_maps.npz"),
            anomaly_map=test["anomaly_map"].astype(np.float32),
            masks=test["masks"],
            paths=test["paths"],
        )


def single_row(rows: Mapping, index: int) -> dict:
    """Row `index` of a batch of rows, as copies (kept beyond the batch)."""
    return {key: np.asarray(value[index]).copy() for key, value in rows.items()}
