"""Set-up shared by the study tools (`limited_data_study.py`, `baseline_table.py`)."""

from __future__ import annotations

import os

import ml_collections


def enable_compilation_cache(path: str) -> None:
    """Persistent XLA compilation cache in `path`, shared by a study's runs; '' = off."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.set_cache_dir(path)


def with_supervised_protocol(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `data.protocol='supervised'` (reads no data): what the two
    studies validate before any work, since a check can depend on the protocol."""
    study = config.copy_and_resolve_references()
    study.data.protocol = "supervised"
    return study


def supervised_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `data.protocol='supervised'` and `model.num_defect_classes` set
    to the dataset's number of defect types (both studies compare labelled-defect training)."""
    from m2u_jax.data import pipeline

    study = with_supervised_protocol(config)
    info = pipeline.load_dataset_info(study)
    if not info.class_names:
        raise ValueError(f"{config.data.root} has no defective image: nothing to study")
    study.model.num_defect_classes = info.num_classes
    return study
