"""ONNX Runtime vs JAX parity of an exported graph, on real images.

`check_parity(session, reference_fn, images, ...)` runs the ONNX Runtime session and the jitted
JAX inference function on the same images for each batch size and `compare_outputs` them:
max |ONNX − JAX| of the dense outputs within `FP32_TOLERANCE` (`FP16_TOLERANCE` for a float16
graph, always compared with the float32 JAX model), and a one-to-one box matching (same class,
IoU ≥ `BOX_MIN_IOU`, score within tolerance; boxes within the tolerance of the score threshold
only count as `borderline`). `parity_images` takes the config's test images through the
evaluation pipeline, else synthetic ones. `convert` writes the result to PATH.parity.json.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from PIL import Image

from m2u_jax.data import records, synthetic
from m2u_jax.export.interface import OUTPUT_NAMES
from m2u_jax.modalities import split_list

FP32_TOLERANCE = {"anomaly_map": 1e-4, "image_score": 1e-4, "uncertainty": 1e-4}
FP16_TOLERANCE = {"anomaly_map": 2e-2, "image_score": 2e-2, "uncertainty": 2e-3}
BOX_MIN_IOU = {"float32": 0.9, "float16": 0.5}
DENSE_OUTPUTS = ("anomaly_map", "image_score", "uncertainty")
INTEGER_OUTPUTS = ("box_classes", "num_boxes")


def _synthetic_images(count: int, image_size: int, modalities: tuple[str, ...]) -> np.ndarray:
    folders = (records.GOOD, *synthetic.DEFECT_KINDS)
    render_size = max(image_size, synthetic.MIN_IMAGE_SIZE)
    images = []
    for index in range(count):
        category = synthetic.CATEGORIES[index % len(synthetic.CATEGORIES)]
        folder = folders[index % len(folders)]
        rgb = synthetic.render_sample(category, folder, index, image_size=render_size)["image"]
        if render_size != image_size:
            resized = Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR)
            rgb = np.asarray(resized)
        rgb = rgb.astype(np.float32) / 255.0
        grey = rgb.mean(axis=-1, keepdims=True)
        images.append(
            np.concatenate([rgb if name == "rgb" else grey for name in modalities], axis=-1)
        )
    return np.stack(images).astype(np.float32)


def parity_images(config, count: int) -> tuple[np.ndarray, str]:
    """(`[count, S, S, C]` float32 images in [0, 1], a description of where they came from).
    S = `config.data.image_size`. Extra single-channel modalities of synthetic images get the
    image's grey level."""
    try:
        # Imported inside the try: any problem with the data pipeline falls back as well.
        from m2u_jax.data import pipeline

        batch = next(pipeline.iterate_eval(config, "test", batch_size=count))
        images = batch["images"][batch["valid"]]
        if len(images) == count:
            return images.astype(np.float32), f"test split of {config.data.root}"
        reason = f"only {len(images)} readable test images"
    except Exception as error:  # noqa: BLE001 - any data problem falls back to synthetic images
        reason = f"{type(error).__name__}: {error}"
    modalities = split_list(config.data.modalities)
    images = _synthetic_images(count, int(config.data.image_size), modalities)
    return images, f"synthetic generator (dataset unavailable: {reason})"


def onnx_session(model, providers=None, *, allow_spinning: bool = True):
    """An onnxruntime InferenceSession of `model` (path or bytes), quiet, on `providers`
    (default: CPU). `allow_spinning=False` stops the CPU provider's idle worker threads from
    busy-waiting for the next operator: on a machine shared with other work they otherwise
    take the cores that work (and the next call) needs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer warnings are noise here
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model, options, providers=list(providers or ["CPUExecutionProvider"])
    )


def run_onnxruntime(session, images: np.ndarray) -> dict[str, np.ndarray]:
    """{output name: array} of one `session.run` on `images`."""
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: images})
    return dict(zip(names, values))


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (
        np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    )
    return intersection / np.maximum(area(box) + area(others) - intersection, 1e-9)


def _match_boxes(
    reference: dict, candidate: dict, *, min_iou: float, score_tol: float, score_threshold: float
) -> dict:
    """Greedy one-to-one matching per image, highest JAX score first (module docstring)."""
    matched = unmatched = borderline = 0
    worst_iou, worst_score = 1.0, 0.0
    for image in range(reference["boxes"].shape[0]):
        ref_count = int(reference["num_boxes"][image])
        cand_count = int(candidate["num_boxes"][image])
        cand_boxes = candidate["boxes"][image, :cand_count].astype(np.float64)
        cand_classes = candidate["box_classes"][image, :cand_count]
        cand_scores = candidate["box_scores"][image, :cand_count]
        free = np.ones(cand_count, bool)
        for index in range(ref_count):
            box = reference["boxes"][image, index].astype(np.float64)
            score = float(reference["box_scores"][image, index])
            ious = _iou(box, cand_boxes) if cand_count else np.zeros(0)
            ok = free & (cand_classes == reference["box_classes"][image, index]) & (ious >= min_iou)
            ok &= np.abs(cand_scores - score) <= score_tol
            if ok.any():
                best = int(np.argmax(np.where(ok, ious, -1.0)))
                free[best] = False
                matched += 1
                worst_iou = min(worst_iou, float(ious[best]))
                worst_score = max(worst_score, abs(float(cand_scores[best]) - score))
            elif abs(score - score_threshold) <= score_tol:
                borderline += 1
            else:
                unmatched += 1
        for index in np.flatnonzero(free):
            if abs(float(cand_scores[index]) - score_threshold) <= score_tol:
                borderline += 1
            else:
                unmatched += 1
    return dict(
        matched=matched,
        unmatched=unmatched,
        borderline=borderline,
        min_iou=worst_iou,
        max_score_diff=worst_score,
        min_iou_required=min_iou,
    )


def compare_outputs(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    *,
    fp16: bool,
    score_threshold: float,
) -> dict:
    """Compares the seven outputs (module docstring). Returns a JSON-able dict with `passed`,
    per-output `max_abs_diff` and `tolerance`, and the box matching counts."""
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    report: dict = {"max_abs_diff": {}, "tolerance": dict(tolerance)}
    passed = True
    for name in DENSE_OUTPUTS:
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        if ref.shape != cand.shape:
            report.setdefault("shape_mismatch", {})[name] = [list(ref.shape), list(cand.shape)]
            passed = False
            continue
        diff = float(np.max(np.abs(ref.astype(np.float64) - cand))) if ref.size else 0.0
        report["max_abs_diff"][name] = diff
        passed &= bool(diff <= tolerance[name])  # NaN fails too
    for name in ("boxes", "box_scores", "box_classes", "num_boxes"):
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        if ref.shape != cand.shape or (name in INTEGER_OUTPUTS and cand.dtype != np.int32):
            report.setdefault("shape_mismatch", {})[name] = [
                f"{list(ref.shape)} {ref.dtype}",
                f"{list(cand.shape)} {cand.dtype}",
            ]
            passed = False
    if not passed and "shape_mismatch" in report:
        report["passed"] = False
        return report
    boxes = _match_boxes(
        {key: np.asarray(value) for key, value in reference.items()},
        {key: np.asarray(value) for key, value in candidate.items()},
        min_iou=BOX_MIN_IOU["float16" if fp16 else "float32"],
        score_tol=tolerance["image_score"],
        score_threshold=score_threshold,
    )
    report["boxes"] = boxes
    passed &= boxes["unmatched"] == 0
    report["passed"] = bool(passed)
    return report


def check_parity(
    session,
    reference_fn,
    images: np.ndarray,
    *,
    batch_sizes: tuple[int, ...],
    fp16: bool,
    score_threshold: float,
) -> dict:
    """Runs `session` (ONNX Runtime) and `reference_fn` (jitted JAX, images → the seven outputs
    as a tuple in `interface.OUTPUT_NAMES` order) on the first `b` images for every `b` in
    `batch_sizes` and compares them. Returns {'passed', 'batches': [per-batch reports]}."""
    batches = []
    for batch_size in batch_sizes:
        chunk = np.ascontiguousarray(images[:batch_size])
        reference = dict(zip(OUTPUT_NAMES, (np.asarray(value) for value in reference_fn(chunk))))
        candidate = run_onnxruntime(session, chunk)
        report = compare_outputs(reference, candidate, fp16=fp16, score_threshold=score_threshold)
        report["batch_size"] = int(batch_size)
        report["jax_num_boxes"] = reference["num_boxes"].tolist()
        batches.append(report)
    return {"passed": all(report["passed"] for report in batches), "batches": batches}
