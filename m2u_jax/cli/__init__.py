"""The command-line programs: `m2u-train`, `m2u-eval`, `m2u-export`, `m2u-predict`, `m2u-data`,
`m2u-benchmark` (in a checkout also `python train.py`, `python eval.py`, `python tools/
convert_to_onnx/convert.py`, `python tools/benchmark.py`). Each module's `run()` is its
console-script entry point."""


def checkpoint_step(text: str | None) -> int | str | None:
    """A `--step` value: a checkpoint's global step, 'best' (the best-validating params of a
    run trained with `train.best_metric`) or None/'' (the run's default). ValueError otherwise."""
    if text is None or text == "":
        return None
    if text == "best":
        return "best"
    step = int(text)  # ValueError for anything else: argparse and absl name the flag
    if step < 0:
        raise ValueError(f"--step {text}: a checkpoint step is >= 0")
    return step
