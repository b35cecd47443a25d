"""Choose the NMS IoU of a trained detector on its validation split.

    python tools/nms_table.py --workdir runs/quality/neu_sup [--step N] [--ious 0.3,0.4,0.5,0.6]

Restores the run's checkpoint (its own config, WORKDIR/config.json), predicts the validation and
test splits once per NMS IoU threshold (`model.det_iou_threshold`; box-score floor and box cap as
configured) and prints COCO mAP@0.5 and mAP@[.5:.95] of both splits, then the threshold with the
best validation mAP@0.5. The test columns are there to read the choice against, not to make it.
Use the chosen value as `--config.model.det_iou_threshold=I` for eval.py, predict.py and the
ONNX export (NMS is part of the model's graph).
"""

from __future__ import annotations

import math
import sys

DEFAULT_IOUS = (0.3, 0.4, 0.5, 0.6, 0.7)


def choose(rows: list[dict]) -> dict | None:
    """The row with the best validation mAP@0.5; a tie goes to the higher IoU threshold (fewer
    boxes suppressed, the COCO-conventional side). None when validation holds no box (mAP NaN)."""
    defined = [row for row in rows if not math.isnan(row["validation_map50"])]
    if not defined:
        return None
    return max(defined, key=lambda row: (row["validation_map50"], row["iou"]))


def parse_ious(values) -> list[float] | None:
    """`--ious` strings → thresholds in (0, 1]; None when any is not a number in that range
    (shared by the table tools that take `--ious`)."""
    try:
        ious = [float(value) for value in values]
    except ValueError:
        return None
    return ious if ious and all(0.0 < iou <= 1.0 for iou in ious) else None


def nms_rows(config, workdir: str, step, ious) -> tuple[int, list[dict]]:
    """(checkpoint step, one row per IoU threshold: `iou`, `{validation,test}_map50`,
    `{validation,test}_map`)."""
    import jax

    from m2u_jax import evaluate, run_checkpoint
    from m2u_jax import model as model_lib
    from m2u_jax import predictions as predictions_lib

    context = evaluate.eval_context(config)
    config = config.copy_and_resolve_references()
    config.model.num_defect_classes = context.num_defect_classes
    config.eval.num_mc_samples = 1  # boxes come from the deterministic pass
    sharding = predictions_lib.eval_batch_sharding(config)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    params, step = run_checkpoint.restore_params(config, workdir, step, sharding=replicated)
    rows = []
    for iou in ious:
        config.model.det_iou_threshold = float(iou)
        model = model_lib.build_model(config.model)
        predict_batch = predictions_lib.make_model_predict_fn(
            config, model, {"params": params}, sharding
        )
        if context.class_agnostic:
            predict_batch = predictions_lib.without_classes(predict_batch)
        row = {"iou": float(iou)}
        for split in ("validation", "test"):
            gathered = predictions_lib.collect_split(config, split, predict_batch, keep_maps=False)
            detection = evaluate.detection_metrics(
                gathered, context.class_names, context.class_agnostic
            )
            row[f"{split}_map50"] = detection["map50"]
            row[f"{split}_map"] = detection["map"]
        rows.append(row)
    return step, rows


def markdown(step: int, rows: list[dict]) -> str:
    chosen = choose(rows)
    choice = (
        f"NMS IoU chosen on validation: **{chosen['iou']:g}**."
        if chosen
        else "validation holds no ground-truth box: no choice."
    )
    lines = [
        f"Checkpoint step {step}; {choice}",
        "",
        "| NMS IoU | validation mAP@0.5 | validation mAP@[.5:.95] | test mAP@0.5 | "
        "test mAP@[.5:.95] |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mark = " (chosen)" if row is chosen else ""
        lines.append(
            f"| {row['iou']:g}{mark} | {row['validation_map50']:.3f} | "
            f"{row['validation_map']:.3f} | {row['test_map50']:.3f} | {row['test_map']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    del argv
    from m2u_jax import config as config_lib
    from m2u_jax import cpu_prng

    ious = parse_ious(_IOUS.value)
    if ious is None:
        print(f"nms_table.py: --ious {_IOUS.value}: use numbers in (0, 1]", file=sys.stderr)
        return 2
    try:
        config = config_lib.load_run_config(_WORKDIR.value)
        config_lib.validate(config)
    except config_lib.ConfigError as error:
        print(f"nms_table.py: {error}", file=sys.stderr)
        return 2
    step = None if _STEP.value is None else int(_STEP.value)
    cpu_prng.install()  # the loop-free CPU RNG that eval.py installs
    try:
        step, rows = nms_rows(config, _WORKDIR.value, step, ious)
    except (FileNotFoundError, ValueError) as error:
        print(f"nms_table.py: {error}", file=sys.stderr)
        return 2
    print(markdown(step, rows), end="")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    _IOUS = flags.DEFINE_list(
        "ious", [str(iou) for iou in DEFAULT_IOUS], "NMS IoU thresholds to compare."
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
