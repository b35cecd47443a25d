"""Discovery by format; protocols: which records train, validate and test; the class map
(`DatasetInfo`). No TF except for the 'tfds' format.

Every split is computed per stratum (category, defect type), from the records sorted by path and
a numpy generator seeded by (config.seed, the stratum's names), so the assignment does not depend
on discovery order or on which other categories are loaded.

- `unsupervised`: train = the defect-free images of the source's train split (or, for layouts
  without splits, all but `test_fraction` + `val_fraction` of them); every defective image is
  for evaluation only.
- `supervised`: as above for defect-free images; the defective images of each type are pooled
  (whatever source split they were in) and split seeded into test (`test_fraction`), validation
  (`val_fraction`) and train (the rest); `labeled_fraction` then keeps that seeded fraction of
  each type's training defects (at least one).
- Validation always exists: it is the source's validation split plus, for every stratum that
  split lacks, a seeded `val_fraction` of that stratum's test images, moved out of test (so test
  and validation are disjoint). MVTec AD has no validation split, so validation is carved from
  its test set (good and each defect type); MVTec 3D-AD's validation holds only good images, so
  only its defect types are carved.

Entry point: `discover_config` runs the discovery of `config.data.format` (the file layouts of
`sources`, or the prepared TFDS data of `tfds_mvtec_ad.reader`, imported only for 'tfds');
`discover` applies `data.skip_bad_files` to it and `load_splits` then the protocol.

Class map: `defect_type_names` lists every defect type of the dataset, sorted (good = 0, type
i = 1 + index). The model's classes are `DatasetInfo.class_names` (K = `num_classes`): the
defect types under `supervised`, and the single class 'defect' under `unsupervised`, where
detection is class-agnostic (all real boxes are class 0, every defective image has
`defect_types` 1). `config.model.num_defect_classes` = 0 takes K from the data; a set value must
equal K under `supervised` and be at least K (= 1) under `unsupervised`
(`resolve_num_defect_classes`, checked before any model is built).
"""

from __future__ import annotations

import collections
import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np

from m2u_jax.config import DATA_FORMATS, ConfigError
from m2u_jax.modalities import num_channels, split_list
from m2u_jax.data import sources
from m2u_jax.data.records import (
    GOOD,
    DataError,
    Discovery,
    SampleRecord,
    apply_skip_policy,
    defect_type_names,
)

SPLITS = ("train", "validation", "test")
CLASS_AGNOSTIC_NAME = "defect"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer and evaluator need to know about a dataset.

    Attributes:
      class_names: the K classes of the defect-type and detection heads (box class i, defect
        type i + 1): the sorted defect types (supervised) or ('defect',) (unsupervised).
      defect_type_names: every defect type in the data, sorted, whatever the protocol.
      counts: split -> {'images', 'good', 'defective', 'per_category': {name: n},
        'per_defect_type': {name: n}} (per_defect_type includes 'good').
    """

    format: str
    root: str
    protocol: str
    categories: tuple[str, ...]
    modalities: tuple[str, ...]
    num_channels: int
    image_size: int
    class_names: tuple[str, ...]
    defect_type_names: tuple[str, ...]
    counts: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def discover_config(data_config) -> Discovery:
    """Runs the discovery for `config.data`'s format, keeping bad files."""
    data_format = data_config.format
    modalities = split_list(data_config.modalities)
    categories = split_list(data_config.categories)
    if data_format in ("mask_folder", "voc") and categories:
        raise DataError(
            f"{data_config.root}: data.categories={data_config.categories!r} but '{data_format}' "
            "data has one category (the root folder); leave data.categories empty"
        )
    if data_format == "mvtec_ad":
        return sources.discover_mvtec_ad(data_config.root, categories, modalities)
    if data_format == "mvtec_3d":
        return sources.discover_mvtec_3d(data_config.root, categories, modalities)
    if data_format == "mask_folder":
        return sources.discover_mask_folder(data_config.root, data_config.good_class, modalities)
    if data_format == "voc":
        return sources.discover_voc(data_config.root, modalities)
    if data_format == "tfds":
        from m2u_jax.data.tfds_mvtec_ad import reader  # TensorFlow only for this format.

        return reader.discover_prepared(data_config)
    raise DataError(f"data.format={data_format!r} is not one of {DATA_FORMATS}")


def discover(data_config) -> list[SampleRecord]:
    """Records for `config.data`, bad files handled by `data.skip_bad_files`."""
    records = apply_skip_policy(discover_config(data_config), data_config.skip_bad_files)
    if not records:
        raise DataError(f"{data_config.root}: no usable images found")
    return records


def _stratum_rng(seed: int, category: str, defect_name: str) -> np.random.Generator:
    return np.random.default_rng(
        [seed, zlib.crc32(category.encode()), zlib.crc32(defect_name.encode())]
    )


def _carve_count(total: int, fraction: float) -> int:
    """Items moved out of a pool of `total`: round(total * fraction), at least 1 when the pool
    has two or more items (and fraction > 0), and never the whole pool."""
    if fraction <= 0 or total < 2:
        return 0
    return int(min(max(round(total * fraction), 1), total - 1))


def _three_way(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, validation, test) sizes: rounded fractions, but train gets the first item, test
    the second and validation the third before any stratum is left without them."""
    num_test = _carve_count(total, test_fraction)
    num_val = _carve_count(total - num_test, val_fraction / max(1.0 - test_fraction, 1e-9))
    return total - num_test - num_val, num_val, num_test


def assign_splits(
    records: Sequence[SampleRecord],
    *,
    protocol: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    labeled_fraction: float = 1.0,
) -> dict[str, list[SampleRecord]]:
    """Splits records into 'train' / 'validation' / 'test' (each sorted by path)."""
    if protocol not in ("unsupervised", "supervised"):
        raise ValueError(f"data.protocol={protocol!r}: use 'unsupervised' or 'supervised'")
    strata = collections.defaultdict(list)
    for record in sorted(records, key=lambda r: r.path):
        strata[(record.category, record.defect_name)].append(record)
    splits = {name: [] for name in SPLITS}
    for (category, defect_name), items in sorted(strata.items()):
        rng = _stratum_rng(seed, category, defect_name)
        by_source = collections.defaultdict(list)
        for record in items:
            by_source[record.source_split].append(record)
        train, validation, test = [], list(by_source["validation"]), []
        if defect_name == GOOD or protocol == "unsupervised":
            if defect_name == GOOD:
                train += by_source["train"]
                test += by_source["test"]
            else:  # Unsupervised: defects are for evaluation only.
                test += by_source["train"] + by_source["test"]
            unsplit = [by_source[None][i] for i in rng.permutation(len(by_source[None]))]
            if defect_name == GOOD:
                num_train, num_val, num_test = _three_way(len(unsplit), val_fraction, test_fraction)
                train += unsplit[:num_train]
                validation += unsplit[num_train : num_train + num_val]
                test += unsplit[num_train + num_val :]
            else:
                test += unsplit
        else:  # Supervised defects: pool every source split, split per type.
            pool = [items[i] for i in rng.permutation(len(items))]
            num_train, num_val, num_test = _three_way(len(pool), val_fraction, test_fraction)
            train = pool[:num_train]
            validation = pool[num_train : num_train + num_val]
            test = pool[num_train + num_val :]
            if train:
                keep = max(1, round(labeled_fraction * len(train)))
                train = train[:keep]
        if not validation and test:
            order = rng.permutation(len(test))
            num_carved = _carve_count(len(test), val_fraction)
            carved = set(order[:num_carved].tolist())
            validation = [test[i] for i in sorted(carved)]
            test = [record for i, record in enumerate(test) if i not in carved]
        splits["train"] += train
        splits["validation"] += validation
        splits["test"] += test
    return {name: sorted(items, key=lambda r: r.path) for name, items in splits.items()}


def split_counts(split_records: Sequence[SampleRecord]) -> dict:
    """{'images', 'good', 'defective', 'per_category', 'per_defect_type'} for one split."""
    per_category = collections.Counter(r.category for r in split_records)
    per_type = collections.Counter(r.defect_name for r in split_records)
    good = per_type.get(GOOD, 0)
    return {
        "images": len(split_records),
        "good": good,
        "defective": len(split_records) - good,
        "per_category": dict(sorted(per_category.items())),
        "per_defect_type": dict(sorted(per_type.items())),
    }


def make_info(data_config, records: Sequence[SampleRecord], splits: dict) -> DatasetInfo:
    """The DatasetInfo of discovered records and their split."""
    type_names = defect_type_names(records)
    if data_config.protocol == "supervised":
        class_names = type_names
    else:
        class_names = (CLASS_AGNOSTIC_NAME,)
    return DatasetInfo(
        format=data_config.format,
        root=str(data_config.root),
        protocol=data_config.protocol,
        categories=tuple(sorted({r.category for r in records})),
        modalities=split_list(data_config.modalities),
        num_channels=num_channels(data_config.modalities),
        image_size=int(data_config.image_size),
        class_names=class_names,
        defect_type_names=type_names,
        counts={name: split_counts(items) for name, items in splits.items()},
    )


def config_splits(records: list[SampleRecord], config) -> dict[str, list[SampleRecord]]:
    """`assign_splits` with `config`'s protocol, seed and fractions."""
    data = config.data
    return assign_splits(
        records,
        protocol=data.protocol,
        seed=int(config.seed),
        val_fraction=float(data.val_fraction),
        test_fraction=float(data.test_fraction),
        labeled_fraction=float(data.labeled_fraction),
    )


def load_splits(config) -> tuple[dict[str, list[SampleRecord]], DatasetInfo]:
    """Discovers `config.data` and applies its protocol: (split -> records, DatasetInfo)."""
    records = discover(config.data)
    splits = config_splits(records, config)
    return splits, make_info(config.data, records, splits)


def load_dataset_info(config) -> DatasetInfo:
    """The class map and split sizes of `config.data` (discovers the files; no decoding)."""
    return load_splits(config)[1]


def class_index_maps(info: DatasetInfo) -> tuple[dict[str, int], dict[str, int]]:
    """(defect name -> defect type id, defect name -> box class) for `info`'s protocol.

    good -> 0 in the first map. Unsupervised: every defect -> type 1, box class 0.
    """
    if info.protocol == "supervised":
        type_of = {name: i + 1 for i, name in enumerate(info.class_names)}
    else:
        type_of = {name: 1 for name in info.defect_type_names}
    type_of[GOOD] = 0
    box_class_of = {name: type_id - 1 for name, type_id in type_of.items() if name != GOOD}
    return type_of, box_class_of


def resolve_num_defect_classes(requested: int, info: DatasetInfo) -> int:
    """The class count of the model's defect-type and detection heads for the data of `info`.

    `requested` is `config.model.num_defect_classes`: 0 = from the data (`info.num_classes`:
    the defect types under `supervised`, 1 = the class-agnostic 'defect' under `unsupervised`).
    A set value is checked against the data: under `supervised` it must equal the number of
    defect types (fewer classes put a class index outside the heads, the NaN of an
    out-of-range one-hot; more leave classes no image has, which evaluation cannot score);
    under `unsupervised` every real box is class 0, so any value >= 1 fits. Raises ConfigError
    with one line naming both numbers and the class names.
    """
    requested = int(requested)
    available = info.num_classes
    if info.protocol == "supervised" and available == 0:
        raise ConfigError(
            f"data.protocol='supervised' but {info.root} has no defective image (no defect class "
            "to learn); use --config.data.protocol=unsupervised"
        )
    if requested == 0:
        return available
    if requested < available or (info.protocol == "supervised" and requested != available):
        names = list(info.class_names)
        shown = ", ".join(names[:10]) + (
            f", ... ({len(names) - 10} more)" if len(names) > 10 else ""
        )
        raise ConfigError(
            f"model.num_defect_classes={requested} but the data in {info.root} has {available} "
            f"defect classes ({shown}) under the {info.protocol} protocol: set "
            f"--config.model.num_defect_classes={available} or 0 (from the data)"
        )
    return requested


def with_data_num_defect_classes(config, info: DatasetInfo | None = None):
    """`config` with `model.num_defect_classes` checked against its data and, when 0, set to
    the data's class count (a copy; `config` is returned as it is when nothing changes).
    `info` defaults to `load_dataset_info(config)` (discovers the files; no decoding).
    Raises ConfigError (`resolve_num_defect_classes`)."""
    if info is None:
        info = load_dataset_info(config)
    resolved = resolve_num_defect_classes(config.model.num_defect_classes, info)
    if resolved == int(config.model.num_defect_classes):
        return config
    copy = config.copy_and_resolve_references()
    copy.model.num_defect_classes = resolved
    return copy
