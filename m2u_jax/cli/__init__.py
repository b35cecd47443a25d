"""The command-line programs: `m2u-train`, `m2u-eval`, `m2u-export`, `m2u-predict`, `m2u-data`,
`m2u-benchmark` (in a checkout also `python train.py`, `python eval.py`, `python tools/
convert_to_onnx/convert.py`, `python tools/benchmark.py`). Each module's `run()` is its
console-script entry point."""

import os
import tempfile


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


def folder_problem(
    path: str, flag: str, *, read: bool = False, named: str | None = None
) -> str | None:
    """Why a tool cannot write into folder `path` (made when missing), as one line naming
    `flag` and `named` (default `path`), or None: `path` or a folder above it is a file, or the
    nearest existing folder cannot be written (with `read`: or listed). Tried, not checked with
    `os.access`: root passes every permission check, and a read-only mount fails only a write.
    """
    if "://" in path:  # gs://... (orbax writes there): not a local folder to try
        return None
    named = path if named is None else named
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if named == path and existing == os.path.abspath(path):
            return f"{flag} {path} is a file, not a folder"
        return f"{flag} {named}: {existing} is a file, not a folder"
    try:
        if read:
            os.listdir(existing)
    except OSError as error:
        return f"{flag} {named}: cannot read {existing} ({error.strerror})"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{flag} {named}: cannot write in {existing} ({error.strerror})"
    return None


def file_problem(path: str, flag: str) -> str | None:
    """Why a tool cannot write file `path` (its folders made when missing), as one line, or
    None: `path` is a folder, or the `folder_problem` of the folder it goes in."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; name a file"
    return folder_problem(os.path.dirname(os.path.abspath(path)), flag, named=path)
