"""Reads data prepared by the `mvtec_ad` TFDS builder as `SampleRecord`s plus random access.

`data.format='tfds'`: `data.root` is the builder's manual_dir (an extracted MVTec AD download)
and `data.tfds_data_dir` where prepared data lives ('' = the TFDS default). A category that is
not prepared yet is built on first use (ArrayRecord files, so examples can be read by index).
Records come from the builder's metadata (no scan of the data); the pipeline reads each
example's encoded image and mask by index and decodes them with the same code as files.
"""

from __future__ import annotations

import pathlib
import threading

import tensorflow_datasets as tfds

from m2u_jax.modalities import split_list
from m2u_jax.data.records import GOOD, DataError, Discovery, SampleRecord
from m2u_jax.data.tfds_mvtec_ad.mvtec_ad import (
    MVTEC_AD_CATEGORIES,
    SOURCE_SPLITS,
    MvtecAd,
    MvtecAdConfig,
)

FILE_FORMAT = "array_record"


_BUILDERS: dict[tuple[str, str, str], MvtecAd] = {}
_BUILDERS_LOCK = threading.Lock()


def load_builder(data_config, category: str) -> MvtecAd:
    """The `mvtec_ad/<category>` builder, prepared from `data.root` if needed (memoised)."""
    key = (category, str(data_config.tfds_data_dir), str(data_config.root))
    with _BUILDERS_LOCK:
        if key not in _BUILDERS:
            _BUILDERS[key] = _prepared_builder(data_config, category)
        return _BUILDERS[key]


def _prepared_builder(data_config, category: str) -> MvtecAd:
    config = category if category in MVTEC_AD_CATEGORIES else MvtecAdConfig(name=category)
    builder = MvtecAd(
        config=config, data_dir=data_config.tfds_data_dir or None, file_format=FILE_FORMAT
    )
    if not builder.is_prepared():
        if not pathlib.Path(data_config.root).is_dir():
            raise DataError(
                f"{data_config.root}: mvtec_ad/{category} is not prepared in "
                f"{builder.data_dir} and data.root (the manual_dir) is not a directory"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(data_config.root)),
            file_format=FILE_FORMAT,
        )
    return builder


def _categories(data_config) -> list[str]:
    wanted = list(split_list(data_config.categories))
    if wanted:
        return wanted
    root = pathlib.Path(data_config.root)
    if root.is_dir():
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "train").is_dir())
        if found:
            return found
    raise DataError(
        f"{data_config.root}: no MVTec AD categories found; set data.categories "
        f"(e.g. {','.join(MVTEC_AD_CATEGORIES[:2])})"
    )


def discover_prepared(data_config) -> Discovery:
    """Records of every requested category's prepared train and test splits."""
    modalities = split_list(data_config.modalities)
    if modalities != ("rgb",):
        raise DataError(
            f"{data_config.root}: the tfds mvtec_ad source has only 'rgb', but data.modalities="
            f"{data_config.modalities!r}"
        )
    root = pathlib.Path(data_config.root)
    records = []
    for category in _categories(data_config):
        builder = load_builder(data_config, category)
        for split in SOURCE_SPLITS:
            for index, (relative, defect, width, height) in enumerate(
                builder.info.metadata.get(f"{split}_examples", [])
            ):
                path = str(root / relative)
                records.append(
                    SampleRecord(
                        path=path,
                        category=category,
                        defect_name=defect,
                        source_split=split,
                        modality_paths={"rgb": path},
                        mask_path=None if defect == GOOD else f"{path} (mask)",
                        width=int(width),
                        height=int(height),
                        tfds_index=(category, split, index),
                    )
                )
    return Discovery(records, [])


class ExampleBytes:
    """Encoded image and mask of a tfds record by index (thread-safe, sources opened lazily)."""

    def __init__(self, data_config):
        self._data_config = data_config
        self._sources = {}
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()

    def _source(self, category: str, split: str):
        key = (category, split)
        with self._lock:
            if key not in self._sources:
                builder = load_builder(self._data_config, category)
                self._sources[key] = builder.as_data_source(
                    split,
                    decoders={
                        "image": tfds.decode.SkipDecoding(),
                        "mask": tfds.decode.SkipDecoding(),
                    },
                )
            return self._sources[key]

    def __call__(self, record: SampleRecord) -> dict[str, bytes]:
        """path -> encoded bytes for the record's image (and mask)."""
        category, split, index = record.tfds_index
        source = self._source(category, split)
        with self._read_lock:  # Reads are short; decoding (the slow part) runs unlocked.
            example = source[index]
        files = {record.path: example["image"]}
        if record.mask_path is not None:
            files[record.mask_path] = example["mask"]
        return files
