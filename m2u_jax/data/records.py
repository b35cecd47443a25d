"""The data contract shared by every data module: `SampleRecord`s, `Discovery` and `DataError`.

A leaf module (no m2u_jax imports): discovery (`sources`, the tfds reader) produces records,
`decode` reads them, `splits` and the pipeline consume them. Every bad input file raises
`DataError` naming the file; `apply_skip_policy` decides whether a discovery's bad files stop
the run or are dropped with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping

GOOD = "good"

logger = logging.getLogger(__name__)


def defect_name_of(folder: str) -> str:
    """The defect name a layout folder stands for: GOOD for any spelling of 'good' ('Good',
    'GOOD'), else the folder name itself."""
    return GOOD if folder.lower() == GOOD else folder


class DataError(ValueError):
    """A bad input file; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One image of a dataset, before decoding.

    Attributes:
      path: the base image (what evaluation reports as the sample's path).
      category: product category (MVTec category, or the root folder's name).
      defect_name: 'good' for defect-free images, else the defect type's name.
      source_split: 'train' | 'validation' | 'test' when the layout says so, else None.
      modality_paths: modality -> file to read it from (only the modalities asked for).
      mask_path: the mask file, or None (all zero for good images; VOC uses `boxes`).
      width, height: the base image's size in pixels (from its header).
      boxes: annotated xyxy boxes in the image's pixel frame (VOC), or None = from the mask.
      box_names: defect name of every annotated box.
      tfds_index: (builder config, split, example index) of a prepared TFDS example.
    """

    path: str
    category: str
    defect_name: str
    source_split: str | None
    modality_paths: Mapping[str, str]
    mask_path: str | None
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_names: tuple[str, ...] | None = None
    tfds_index: tuple[str, str, int] | None = None

    @property
    def label(self) -> int:
        """0 good, 1 defective."""
        return int(self.defect_name != GOOD)


@dataclasses.dataclass
class Discovery:
    """Records found under a root, and the bad files that were left out (DataErrors)."""

    records: list[SampleRecord]
    problems: list[DataError]


def apply_skip_policy(discovery: Discovery, skip_bad_files: bool) -> list[SampleRecord]:
    """Raises the first problem (with a count), or warns once and drops the bad files; then
    keeps every file once (`unique_records`)."""
    problems = discovery.problems
    if problems and not skip_bad_files:
        more = len(problems) - 1
        suffix = f" (and {more} more bad file(s))" if more else ""
        raise DataError(
            f"{problems[0]}{suffix}; set data.skip_bad_files=True to skip bad files with a warning"
        )
    if problems:
        logger.warning(
            "skipped %d bad file(s) (data.skip_bad_files=True); first: %s",
            len(problems),
            problems[0],
        )
    return unique_records(discovery.records)


def unique_records(records: list[SampleRecord]) -> list[SampleRecord]:
    """`records` without those whose image resolves to a file already listed (a link, a folder
    linked into itself), with one warning: a split can never hold one file twice."""
    seen: set[str] = set()
    kept = []
    for record in records:
        resolved = os.path.realpath(record.path)
        if resolved not in seen:
            seen.add(resolved)
            kept.append(record)
    if len(kept) < len(records):
        logger.warning(
            "%d file(s) listed twice (links to the same image) counted once",
            len(records) - len(kept),
        )
    return kept


def defect_type_names(records: Iterable[SampleRecord]) -> tuple[str, ...]:
    """The dataset's class map: every defect name (image types and box names), sorted."""
    names = set()
    for record in records:
        if record.defect_name != GOOD:
            names.add(record.defect_name)
        names.update(record.box_names or ())
    return tuple(sorted(names))
