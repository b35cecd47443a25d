"""Predictions on a plant's images from a trained run or an exported model.

    predictor = Predictor.from_workdir("runs/parts")        # JAX, the run's newest checkpoint
    predictor = Predictor.from_onnx("runs/parts/model.onnx")  # ONNX Runtime, no JAX needed
    for p in predictor.predict(["a.png", "b.png"]):
        print(p.path, p.decision, p.image_score, p.boxes)

Both backends run the same inference function (`m2u_jax.export.graph`: normalisation, T fixed
MC-dropout masks, box post-processing) and apply the same calibrated thresholds
(`m2u_jax.review`), so they give the same decisions. By default every image is resized to the
model input, as in training and evaluation. `tiling='auto'` tiles images larger than the model
input instead: overlapping model-size tiles at native resolution, run as batches, anomaly maps
stitched with linear blending in the overlaps, boxes merged across tiles by NMS. Tile when the
model was trained at the images' native scale (e.g. `data.train_crop` crops of full-resolution
images); a model trained on downsized images sees another scale in native tiles. Results are
in the input image's pixels. This module imports no JAX: `from_workdir` loads it when called.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from m2u_jax import class_names as class_names_lib
from m2u_jax import review
from m2u_jax.data import decode, records
from m2u_jax.export.interface import OUTPUT_NAMES
from m2u_jax.modalities import MODALITY_CHANNELS, split_list

TILING_MODES = ("auto", "on", "off")
OVERLAY_MIN_SIDE = 256  # overlays of smaller images are enlarged to about this side
# Forward of a batch `[N, S, S, C]` float32 in [0, 1] → the seven arrays of
# `m2u_jax.export.interface.OUTPUT_NAMES`, as a dict.
Forward = Callable[[np.ndarray], dict]


@dataclasses.dataclass
class Prediction:
    """One image's result, in the input image's pixels.

    `decision` is 'accept' | 'reject' | 'review' (`m2u_jax.review`); `uncertainty` is the MC
    (or deep-ensemble) variance of the image score (0 with T = 1 and no ensemble);
    `anomaly_map` `[H, W]` float32 in [0, 1]; `boxes`: dicts with `box` (x0, y0, x1, y1),
    `score`, `class_id`, `class_name`; `tiles`: 1 for a resized image, else the number of
    tiles."""

    path: str | None
    image_score: float
    uncertainty: float
    decision: str
    anomaly_map: np.ndarray
    boxes: list[dict]
    tiles: int = 1

    def to_json(self) -> dict:
        """The JSON-able fields (no map): one line of `predict.py`'s JSONL."""
        return dict(
            path=self.path,
            image_score=self.image_score,
            uncertainty=self.uncertainty,
            decision=self.decision,
            anomaly_max=float(self.anomaly_map.max()),
            boxes=self.boxes,
            tiles=self.tiles,
        )


# ----------------------------------------------------------------------------- input


def read_image(path: str, modalities: Sequence[str]) -> tuple[np.ndarray, str]:
    """`(array [H, W, C], kind)` at the file's resolution, as `m2u_jax.data.decode` reads it:
    kind 'uint8' / 'uint16' raw integers, 'float' float32 in [0, 1]. Image files for
    one-modality models; one `.npy` `[H, W, C]` per sample for stacked modalities (uint8 /
    uint16, or floats that must be finite and in [0, 1]). Raises DataError naming the file."""
    channels = sum(MODALITY_CHANNELS[name] for name in modalities)
    if not path.lower().endswith(".npy"):
        if len(modalities) != 1:
            raise records.DataError(
                f"{path}: the model stacks {'+'.join(modalities)}; give one .npy "
                f"[h, w, {channels}] per sample instead of an image file"
            )
        return decode.read_modality(path, modalities[0])
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise records.DataError(f"{path}: not a readable .npy array ({error})") from None
    array = array[..., None] if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[-1] != channels:
        raise records.DataError(
            f"{path}: array of shape {array.shape}; the model needs [h, w, {channels}] "
            f"({'+'.join(modalities)})"
        )
    if array.dtype in (np.uint8, np.uint16):
        return array, str(array.dtype)
    return as_model_values(array, path), "float"


def as_model_values(array, name: str = "array") -> np.ndarray:
    """A float `[H, W, C]` input checked to be finite and in [0, 1] (DataError naming it)."""
    array = np.asarray(array, np.float32)
    if array.ndim != 3:
        raise records.DataError(f"{name}: shape {array.shape}; expected [h, w, channels]")
    if not np.isfinite(array).all():
        raise records.DataError(f"{name}: the array holds NaN or Inf values")
    if array.min() < 0.0 or array.max() > 1.0:
        raise records.DataError(
            f"{name}: float values in [{array.min():g}, {array.max():g}]; expected [0, 1] "
            "(divide 8-bit data by 255)"
        )
    return array


def to_float(array: np.ndarray, kind: str) -> np.ndarray:
    """A `read_image` result as float32 in [0, 1] at its own resolution."""
    scale = {"uint8": 1 / 255.0, "uint16": 1 / 65535.0, "float": 1.0}[kind]
    return array.astype(np.float32) * np.float32(scale)


def resize(array: np.ndarray, kind: str, size: int, nearest: bool = False) -> np.ndarray:
    """A `read_image` result resized to the model input `[size, size, C]` float32 exactly as
    the evaluation pipeline does (`decode.resize_to_uint16`)."""
    return decode.resize_to_uint16(array, kind, size, nearest=nearest).astype(np.float32) / 65535.0


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    if values.shape == (height, width):
        return values.astype(np.float32)
    image = Image.fromarray(values.astype(np.float32), "F").resize((width, height), Image.BILINEAR)
    return np.asarray(image, np.float32)


# ----------------------------------------------------------------------------- tiling


TILE_OVERLAP = 0.25  # default fraction of a tile shared with each neighbour


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length` with at least `overlap`
    (fraction of a tile) shared by neighbours; the last tile ends at `length`."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = int(np.ceil((length - tile) / stride)) + 1
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def blend_window(tile: int, overlap: float) -> np.ndarray:
    """`[tile, tile]` weights: 1 in the middle, falling linearly to a small positive value
    over the overlap width at each edge, so overlapping tiles cross-fade."""
    ramp_width = max(1, int(tile * overlap))
    position = np.minimum(np.arange(tile), np.arange(tile)[::-1]) + 0.5
    ramp = np.clip(position / ramp_width, 1e-3, 1.0)
    return np.outer(ramp, ramp).astype(np.float32)


def stitch(maps: Sequence[np.ndarray], origins: Sequence[tuple[int, int]], height: int, width: int,
           overlap: float) -> np.ndarray:  # fmt: skip
    """The `[height, width]` map from per-tile maps `[S, S]` at `origins` (y, x): a weighted
    mean with `blend_window` weights, so seams do not show."""
    tile = maps[0].shape[0]
    window = blend_window(tile, overlap)
    total = np.zeros((height, width), np.float64)
    weight = np.zeros((height, width), np.float64)
    for values, (top, left) in zip(maps, origins, strict=True):
        total[top : top + tile, left : left + tile] += values * window
        weight[top : top + tile, left : left + tile] += window
    return (total / np.maximum(weight, 1e-12)).astype(np.float32)


def merge_boxes(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float
) -> list[int]:
    """Indices kept by class-wise NMS (highest score first) over boxes `[K, 4]` from all tiles:
    a defect seen by two overlapping tiles is reported once."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for index in order:
        box = boxes[index]
        duplicate = False
        for other in kept:
            if classes[other] != classes[index]:
                continue
            x0, y0 = np.maximum(box[:2], boxes[other][:2])
            x1, y1 = np.minimum(box[2:], boxes[other][2:])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            union = np.prod(box[2:] - box[:2]) + np.prod(boxes[other][2:] - boxes[other][:2])
            if inter > iou * max(union - inter, 1e-9):
                duplicate = True
                break
        if not duplicate:
            kept.append(int(index))
    return kept


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """Runs a model on images and decides accept / reject / review (module docstring).

    Build with `from_workdir` or `from_onnx`; the constructor takes any `forward` (a batch of
    model-size images → the arrays of `m2u_jax.export.interface.OUTPUT_NAMES`)."""

    def __init__(
        self,
        forward: Forward,
        *,
        image_size: int,
        modalities: Sequence[str],
        thresholds: dict,
        class_names: Sequence[str],
        box_iou_threshold: float = 0.5,
        source: str = "",
    ):
        for key in ("score_threshold", "uncertainty_threshold"):
            if key not in thresholds:
                raise ValueError(f"{source}: thresholds lack {key!r}")
        self.forward = forward
        self.image_size = int(image_size)
        self.modalities = tuple(modalities)
        self.thresholds = dict(thresholds)
        self.class_names = tuple(class_names)
        self.box_iou_threshold = float(box_iou_threshold)
        self.source = source

    @classmethod
    def from_workdir(
        cls, workdir: str, step: int | str | None = None, *, thresholds: str | dict | None = None
    ) -> Predictor:
        """The run in WORKDIR (its config.json, newest fine-tuned checkpoint or `step`, and the
        thresholds and class names evaluation calibrated, DIR/eval/thresholds.json), on JAX with
        the T MC-dropout samples the thresholds were calibrated at, or the deep ensemble of the
        run's `eval.ensemble_workdirs`."""
        # JAX only for this backend: the ONNX predictor must import without it.
        from m2u_jax import config as config_lib
        from m2u_jax import run_checkpoint

        config = config_lib.load_run_config(workdir)
        calibrated = load_thresholds(
            thresholds
            if thresholds is not None
            else os.path.join(workdir, "eval", "thresholds.json")
        )
        params, step = run_checkpoint.restore_params(config, workdir, step)
        return cls.from_params(
            config,
            params,
            thresholds=calibrated,
            members=run_checkpoint.restore_members(config),
            source=f"{workdir} step {step}",
        )

    @classmethod
    def from_params(
        cls,
        config,
        params,
        *,
        thresholds: dict,
        members: Sequence = (),
        source: str = "params in memory",
    ) -> Predictor:
        """The model of `config` with `params` (a checkpoint's params tree) on JAX, running the
        exported inference function with the `thresholds` dict's `num_mc_samples` (default 1)
        MC-dropout samples, or the deep ensemble of `members` (params trees) when given."""
        from m2u_jax.export import graph

        members = [graph.prepare_params(member) for member in members]
        model, params = graph.build_export_model(config.model, params)
        samples = 1 if members else int(thresholds.get("num_mc_samples", 1))
        forward = _jax_forward(
            graph.make_inference_fn(model, params, num_mc_samples=samples, members=members)
        )
        return cls(
            forward,
            image_size=int(config.data.image_size),
            modalities=split_list(config.data.modalities),
            thresholds=thresholds,
            class_names=_class_names(thresholds, int(config.model.num_defect_classes)),
            box_iou_threshold=float(config.model.det_iou_threshold),
            source=source,
        )

    @classmethod
    def from_onnx(
        cls, path: str, *, thresholds: str | dict | None = None, providers=None
    ) -> Predictor:
        """An exported model (tools/convert_to_onnx/convert.py) on ONNX Runtime, with the
        thresholds and class names stored in its metadata (or `thresholds`, a thresholds.json
        path or dict). A model without them is an error."""
        from m2u_jax.export import onnx_runner  # onnxruntime only for this backend

        session = onnx_runner.make_session(path, providers)
        info = onnx_runner.model_info(session, path)
        if thresholds is not None:
            calibrated = load_thresholds(thresholds)
        elif info["thresholds"] is not None:
            calibrated = info["thresholds"]
        else:
            raise ValueError(
                f"{path} carries no calibrated thresholds (m2u.score_threshold): export it from "
                "an evaluated run, or pass thresholds=DIR/eval/thresholds.json"
            )
        names = info["class_names"]
        output_names = [output.name for output in session.get_outputs()]

        fixed = info["batch"]  # an int for a static-batch export, None for a dynamic one

        def run(images: np.ndarray) -> list[np.ndarray]:
            return session.run(None, {info["input_name"]: images})

        def forward(images: np.ndarray) -> dict:
            images = images.astype(np.float32)
            if fixed is None:
                return dict(zip(output_names, run(images), strict=True))
            # A static batch: chunks of exactly `fixed` images, the last padded with copies of
            # its last image and the padding's outputs dropped.
            parts = []
            for start in range(0, len(images), fixed):
                chunk = images[start : start + fixed]
                padding = fixed - len(chunk)
                if padding:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], padding, axis=0)])
                parts.append([value[: fixed - padding] for value in run(chunk)])
            return {
                name: np.concatenate([part[index] for part in parts])
                for index, name in enumerate(output_names)
            }

        return cls(
            forward,
            image_size=info["image_size"],
            modalities=info["modalities"],
            thresholds=calibrated,
            class_names=names,
            source=path,
        )

    # ------------------------------------------------------------------------- predict

    def predict(
        self,
        inputs: Iterable[str | np.ndarray],
        *,
        batch_size: int = 8,
        tiling: str = "off",
        overlap: float = TILE_OVERLAP,
    ) -> list[Prediction]:
        """Predictions for image paths or `[H, W, C]` float arrays in [0, 1] (module
        docstring). `tiling`: 'off' resizes every image, 'auto' tiles images larger than the
        model input, 'on' tiles all; `overlap`: fraction of a tile shared by neighbours."""
        return list(
            self.iter_predict(inputs, batch_size=batch_size, tiling=tiling, overlap=overlap)
        )

    def iter_predict(
        self, inputs, *, batch_size: int = 8, tiling: str = "off", overlap: float = TILE_OVERLAP
    ) -> Iterator[Prediction]:
        """`predict`, one image at a time (for progress bars over long folders)."""
        if tiling not in TILING_MODES:
            raise ValueError(f"tiling={tiling!r} is not one of {TILING_MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap={overlap} must be in [0, 1)")
        for item in inputs:
            path = str(item) if isinstance(item, (str, os.PathLike)) else None
            if path:
                array, kind = read_image(path, self.modalities)
            else:
                array, kind = as_model_values(item), "float"
            yield self._predict_one(array, kind, path, batch_size, tiling, overlap)

    def _predict_one(self, array, kind, path, batch_size, tiling, overlap) -> Prediction:
        height, width = array.shape[:2]
        size = self.image_size
        tiled = tiling == "on" or (tiling == "auto" and max(height, width) > size)
        if tiled:
            image = to_float(array, kind)
            if min(height, width) < size:  # pad to one tile where a side is shorter
                padded = np.zeros((max(height, size), max(width, size), image.shape[2]), np.float32)
                padded[:height, :width] = image
                image = padded
            origins = [
                (top, left)
                for top in tile_origins(image.shape[0], size, overlap)
                for left in tile_origins(image.shape[1], size, overlap)
            ]
            crops = np.stack([image[t : t + size, x : x + size] for t, x in origins])
        else:
            origins = [(0, 0)]
            crops = resize(array, kind, size, nearest=self.modalities == ("depth",))[None]
        outputs = self._run(crops, batch_size)
        if tiled:
            anomaly_map = stitch(list(outputs["anomaly_map"]), origins, *image.shape[:2], overlap)
            anomaly_map = anomaly_map[:height, :width]
            scale_x = scale_y = 1.0
        else:
            anomaly_map = _resize_map(outputs["anomaly_map"][0], height, width)
            scale_x, scale_y = width / size, height / size
        # The image is as defective as its most defective tile.
        worst = int(np.argmax(outputs["image_score"]))
        score = float(outputs["image_score"][worst])
        spread = float(outputs["uncertainty"][worst])
        decision = review.DECISION_NAMES[
            int(review.review_policy([score], [spread], self.thresholds)[0])
        ]
        return Prediction(
            path=path,
            image_score=score,
            uncertainty=spread,
            decision=decision,
            anomaly_map=np.clip(anomaly_map, 0.0, 1.0),
            boxes=self._boxes(outputs, origins, scale_x, scale_y, width, height),
            tiles=len(origins) if tiled else 1,
        )

    def _run(self, crops: np.ndarray, batch_size: int) -> dict:
        parts = [self.forward(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
        return {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}

    def _boxes(self, outputs, origins, scale_x, scale_y, width, height) -> list[dict]:
        found_boxes, found_scores, found_classes = [], [], []
        for index, (top, left) in enumerate(origins):
            count = int(outputs["num_boxes"][index])
            for k in range(count):
                x0, y0, x1, y1 = outputs["boxes"][index, k]
                found_boxes.append([x0 * scale_x + left, y0 * scale_y + top,
                                    x1 * scale_x + left, y1 * scale_y + top])  # fmt: skip
                found_scores.append(float(outputs["box_scores"][index, k]))
                found_classes.append(int(outputs["box_classes"][index, k]))
        if not found_boxes:
            return []
        found = np.clip(np.asarray(found_boxes, np.float32), 0, [width, height, width, height])
        scores, classes = np.asarray(found_scores), np.asarray(found_classes)
        keep = merge_boxes(found, scores, classes, self.box_iou_threshold)
        return [
            dict(
                box=[round(float(v), 2) for v in found[i]],
                score=float(scores[i]),
                class_id=int(classes[i]),
                class_name=class_names_lib.class_name(int(classes[i]), self.class_names),
            )
            for i in keep
        ]


def overlay(
    image: np.ndarray,
    prediction: Prediction,
    map_threshold: float = 0.5,
    min_side: int = OVERLAY_MIN_SIDE,
) -> Image.Image:
    """An RGB picture of `image` (`[H, W, C]` in [0, 1]) with the anomaly map's contour above
    `map_threshold` in red, the boxes in yellow with class and score, and the decision. Small
    images are enlarged by an integer factor (nearest) to at least `min_side` pixels, so the
    labels stay readable."""
    base = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)
    rgb = (np.clip(base, 0, 1) * 255).astype(np.uint8)
    inside = prediction.anomaly_map >= map_threshold
    scale = max(1, -(-min_side // max(rgb.shape[:2])))
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
        inside = np.repeat(np.repeat(inside, scale, axis=0), scale, axis=1)
    rgb = rgb.copy()
    edge = inside & ~(
        np.roll(inside, 1, 0)
        & np.roll(inside, -1, 0)
        & np.roll(inside, 1, 1)
        & np.roll(inside, -1, 1)
    )
    rgb[edge] = (255, 0, 0)
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    for box in prediction.boxes:
        x0, y0, x1, y1 = (value * scale for value in box["box"])
        draw.rectangle((x0, y0, x1, y1), outline=(255, 220, 0), width=2)
        draw.text((x0 + 2, y0 + 1), f"{box['class_name']} {box['score']:.2f}", fill=(255, 220, 0))
    colour = {"accept": (0, 200, 0), "reject": (255, 0, 0), "review": (255, 160, 0)}
    draw.text((4, 4), f"{prediction.decision} {prediction.image_score:.3f}",
              fill=colour[prediction.decision])  # fmt: skip
    return picture


# ----------------------------------------------------------------------------- helpers


def load_thresholds(source: str | dict) -> dict:
    """Thresholds from evaluation's thresholds.json (a path) or a dict; FileNotFoundError with
    the fix when the file is missing."""
    if isinstance(source, dict):
        return dict(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"{source} does not exist: evaluate the run first (python eval.py --workdir DIR), "
            "which calibrates the decision thresholds"
        )
    with open(source, encoding="utf-8") as file:
        return json.load(file)


def _class_names(thresholds: dict, num_classes: int) -> tuple[str, ...]:
    names = thresholds.get("class_names")
    return tuple(names) if names else tuple(class_names_lib.default_class_names(num_classes))


def _jax_forward(inference) -> Forward:
    import jax

    jitted = jax.jit(inference)

    def forward(images: np.ndarray) -> dict:
        values = jax.device_get(jitted(images.astype(np.float32)))
        return dict(zip(OUTPUT_NAMES, values, strict=True))

    return forward
