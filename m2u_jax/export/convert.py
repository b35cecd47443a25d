"""Checkpoint → finalised, checked ONNX file: the library behind tools/convert_to_onnx/convert.py.

`convert(config, variables, output, ...)` (`convert_many` for several exports of one model)
builds the export graph (`graph.make_inference_fn`), converts it with jax2onnx in this process
or with jax2tf → SavedModel → tf2onnx in `.venv-jax2tf` (`python -m
m2u_jax.export.jax2tf_export`, one subprocess for all jobs), finalises it for TensorRT
(`onnx_graph.finalize`), saves it and writes PATH.parity.json: the `onnx.checker` result, the
TensorRT findings (`trt_check`) and ONNX Runtime vs JAX parity on real images (`parity`). The
report's `passed` is True only if all three pass. Bad arguments raise ValueError, a failed
backend `ExportError`. Params come from `load_inference_variables` (a fine-tuned checkpoint) or
`random_inference_variables`. Every export records its input normalisation
(`input_normalization`) and box class names in the `m2u.*` metadata; `calibration_metadata`
adds a run's calibrated decision thresholds (WORKDIR/eval/thresholds.json), which
`onnx_runner` then uses by default. Steps, the `--fp16` policy, the metadata keys and measured
numbers: tools/convert_to_onnx/README.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from m2u_jax import config as config_lib
from m2u_jax import model as model_lib
from m2u_jax import run_checkpoint
from m2u_jax.class_names import default_class_names
from m2u_jax.export import graph as export_graph
from m2u_jax.export import interface, onnx_runner, parity, trt_check
from m2u_jax.export.onnx_graph import (
    BATCH_DIM,
    OPSET,
    ExportError,
    finalize,
    rename_outputs,
)

# The jax2tf environment lives in the checkout (`make setup-jax2tf`), beside the editable
# install of this package.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
JAX2TF_PYTHON = REPO_ROOT / ".venv-jax2tf" / "bin" / "python"
JAX2TF_MODULE = "m2u_jax.export.jax2tf_export"
BACKENDS = ("jax2onnx", "jax2tf")
# Where eval.py writes a run's calibrated thresholds, relative to the run directory.
THRESHOLDS_FILE = os.path.join("eval", "thresholds.json")


# ----------------------------------------------------------------------------- inputs


def load_config(path: str):
    """Loads a config file (`get_config()`, as train.py does) and validates it."""
    config = config_lib.config_from_file(path)
    config_lib.validate(config)
    return config


def calibrated_mc_samples(workdir: str, thresholds_path: str | None = None) -> int:
    """The T the thresholds of a run (`thresholds_path`, default WORKDIR/eval/thresholds.json)
    were calibrated at: the export's default, so the review thresholds fit its variance; 1
    when there are none (a bad file is named later, by `calibration_metadata`)."""
    path = thresholds_path or os.path.join(workdir, THRESHOLDS_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            samples = json.load(file).get("num_mc_samples", 1)
        return max(1, int(samples))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def load_inference_variables(config, workdir: str, step: int | str | None = None) -> dict:
    """`{'params': ..., 'step': global step}` (numpy params) of a fine-tuned checkpoint in
    WORKDIR/checkpoints (`run_checkpoint.restore_params`: params only; `step=None` = the newest
    fine-tuned one, or the best-validating params; `step="best"` those). The export uses
    `params`; `step` names the checkpoint. With `eval.ensemble_workdirs` also `members`: the
    params of those runs (`run_checkpoint.restore_members`), exported as a deep ensemble."""
    params, global_step = run_checkpoint.restore_params(config, workdir, step)
    variables = {"params": params, "step": int(global_step)}
    members = run_checkpoint.restore_members(config)
    if members:
        variables["members"] = members
    return variables


def random_inference_variables(config, seed: int = 0) -> dict:
    """Freshly initialised `{'params': ...}` (numpy), for benchmarks and tests."""
    model = model_lib.build_model(config.model)
    init = jax.jit(lambda key: model_lib.init_params(model, config, key))
    return {"params": jax.device_get(init(jax.random.PRNGKey(seed)))}


def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested params → {'a/b/c': numpy array}: the version-independent form that crosses over
    to the jax2tf environment (`jax2tf_export.unflatten_params` inverts it)."""
    flat = {}
    for name, value in params.items():
        if "/" in str(name):
            raise ValueError(f"parameter name {name!r} contains '/'")
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, key + "/"))
        else:
            flat[key] = np.asarray(value)
    return flat


# ----------------------------------------------------------------------------- metadata


def input_normalization(channels: int) -> dict:
    """What the exported graph does to its input, as stored in `m2u.normalization`: images
    `[N, H, W, C]` float32 in [0, 1], channels-last, normalised inside the graph to
    (x - mean) / std = 2x - 1 ([-1, 1], `m2u_jax.vit`: `images * 2.0 - 1.0`) for every channel;
    8-bit / 16-bit pixels are divided by 255 / 65535 first (`onnx_runner.load_image`)."""
    return dict(
        input_range=[0.0, 1.0],
        layout="NHWC",
        in_graph="(x - mean) / std",
        mean=[0.5] * int(channels),
        std=[0.5] * int(channels),
        uint8_scale=255,
        uint16_scale=65535,
    )


def calibration_metadata(
    model_config,
    *,
    workdir: str | None = None,
    thresholds_path: str | None = None,
    mc_samples: int = 1,
    checkpoint_step: int | None = None,
    ensemble_members: int = 1,
) -> tuple[dict, list[str]]:
    """(metadata, warnings) for an export from a run: the calibrated decision thresholds of
    `thresholds_path` (default WORKDIR/eval/thresholds.json, eval.py's) as `m2u.*` keys
    (`score_threshold`, `uncertainty_threshold`, `uncertainty_measure`, `review_mc_samples` =
    the T they were calibrated at, `review_budget`, `threshold_rule`, `checkpoint_step`,
    `thresholds_source`) and `class_names` (a JSON list; when the file names none,
    `class_names.default_class_names`, with a warning unless the model has one class).

    `warnings` are `WARNING: ...` lines for the caller to print: no thresholds file in the run
    (the model then carries no thresholds and the runner refuses it without --thresholds), a
    calibrated T other than the exported `mc_samples` (the variance scale changes with T), a
    calibrated checkpoint other than `checkpoint_step`, another deep-ensemble size than
    `ensemble_members`, another `model.test_time_flips` than `model_config`'s. Raises
    FileNotFoundError for a missing explicit `thresholds_path`, ValueError for a malformed
    file."""
    num_classes = int(model_config.num_defect_classes)
    fallback = default_class_names(num_classes)
    if thresholds_path is None:
        if workdir is None:
            raise ValueError("calibration_metadata needs workdir or thresholds_path")
        path = os.path.join(workdir, THRESHOLDS_FILE)
        if not os.path.isfile(path):
            fix = f"python eval.py --workdir {workdir}" + (
                f" --step {checkpoint_step}" if checkpoint_step is not None else ""
            )
            warnings = [
                f"WARNING: {path} does not exist: the exported model carries no calibrated "
                f"thresholds, and infer_onnx.py refuses it without --thresholds or "
                f"--uncalibrated; run `{fix}` and export again (or pass --thresholds FILE)"
            ]
            if num_classes != 1:
                warnings.append(_class_names_warning(path, fallback, missing=True))
            return {"class_names": json.dumps(fallback)}, warnings
    else:
        path = thresholds_path
    thresholds = onnx_runner.load_thresholds(path)  # validates keys and the measure
    with open(path) as file:
        data = json.load(file)
    metadata = dict(
        score_threshold=thresholds["score_threshold"],
        uncertainty_threshold=thresholds["uncertainty_threshold"],
        uncertainty_measure=onnx_runner.UNCERTAINTY_MEASURE,
        thresholds_source=path,
    )
    warnings = []
    run = workdir or "DIR"
    calibrated_samples = thresholds.get("num_mc_samples")
    if calibrated_samples is not None:
        metadata["review_mc_samples"] = int(calibrated_samples)
        if int(calibrated_samples) != int(mc_samples):
            warnings.append(
                f"WARNING: the thresholds in {path} were calibrated with T={calibrated_samples} "
                f"MC samples but the graph is exported with --mc-samples {mc_samples}: the "
                "uncertainty (MC variance) scale changes with T"
                + (", and a T = 1 graph sends nothing to review" if int(mc_samples) == 1 else "")
                + f"; export with --mc-samples {calibrated_samples}, or recalibrate with "
                f"`python eval.py --workdir {run} --config.eval.num_mc_samples={mc_samples}`"
            )
    calibrated_flips = int(data.get("test_time_flips", 1))
    if calibrated_flips != int(model_config.test_time_flips):
        warnings.append(
            f"WARNING: the thresholds in {path} were calibrated on scores averaged over "
            f"{calibrated_flips} flipped view(s) but the graph averages "
            f"{model_config.test_time_flips}: the score scale differs; export with "
            f"--config.model.test_time_flips={calibrated_flips}, or recalibrate with "
            f"`python eval.py --workdir {run} "
            f"--config.model.test_time_flips={model_config.test_time_flips}`"
        )
    calibrated_members = int(data.get("ensemble_members", 1))
    if calibrated_members != int(ensemble_members):
        warnings.append(
            f"WARNING: the thresholds in {path} were calibrated with {calibrated_members} deep-"
            f"ensemble member(s) but the graph is exported with {ensemble_members}: the "
            "uncertainty comes from another source; set eval.ensemble_workdirs as the "
            "evaluation did"
        )
    for key, name, kind in (
        ("budget", "review_budget", float),
        ("threshold_rule", "threshold_rule", str),
        ("checkpoint_step", "checkpoint_step", int),
    ):
        if data.get(key) is not None:
            metadata[name] = kind(data[key])
    calibrated_step = metadata.get("checkpoint_step")
    if None not in (calibrated_step, checkpoint_step) and calibrated_step != checkpoint_step:
        warnings.append(
            f"WARNING: the thresholds in {path} were calibrated on checkpoint "
            f"{calibrated_step}, but checkpoint {checkpoint_step} is exported; run "
            f"`python eval.py --workdir {run} --step {checkpoint_step}` or export --step "
            f"{calibrated_step}"
        )
    names = data.get("class_names")
    if names is None:
        names = fallback
        if num_classes != 1:
            warnings.append(_class_names_warning(path, fallback))
    elif not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise ValueError(f"{path}: class_names is not a list of names: {names!r}")
    elif len(names) not in (1, num_classes):
        warnings.append(
            f"WARNING: {path} names {len(names)} classes {names}, the model predicts "
            f"{num_classes}; boxes past the list are labelled class_<index>"
        )
    metadata["class_names"] = json.dumps(list(names))
    return metadata, warnings


def _class_names_warning(path: str, fallback: list[str], *, missing: bool = False) -> str:
    if missing:
        where = f"without {path} the box classes have no names"
    else:
        where = f"{path} records no class_names"
    if not fallback:
        return f"WARNING: {where}, and the model's class count is unknown"
    return (
        f"WARNING: {where}; boxes are labelled {fallback[0]}...{fallback[-1]} (eval.py writes "
        "the dataset's class names to thresholds.json)"
    )


# ----------------------------------------------------------------------------- backends


def export_jax2onnx(
    model,
    params: dict,
    *,
    batch: int | None,
    mc_samples: int,
    mc_seed: int,
    members: Sequence[dict] = (),
):
    """jax2onnx export of the inference function (with deep-ensemble `members`, see
    `graph.make_inference_fn`) → raw ModelProto (before `finalize`)."""
    from jax2onnx import to_onnx  # here, not at the top: its plugin import takes ~10 s

    # jax arrays, not numpy: with numpy params jax2onnx's linen Conv lowering keeps a float32
    # kernel next to a float16 input under model.dtype=float16 (an invalid graph).
    params = jax.tree.map(jnp.asarray, params)
    inference = export_graph.make_inference_fn(
        model,
        params,
        num_mc_samples=mc_samples,
        mc_seed=mc_seed,
        members=[jax.tree.map(jnp.asarray, member) for member in members],
    )
    shape = (BATCH_DIM if batch is None else int(batch), *_image_shape(model))
    return to_onnx(
        inference,
        inputs=[shape],
        opset=OPSET,
        model_name="m2u_inspectnet",
        input_names=[interface.INPUT_NAME],
        output_names=list(interface.OUTPUT_NAMES),
    )


def _image_shape(model) -> tuple[int, int, int]:
    return int(model.image_size), int(model.image_size), int(model.num_channels)


def export_jax2tf(
    model_config,
    params: dict,
    jobs: list[dict],
    *,
    mc_seed: int,
    attention: str = "matmul",
    check_images=None,
) -> list[dict]:
    """Runs `jax2tf_export` in `.venv-jax2tf` once for all `jobs` (dicts with `onnx`,
    `saved_model`, `batch` (None = dynamic), `mc_samples`, `fp16`). Returns the subprocess'
    per-job reports; the raw ONNX files are at each job's `onnx` path and, with
    `check_images` `[n, S, S, C]`, each SavedModel's outputs on them at `check_outputs`."""
    if not JAX2TF_PYTHON.exists():
        raise ExportError(
            f"{JAX2TF_PYTHON} not found: build the jax2tf environment with `make setup-jax2tf`"
        )
    with tempfile.TemporaryDirectory(prefix="m2u_jax2tf_") as scratch:
        np.savez(os.path.join(scratch, "params.npz"), **flatten_params(params))
        if check_images is not None:
            np.save(os.path.join(scratch, "check_images.npy"), np.asarray(check_images, np.float32))
        spec = dict(
            params=os.path.join(scratch, "params.npz"),
            check_images=None
            if check_images is None
            else os.path.join(scratch, "check_images.npy"),
            model_config=json.loads(json.dumps(model_config.to_dict(), default=list)),
            mc_seed=int(mc_seed),
            attention=attention,
            jobs=[
                dict(job, batch=None if job["batch"] is None else int(job["batch"])) for job in jobs
            ],
            report=os.path.join(scratch, "report.json"),
        )
        spec_path = os.path.join(scratch, "spec.json")
        with open(spec_path, "w") as file:
            json.dump(spec, file, indent=2)
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("XLA_FLAGS", None)  # no fake devices: the export runs on one CPU device
        result = subprocess.run(
            [str(JAX2TF_PYTHON), "-m", JAX2TF_MODULE, "--spec", spec_path],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
            if "No module named 'm2u_jax'" in tail:  # an environment built before it had m2u_jax
                tail += f"\nrun: {JAX2TF_PYTHON.parent / 'pip'} install --no-deps -e {REPO_ROOT}"
            raise ExportError(f"jax2tf export failed (exit {result.returncode}):\n{tail}")
        with open(spec["report"]) as file:
            return json.load(file)["jobs"]


# ----------------------------------------------------------------------------- conversion


def convert(
    config,
    variables: dict,
    output: str,
    *,
    backend: str = "jax2onnx",
    batch: int | None = 1,
    mc_samples: int = 1,
    fp16: bool = False,
    mc_seed: int = 0,
    parity_count: int = 4,
    trt: str = "8.5",
    attention: str = "matmul",
    extra_metadata: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Exports, finalises, checks and compares one model (module docstring); writes `output`
    (and PATH.savedmodel/ for jax2tf) and `output`.parity.json. Returns the report dict, whose
    `passed` is True only if the checker, the TensorRT check and parity all pass. `progress`:
    see `convert_many`."""
    jobs = [dict(output=output, batch=batch, mc_samples=mc_samples, fp16=fp16)]
    return convert_many(
        config,
        variables,
        jobs,
        backend=backend,
        mc_seed=mc_seed,
        parity_count=parity_count,
        trt=trt,
        attention=attention,
        extra_metadata=extra_metadata,
        progress=progress,
    )[0]


def convert_many(
    config,
    variables: dict,
    jobs: list[dict],
    *,
    backend: str = "jax2onnx",
    mc_seed: int = 0,
    parity_count: int = 4,
    trt: str = "8.5",
    attention: str = "matmul",
    extra_metadata: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """`convert` for several exports of one model (`jobs`: dicts with `output`, `batch`
    (None = dynamic), `mc_samples`, `fp16`); the jax2tf backend converts them all in one
    subprocess, so TensorFlow starts once. `attention`: the exported attention form
    (`graph.EXPORT_ATTENTION_FORMS`). `extra_metadata` (e.g. `calibration_metadata`'s) is added
    to, and overrides, the `m2u.*` metadata written for every export (values as strings;
    lists and dicts as JSON). `progress(line)` hears each phase as it starts, with the seconds
    since the call (an export takes seconds to minutes)."""
    start_all = time.perf_counter()

    def report_phase(message: str) -> None:
        if progress is not None:
            progress(f"[{time.perf_counter() - start_all:5.1f}s] {message}")

    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not one of {BACKENDS}")
    for job in jobs:
        if job["batch"] is not None and int(job["batch"]) < 1:
            raise ValueError(f"--batch must be >= 1, got {job['batch']}")
        if int(job["mc_samples"]) < 1:
            raise ValueError(f"--mc-samples must be >= 1, got {job['mc_samples']}")
        if variables.get("members") and int(job["mc_samples"]) != 1:
            raise ValueError(
                f"--mc-samples {job['mc_samples']} with a deep ensemble (eval.ensemble_workdirs):"
                " its uncertainty comes from the members; export with --mc-samples 1"
            )
        pathlib.Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
    if variables.get("members") and backend != "jax2onnx":
        raise ValueError("a deep ensemble (eval.ensemble_workdirs) exports with --backend jax2onnx")
    model32, params = export_graph.build_export_model(
        config.model, variables["params"], attention=attention
    )
    members = [export_graph.prepare_params(member) for member in variables.get("members", ())]
    largest_batch = max([parity_count] + [int(job["batch"] or 0) for job in jobs])
    images, image_source = parity.parity_images(config, largest_batch)

    raw_models, backend_reports, export_seconds = [], [], []
    if backend == "jax2onnx":
        for number, job in enumerate(jobs, 1):
            report_phase(
                f"export {number}/{len(jobs)}: tracing and converting with jax2onnx "
                f"(batch {job['batch'] or 'dynamic'}, T={job['mc_samples']})"
            )
            model = (
                model32
                if not job["fp16"]
                else export_graph.build_export_model(
                    config.model, variables["params"], fp16=True, attention=attention
                )[0]
            )
            start = time.perf_counter()
            raw_models.append(
                export_jax2onnx(
                    model,
                    params,
                    batch=job["batch"],
                    mc_samples=job["mc_samples"],
                    mc_seed=mc_seed,
                    members=members,
                )
            )
            export_seconds.append(time.perf_counter() - start)
            backend_reports.append({})
    else:
        tf_jobs = [
            dict(
                onnx=str(pathlib.Path(job["output"]).with_suffix(".tf2onnx.onnx")),
                saved_model=str(pathlib.Path(job["output"]).with_suffix(".savedmodel")),
                batch=job["batch"],
                mc_samples=int(job["mc_samples"]),
                fp16=bool(job["fp16"]),
            )
            for job in jobs
        ]
        report_phase(
            f"exporting {len(jobs)} graph(s) with jax2tf + tf2onnx in a subprocess (TensorFlow "
            "starts once; this is the slow part)"
        )
        start = time.perf_counter()
        backend_reports = export_jax2tf(
            config.model,
            params,
            tf_jobs,
            mc_seed=mc_seed,
            attention=attention,
            check_images=images[:largest_batch],
        )
        elapsed = (time.perf_counter() - start) / len(jobs)
        for tf_job, backend_report in zip(tf_jobs, backend_reports):
            raw = onnx.load(tf_job["onnx"])
            rename_outputs(raw.graph, backend_report["output_names"])
            raw_models.append(raw)
            os.remove(tf_job["onnx"])
            export_seconds.append(elapsed)

    reports = []
    for number, (job, raw, backend_report, seconds) in enumerate(
        zip(jobs, raw_models, backend_reports, export_seconds), 1
    ):
        report_phase(
            f"check {number}/{len(jobs)}: onnx.checker, TensorRT {trt} rules, parity against "
            f"JAX on {len(images)} image(s) -> {job['output']}"
        )
        reference = jax.jit(
            export_graph.make_inference_fn(
                model32,
                params,
                num_mc_samples=int(job["mc_samples"]),
                mc_seed=mc_seed,
                members=members,
            )
        )
        metadata = dict(
            backend=backend,
            modalities=str(config.data.modalities),
            image_size=int(config.data.image_size),
            channels=int(model32.num_channels),
            mc_samples=int(job["mc_samples"]),
            ensemble_members=1 + len(members),
            mc_seed=int(mc_seed),
            precision="float16" if job["fp16"] else "float32",
            batch="dynamic" if job["batch"] is None else int(job["batch"]),
            attention=attention,
            det_score_threshold=float(config.model.det_score_threshold),
            det_max_detections=int(config.model.det_max_detections),
            num_defect_classes=int(config.model.num_defect_classes),
            input="images [N,H,W,C] float32 in [0,1], channels-last, normalised inside",
            normalization=json.dumps(input_normalization(model32.num_channels)),
            class_names=json.dumps(default_class_names(int(config.model.num_defect_classes))),
            outputs=",".join(interface.OUTPUT_NAMES),
        )
        metadata.update(extra_metadata or {})  # its class_names replace the default ones
        model = finalize(raw, metadata)
        report = _check_and_save(
            model,
            job,
            reference,
            images,
            image_source=image_source,
            parity_count=parity_count,
            score_threshold=float(config.model.det_score_threshold),
            trt=trt,
        )
        report.update(backend=backend, export_seconds=seconds, backend_report=backend_report)
        if backend == "jax2tf":
            report["saved_model"] = backend_report["saved_model"]
            report["saved_model_parity"] = _saved_model_parity(
                backend_report, reference, images, job, float(config.model.det_score_threshold)
            )
            report["passed"] = report["passed"] and report["saved_model_parity"]["passed"]
        with open(job["output"] + ".parity.json", "w") as file:
            json.dump(report, file, indent=2)
        reports.append(report)
    return reports


def _saved_model_parity(backend_report, reference, images, job, score_threshold) -> dict:
    """The reloaded SavedModel's outputs (computed in the jax2tf subprocess) against JAX."""
    path = backend_report.get("check_outputs")
    if not path:
        return {"passed": False, "error": "the jax2tf subprocess saved no SavedModel outputs"}
    with np.load(path) as archive:
        candidate = {name: archive[name] for name in archive.files}
    os.remove(path)
    count = len(candidate["image_score"])
    expected = dict(zip(interface.OUTPUT_NAMES, (np.asarray(v) for v in reference(images[:count]))))
    report = parity.compare_outputs(
        expected, candidate, fp16=bool(job["fp16"]), score_threshold=score_threshold
    )
    report["batch_size"] = count
    return report


def _check_and_save(
    model, job, reference, images, *, image_source, parity_count, score_threshold, trt
):
    output = job["output"]
    onnx.save(model, output)
    report: dict = dict(
        onnx=output,
        bytes=os.path.getsize(output),
        opset=OPSET,
        ir_version=model.ir_version,
        batch="dynamic" if job["batch"] is None else int(job["batch"]),
        mc_samples=int(job["mc_samples"]),
        precision="float16" if job["fp16"] else "float32",
        images=image_source,
        num_nodes=len(model.graph.node),
    )
    try:
        onnx.checker.check_model(output)
        report["checker"] = "ok"
    except onnx.checker.ValidationError as error:
        report["checker"] = f"failed: {error}"
    findings = trt_check.check_model(model, trt)
    report["tensorrt"] = dict(
        target=trt,
        errors=[str(finding) for finding in trt_check.errors(findings)],
        warnings=[str(finding) for finding in findings if finding.severity != "error"],
    )
    batch_sizes = (int(job["batch"]),) if job["batch"] is not None else (1, parity_count)
    start = time.perf_counter()
    try:
        session = parity.onnx_session(output)
        report["parity"] = parity.check_parity(
            session,
            reference,
            images,
            batch_sizes=batch_sizes,
            fp16=bool(job["fp16"]),
            score_threshold=score_threshold,
        )
    except Exception as error:  # noqa: BLE001 - an ONNX Runtime failure is a parity failure
        report["parity"] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    report["parity_seconds"] = time.perf_counter() - start
    graph_ok = report["checker"] == "ok" and not report["tensorrt"]["errors"]
    report["graph_ok"] = graph_ok
    report["passed"] = bool(graph_ok and report["parity"]["passed"])
    return report
