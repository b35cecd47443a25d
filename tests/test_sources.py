"""File discovery for every layout (m2u_jax.data.sources)."""

import collections
import logging
import re

import pytest

from configs import default
from m2u_jax.data import sources, synthetic
from m2u_jax.data.records import DataError, apply_skip_policy, defect_type_names
from m2u_jax.data.splits import discover_config
from tests.data_trees import (
    VOC_ANNOTATIONS,
    block_mask,
    rgb_image,
    save_png,
    write_mask_folder,
    write_mvtec_3d,
    write_voc,
)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    synthetic.generate(
        root,
        categories="fabric,pill",
        image_size=32,
        num_train=3,
        num_test_good=2,
        num_test_defect=1,
        seed=0,
    )
    return root


def _counts(records):
    return collections.Counter((r.category, r.source_split, r.defect_name) for r in records)


def test_mvtec_ad_records(mvtec_root):
    discovery = sources.discover_mvtec_ad(str(mvtec_root))
    assert discovery.problems == []
    counts = _counts(discovery.records)
    for category in ("fabric", "pill"):
        assert counts[(category, "train", "good")] == 3
        assert counts[(category, "test", "good")] == 2
        for kind in synthetic.DEFECT_KINDS:
            assert counts[(category, "test", kind)] == 1
    assert len(discovery.records) == 2 * (3 + 2 + 4)
    crack = next(r for r in discovery.records if r.defect_name == "crack")
    assert crack.mask_path == str(mvtec_root / crack.category / "ground_truth/crack/000_mask.png")
    assert (crack.width, crack.height, crack.label) == (32, 32, 1)
    good = next(r for r in discovery.records if r.defect_name == "good")
    assert good.mask_path is None and good.label == 0
    assert defect_type_names(discovery.records) == ("crack", "hole", "scratch", "stain")


def test_mvtec_ad_category_selection_and_errors(mvtec_root, tmp_path):
    records = sources.discover_mvtec_ad(str(mvtec_root), ["pill"]).records
    assert {r.category for r in records} == {"pill"}
    with pytest.raises(
        DataError, match=re.escape("names ['wood'], not found; available: ['fabric', 'pill']")
    ):
        sources.discover_mvtec_ad(str(mvtec_root), ["wood"])
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="empty: category has no images"):
        sources.discover_mvtec_ad(str(tmp_path))
    with pytest.raises(DataError, match="data.root is not a directory"):
        sources.discover_mvtec_ad(str(tmp_path / "nowhere"))


def test_mvtec_ad_missing_mask_and_skip_policy(tmp_path, caplog):
    root = tmp_path / "ds"
    save_png(root / "cat/train/good/000.png", rgb_image(8, 10))
    save_png(root / "cat/test/crack/000.png", rgb_image(8, 20))
    save_png(root / "cat/test/crack/001.png", rgb_image(8, 30))
    save_png(root / "cat/ground_truth/crack/000_mask.png", block_mask(8, [(0, 2, 0, 2)]))
    discovery = sources.discover_mvtec_ad(str(root))
    assert len(discovery.records) == 2 and len(discovery.problems) == 1
    missing = root / "cat/test/crack/001.png"
    mask = root / "cat/ground_truth/crack/001_mask.png"
    expected = f"{missing}: defective image has no mask (expected {mask})"
    assert str(discovery.problems[0]) == expected
    with pytest.raises(DataError, match=re.escape(expected) + ".*skip_bad_files=True"):
        apply_skip_policy(discovery, skip_bad_files=False)
    with caplog.at_level(logging.WARNING):
        kept = apply_skip_policy(discovery, skip_bad_files=True)
    assert len(kept) == 2
    assert "skipped 1 bad file(s)" in caplog.text and str(missing) in caplog.text


def test_mvtec_ad_mask_of_another_size(tmp_path):
    root = tmp_path / "ds"
    save_png(root / "cat/test/crack/000.png", rgb_image(8, 20))
    save_png(root / "cat/ground_truth/crack/000_mask.png", block_mask(6, [(0, 2, 0, 2)]))
    (problem,) = sources.discover_mvtec_ad(str(root)).problems
    assert "000_mask.png: mask is 6x6 but its image" in str(problem) and "is 8x8" in str(problem)


def test_sidecar_modalities(tmp_path):
    root = tmp_path / "ds"
    image = save_png(root / "cat/train/good/000.png", rgb_image(8, 10))
    thermal = save_png(root / "cat/train/good/000.thermal.png", block_mask(8, []))
    save_png(root / "cat/train/good/001.png", rgb_image(8, 10))
    discovery = sources.discover_mvtec_ad(str(root), modalities=("rgb", "thermal"))
    (record,) = discovery.records  # The side file is not an image of its own.
    assert record.modality_paths == {"rgb": str(image), "thermal": str(thermal)}
    # 'gray' reads the image file itself, as 'rgb' does.
    (record,) = sources.discover_mvtec_ad(str(root), modalities=("gray", "thermal")).records
    assert record.modality_paths == {"gray": str(image), "thermal": str(thermal)}
    (problem,) = discovery.problems
    assert "001.png: no 'thermal' image beside it (expected 001.thermal.png" in str(problem)


def test_mvtec_3d(tmp_path):
    write_mvtec_3d(tmp_path / "with_xyz")
    records = sources.discover_mvtec_3d(
        str(tmp_path / "with_xyz"), modalities=("rgb", "depth")
    ).records
    counts = _counts(records)
    assert counts == {
        ("cookie", "train", "good"): 3,
        ("cookie", "validation", "good"): 2,
        ("cookie", "test", "good"): 2,
        ("cookie", "test", "crack"): 2,
        ("cookie", "test", "hole"): 1,
    }
    hole = next(r for r in records if r.defect_name == "hole")
    folder = tmp_path / "with_xyz/cookie/test/hole"
    assert hole.modality_paths["depth"] == str(folder / "xyz/000.tiff")
    assert hole.mask_path == str(folder / "gt/000.png")
    assert next(r for r in records if r.defect_name == "good").mask_path is None
    # Without xyz folders: fine for rgb, a clear error when depth is asked for.
    write_mvtec_3d(tmp_path / "no_xyz", with_xyz=False)
    assert len(sources.discover_mvtec_3d(str(tmp_path / "no_xyz")).records) == 10
    discovery = sources.discover_mvtec_3d(str(tmp_path / "no_xyz"), modalities=("rgb", "depth"))
    assert discovery.records == [] and len(discovery.problems) == 10
    assert "data.modalities asks for 'depth' but its point map" in str(discovery.problems[0])
    assert "xyz/000.tiff is missing" in str(discovery.problems[0])


def test_mask_folder(tmp_path):
    write_mask_folder(tmp_path / "tiles")
    discovery = sources.discover_mask_folder(str(tmp_path / "tiles"), good_class="MT_Free")
    assert discovery.problems == []
    counts = collections.Counter(r.defect_name for r in discovery.records)
    assert counts == {"good": 4, "MT_Crack": 3, "MT_Hole": 2}
    crack = next(r for r in discovery.records if r.defect_name == "MT_Crack")
    assert crack.path.endswith("MT_Crack/Imgs/exp_0.jpg")
    assert crack.mask_path.endswith("MT_Crack/Imgs/exp_0.png")
    assert (crack.width, crack.height, crack.category, crack.source_split) == (
        40,
        20,
        "tiles",
        None,
    )
    assert defect_type_names(discovery.records) == ("MT_Crack", "MT_Hole")
    with pytest.raises(DataError, match=re.escape("data.good_class='good' names no class folder")):
        sources.discover_mask_folder(str(tmp_path / "tiles"))
    (tmp_path / "tiles/MT_Crack/Imgs/exp_1.png").unlink()
    (problem,) = sources.discover_mask_folder(str(tmp_path / "tiles"), "MT_Free").problems
    assert "exp_1.jpg: defective image has no mask" in str(problem)


def test_voc(tmp_path):
    write_voc(tmp_path / "steel")
    discovery = sources.discover_voc(str(tmp_path / "steel"))
    assert discovery.problems == []
    by_name = {r.path.rsplit("/", 1)[1][:-4]: r for r in discovery.records}
    assert set(by_name) == set(VOC_ANNOTATIONS)
    # 1-based inclusive VOC pixels -> continuous xyxy.
    assert by_name["scratches_2"].boxes == ((4.0, 4.0, 8.0, 8.0), (19.0, 19.0, 30.0, 30.0))
    assert by_name["scratches_2"].box_names == ("scratches", "scratches")
    # The image's type is its largest box's class.
    assert by_name["inclusion_1"].defect_name == "patches"
    assert by_name["clean_1"].defect_name == "good" and by_name["clean_1"].boxes == ()
    assert by_name["patches_2"].path.endswith("Validation_Images/patches_2.jpg")
    assert defect_type_names(discovery.records) == ("inclusion", "patches", "scratches")
    assert sum(len(r.boxes) for r in discovery.records) == 9


def test_voc_bad_annotations(tmp_path):
    write_voc(tmp_path / "steel")
    (tmp_path / "steel/ANNOTATIONS/orphan.xml").write_text("<annotation></annotation>")
    (tmp_path / "steel/ANNOTATIONS/patches_1.xml").write_text("<annotation><object>")
    save_png(tmp_path / "steel/IMAGES/lonely.png", rgb_image(32, 1))
    problems = sorted(str(p) for p in sources.discover_voc(str(tmp_path / "steel")).problems)
    assert len(problems) == 3
    assert any("orphan.xml: annotation without an image" in p for p in problems)
    assert any("patches_1.xml: unreadable VOC annotation" in p for p in problems)
    assert any("lonely.png: no VOC annotation lonely.xml" in p for p in problems)


def test_discover_config_checks(tmp_path):
    config = default.get_config()
    config.data.format = "csv"
    config.data.root = str(tmp_path)
    with pytest.raises(DataError, match="data.format='csv' is not one of"):
        discover_config(config.data)
    config.data.format = "voc"
    config.data.categories = "a,b"
    with pytest.raises(DataError, match="has one category .*leave data.categories empty"):
        discover_config(config.data)


def test_good_in_any_case_is_defect_free_and_linked_files_count_once(tmp_path):
    synthetic.generate(
        tmp_path / "data", categories="fabric", image_size=32, num_train=2, num_test_good=2,
        num_test_defect=1, seed=0,
    )  # fmt: skip
    test_dir = tmp_path / "data" / "fabric" / "test"
    (test_dir / "good").rename(test_dir / "Good")
    (test_dir / "Good" / "copy.png").symlink_to(test_dir / "Good" / "000.png")
    discovery = sources.discover_mvtec_ad(str(tmp_path / "data"))
    assert _counts(discovery.records)[("fabric", "test", "good")] == 3  # 2 files + 1 link
    assert "Good" not in defect_type_names(discovery.records)
    records = apply_skip_policy(discovery, skip_bad_files=False)
    assert _counts(records)[("fabric", "test", "good")] == 2
    assert len(records) == len(discovery.records) - 1
