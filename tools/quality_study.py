"""Real-data quality study: one config over a matrix of (data, protocol, labelled fraction) runs,
each evaluated at several checkpoints of the same run, written to a markdown report.

    python tools/quality_study.py --config configs/cpu_real.py --workdir runs/quality \
        --data_dir ../shared/data --runs mt_unsup,mt_sup@0.1,neu_sup --out docs/quality_runs.md

A run spec is `NAME[@FRACTION]` for the built-in sets under `--data_dir`
(`mt_unsup`, `mt_sup`: Magnetic-tile as a mask folder, `MT_Free` good; `neu_sup`: NEU-DET as
Pascal VOC), or `name=FORMAT:ROOT:PROTOCOL[:GOOD_CLASS][@FRACTION]` for any other set (the
same commands measure data the team never sees). Every `--config.*` override applies to every
run.

Each run trains with `trainer.train` into WORKDIR/NAME (resumable: a finished run
is only re-evaluated), keeps `--curve_points` evenly spaced fine-tuning checkpoints and
evaluates each (`evaluate.evaluate(step=...)`, cached per model/eval settings), so the report
shows quality against the CPU minutes spent up to that checkpoint (`train_seconds` in the
checkpoint meta, pretraining included) — whether a run is still rising (budget-limited) or
flat (design-limited). The report is a table per run plus one summary table (`--readme`
also writes the summary into the README's generated block), and WORKDIR/quality.json holds
every number.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
import time

if __package__ in (None, ""):  # `python tools/quality_study.py` from anywhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402

from tools.study_setup import enable_compilation_cache  # noqa: E402

# Built-in runs: (format, sub-folder of --data_dir, protocol, good class).
BUILTIN_RUNS = {
    "mt_unsup": ("mask_folder", "magnetic_tile", "unsupervised", "MT_Free"),
    "mt_sup": ("mask_folder", "magnetic_tile", "supervised", "MT_Free"),
    "neu_sup": ("voc", "neu_det", "supervised", "good"),
}
# (column, metrics.json section, key, label)
COLUMNS = (
    ("image_auroc", "image", "auroc", "image AUROC"),
    ("pixel_auroc", "pixel", "auroc", "pixel AUROC"),
    ("aupro", "pixel", "aupro", "AUPRO"),
    ("map50", "detection", "map50", "mAP@0.5"),
    ("accuracy", "image", "accuracy", "accuracy"),
)


def parse_run(spec: str, data_dir: str) -> dict:
    """A run spec (module docstring) → {name, format, root, protocol, good_class, fraction}."""
    spec = spec.strip()
    body, _, fraction_text = spec.partition("@")
    fraction = 1.0
    if fraction_text:
        try:
            fraction = float(fraction_text)
        except ValueError:
            raise ValueError(f"run {spec!r}: fraction {fraction_text!r} is not a number") from None
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"run {spec!r}: fraction {fraction} is not in (0, 1]")
    if "=" in body:
        name, _, description = body.partition("=")
        parts = description.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"run {spec!r}: expected name=FORMAT:ROOT:PROTOCOL[:GOOD_CLASS]")
        data_format, root, protocol = parts[:3]
        good_class = parts[3] if len(parts) == 4 else "good"
    elif body in BUILTIN_RUNS:
        name = body
        data_format, folder, protocol, good_class = BUILTIN_RUNS[body]
        root = os.path.join(data_dir, folder)
    else:
        raise ValueError(f"run {spec!r}: unknown; built-in runs are {sorted(BUILTIN_RUNS)}")
    if fraction < 1.0 and protocol != "supervised":
        raise ValueError(f"run {spec!r}: a labelled fraction needs the supervised protocol")
    label = name if fraction_text == "" else f"{name}@{fraction:g}"
    return dict(
        name=label,
        format=data_format,
        root=root,
        protocol=protocol,
        good_class=good_class,
        fraction=fraction,
    )


def run_config(
    config: ml_collections.ConfigDict, run: dict, curve_points: int
) -> ml_collections.ConfigDict:
    """`config` pointed at the run's data, checkpointing `curve_points` times in fine-tuning."""
    copy = config.copy_and_resolve_references()
    copy.data.format = run["format"]
    copy.data.root = run["root"]
    copy.data.protocol = run["protocol"]
    copy.data.good_class = run["good_class"]
    copy.data.labeled_fraction = run["fraction"]
    steps = int(copy.train.finetune_steps)
    copy.train.checkpoint_every = max(1, math.ceil(steps / max(curve_points, 1)))
    # Every curve checkpoint stays, plus the pretraining one.
    copy.train.keep_checkpoints = max(int(copy.train.keep_checkpoints), curve_points + 2)
    copy.eval.after_training = False
    # The curve rows carry the score-reduction and map-smoothing comparisons.
    copy.eval.variant_metrics = True
    return copy


def _value(metrics: dict, section: str, key: str) -> float:
    value = metrics.get(section, {}).get(key)
    return math.nan if value is None else float(value)


def evaluation_key(config: ml_collections.ConfigDict) -> str:
    """8 hex digits naming the `model.*` and `eval.*` values an evaluation depends on, so a cached
    evaluation is reused only under the same values (a changed `--config.eval.*` re-evaluates)."""
    from m2u_jax import config as config_lib

    flat = config_lib._flatten(config)
    chosen = {key: flat[key] for key in sorted(flat) if key.startswith(("model.", "eval."))}
    text = json.dumps(chosen, sort_keys=True, default=list)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def evaluate_curve(config: ml_collections.ConfigDict, run_dir: str) -> list[dict]:
    """Evaluates every kept fine-tuning checkpoint of `run_dir`; one row per checkpoint with
    step, train_minutes, eval_minutes and the `COLUMNS` (cached in RUN_DIR/curve/ per
    `evaluation_key`)."""
    from m2u_jax import evaluate, report, run_checkpoint

    manager = run_checkpoint.make_manager(run_dir, 1000, async_save=False)
    try:
        metas = [meta for meta in run_checkpoint.all_metas(manager) if meta["stage"] == "finetune"]
    finally:
        manager.close()
    curve_dir = os.path.join(run_dir, "curve")
    os.makedirs(curve_dir, exist_ok=True)
    rows = []
    settings = evaluation_key(config)
    for meta in metas:
        step = int(meta["global_step"])
        cached = os.path.join(curve_dir, f"step_{step}-{settings}.json")
        if os.path.exists(cached):
            with open(cached, encoding="utf-8") as file:
                record = json.load(file)
        else:
            start = time.perf_counter()
            evaluate.evaluate(config, run_dir, step, with_speed=False)
            with open(os.path.join(run_dir, "eval", "metrics.json"), encoding="utf-8") as file:
                record = {"metrics": json.load(file), "eval_seconds": time.perf_counter() - start}
            report.write_json(cached, record)
            # Keep each checkpoint's full report next to its numbers.
            shutil.copytree(
                os.path.join(run_dir, "eval"),
                os.path.join(curve_dir, f"eval_step_{step}-{settings}"),
                dirs_exist_ok=True,
            )
        metrics = record["metrics"]
        row = {
            "step": step,
            "finetune_step": int(meta["stage_step"]),
            "train_minutes": float(meta.get("train_seconds", math.nan)) / 60.0,
            "eval_minutes": record["eval_seconds"] / 60.0,
            "threshold_rule": metrics.get("image", {}).get("threshold_rule", "f1"),
        }
        for column, section, key, _ in COLUMNS:
            row[column] = _value(metrics, section, key)
        row["score_variants"] = metrics.get("image", {}).get("score_variants", {})
        row["pixel_smoothing"] = metrics.get("pixel", {}).get("smoothing_variants", {})
        rows.append(row)
    return rows


def run_matrix(config, workdir: str, runs: list[dict], curve_points: int) -> list[dict]:
    from m2u_jax import trainer

    results = []
    for run in runs:
        run_dir = os.path.join(workdir, run["name"])
        cfg = run_config(config, run, curve_points)
        print(f"quality study: {run['name']} -> {run_dir}", flush=True)
        trainer.train(cfg, run_dir)
        # The run's resolved config (class count from the data) rebuilds the same model.
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as file:
            resolved = ml_collections.ConfigDict(json.load(file))
        cfg.model.num_defect_classes = int(resolved.model.num_defect_classes)
        results.append({**run, "curve": evaluate_curve(cfg, run_dir)})
        write_json(os.path.join(workdir, "quality.json"), results)
    return results


def write_json(path: str, payload) -> None:
    from m2u_jax import report

    report.write_json(path, payload)


def _cell(value) -> str:
    if value is None:  # NaN is written as null in metrics.json
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def summary_table(results: list[dict]) -> list[str]:
    """One row per run: its data, protocol, labelled fraction and last checkpoint's numbers."""
    labels = [label for *_, label in COLUMNS]
    lines = ["| run | data | protocol | labelled | CPU min (train) |"]
    lines[-1] += "".join(f" {label} |" for label in labels)
    lines.append("|" + "---|" * (5 + len(labels)))
    for result in results:
        if not result["curve"]:
            continue
        last = result["curve"][-1]
        cells = [
            result["name"],
            f"`{result['root']}` ({result['format']})",
            result["protocol"],
            f"{result['fraction']:g}",
            f"{last['train_minutes']:.1f}",
        ]
        cells += [_cell(last[column]) for column, *_ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: list[dict], note: str) -> str:
    """Summary table (last checkpoint of each run) and one curve table per run."""
    labels = [label for *_, label in COLUMNS]
    lines = [note, "", *summary_table(results)]
    for result in results:
        lines += ["", f"### {result['name']}: quality against CPU minutes", ""]
        header = "| fine-tune step | train min | eval min |"
        lines.append(header + "".join(f" {label} |" for label in labels))
        lines.append("|" + "---|" * (3 + len(labels)))
        for row in result["curve"]:
            cells = [str(row["finetune_step"]), f"{row['train_minutes']:.1f}"]
            cells.append(f"{row['eval_minutes']:.1f}")
            cells += [_cell(row[column]) for column, *_ in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        variants = result["curve"][-1]["score_variants"] if result["curve"] else {}
        if any(_cell(value) != "n/a" for value in variants.values()):  # none without good images
            lines += ["", "Image AUROC of each score reduction (last checkpoint): "]
            lines[-1] += ", ".join(f"{name} {_cell(v)}" for name, v in variants.items())
        smoothing = result["curve"][-1].get("pixel_smoothing", {}) if result["curve"] else {}
        if smoothing:  # cached evaluations from before 2026-12-04 lack it
            lines += ["", "Pixel AUROC / AUPRO of the map mean-filtered w×w (last checkpoint): "]
            lines[-1] += ", ".join(
                f"{name} {_cell(v['auroc'])} / {_cell(v['aupro'])}" for name, v in smoothing.items()
            )
        rule = result["curve"][-1]["threshold_rule"] if result["curve"] else "?"
        lines += ["", f"Accuracy uses the `{rule}` threshold rule on validation."]
    return "\n".join(lines) + "\n"


BEGIN_MARK = "<!-- quality_study:begin (generated by tools/quality_study.py) -->"
END_MARK = "<!-- quality_study:end -->"


def write_report(path: str, text: str, *, require_marks: bool = False) -> None:
    """Writes the generated tables to `path`; a file that already has the begin/end marks keeps
    everything outside them (the hand-written analysis of docs/quality.md). With
    `require_marks` a file without both marks is an error, not overwritten (the README)."""
    block = f"{BEGIN_MARK}\n{text}{END_MARK}\n"
    target = pathlib.Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    if BEGIN_MARK in old and END_MARK in old:
        head, _, rest = old.partition(BEGIN_MARK)
        _, _, tail = rest.partition(END_MARK)
        block = head + block + tail.lstrip("\n")
    elif require_marks:
        raise ValueError(f"{path} has no {BEGIN_MARK} ... {END_MARK} block to replace")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(block, encoding="utf-8")


def study_note(config) -> str:
    import jax

    path = config_flags.get_config_filename(flags.FLAGS["config"])
    return (
        f"Config `{path}`; {config.train.pretrain_steps} pretraining "
        f"+ {config.train.finetune_steps} fine-tuning steps, batch {config.train.batch_size}, "
        f"{config.data.image_size} px, seed {config.seed}, on {jax.devices()[0].device_kind} "
        f"x{jax.device_count()} ({os.cpu_count()} CPU cores). Metrics on each run's held-back "
        "test split."
    )


def main(argv) -> int:
    del argv
    from m2u_jax import config as config_lib

    config = _CONFIG.value
    try:
        runs = [parse_run(spec, _DATA_DIR.value) for spec in _RUNS.value.split(",") if spec]
        if not runs:
            raise ValueError("--runs names no run")
        # Each run's own config (its protocol can decide a check), before any run trains.
        for run in runs:
            try:
                config_lib.validate(run_config(config, run, _CURVE_POINTS.value))
            except config_lib.ConfigError as error:
                raise config_lib.ConfigError(f"run {run['name']}: {error}") from None
    except (ValueError, config_lib.ConfigError) as error:
        print(f"quality_study.py: {error}", file=sys.stderr)
        return 2
    workdir = _WORKDIR.value
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    results = run_matrix(config, workdir, runs, _CURVE_POINTS.value)
    text = markdown(results, study_note(config))
    out = _OUT.value or os.path.join(workdir, "quality.md")
    write_report(out, text)
    print(text)
    print(f"wrote {out}")
    if _README.value:
        summary = "\n".join([study_note(config), "", *summary_table(results)]) + "\n"
        try:
            write_report(_README.value, summary, require_marks=True)
        except ValueError as error:
            print(f"quality_study.py: {error}", file=sys.stderr)
            return 2
        print(f"wrote the summary table into {_README.value}")
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from m2u_jax import host_memory

    host_memory.keep_freed_memory()  # first, before JAX's threads start (as train.py)

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Study directory (one folder per run).")
    _DATA_DIR = flags.DEFINE_string("data_dir", "../shared/data", "Root of the built-in sets.")
    _RUNS = flags.DEFINE_string("runs", "mt_unsup,mt_sup@0.1,neu_sup", "Comma-separated runs.")
    _CURVE_POINTS = flags.DEFINE_integer("curve_points", 4, "Checkpoints evaluated per run.")
    _OUT = flags.DEFINE_string("out", "", "Markdown report ('' = WORKDIR/quality.md).")
    _README = flags.DEFINE_string(
        "readme", "", "Also write the summary table into this file's generated block (README.md)."
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
