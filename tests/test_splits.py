"""Protocols, validation carving and the class map (m2u_jax.data.splits)."""

import collections

import pytest

from configs import default, tiny
from m2u_jax.config import ConfigError
from m2u_jax.data import splits
from m2u_jax.data.records import SampleRecord
from tests.data_trees import write_defect_classes


def _records(layout):
    """layout: {(category, source_split, defect): count} -> SampleRecords."""
    records = []
    for (category, source_split, defect), count in layout.items():
        for index in range(count):
            path = f"/d/{category}/{source_split}/{defect}/{index:03d}.png"
            records.append(
                SampleRecord(path, category, defect, source_split, {"rgb": path}, None, 8, 8)
            )
    return records


MVTEC = {
    ("bottle", "train", "good"): 12,
    ("bottle", "test", "good"): 10,
    ("bottle", "test", "crack"): 5,
    ("bottle", "test", "hole"): 10,
}


def _table(split_records):
    return collections.Counter((r.category, r.defect_name) for r in split_records)


def _assign(records, protocol="unsupervised", seed=0, labeled_fraction=1.0):
    return splits.assign_splits(
        records,
        protocol=protocol,
        seed=seed,
        val_fraction=0.2,
        test_fraction=0.2,
        labeled_fraction=labeled_fraction,
    )


def test_unsupervised_mvtec_carves_validation_from_test():
    result = _assign(_records(MVTEC))
    assert _table(result["train"]) == {("bottle", "good"): 12}
    # round(0.2 * n), at least 1: good 10 -> 2, crack 5 -> 1, hole 10 -> 2.
    assert _table(result["validation"]) == {
        ("bottle", "good"): 2,
        ("bottle", "crack"): 1,
        ("bottle", "hole"): 2,
    }
    assert _table(result["test"]) == {
        ("bottle", "good"): 8,
        ("bottle", "crack"): 4,
        ("bottle", "hole"): 8,
    }
    paths = [{r.path for r in result[name]} for name in splits.SPLITS]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert sum(len(p) for p in paths) == 37
    assert all(r.source_split == "test" for r in result["validation"])


def test_supervised_per_type_split_and_labeled_fraction():
    result = _assign(_records(MVTEC), protocol="supervised")
    # hole 10: test 2, validation round(8 * 0.25) = 2, train 6; crack 5: test 1, val 1, train 3.
    assert _table(result["train"]) == {
        ("bottle", "good"): 12,
        ("bottle", "crack"): 3,
        ("bottle", "hole"): 6,
    }
    assert _table(result["validation"]) == {
        ("bottle", "good"): 2,
        ("bottle", "crack"): 1,
        ("bottle", "hole"): 2,
    }
    half = _assign(_records(MVTEC), protocol="supervised", labeled_fraction=0.5)
    assert _table(half["train"]) == {
        ("bottle", "good"): 12,
        ("bottle", "crack"): 2,  # round(1.5) = 2
        ("bottle", "hole"): 3,
    }
    # The kept defects are a subset of the full training defects; val / test do not change.
    assert {r.path for r in half["train"]} <= {r.path for r in result["train"]}
    assert half["test"] == result["test"]
    tiny = _assign(_records(MVTEC), protocol="supervised", labeled_fraction=0.01)
    assert _table(tiny["train"])[("bottle", "crack")] == 1


def test_unsplit_sources_and_source_validation():
    layout = {("tiles", None, "good"): 20, ("tiles", None, "MT_Crack"): 6}
    result = _assign(_records(layout))
    # good 20: test 4, validation round(16 * 0.25) = 4, train 12; defects: 1 of 6 to validation.
    assert _table(result["train"]) == {("tiles", "good"): 12}
    assert _table(result["validation"]) == {("tiles", "good"): 4, ("tiles", "MT_Crack"): 1}
    assert _table(result["test"]) == {("tiles", "good"): 4, ("tiles", "MT_Crack"): 5}
    # MVTec 3D-AD: the validation split has good images only; defects are carved from test.
    layout = {
        ("cookie", "train", "good"): 5,
        ("cookie", "validation", "good"): 3,
        ("cookie", "test", "good"): 4,
        ("cookie", "test", "hole"): 5,
    }
    result = _assign(_records(layout))
    assert _table(result["validation"]) == {("cookie", "good"): 3, ("cookie", "hole"): 1}
    assert _table(result["test"]) == {("cookie", "good"): 4, ("cookie", "hole"): 4}


def test_split_is_seeded_and_order_independent():
    records = _records(MVTEC)
    first = _assign(records, seed=3)
    again = _assign(list(reversed(records)), seed=3)
    assert first == again
    other = _assign(records, seed=4)
    assert {r.path for r in other["validation"]} != {r.path for r in first["validation"]}
    # Adding another category does not move this one's images.
    more = _assign(records + _records({("cable", "test", "hole"): 4}), seed=3)
    assert [r for r in more["validation"] if r.category == "bottle"] == first["validation"]


@pytest.mark.parametrize("protocol", ["unsupervised", "supervised"])
def test_dataset_info_and_class_maps(protocol):
    config = default.get_config()
    config.data.protocol = protocol
    records = _records(MVTEC)
    info = splits.make_info(config.data, records, _assign(records, protocol=protocol))
    assert info.defect_type_names == ("crack", "hole")
    type_of, box_class_of = splits.class_index_maps(info)
    if protocol == "supervised":
        assert info.class_names == ("crack", "hole") and info.num_classes == 2
        assert type_of == {"good": 0, "crack": 1, "hole": 2}
        assert box_class_of == {"crack": 0, "hole": 1}
    else:
        assert info.class_names == ("defect",) and info.num_classes == 1
        assert type_of == {"good": 0, "crack": 1, "hole": 1}
        assert box_class_of == {"crack": 0, "hole": 0}
    assert info.counts["test"]["images"] == sum(info.counts["test"]["per_defect_type"].values())
    assert info.num_channels == 3 and info.categories == ("bottle",)


# ------------------------------------------------------------ model.num_defect_classes vs data

FIVE_KINDS = ("crack", "hole", "pit", "scratch", "stain")


def _five_kind_config(tmp_path, protocol, num_defect_classes):
    """tiny config on a generated mask_folder tree: 'good' + five defect kinds (2 images each)."""
    root = tmp_path / "plates"
    write_defect_classes(root, FIVE_KINDS)
    config = tiny.get_config()
    config.data.format = "mask_folder"
    config.data.root = str(root)
    config.data.protocol = protocol
    config.model.num_defect_classes = num_defect_classes
    return config


def test_fewer_model_classes_than_the_data_stop_with_both_numbers_and_the_names(tmp_path):
    config = _five_kind_config(tmp_path, "supervised", 4)
    info = splits.load_dataset_info(config)
    assert info.class_names == FIVE_KINDS
    with pytest.raises(ConfigError) as raised:
        splits.resolve_num_defect_classes(4, info)
    assert str(raised.value) == (
        f"model.num_defect_classes=4 but the data in {tmp_path / 'plates'} has 5 defect classes "
        "(crack, hole, pit, scratch, stain) under the supervised protocol: set "
        "--config.model.num_defect_classes=5 or 0 (from the data)"
    )
    assert "\n" not in str(raised.value)
    # More classes than the data under `supervised`: no image has class 6, evaluation cannot
    # score it: the same error.
    with pytest.raises(ConfigError, match=r"num_defect_classes=6 but .* has 5 defect classes"):
        splits.with_data_num_defect_classes(_five_kind_config(tmp_path, "supervised", 6))


def test_zero_takes_the_class_count_from_the_data(tmp_path):
    config = _five_kind_config(tmp_path, "supervised", 0)
    resolved = splits.with_data_num_defect_classes(config)
    assert resolved.model.num_defect_classes == 5
    assert config.model.num_defect_classes == 0  # a copy: the caller's config is unchanged
    # Unsupervised: the class map is the single class-agnostic 'defect'.
    unsupervised = _five_kind_config(tmp_path, "unsupervised", 0)
    info = splits.load_dataset_info(unsupervised)
    assert info.class_names == ("defect",) and info.defect_type_names == FIVE_KINDS
    assert splits.with_data_num_defect_classes(unsupervised, info).model.num_defect_classes == 1


def test_a_matching_explicit_value_passes(tmp_path):
    config = _five_kind_config(tmp_path, "supervised", 5)
    assert splits.with_data_num_defect_classes(config) is config  # nothing to change
    # Unsupervised boxes are all class 0: any count >= 1 fits (the tiny config's default 4).
    unsupervised = _five_kind_config(tmp_path, "unsupervised", 4)
    info = splits.load_dataset_info(unsupervised)
    assert splits.resolve_num_defect_classes(4, info) == 4
    assert splits.resolve_num_defect_classes(1, info) == 1


def test_supervised_data_without_defects_is_named(tmp_path):
    write_defect_classes(tmp_path / "clean", ())  # only 'good' images
    config = tiny.get_config()
    config.data.format = "mask_folder"
    config.data.root = str(tmp_path / "clean")
    config.data.protocol = "supervised"
    info = splits.load_dataset_info(config)
    assert info.num_classes == 0
    for requested in (0, 4):
        with pytest.raises(ConfigError, match="no defective image .*--config.data.protocol="):
            splits.resolve_num_defect_classes(requested, info)
