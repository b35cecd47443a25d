"""ONNX Runtime inference on an exported model, without JAX (numpy, onnxruntime, onnx, PIL).

`run(model_path, image_inputs, out_path, thresholds=...)` predicts every image file (or `.npy`
stack of modalities) and writes one JSON line per image: `path`, `image_score`, `uncertainty`,
`decision` (accept / reject / review), `anomaly_max`, `boxes` in the original image's pixels,
`num_boxes`. Building blocks: `make_session` (TensorRT → CUDA → CPU providers, FP16 engine
cache beside the model), `model_info` (geometry and `m2u.*` metadata), `load_image` (the
evaluation pipeline's decoding and resize), `load_thresholds` (eval.py's thresholds.json) and
`review_decisions` (`m2u_jax.review`'s policy, the one evaluation uses).
`onnx_images_per_sec` is the benchmark tool's entry. Details: tools/convert_to_onnx/README.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from m2u_jax import review
from m2u_jax.data import decode, records

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_NAMES = {
    "tensorrt": PROVIDER_ORDER[0],
    "cuda": PROVIDER_ORDER[1],
    "cpu": PROVIDER_ORDER[2],
}
# Without --thresholds: score 0.5 (the image score is probability-like, in [0, 1]) and
# uncertainty 0.01 (a standard deviation of 0.1 between MC samples; a T = 1 export never asks
# for review).
DEFAULT_THRESHOLDS = {"score_threshold": 0.5, "uncertainty_threshold": 0.01}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_BATCH = 8


# ----------------------------------------------------------------------------- session


def select_providers(wanted: list[str] | None = None) -> list[str]:
    """The available providers among `wanted` (short names 'tensorrt' / 'cuda' / 'cpu', default
    all) in TensorRT → CUDA → CPU order. Raises ValueError when none is available."""
    available = set(ort.get_available_providers())
    names = [PROVIDER_NAMES[name] for name in (wanted or PROVIDER_NAMES)]
    chosen = [name for name in PROVIDER_ORDER if name in names and name in available]
    if not chosen:
        raise ValueError(f"none of {names} is available in this onnxruntime ({sorted(available)})")
    return chosen


def make_session(model_path: str, providers: list[str] | None = None):
    """InferenceSession on `providers` (full names, default `select_providers()`); the TensorRT
    provider gets FP16 and an engine cache beside the model. Raises FileNotFoundError or
    ValueError (not a valid ONNX model)."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"ONNX model {model_path} does not exist")
    # Check the file before handing it to a runtime: a truncated or foreign file then fails with
    # one line naming it instead of a protobuf traceback from deep inside onnxruntime.
    try:
        onnx.checker.check_model(model_path)
    except Exception as error:  # onnx raises several unrelated types for bad files.
        raise ValueError(f"{model_path}: not a valid ONNX model ({error})") from error
    providers = providers or select_providers()
    configured = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            cache = model_path + ".trt_cache"
            os.makedirs(cache, exist_ok=True)
            configured.append(
                (
                    name,
                    {
                        "trt_fp16_enable": True,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": cache,
                    },
                )
            )
        else:
            configured.append(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_path, options, providers=configured)


def model_info(session) -> dict:
    """Input geometry and export settings: `batch` (int, or None when dynamic), `image_size`,
    `channels`, `modalities` (tuple), `mc_samples` (from the `m2u.*` metadata when present)."""
    image_input = session.get_inputs()[0]
    batch, height, width, channels = image_input.shape
    if height != width or not all(isinstance(size, int) for size in (height, width, channels)):
        raise ValueError(
            f"model input {image_input.name} has shape {image_input.shape}; "
            "expected [N, S, S, C] with static S and C"
        )
    metadata = session.get_modelmeta().custom_metadata_map
    modalities = tuple(
        name.strip() for name in metadata.get("m2u.modalities", "rgb").split(",") if name.strip()
    )
    return dict(
        input_name=image_input.name,
        batch=batch if isinstance(batch, int) else None,
        image_size=int(height),
        channels=int(channels),
        modalities=modalities,
        mc_samples=int(metadata.get("m2u.mc_samples", 1)),
    )


# ----------------------------------------------------------------------------- images


def list_images(inputs: list[str]) -> list[str]:
    """Files given directly, plus image / .npy files under given directories (sorted)."""
    paths = []
    for entry in inputs:
        path = pathlib.Path(entry)
        if path.is_dir():
            found = sorted(
                str(child)
                for child in path.rglob("*")
                if child.suffix.lower() in (*IMAGE_EXTENSIONS, ".npy") and child.is_file()
            )
            if not found:
                raise FileNotFoundError(f"{entry}: no image or .npy files inside")
            paths.extend(found)
        elif path.is_file():
            paths.append(str(path))
        else:
            raise FileNotFoundError(f"{entry}: no such file or directory")
    return paths


def load_image(path: str, modalities: tuple[str, ...], image_size: int) -> tuple[np.ndarray, tuple]:
    """(`[S, S, C]` float32 in [0, 1], original (height, width)). An image file (png, jpg, bmp,
    tif) of a single-modality model is read and resized like the evaluation pipeline
    (`m2u_jax.data.decode`); a multi-modality model takes one `.npy` `[h, w, C]` per sample
    (float in [0, 1]; uint8 / uint16 are scaled), channels in `modalities` order."""
    channels = sum(1 if name != "rgb" else 3 for name in modalities)
    if path.lower().endswith(".npy"):
        array = np.load(path, allow_pickle=False)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] != channels:
            raise ValueError(
                f"{path}: array of shape {array.shape}; the model needs [h, w, {channels}] "
                f"({'+'.join(modalities)})"
            )
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535.0
        array = array.astype(np.float32)
        original = array.shape[:2]
        if original != (image_size, image_size):
            planes = [
                np.asarray(
                    Image.fromarray(array[..., c], "F").resize(
                        (image_size, image_size), Image.BILINEAR
                    )
                )
                for c in range(channels)
            ]
            array = np.stack(planes, axis=-1)
        return np.clip(array, 0.0, 1.0).astype(np.float32), original
    if len(modalities) != 1:
        raise ValueError(
            f"{path}: the model stacks {'+'.join(modalities)}; give one .npy [h, w, {channels}] "
            "per sample instead of an image file"
        )
    modality = modalities[0]
    try:
        array, kind = decode.read_modality(path, modality)
    except records.DataError as error:
        raise ValueError(str(error)) from None
    original = array.shape[:2]
    resized = decode.resize_to_uint16(array, kind, image_size, nearest=modality == "depth")
    return resized.astype(np.float32) / 65535.0, original


# ----------------------------------------------------------------------------- decisions


def load_thresholds(path: str | None) -> dict[str, float]:
    """Review thresholds from eval.py's thresholds.json (`score_threshold`,
    `uncertainty_threshold`, also under `review_thresholds`; an `uncertainty_measure` must be
    `score_var`, what the graph outputs), or `DEFAULT_THRESHOLDS` when `path` is empty."""
    if not path:
        return dict(DEFAULT_THRESHOLDS)
    with open(path) as file:
        data = json.load(file)
    for key in ("review_thresholds", "thresholds"):
        if isinstance(data.get(key), dict):
            data = {**data, **data[key]}
    measure = data.get("uncertainty", data.get("uncertainty_measure", "score_var"))
    if measure != "score_var":
        raise ValueError(
            f"{path}: thresholds were calibrated on uncertainty {measure!r}, but the exported "
            "graph outputs score_var (MC variance of the image score)"
        )
    try:
        thresholds = {key: float(data[key]) for key in ("score_threshold", "uncertainty_threshold")}
    except KeyError as error:
        raise ValueError(
            f"{path}: missing {error.args[0]!r} (need score_threshold and uncertainty_threshold)"
        ) from None
    if "num_mc_samples" in data:  # eval.py writes it; `run` compares it with the model's T
        thresholds["num_mc_samples"] = int(data["num_mc_samples"])
    return thresholds


def review_decisions(scores, uncertainty, thresholds: dict[str, float]) -> np.ndarray:
    """Per-image decision indices into `DECISION_NAMES`: `m2u_jax.review.review_policy`."""
    return review.review_policy(scores, uncertainty, thresholds)


# ----------------------------------------------------------------------------- inference


def _batches(paths: list[str], batch_size: int):
    for start in range(0, len(paths), batch_size):
        yield paths[start : start + batch_size]


def run(
    model_path: str,
    image_inputs: list[str],
    out_path: str,
    *,
    thresholds: dict[str, float] | None = None,
    batch_size: int | None = None,
    providers: list[str] | None = None,
    maps_dir: str | None = None,
) -> dict:
    """Predicts every image and writes `out_path` (JSONL, module docstring). Returns a summary:
    `images`, `provider`, `model_images_per_sec`, `end_to_end_images_per_sec`, `decisions`."""
    session = make_session(model_path, providers)
    info = model_info(session)
    paths = list_images(image_inputs)
    thresholds = dict(thresholds or DEFAULT_THRESHOLDS)
    calibrated_samples = thresholds.get("num_mc_samples", info["mc_samples"])
    if calibrated_samples != info["mc_samples"]:
        print(
            f"infer_onnx: thresholds were calibrated with {calibrated_samples} MC samples, the "
            f"model was exported with T={info['mc_samples']}"
            + (
                "; it reports zero uncertainty, so nothing goes to review"
                if info["mc_samples"] == 1
                else ""
            ),
            file=sys.stderr,
        )
    if info["batch"] is not None:
        if batch_size not in (None, info["batch"]):
            print(
                f"infer_onnx: the model has a static batch of {info['batch']}; using it",
                file=sys.stderr,
            )
        batch_size = info["batch"]
    batch_size = int(batch_size or DEFAULT_BATCH)
    if maps_dir:
        os.makedirs(maps_dir, exist_ok=True)
    output_names = [output.name for output in session.get_outputs()]
    counts = dict.fromkeys(review.DECISION_NAMES, 0)
    model_seconds = 0.0
    start = time.perf_counter()
    pathlib.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out:
        for chunk in _batches(paths, batch_size):
            loaded = [load_image(path, info["modalities"], info["image_size"]) for path in chunk]
            images = np.stack([image for image, _ in loaded])
            if info["batch"] is not None and len(chunk) < info["batch"]:  # pad a static batch
                padding = np.zeros((info["batch"] - len(chunk), *images.shape[1:]), np.float32)
                images = np.concatenate([images, padding])
            run_start = time.perf_counter()
            values = dict(
                zip(output_names, session.run(output_names, {info["input_name"]: images}))
            )
            model_seconds += time.perf_counter() - run_start
            count = len(chunk)
            decisions = review_decisions(
                values["image_score"][:count], values["uncertainty"][:count], thresholds
            )
            for index, (path, (_, original)) in enumerate(zip(chunk, loaded)):
                scale = (
                    np.array([original[1], original[0], original[1], original[0]], np.float64)
                    / info["image_size"]
                )
                num_boxes = int(values["num_boxes"][index])
                boxes = [
                    dict(
                        box=[round(float(v), 2) for v in values["boxes"][index, k] * scale],
                        score=float(values["box_scores"][index, k]),
                        **{"class": int(values["box_classes"][index, k])},
                    )
                    for k in range(num_boxes)
                ]
                decision = review.DECISION_NAMES[int(decisions[index])]
                counts[decision] += 1
                record = dict(
                    path=path,
                    image_score=float(values["image_score"][index]),
                    uncertainty=float(values["uncertainty"][index]),
                    decision=decision,
                    anomaly_max=float(values["anomaly_map"][index].max()),
                    num_boxes=num_boxes,
                    boxes=boxes,
                )
                out.write(json.dumps(record) + "\n")
                if maps_dir:
                    heat = np.clip(values["anomaly_map"][index] * 255.0 + 0.5, 0, 255)
                    name = pathlib.Path(path).stem + "_anomaly.png"
                    Image.fromarray(heat.astype(np.uint8)).save(os.path.join(maps_dir, name))
    total = time.perf_counter() - start
    return dict(
        images=len(paths),
        provider=session.get_providers()[0],
        batch_size=batch_size,
        thresholds=thresholds,
        decisions=counts,
        model_images_per_sec=len(paths) / max(model_seconds, 1e-9),
        end_to_end_images_per_sec=len(paths) / max(total, 1e-9),
    )


def onnx_images_per_sec(
    onnx_path: str,
    batch: int,
    image_size: int,
    channels: int,
    repeats: int,
    providers: list[str] | None = None,
) -> float:
    """Steady-state ONNX Runtime throughput (images/s) of `session.run` on random
    `[batch, image_size, image_size, channels]` images: two warm-up runs, then `repeats` timed
    runs. Providers default to `select_providers()` (TensorRT → CUDA → CPU). Raises ValueError
    when the model's static input shape differs from the requested one."""
    session = make_session(onnx_path, providers)
    info = model_info(session)
    if info["batch"] not in (None, batch):
        raise ValueError(f"{onnx_path} has a static batch of {info['batch']}, not {batch}")
    if (info["image_size"], info["channels"]) != (image_size, channels):
        raise ValueError(
            f"{onnx_path} takes {info['image_size']}x{info['image_size']}x{info['channels']} "
            f"images, not {image_size}x{image_size}x{channels}"
        )
    images = np.random.default_rng(0).random((batch, image_size, image_size, channels), np.float32)
    feed = {info["input_name"]: images}
    for _ in range(2):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    return batch * repeats / (time.perf_counter() - start)
