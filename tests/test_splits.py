"""Protocols, validation carving and the class map (m2u_jax.data.splits)."""

import collections

import pytest

from configs import default
from m2u_jax.data import splits
from m2u_jax.data.sources import SampleRecord


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
