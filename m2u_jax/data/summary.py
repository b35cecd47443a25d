"""Dataset summary as one JSON object (no TF except for the 'tfds' format).

    python -m m2u_jax.data.summary --config configs/default.py \\
        --config.data.format=voc --config.data.root=../shared/data/neu_det

prints images per split / category / defect type, box counts, the size range of the image
files, how many of a sample of them are gray pictures, modalities, the class map, the number of
bad files and of suspicious masks (empty on a defective image, or mostly set), with an example
in `notes`. Box counts are those of the annotations (VOC) or of the 8-connected components of
the masks at the files' own resolution (every component, before resizing and before truncation
to `data.max_boxes`). Exits with status 2 and a one-line message naming the file or key on bad
input.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import sys
from collections.abc import Sequence

from m2u_jax.config import ConfigError, validate
from m2u_jax.modalities import split_list
from m2u_jax.data import decode
from m2u_jax.data.records import DataError, SampleRecord, apply_skip_policy
from m2u_jax.data.splits import SPLITS, config_splits, discover_config, make_info


def _count_boxes(record: SampleRecord) -> tuple[int, list[str], str | None]:
    """(number of boxes, their defect names, what looks wrong with the mask or None) of one
    record at its native resolution."""
    if record.boxes is not None:
        return len(record.boxes), list(record.box_names), None
    if record.mask_path is None or record.tfds_index is not None:
        return 0, [], None
    mask = decode.read_mask(record.mask_path)
    count = len(decode.boxes_from_mask(mask))
    return count, [record.defect_name] * count, decode.mask_problem(mask, record.label == 1)


GRAY_SAMPLE = 64  # image files checked for gray content, spread evenly over the set


def _is_gray_file(record: SampleRecord) -> bool:
    """Whether the record's image file is a gray picture (one channel, or RGB channels alike);
    False for a file that does not decode (the summary reports, training names the file)."""
    try:
        return decode.is_gray(*decode.read_modality(record.path, "rgb"))
    except DataError:
        return False


def _size_range(records: Sequence[SampleRecord]) -> dict:
    widths = [r.width for r in records]
    heights = [r.height for r in records]
    return {
        "min": {"width": min(widths), "height": min(heights)},
        "max": {"width": max(widths), "height": max(heights)},
    }


def summarize(config) -> dict:
    """The summary dict of `config.data` (see the module docstring)."""
    data = config.data
    discovery = discover_config(data)
    records = apply_skip_policy(discovery, data.skip_bad_files)
    if not records:
        raise DataError(f"{data.root}: no usable images found")
    splits = config_splits(records, config)
    info = make_info(data, records, splits)
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        box_counts = dict(zip((r.path for r in records), pool.map(_count_boxes, records)))
        files = [r for r in records if r.tfds_index is None]
        sample = files[:: max(1, len(files) // GRAY_SAMPLE)][:GRAY_SAMPLE]
        gray = sum(pool.map(_is_gray_file, sample))
    per_box_class = collections.Counter()
    for _, names, _ in box_counts.values():
        per_box_class.update(names)
    suspicious = {path: problem for path, (_, _, problem) in box_counts.items() if problem}
    split_summary = {}
    for name in SPLITS:
        counts = dict(info.counts[name])
        counts["boxes"] = sum(box_counts[r.path][0] for r in splits[name])
        split_summary[name] = counts
    per_category = collections.Counter(r.category for r in records)
    per_type = collections.Counter(r.defect_name for r in records)
    notes = []
    if not splits["train"]:
        notes.append(
            f"the training split is empty under data.protocol={data.protocol!r}"
            + (" (no defect-free images)" if data.protocol == "unsupervised" else "")
        )
    if suspicious:
        path, problem = next(iter(sorted(suspicious.items())))
        notes.append(f"{len(suspicious)} suspicious mask(s), e.g. {path}: {problem}")
    modalities = split_list(data.modalities)
    if sample and gray == len(sample) and "rgb" in modalities:
        notes.append(
            f"the {len(sample)} image files checked are gray: 'rgb' reads them as three equal "
            "channels; data.modalities=gray would read one (a cheaper train step, slightly lower "
            "quality on NEU-DET: docs/quality.md, 'One channel for gray pictures')"
        )
    good = per_type.get("good", 0)
    return {
        "format": data.format,
        "root": str(data.root),
        "protocol": data.protocol,
        "modalities": list(modalities),
        "num_channels": info.num_channels,
        "images": len(records),
        "good": good,
        "defective": len(records) - good,
        "boxes": sum(count for count, _, _ in box_counts.values()),
        "suspicious_masks": len(suspicious),
        "boxes_per_defect_type": dict(sorted(per_box_class.items())),
        "per_category": dict(sorted(per_category.items())),
        "per_defect_type": dict(sorted(per_type.items())),
        "image_size": _size_range(records),
        "gray_files": {"checked": len(sample), "gray": gray},
        "resized_to": int(data.image_size),
        "splits": split_summary,
        "class_names": list(info.class_names),
        "num_classes": info.num_classes,
        "defect_type_names": list(info.defect_type_names),
        "bad_files": len(discovery.problems),
        "notes": notes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    # Own FlagValues: importing this module never touches absl's global flags. `sys_argv` lets
    # config_flags register the `--config.a.b=value` override flags it finds in argv.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (configs/*.py).",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    try:
        flag_values(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        if isinstance(error, (AttributeError, KeyError)):  # config_flags: unknown override key
            key = str(error).strip("\"'")
            message = f"unknown config key {key!r} on the command line (see m2u_jax/default_config.py)"
        else:
            message = f"bad command line: {error}"
        print(f"summary: error: {message}", file=sys.stderr)
        return 2
    config = flag_values.config
    if config is None:
        print("summary: error: --config is required", file=sys.stderr)
        return 2
    try:
        validate(config)
        summary = summarize(config)
    except (ConfigError, DataError) as error:
        print(f"summary: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
