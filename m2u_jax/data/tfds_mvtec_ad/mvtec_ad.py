"""TFDS builder for MVTec AD read from a manually downloaded, extracted copy.

    import tensorflow_datasets as tfds
    from m2u_jax.data.tfds_mvtec_ad.mvtec_ad import MvtecAd
    builder = MvtecAd(config="bottle", data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/mvtec_anomaly_detection"),
        file_format="array_record")

One builder config per MVTec AD category (`MvtecAdConfig(name=...)` also builds any other
category folder in the same layout, e.g. the synthetic set's). Splits `train` and `test`, as in
the download. Every file goes through `m2u_jax.data.decode` (checksums, truncation, channel
count, mask size), so a bad download fails the build with the file's name. Grayscale categories
(grid, screw, zipper) are stored as RGB.

Features: `image` `[h, w, 3]` uint8 PNG, `mask` `[h, w, 1]` uint8 PNG (0 / 255; zero for good
images), `label` (good / defective), `defect_type` (folder name), `category`, `path` (relative to
manual_dir). Examples are stored in sorted path order (shuffling disabled), and the builder's
metadata lists (path, defect_type, width, height) per split in that order, so a reader can index
examples without scanning the data (`reader.py`).
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from m2u_jax.data import decode, sources
from m2u_jax.data.records import DataError, apply_skip_policy

MVTEC_AD_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
SOURCE_SPLITS = ("train", "test")


class MvtecAdConfig(tfds.core.BuilderConfig):
    """One MVTec AD category (the config's name is the category folder)."""


class MvtecAd(tfds.core.GeneratorBasedBuilder):
    """MVTec AD anomaly detection: good training images, good and defective test images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: image, mask, label, defect type, path."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad, extract "
        "it, and pass the folder holding the category folders (bottle/, cable/, ...) as "
        "manual_dir (m2u-jax: --config.data.root)."
    )
    BUILDER_CONFIGS = [
        MvtecAdConfig(name=category, description=f"MVTec AD category '{category}'.")
        for category in MVTEC_AD_CATEGORIES
    ]

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 derives this through `importlib_resources`, a package it no longer
        # installs on Python >= 3.9; the builder's own file is the same answer.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "mask": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(names=["good", "defective"]),
                    "defect_type": tfds.features.Text(),
                    "category": tfds.features.Text(),
                    "path": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(str(dl_manager.manual_dir))
        discovery = sources.discover_mvtec_ad(str(root), [self.builder_config.name])
        records = apply_skip_policy(discovery, skip_bad_files=False)
        generators = {}
        for split in SOURCE_SPLITS:
            split_records = sorted(
                (r for r in records if r.source_split == split), key=lambda r: r.path
            )
            if not split_records:
                continue
            self.info.metadata[f"{split}_examples"] = [
                [str(pathlib.Path(r.path).relative_to(root)), r.defect_name, r.width, r.height]
                for r in split_records
            ]
            generators[split] = self._generate_examples(root, split_records)
        return generators

    def _generate_examples(self, root: pathlib.Path, records):
        for index, record in enumerate(records):
            image, _ = decode.read_modality(record.path, "rgb")
            if record.mask_path is not None:
                mask = decode.read_mask(record.mask_path)
                if mask.shape != image.shape[:2]:
                    raise DataError(
                        f"{record.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its "
                        f"image {record.path} is {image.shape[1]}x{image.shape[0]}"
                    )
            else:
                mask = np.zeros(image.shape[:2], bool)
            # Integer keys in sorted path order: with shuffling disabled this is the stored order.
            yield (
                index,
                {
                    "image": image,
                    "mask": mask.astype(np.uint8)[..., None] * 255,
                    "label": record.label,
                    "defect_type": record.defect_name,
                    "category": record.category,
                    "path": str(pathlib.Path(record.path).relative_to(root)),
                },
            )
