"""Serve predictions from an exported model with ONNX Runtime (on a Jetson, a server or a laptop).

    python tools/convert_to_onnx/infer_onnx.py --model model.onnx --images DIR_OR_FILES... \\
        --out preds.jsonl [--thresholds thresholds.json] [--batch-size 8] [--maps-dir DIR] \\
        [--providers tensorrt,cuda,cpu]

Execution providers: TensorRT → CUDA → CPU, whichever this onnxruntime build has (`--providers`
narrows the list). The TensorRT provider builds an FP16 engine on the first run and caches it
next to the model (`<model>.trt_cache/`), so only the first start is slow.

Inputs: image files (png, jpg, bmp, tif) read and resized exactly like the evaluation pipeline
(`m2u_jax.data.decode`: 8/16-bit scaling, bilinear resize to the model's square input, grey
images replicated for rgb) for single-modality models; for multi-modality models one `.npy`
per sample, `[h, w, C]` float in [0, 1] (uint8 / uint16 are scaled) with the channels stacked in
the order of the model's `m2u.modalities` metadata. Directories are searched recursively.

Output: one JSON line per image: `path`, `image_score`, `uncertainty` (MC variance of the image
score; 0 for a T = 1 export), `decision` (`accept` / `reject` / `review`), `anomaly_max`,
`boxes` (each `{"box": [x0, y0, x1, y1], "score", "class"}` in the original image's pixels),
`num_boxes`. `--maps-dir` also writes each anomaly map as an 8-bit PNG (model resolution).

Decisions: `m2u_jax.uncertainty.review_policy`, the policy of `eval.py` — review where
uncertainty > `uncertainty_threshold`, else reject where score ≥ `score_threshold`, else
accept. Thresholds come from `--thresholds` (eval.py's `DIR/eval/thresholds.json`: keys
`score_threshold` and `uncertainty_threshold`, also accepted under `review_thresholds`; if it
names its `uncertainty_measure`, that must be `score_var`, the measure this graph outputs),
else `DEFAULT_THRESHOLDS`: score 0.5 (the image score is a probability-like value in [0, 1])
and uncertainty 0.01 (a standard deviation of 0.1 between MC samples); a T = 1 export never
asks for review. On a device without JAX the same rule runs in numpy (`review_decisions`).

The script prints the model throughput (images/s of `session.run` alone) and the end-to-end rate
(including reading and resizing the files). `onnx_images_per_sec` is the benchmark tool's entry.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make m2u_jax importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_NAMES = {
    "tensorrt": PROVIDER_ORDER[0],
    "cuda": PROVIDER_ORDER[1],
    "cpu": PROVIDER_ORDER[2],
}
DEFAULT_THRESHOLDS = {"score_threshold": 0.5, "uncertainty_threshold": 0.01}
DECISION_NAMES = ("accept", "reject", "review")  # = m2u_jax.uncertainty.DECISION_NAMES
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_BATCH = 8


# ----------------------------------------------------------------------------- session


def select_providers(wanted: list[str] | None = None) -> list[str]:
    """The available providers among `wanted` (short names 'tensorrt' / 'cuda' / 'cpu', default
    all) in TensorRT → CUDA → CPU order. Raises ValueError when none is available."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    names = [PROVIDER_NAMES[name] for name in (wanted or PROVIDER_NAMES)]
    chosen = [name for name in PROVIDER_ORDER if name in names and name in available]
    if not chosen:
        raise ValueError(f"none of {names} is available in this onnxruntime ({sorted(available)})")
    return chosen


def make_session(model_path: str, providers: list[str] | None = None):
    """InferenceSession on `providers` (full names, default `select_providers()`); the TensorRT
    provider gets FP16 and an engine cache beside the model."""
    import onnxruntime as ort

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"ONNX model {model_path} does not exist")
    import onnx

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
    """(`[S, S, C]` float32 in [0, 1], original (height, width)) — see the module docstring."""
    from PIL import Image

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
    from m2u_jax.data import decode

    modality = modalities[0]
    try:
        array, kind = decode.read_modality(path, modality)
    except decode.DataError as error:
        raise ValueError(str(error)) from None
    original = array.shape[:2]
    resized = decode.resize_to_uint16(array, kind, image_size, nearest=modality == "depth")
    return resized.astype(np.float32) / 65535.0, original


# ----------------------------------------------------------------------------- decisions


def load_thresholds(path: str | None) -> dict[str, float]:
    """Review thresholds from an evaluation JSON file, or `DEFAULT_THRESHOLDS` (docstring)."""
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
    """Per-image decision indices into `DECISION_NAMES` (0 accept, 1 reject, 2 review):
    `m2u_jax.uncertainty.review_policy` when JAX is installed, else the same rule in numpy."""
    scores = np.asarray(scores, np.float32)
    uncertainty = np.asarray(uncertainty, np.float32)
    return np.asarray(_review_policy()(scores, uncertainty, thresholds))


def _review_policy():
    try:
        from m2u_jax.uncertainty import review_policy
    except ImportError:  # e.g. a Jetson with onnxruntime but without JAX
        return _review_decisions_numpy
    return review_policy


def _review_decisions_numpy(scores, uncertainty, thresholds) -> np.ndarray:
    review = uncertainty > thresholds["uncertainty_threshold"]
    reject = scores >= thresholds["score_threshold"]
    return np.where(review, 2, np.where(reject, 1, 0)).astype(np.int32)


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
    from PIL import Image

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
    counts = dict.fromkeys(DECISION_NAMES, 0)
    _review_policy()  # import JAX (if present) before the clock starts
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
                decision = DECISION_NAMES[int(decisions[index])]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ONNX Runtime inference on exported models.")
    parser.add_argument("--model", required=True, help="exported .onnx file")
    parser.add_argument("--images", required=True, nargs="+", help="image files or directories")
    parser.add_argument("--out", required=True, help="predictions JSONL to write")
    parser.add_argument("--thresholds", default=None, help="review thresholds JSON (eval)")
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=None,
        help=f"batch for a dynamic-batch model (default {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of tensorrt,cuda,cpu (default: all available)",
    )
    parser.add_argument("--maps-dir", "--maps_dir", default=None, help="write anomaly-map PNGs")
    args = parser.parse_args(argv)
    try:
        wanted = [name.strip() for name in args.providers.split(",")] if args.providers else None
        if wanted and any(name not in PROVIDER_NAMES for name in wanted):
            raise ValueError(
                f"--providers {args.providers!r}: use names from {list(PROVIDER_NAMES)}"
            )
        summary = run(
            args.model,
            args.images,
            args.out,
            thresholds=load_thresholds(args.thresholds),
            batch_size=args.batch_size,
            providers=select_providers(wanted),
            maps_dir=args.maps_dir,
        )
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
        print(f"infer_onnx: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary['images']} images on {summary['provider']} (batch {summary['batch_size']}): "
        f"model {summary['model_images_per_sec']:.1f} images/s, end to end "
        f"{summary['end_to_end_images_per_sec']:.1f} images/s; decisions {summary['decisions']}; "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
