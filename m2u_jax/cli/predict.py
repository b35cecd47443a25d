"""`m2u-predict` / `python -m m2u_jax.cli.predict`: a trained run or an exported model on a file,
a folder or a glob of images.

    m2u-predict --workdir runs/parts --out runs/parts/predict "plant/*.png"
    m2u-predict --onnx runs/parts/model.onnx --out out/ plant/line3/

Writes OUT/predictions.jsonl (one line per image: path, image_score, uncertainty, decision,
anomaly_max, boxes with class names, tiles) and, unless `--no-overlays`, OUT/overlays/<the
image's path below the inputs' common folder>.png (map contour, boxes, decision). The JSONL is
written to a temporary file and renamed when every image is done; a bad image stops the run
with one line naming it and leaves the lines before it in predictions.jsonl.partial.
Exit status: 0 done; 2 bad arguments, model or image.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from PIL import Image

from m2u_jax import host_memory
from m2u_jax import predictor as predictor_lib
from m2u_jax.cli import checkpoint_step, folder_problem
from m2u_jax.data import records
from m2u_jax.data.decode import IMAGE_EXTENSIONS


def list_inputs(entries: list[str]) -> list[str]:
    """Image / .npy files named directly, found under folders (recursively) or matched by glob
    patterns, sorted per entry, each file once (by resolved path)."""
    found: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        if os.path.isdir(entry):
            matches = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(entry, followlinks=False)
                for name in names
                if os.path.splitext(name)[1].lower() in (*IMAGE_EXTENSIONS, ".npy")
            )
        elif os.path.isfile(entry):
            matches = [entry]
        else:
            matches = sorted(
                path for path in glob.glob(entry, recursive=True) if os.path.isfile(path)
            )
        if not matches:
            raise FileNotFoundError(f"{entry}: no image or .npy file there")
        for path in matches:
            resolved = os.path.realpath(path)
            if resolved not in seen:
                seen.add(resolved)
                found.append(path)
    return found


def read_thresholds(path: str) -> dict:
    """A `--thresholds` file (eval.py's thresholds.json): its JSON object, or ValueError /
    FileNotFoundError naming the file and the problem (not JSON, not an object, no numeric
    score_threshold / uncertainty_threshold)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON thresholds file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: not a JSON object of thresholds (score_threshold, uncertainty_threshold; "
            f"it holds a {type(data).__name__})"
        )
    for key in ("score_threshold", "uncertainty_threshold"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{path}: {key} is {value!r}, not a number")
    return data


def overlay_path(out_dir: str, path: str, root: str) -> str:
    """OUT/overlays/<path relative to `root`>.png: same-name images of different folders keep
    different overlays."""
    relative = os.path.relpath(os.path.abspath(path), root)
    return os.path.join(out_dir, "overlays", os.path.splitext(relative)[0] + ".png")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="m2u-predict", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run directory of train.py (JAX backend)")
    source.add_argument("--onnx", help="exported model (ONNX Runtime backend, no JAX)")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--step", type=checkpoint_step, default=None, help="checkpoint step or 'best' (--workdir)"
    )
    parser.add_argument("--thresholds", default=None, help="thresholds.json to use instead")
    parser.add_argument(
        "--tiling",
        default="off",
        choices=predictor_lib.TILING_MODES,
        help="off: resize to the model input (as trained); auto: tile larger images",
    )
    parser.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=8)
    parser.add_argument("--no-overlays", "--no_overlays", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.batch_size < 1:
        print(f"m2u-predict: --batch-size {args.batch_size} must be >= 1", file=sys.stderr)
        return 2
    problem = folder_problem(args.out, "--out")  # before the model is loaded
    if problem:
        print(f"m2u-predict: {problem}", file=sys.stderr)
        return 2
    try:
        paths = list_inputs(args.inputs)
        thresholds = read_thresholds(args.thresholds) if args.thresholds else None
        if args.workdir:
            model = predictor_lib.Predictor.from_workdir(
                args.workdir, args.step, thresholds=thresholds
            )
        else:
            model = predictor_lib.Predictor.from_onnx(args.onnx, thresholds=thresholds)
    except (FileNotFoundError, ValueError) as error:  # ConfigError and DataError are ValueErrors
        print(f"m2u-predict: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    target = os.path.join(args.out, "predictions.jsonl")
    partial = target + ".partial"
    root = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])
    counts = dict.fromkeys(("accept", "reject", "review"), 0)
    start = time.perf_counter()
    try:
        from tqdm import tqdm  # optional: a plain run without a progress bar otherwise
    except ImportError:
        tqdm = None
    results = model.iter_predict(
        paths, batch_size=args.batch_size, tiling=args.tiling, overlap=args.overlap
    )
    if tqdm is not None:
        results = tqdm(results, total=len(paths), unit="img", file=sys.stderr)
    with open(partial, "w", encoding="utf-8") as file:
        try:
            for result in results:
                file.write(json.dumps(result.to_json(), allow_nan=False) + "\n")
                counts[result.decision] += 1
                if not args.no_overlays:
                    array, kind = predictor_lib.read_image(result.path, model.modalities)
                    picture = predictor_lib.overlay(predictor_lib.to_float(array, kind), result)
                    destination = overlay_path(args.out, result.path, root)
                    os.makedirs(os.path.dirname(destination), exist_ok=True)
                    picture.save(destination)
        except (records.DataError, ValueError, OSError, Image.DecompressionBombError) as error:
            done = sum(counts.values())
            kept = f"their lines are in {partial}"
            if done == 0:  # nothing to keep: no empty .partial file
                os.remove(partial)
                kept = "no predictions written"
            print(
                f"m2u-predict: {error}; stopped after {done} of {len(paths)} image(s), {kept}",
                file=sys.stderr,
            )
            return 2
    os.replace(partial, target)
    seconds = time.perf_counter() - start
    print(
        f"{len(paths)} image(s): {counts['accept']} accept, {counts['reject']} reject, "
        f"{counts['review']} review ({len(paths) / max(seconds, 1e-9):.1f} img/s, "
        f"{model.source}) -> {target}"
    )
    return 0


def run() -> None:
    """Console-script entry point (`m2u-predict`)."""
    host_memory.keep_freed_memory()  # first, before JAX's threads start (as train.py)
    sys.exit(main())


if __name__ == "__main__":
    run()
