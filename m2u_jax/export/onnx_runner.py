"""ONNX Runtime inference on an exported model, without JAX (numpy, onnxruntime, onnx, PIL).

`run(model_path, image_inputs, out_path)` predicts every image file (or `.npy` stack of
modalities) and writes one JSON line per image: `path`, `image_score`, `uncertainty`,
`decision` (accept / reject / review), `anomaly_max`, `boxes` in the original image's pixels
(with the class index and name), `num_boxes`. The decision thresholds are the calibrated ones
the exporter stored in the model's `m2u.*` metadata (`model_info`); `thresholds=` (eval.py's
thresholds.json, `load_thresholds`) overrides them, and a model without any is refused unless
`uncalibrated=True` (`DEFAULT_THRESHOLDS`, with a warning). The output file is replaced
atomically (a run that fails midway leaves the old file and PATH.partial). Building blocks:
`make_session` (TensorRT → CUDA → CPU providers, FP16 engine cache beside the model),
`model_info` (geometry, thresholds, class names, normalisation), `load_image` (the evaluation
pipeline's decoding and resize), `resolve_thresholds` and `review_decisions`
(`m2u_jax.review`'s policy, the one evaluation uses). `onnx_images_per_sec` is the benchmark
tool's entry. Details: tools/convert_to_onnx/README.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

from m2u_jax import review
from m2u_jax.class_names import class_name, default_class_names
from m2u_jax.data import decode, records
from m2u_jax.export.interface import OUTPUT_NAMES

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_NAMES = {
    "tensorrt": PROVIDER_ORDER[0],
    "cuda": PROVIDER_ORDER[1],
    "cpu": PROVIDER_ORDER[2],
}
# Only with `uncalibrated=True` (infer_onnx.py --uncalibrated): score 0.5 (the image score is
# probability-like, in [0, 1]) and uncertainty 0.01 (a standard deviation of 0.1 between MC
# samples; a T = 1 export never asks for review). Real decisions need calibrated thresholds.
DEFAULT_THRESHOLDS = {"score_threshold": 0.5, "uncertainty_threshold": 0.01}
# The uncertainty the exported graph outputs: the MC variance of the image score.
UNCERTAINTY_MEASURE = "score_var"
# Tolerance of the [0, 1] range check of float `.npy` inputs (float rounding of scaled data).
RANGE_TOLERANCE = 1e-6
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
        import onnx  # optional: a deployment with onnxruntime alone skips the checker
    except ImportError:
        onnx = None
    if onnx is not None:
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


def model_info(session, model_path: str = "the model") -> dict:
    """Input geometry and export settings from the input shape and the `m2u.*` metadata:
    `batch` (int, or None when dynamic), `image_size`, `channels`, `modalities` (tuple),
    `mc_samples` (T of the graph), `thresholds` (the calibrated `score_threshold`,
    `uncertainty_threshold` and `num_mc_samples` they were calibrated at, or None when the
    export carries none), `threshold_rule` and `checkpoint_step` of that calibration (or None),
    `class_names` (list, index order; `default_class_names` for exports that predate them) and
    `normalization` (dict: what the graph does to its [0, 1] input; None for older exports).
    Raises ValueError (naming `model_path`) for malformed metadata, or for a model of another
    graph (without the outputs of `OUTPUT_NAMES`)."""
    outputs = [output.name for output in session.get_outputs()]
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ValueError(
            f"{model_path}: not a model exported by convert.py: it lacks the output(s) "
            f"{', '.join(missing)} (it has {', '.join(outputs) or 'none'})"
        )
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
    try:
        class_names = _json_metadata(metadata, "class_names")
        if class_names is None:
            class_names = default_class_names(int(metadata.get("m2u.num_defect_classes", 0)))
        elif not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
            raise ValueError(f"m2u.class_names is not a JSON list of names: {class_names!r}")
        thresholds = thresholds_from_metadata(metadata)
        step = metadata.get("m2u.checkpoint_step")
        return dict(
            input_name=image_input.name,
            batch=batch if isinstance(batch, int) else None,
            image_size=int(height),
            channels=int(channels),
            modalities=modalities,
            mc_samples=int(metadata.get("m2u.mc_samples", 1)),
            thresholds=thresholds,
            threshold_rule=metadata.get("m2u.threshold_rule"),
            checkpoint_step=None if step is None else int(step),
            class_names=class_names,
            normalization=_json_metadata(metadata, "normalization"),
        )
    except ValueError as error:
        raise ValueError(f"{model_path}: bad m2u.* metadata ({error})") from None


def _json_metadata(metadata, key: str):
    text = metadata.get(f"m2u.{key}")
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"m2u.{key} is not JSON: {error}") from None


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


def map_names(paths: list[str]) -> list[str]:
    """Relative PNG paths for the anomaly maps of `paths`: each image's path below the common
    folder of all of them, with `_anomaly.png` in place of its extension, so that same-named
    images in different folders keep apart (`a/x.png` → `a/x_anomaly.png`). Two files that
    differ only in their extension keep it (`x_png_anomaly.png`, `x_npy_anomaly.png`)."""
    if not paths:
        return []
    folders = [os.path.dirname(os.path.abspath(path)) for path in paths]
    try:
        root = os.path.commonpath(folders)
    except ValueError:  # different drives: no common folder
        root = None
    relative = [
        pathlib.PurePath(os.path.relpath(os.path.abspath(path), root))
        if root
        else pathlib.PurePath(os.path.basename(path))
        for path in paths
    ]
    stems = [str(rel.with_suffix("")) for rel in relative]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [
        (stem if counts[stem] == 1 else f"{stem}_{rel.suffix.lstrip('.').lower()}") + "_anomaly.png"
        for stem, rel in zip(stems, relative)
    ]


def load_image(path: str, modalities: tuple[str, ...], image_size: int) -> tuple[np.ndarray, tuple]:
    """(`[S, S, C]` float32 in [0, 1], original (height, width)). An image file (png, jpg, bmp,
    tif) of a single-modality model is read and resized like the evaluation pipeline
    (`m2u_jax.data.decode`); a multi-modality model takes one `.npy` `[h, w, C]` per sample
    (float in [0, 1]; uint8 / uint16 are scaled), channels in `modalities` order. Raises
    ValueError naming `path` for an unreadable file, a wrong shape, NaN / Inf values or values
    outside [0, 1] (e.g. 0-255 floats: they would be clipped to 1, silently)."""
    channels = sum(1 if name != "rgb" else 3 for name in modalities)
    if path.lower().endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] != channels:
            raise ValueError(
                f"{path}: array of shape {array.shape}; the model needs [h, w, {channels}] "
                f"({'+'.join(modalities)})"
            )
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{path}: array of dtype {array.dtype}; use float, uint8 or uint16")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535.0
        array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(
                f"{path}: {int(array.size - finite.sum())} NaN / Inf value(s) in the array"
            )
        low, high = float(array.min()), float(array.max())
        if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
            raise ValueError(
                f"{path}: values in [{low:g}, {high:g}], outside [0, 1]; scale the array to "
                "[0, 1] (e.g. divide 0-255 data by 255) or save it as uint8 / uint16"
            )
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


def load_thresholds(path: str) -> dict:
    """Review thresholds from eval.py's thresholds.json (`thresholds_from_dict`). Raises
    FileNotFoundError, json.JSONDecodeError or ValueError naming `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    with open(path) as file:
        try:
            data = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON thresholds file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object of thresholds")
    return thresholds_from_dict(data, path)


def thresholds_from_dict(data: dict, source: str) -> dict:
    """`score_threshold`, `uncertainty_threshold` (floats; also accepted under
    `review_thresholds`) and, when present, `num_mc_samples` (the T they were calibrated at;
    `run` compares it with the model's T) of a thresholds.json-like dict. An
    `uncertainty_measure` must be `score_var`, what the graph outputs. Raises ValueError naming
    `source`."""
    for key in ("review_thresholds", "thresholds"):
        if isinstance(data.get(key), dict):
            data = {**data, **data[key]}
    measure = data.get("uncertainty", data.get("uncertainty_measure", UNCERTAINTY_MEASURE))
    if measure != UNCERTAINTY_MEASURE:
        raise ValueError(
            f"{source}: thresholds were calibrated on uncertainty {measure!r}, but the exported "
            f"graph outputs {UNCERTAINTY_MEASURE} (MC variance of the image score)"
        )
    try:
        thresholds = {key: float(data[key]) for key in ("score_threshold", "uncertainty_threshold")}
    except KeyError as error:
        raise ValueError(
            f"{source}: missing {error.args[0]!r} (need score_threshold and uncertainty_threshold)"
        ) from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: thresholds are not numbers ({error})") from None
    if not all(np.isfinite(value) for value in thresholds.values()):
        raise ValueError(f"{source}: thresholds are not finite: {thresholds}")
    if data.get("num_mc_samples") is not None:  # eval.py writes it
        thresholds["num_mc_samples"] = int(data["num_mc_samples"])
    return thresholds


def thresholds_from_metadata(metadata) -> dict | None:
    """The calibrated thresholds the exporter stored (`m2u.score_threshold`,
    `m2u.uncertainty_threshold`, `m2u.uncertainty_measure`, `m2u.review_mc_samples`) in the
    `thresholds_from_dict` form, or None when the model carries none."""
    if "m2u.score_threshold" not in metadata and "m2u.uncertainty_threshold" not in metadata:
        return None
    data = {
        key: metadata[f"m2u.{key}"]
        for key in ("score_threshold", "uncertainty_threshold", "uncertainty_measure")
        if f"m2u.{key}" in metadata
    }
    if "m2u.review_mc_samples" in metadata:
        data["num_mc_samples"] = metadata["m2u.review_mc_samples"]
    return thresholds_from_dict(data, "m2u.* thresholds")


def resolve_thresholds(
    info: dict,
    model_path: str,
    thresholds: dict | None = None,
    *,
    uncalibrated: bool = False,
) -> tuple[dict, str]:
    """(thresholds, where they came from): `thresholds` when given (--thresholds), else
    `DEFAULT_THRESHOLDS` with a `WARNING:` line on stderr when `uncalibrated`, else the
    calibrated ones in the model's metadata (`info` of `model_info`). Raises ValueError, one
    line naming `model_path` and the fix, when there are none."""
    if thresholds:
        return dict(thresholds), "--thresholds"
    if uncalibrated:
        ignored = " (ignoring the calibrated thresholds in the model)" if info["thresholds"] else ""
        print(
            f"WARNING: infer_onnx: --uncalibrated: deciding with the uncalibrated defaults "
            f"score_threshold={DEFAULT_THRESHOLDS['score_threshold']}, uncertainty_threshold="
            f"{DEFAULT_THRESHOLDS['uncertainty_threshold']}{ignored}; accept/reject decisions "
            "are not calibrated to this model",
            file=sys.stderr,
        )
        return dict(DEFAULT_THRESHOLDS), "uncalibrated defaults"
    if info["thresholds"]:
        return dict(info["thresholds"]), "model metadata"
    raise ValueError(
        f"{model_path} carries no calibrated thresholds: export it from a run evaluated with "
        "`python eval.py --workdir DIR` (convert.py then embeds DIR/eval/thresholds.json), or "
        "pass --thresholds DIR/eval/thresholds.json (--uncalibrated runs with the 0.5 / 0.01 "
        "defaults)"
    )


def review_decisions(scores, uncertainty, thresholds: dict[str, float]) -> np.ndarray:
    """Per-image decision indices into `DECISION_NAMES`: `m2u_jax.review.review_policy`."""
    return review.review_policy(scores, uncertainty, thresholds)


# ----------------------------------------------------------------------------- inference


def run(
    model_path: str,
    image_inputs: list[str],
    out_path: str,
    *,
    thresholds: dict[str, float] | None = None,
    uncalibrated: bool = False,
    batch_size: int | None = None,
    providers: list[str] | None = None,
    maps_dir: str | None = None,
) -> dict:
    """Predicts every image and writes `out_path` (JSONL, module docstring). Thresholds:
    `resolve_thresholds` (`thresholds` > `uncalibrated` defaults > the model's metadata; none
    is a ValueError). `out_path` is written to a temporary file beside it and renamed at the
    end: when a run fails midway (a bad image, an interrupt), the previous `out_path` is left as
    it was and the records written so far are kept as `out_path`.partial (a stderr line says
    so); a successful run removes a stale `.partial`. `maps_dir`: one 8-bit PNG per image at
    its path below the images' common folder (`map_names`). Returns a summary: `images`,
    `provider`, `batch_size`, `thresholds`, `thresholds_source`, `decisions`,
    `model_images_per_sec`, `end_to_end_images_per_sec`."""
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out = pathlib.Path(out_path)
    if out.is_dir():  # found before the model runs, not at the final rename
        raise ValueError(f"--out {out_path} is a folder; name the predictions file")
    for folder in (out.parent.absolute(), *out.parent.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out_path}: {folder} is a file, not a folder")
            break
    session = make_session(model_path, providers)
    info = model_info(session, model_path)
    thresholds, source = resolve_thresholds(info, model_path, thresholds, uncalibrated=uncalibrated)
    paths = list_images(image_inputs)
    calibrated_samples = thresholds.get("num_mc_samples", info["mc_samples"])
    if calibrated_samples != info["mc_samples"]:
        print(
            f"infer_onnx: thresholds were calibrated with {calibrated_samples} MC samples, the "
            f"model was exported with T={info['mc_samples']}"
            + (
                "; it reports zero uncertainty, so nothing goes to review"
                if info["mc_samples"] == 1
                else "; the uncertainty scale differs, so the review share will too"
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
    map_paths = [os.path.join(maps_dir, name) for name in map_names(paths)] if maps_dir else None
    output_names = [output.name for output in session.get_outputs()]
    counts = dict.fromkeys(review.DECISION_NAMES, 0)
    model_seconds = 0.0
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the result, so the final rename is atomic; the process id keeps two
    # concurrent runs apart.
    temporary = out.parent / f".{out.name}.{os.getpid()}.tmp"
    written = 0
    try:
        with open(temporary, "w") as file:
            for first in range(0, len(paths), batch_size):
                chunk = paths[first : first + batch_size]
                loaded = [
                    load_image(path, info["modalities"], info["image_size"]) for path in chunk
                ]
                images = np.stack([image for image, _ in loaded])
                if info["batch"] is not None and len(chunk) < info["batch"]:  # pad a static batch
                    padding = np.zeros((info["batch"] - len(chunk), *images.shape[1:]), np.float32)
                    images = np.concatenate([images, padding])
                run_start = time.perf_counter()
                values = dict(
                    zip(output_names, session.run(output_names, {info["input_name"]: images}))
                )
                model_seconds += time.perf_counter() - run_start
                decisions = review_decisions(
                    values["image_score"][: len(chunk)],
                    values["uncertainty"][: len(chunk)],
                    thresholds,
                )
                for index, (path, (_, original)) in enumerate(zip(chunk, loaded)):
                    record = _record(path, original, values, index, info)
                    record["decision"] = review.DECISION_NAMES[int(decisions[index])]
                    counts[record["decision"]] += 1
                    if map_paths:
                        map_path = map_paths[first + index]
                        os.makedirs(os.path.dirname(map_path) or ".", exist_ok=True)
                        heat = np.clip(values["anomaly_map"][index] * 255.0 + 0.5, 0, 255)
                        Image.fromarray(heat.astype(np.uint8)).save(map_path)
                        record["anomaly_map_png"] = map_path
                    file.write(json.dumps(record) + "\n")
                    written += 1
        os.replace(temporary, out)
    except BaseException:
        _keep_partial(temporary, out, written, len(paths))
        raise
    stale = pathlib.Path(f"{out}.partial")
    if stale.is_file():
        stale.unlink()
    total = time.perf_counter() - start
    return dict(
        images=len(paths),
        provider=session.get_providers()[0],
        batch_size=batch_size,
        thresholds=thresholds,
        thresholds_source=source,
        decisions=counts,
        model_images_per_sec=len(paths) / max(model_seconds, 1e-9),
        end_to_end_images_per_sec=len(paths) / max(total, 1e-9),
    )


def _record(path: str, original: tuple, values: dict, index: int, info: dict) -> dict:
    """One JSONL record (module docstring) without its decision; boxes in original pixels."""
    scale = (
        np.array([original[1], original[0], original[1], original[0]], np.float64)
        / info["image_size"]
    )
    num_boxes = int(values["num_boxes"][index])
    boxes = []
    for k in range(num_boxes):
        class_id = int(values["box_classes"][index, k])
        boxes.append(
            {
                "box": [round(float(v), 2) for v in values["boxes"][index, k] * scale],
                "score": float(values["box_scores"][index, k]),
                "class": class_id,
                "class_name": class_name(class_id, info["class_names"]),
            }
        )
    return dict(
        path=path,
        image_score=float(values["image_score"][index]),
        uncertainty=float(values["uncertainty"][index]),
        decision=None,
        anomaly_max=float(values["anomaly_map"][index].max()),
        num_boxes=num_boxes,
        boxes=boxes,
    )


def _keep_partial(temporary: pathlib.Path, out: pathlib.Path, written: int, total: int) -> None:
    """After a failed run: the temporary file becomes OUT.partial, `out` stays as it was (no
    record written: the empty temporary file is removed, and the error alone is the message)."""
    if not temporary.exists():
        return
    if written == 0:
        temporary.unlink(missing_ok=True)
        return
    partial = pathlib.Path(f"{out}.partial")
    try:
        os.replace(temporary, partial)
    except OSError:
        return
    before = "left as it was" if out.exists() else "not written"
    print(
        f"infer_onnx: stopped after {written} of {total} images; their predictions are in "
        f"{partial} ({out} {before})",
        file=sys.stderr,
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
