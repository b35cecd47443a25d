"""The synthetic MVTec-AD-format generator: exact layout, exact masks, visible defects,
reproducible bytes, independent per-image seeds, and the command line."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from m2u_jax.data import synthetic

SIZE = 64
COUNTS = dict(num_train=3, num_test_good=2, num_test_defect=2)
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = synthetic.generate(root, image_size=SIZE, seed=0, **COUNTS)
    return root, summary


def test_layout_is_exactly_mvtec(dataset):
    root, summary = dataset
    expected = set()
    for category in ("fabric", "metal", "pill"):
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(3)}
        expected |= {f"{category}/test/good/{i:03d}.png" for i in range(2)}
        for kind in ("crack", "hole", "scratch", "stain"):
            expected |= {f"{category}/test/{kind}/{i:03d}.png" for i in range(2)}
            expected |= {f"{category}/ground_truth/{kind}/{i:03d}_mask.png" for i in range(2)}
        expected.add(f"{category}/{synthetic.MARKER_FILE}")
    assert set(_files(root)) == expected
    # Good images have no ground truth at all.
    assert not list(root.glob("*/ground_truth/good"))
    assert summary["num_images"] == 3 * (3 + 2 + 4 * 2) == 39
    assert summary["num_masks"] == 3 * 4 * 2 == 24
    assert summary["categories"]["pill"] == {
        "train_good": 3,
        "test_good": 2,
        "test_defect": {"crack": 2, "hole": 2, "scratch": 2, "stain": 2},
    }


def test_images_rgb_masks_binary_same_size_nonempty(dataset):
    root, _ = dataset
    for image_path in root.glob("*/*/*/*.png"):
        if image_path.parts[-3] == "ground_truth":
            continue
        with Image.open(image_path) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE), image_path
    masks = sorted(root.glob("*/ground_truth/*/*_mask.png"))
    assert len(masks) == 24
    for mask_path in masks:
        with Image.open(mask_path) as mask_image:
            assert mask_image.mode == "L" and mask_image.size == (SIZE, SIZE), mask_path
            mask = np.asarray(mask_image)
        assert set(np.unique(mask)) == {0, 255}, mask_path
        image_path = (
            mask_path.parents[2]
            / "test"
            / mask_path.parent.name
            / (mask_path.name.replace("_mask", ""))
        )
        assert image_path.exists(), image_path


def test_files_are_what_render_sample_returns(dataset):
    root, _ = dataset
    sample = synthetic.render_sample("metal", "scratch", 1, image_size=SIZE, seed=0)
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "metal/test/scratch/001.png")), sample["image"]
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "metal/ground_truth/scratch/001_mask.png")), sample["mask"]
    )
    good = synthetic.render_sample("pill", "good", 2, split="train", image_size=SIZE, seed=0)
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "pill/train/good/002.png")), good["image"]
    )


@pytest.mark.parametrize("category", synthetic.CATEGORIES)
@pytest.mark.parametrize("kind", synthetic.DEFECT_KINDS)
def test_defect_changes_exactly_the_masked_pixels(category, kind):
    for index in range(3):
        sample = synthetic.render_sample(category, kind, index, image_size=SIZE, seed=5)
        mask = sample["mask"] > 0
        diff = np.abs(sample["image"].astype(np.int32) - sample["clean"].astype(np.int32)).mean(-1)
        # Outside the mask the defective image is the clean rendering, bit for bit.
        assert diff[~mask].max() == 0
        # Inside it, a clear contrast: at least ~12% of the full range on average
        # (observed minimum ~37/255, for stains), and every masked pixel changed.
        assert diff[mask].mean() > 30, (category, kind, index, diff[mask].mean())
        assert (diff[mask] > 0).mean() > 0.97
        # One or two separate regions, each 0.2%-8% of the image.
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert count in (1, 2)
        fractions = np.bincount(labels.ravel())[1:] / mask.size
        assert np.all(fractions >= synthetic.MIN_REGION_FRACTION), fractions
        assert np.all(fractions <= synthetic.MAX_REGION_FRACTION), fractions


def test_pill_defects_lie_on_the_tablet():
    for index in range(3):
        for kind in synthetic.DEFECT_KINDS:
            sample = synthetic.render_sample("pill", kind, index, image_size=SIZE, seed=1)
            brightness = sample["clean"].astype(np.float32).mean(-1)
            # The tray stays below ~65 and the lit cream tablet far above; filling holes
            # closes the tablet's darker speckles and score line.
            assert np.median(brightness[:4, :4]) < 65
            tablet = ndimage.binary_fill_holes(brightness > 80)
            assert 0.1 < tablet.mean() < 0.4
            mask = sample["mask"] > 0
            assert mask.any() and not (mask & ~tablet).any(), (kind, index)


def test_good_images_form_a_distribution():
    for category in synthetic.CATEGORIES:
        images = [
            synthetic.render_sample(category, "good", i, split="train", image_size=SIZE)["image"]
            for i in range(3)
        ]
        for first in range(3):
            for second in range(first + 1, 3):
                diff = np.abs(images[first].astype(np.int32) - images[second].astype(np.int32))
                assert diff.mean() > 4, (category, first, second)
    # The tablet's pose moves: its bright-pixel centroid differs between images.
    centroids = []
    for index in range(4):
        image = synthetic.render_sample("pill", "good", index, split="train", image_size=256)
        ys, xs = np.nonzero(image["image"].mean(-1) > 128)
        centroids.append((xs.mean(), ys.mean()))
    assert np.ptp(np.array(centroids), axis=0).max() > 2.0


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    root, _ = dataset
    # Two worker processes write the same bytes as the single-process run.
    synthetic.generate(tmp_path / "again", image_size=SIZE, seed=0, workers=2, **COUNTS)
    assert _files(tmp_path / "again") == _files(root)
    synthetic.generate(tmp_path / "other", categories="fabric", image_size=SIZE, seed=1, **COUNTS)
    other = _files(tmp_path / "other")
    original = _files(root)
    pngs = [name for name in other if name.endswith(".png") and "ground_truth" not in name]
    assert len(pngs) == 13
    assert all(other[name] != original[name] for name in pngs)


def test_subset_and_counts_leave_other_images_unchanged(dataset, tmp_path):
    root, _ = dataset
    summary = synthetic.generate(
        tmp_path, categories=["pill"], image_size=SIZE, num_train=1, num_test_good=4,
        num_test_defect=1, seed=0,
    )  # fmt: skip
    assert list(summary["categories"]) == ["pill"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pill"]
    subset, original = _files(tmp_path), _files(root)
    for name in ("pill/train/good/000.png", "pill/test/good/001.png",
                 "pill/test/hole/000.png", "pill/ground_truth/hole/000_mask.png"):  # fmt: skip
        assert subset[name] == original[name], name
    assert "pill/test/good/003.png" in subset and "pill/test/hole/001.png" not in subset


def test_rerun_replaces_own_output_and_refuses_foreign_folders(tmp_path):
    synthetic.generate(tmp_path, categories="metal", image_size=32, num_train=3,
                       num_test_good=0, num_test_defect=0)  # fmt: skip
    synthetic.generate(tmp_path, categories="metal", image_size=32, num_train=1,
                       num_test_good=0, num_test_defect=0)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "metal/train/good").iterdir()) == ["000.png"]
    (tmp_path / "fabric").mkdir()
    (tmp_path / "fabric" / "mine.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="fabric"):
        synthetic.generate(tmp_path, categories="fabric", image_size=32)
    assert (tmp_path / "fabric" / "mine.txt").read_text() == "real data"


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="carpet"):
        synthetic.generate(tmp_path, categories="fabric,carpet")
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate(tmp_path, image_size=16)
    with pytest.raises(ValueError, match="num_train"):
        synthetic.generate(tmp_path, num_train=-1)
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate(tmp_path, seed=-3)
    with pytest.raises(ValueError, match="dent"):
        synthetic.render_sample("metal", "dent", 0)
    with pytest.raises(ValueError, match="train split"):
        synthetic.render_sample("metal", "hole", 0, split="train")


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "m2u_jax.data.synthetic", "--out", str(tmp_path / "data"),
         "--categories", "metal", "--image-size", "32", "--num-train", "1",
         "--num-test-good", "1", "--num-test-defect", "1", "--seed", "3",
         "--preview", str(tmp_path / "preview.png")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 6 images and 4 masks" in result.stdout
    assert (tmp_path / "data/metal/ground_truth/stain/000_mask.png").exists()
    with Image.open(tmp_path / "preview.png") as preview:
        # One row for the category, six columns (two good + four kinds) of ~32 px each.
        assert preview.width > preview.height > 0
    bad = subprocess.run(
        [sys.executable, "-m", "m2u_jax.data.synthetic", "--out", str(tmp_path / "x"),
         "--categories", "carpet"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "carpet" in bad.stderr
