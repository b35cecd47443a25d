"""Limited-data robustness study: the same config trained and evaluated at several fractions of
labelled training defects (`data.labeled_fraction`, supervised protocol).

    python tools/limited_data_study.py --config configs/tiny.py --workdir /tmp/m2u_limited \
        [--fractions 1.0,0.5,0.2,0.1,0.05] [--config.train.finetune_steps=200 ...]

For every fraction f the run lives in WORKDIR/fraction_<f> (`trainer.train`, which
resumes a finished or interrupted run instead of starting over, then `evaluate.evaluate`). The
study writes WORKDIR/limited_data.{md,json,png}: one table row per fraction (training defects
kept, image accuracy / AUROC / AP, pixel AUROC / AUPRO, mAP@0.5, mAP@[.5:.95]) and one panel per
metric against the fraction.

The protocol is forced to 'supervised' (the fraction only exists there) and
`model.num_defect_classes` is set to the dataset's number of defect types. Runs share a
persistent XLA compilation cache (`--compilation_cache_dir`, default WORKDIR/jax_cache): the
fractions train the same programs, so only the first run compiles.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

if __package__ in (None, ""):  # `python tools/limited_data_study.py` from anywhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from tools.study_setup import (  # noqa: E402
    enable_compilation_cache,
    supervised_config,
    with_supervised_protocol,
)

DEFAULT_FRACTIONS = (1.0, 0.5, 0.2, 0.1, 0.05)
# (column name, metrics.json section, key, label)
STUDY_METRICS = (
    ("image_accuracy", "image", "accuracy", "image accuracy"),
    ("image_auroc", "image", "auroc", "image AUROC"),
    ("image_ap", "image", "ap", "image AP"),
    ("pixel_auroc", "pixel", "auroc", "pixel AUROC"),
    ("aupro", "pixel", "aupro", "AUPRO (FPR ≤ 0.3)"),
    ("map50", "detection", "map50", "mAP@0.5"),
    ("map", "detection", "map", "mAP@[.5:.95]"),
)


def parse_fractions(text: str) -> tuple[float, ...]:
    """'1.0,0.5' -> (1.0, 0.5); each must lie in (0, 1] (the `--fractions` flag)."""
    try:
        fractions = tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--fractions={text!r}: expected comma-separated numbers") from None
    if not fractions:
        raise ValueError("--fractions is empty")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--fractions entry {fraction} is not in (0, 1]")
    return fractions


def fraction_config(config: ml_collections.ConfigDict, fraction: float):
    """`config` (already supervised) at `data.labeled_fraction = fraction`."""
    copy = config.copy_and_resolve_references()
    copy.data.labeled_fraction = float(fraction)
    # The study evaluates each run itself (without the speed measurement it does not report).
    copy.eval.after_training = False
    return copy


def fraction_dir(workdir: str, fraction: float) -> str:
    return os.path.join(workdir, f"fraction_{fraction:g}")


def run_study(
    config: ml_collections.ConfigDict,
    workdir: str,
    fractions=DEFAULT_FRACTIONS,
    *,
    measure_speed: bool = False,
) -> list[dict]:
    """Trains and evaluates `config` at every fraction; returns one row per fraction with
    `fraction`, `train_defects`, `train_images` and the `STUDY_METRICS` columns (NaN when
    undefined)."""
    from m2u_jax import evaluate, trainer
    from m2u_jax.data import pipeline

    base = supervised_config(config)
    rows = []
    for fraction in fractions:
        run_config = fraction_config(base, fraction)
        run_dir = fraction_dir(workdir, fraction)
        counts = pipeline.load_dataset_info(run_config).counts["train"]
        print(f"limited-data study: fraction {fraction:g} -> {run_dir}", flush=True)
        trainer.train(run_config, run_dir)
        metrics = evaluate.evaluate(run_config, run_dir, with_speed=measure_speed)
        row = {
            "fraction": float(fraction),
            "train_defects": int(counts["defective"]),
            "train_images": int(counts["images"]),
        }
        for column, section, key, _ in STUDY_METRICS:
            value = metrics[section][key]
            row[column] = math.nan if value is None else float(value)
        rows.append(row)
    return rows


def _format(value) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    """The study table: a row per fraction, columns fraction, training defects, metrics."""
    header = ["labelled fraction", "training defects", *[label for *_, label in STUDY_METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['fraction']:g}", str(row["train_defects"])]
        cells += [_format(row[column]) for column, *_ in STUDY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(rows: list[dict], path: str) -> str:
    """One panel per metric against the labelled fraction (log x axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 4
    panels = len(STUDY_METRICS)
    figure = Figure(figsize=(4.0 * columns, 3.2 * math.ceil(panels / columns)), dpi=100)
    figure.set_layout_engine("constrained")
    FigureCanvasAgg(figure)
    fractions = np.array([row["fraction"] for row in rows])
    order = np.argsort(fractions)
    for index, (column, _, _, label) in enumerate(STUDY_METRICS):
        axes = figure.add_subplot(math.ceil(panels / columns), columns, index + 1)
        values = np.array([row[column] for row in rows], dtype=np.float64)[order]
        shown = np.isfinite(values)
        axes.plot(fractions[order][shown], values[shown], "o-", color="tab:blue")
        axes.set_xscale("log")
        # The same x range on every panel, also where a metric is undefined (nothing drawn).
        axes.set_xlim(fractions.min() / 1.25, fractions.max() * 1.25)
        axes.set_xticks(fractions[order], [f"{f:g}" for f in fractions[order]])
        axes.minorticks_off()
        axes.set_ylim(-0.02, 1.02)
        axes.set_xlabel("labelled fraction of training defects")
        axes.set_title(label)
        axes.grid(alpha=0.3)
        if not shown.any():
            axes.text(0.5, 0.5, "undefined", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle("Limited-data study (test split)")
    figure.savefig(path, dpi=100, format="png")
    return path


def write_outputs(workdir: str, rows: list[dict], note: str = "") -> dict[str, str]:
    """WORKDIR/limited_data.{md,json,png}; returns their paths."""
    from m2u_jax import report

    os.makedirs(workdir, exist_ok=True)
    paths = {
        "markdown": os.path.join(workdir, "limited_data.md"),
        "json": os.path.join(workdir, "limited_data.json"),
        "plot": os.path.join(workdir, "limited_data.png"),
    }
    report.write_json(paths["json"], {"rows": rows, "note": note})
    plot_study(rows, paths["plot"])
    with open(paths["markdown"], "w", encoding="utf-8") as file:
        file.write("# Limited-data study\n\n")
        if note:
            file.write(note + "\n\n")
        file.write(markdown_table(rows))
        file.write("\n![metrics against the labelled fraction](limited_data.png)\n")
    return paths


def study_note(config: ml_collections.ConfigDict) -> str:
    import jax

    return (
        f"Data: {config.data.format} `{config.data.root}` (supervised protocol, seed "
        f"{config.seed}); {config.train.pretrain_steps} pretraining + "
        f"{config.train.finetune_steps} fine-tuning steps per run, batch "
        f"{config.train.batch_size}, on {jax.devices()[0].device_kind} x{jax.device_count()}. "
        "Metrics on the test split; accuracy at the F1-optimal threshold of validation."
    )


def main(argv) -> int:
    del argv
    from m2u_jax import config as config_lib

    config = _CONFIG.value
    workdir = _WORKDIR.value
    try:
        fractions = parse_fractions(_FRACTIONS.value)
        config_lib.validate(with_supervised_protocol(config))
    except (ValueError, config_lib.ConfigError) as error:
        print(f"limited_data_study.py: {error}", file=sys.stderr)
        return 2
    enable_compilation_cache(
        os.path.join(workdir, "jax_cache") if _CACHE_DIR.value is None else _CACHE_DIR.value
    )
    rows = run_study(config, workdir, fractions)
    paths = write_outputs(workdir, rows, study_note(supervised_config(config)))
    print(markdown_table(rows))
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from m2u_jax import host_memory

    host_memory.keep_freed_memory()  # first, before JAX's threads start (as train.py)

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Study directory (one run per fraction).")
    _FRACTIONS = flags.DEFINE_string(
        "fractions", ",".join(f"{f:g}" for f in DEFAULT_FRACTIONS), "Labelled fractions."
    )
    _CACHE_DIR = flags.DEFINE_string(
        "compilation_cache_dir",
        None,
        "XLA compilation cache ('' = off; default WORKDIR/jax_cache).",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
