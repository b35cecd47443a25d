"""The tf.data pipeline: sharded training batches, evaluation batches, TFDS (m2u_jax.data.pipeline).

Runs with 8 fake CPU devices (tests/conftest.py).
"""

import collections
import itertools
import logging
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from PIL import Image

tf = pytest.importorskip("tensorflow")

from configs import tiny  # noqa: E402
from m2u_jax.data import augment, decode, pipeline, synthetic  # noqa: E402
from m2u_jax.data.records import DataError  # noqa: E402
from tests.data_trees import (  # noqa: E402
    block_mask,
    rgb_image,
    save_png,
    write_mvtec_3d,
    write_voc,
)

TRAIN_KEYS = {
    "images": ((8, 32, 32, 3), np.float32),
    "clean_images": ((8, 32, 32, 3), np.float32),
    "recon_valid": ((8,), np.float32),
    "masks": ((8, 32, 32), np.float32),
    "labels": ((8,), np.int32),
    "defect_types": ((8,), np.int32),
    "boxes": ((8, 4, 4), np.float32),
    "box_classes": ((8, 4), np.int32),
    "box_valid": ((8, 4), np.float32),
}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(
        root,
        categories="fabric,pill",
        image_size=32,
        num_train=8,
        num_test_good=3,
        num_test_defect=2,
        seed=0,
    )
    return root


def _config(root, **data):
    config = tiny.get_config()
    config.data.root = str(root)
    config.data.synthetic_anomaly_prob = 0.75
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def _plain_supervised(root, **data):
    """The supervised protocol's examples as they are: no synthetic anomalies, no flips."""
    return _config(
        root, protocol="supervised", synthetic_anomaly_prob=0.0, random_flips=False, **data
    )


def _numpy(batch):
    return {key: np.asarray(value) for key, value in batch.items()}


def test_train_batches_contract_and_sharding(synthetic_root):
    mesh = jax.make_mesh((8,), ("data",))
    batch = next(pipeline.make_train_iterator(_config(synthetic_root), mesh))
    assert set(batch) == set(TRAIN_KEYS)
    for key, (shape, dtype) in TRAIN_KEYS.items():
        value = batch[key]
        assert isinstance(value, jax.Array) and value.shape == shape and value.dtype == dtype, key
        assert value.sharding.spec == PartitionSpec("data"), key
        assert len(value.addressable_shards) == 8
        assert {s.data.shape[0] for s in value.addressable_shards} == {1}
    values = _numpy(batch)
    assert values["images"].min() >= 0 and values["images"].max() <= 1
    assert set(np.unique(values["masks"])) <= {0.0, 1.0}
    # Unsupervised training images are defect-free: every defect is synthetic.
    has_mask = values["masks"].reshape(8, -1).max(1) > 0
    np.testing.assert_array_equal(values["labels"], has_mask.astype(np.int32))
    np.testing.assert_array_equal(values["defect_types"], has_mask.astype(np.int32))  # 'defect'
    np.testing.assert_array_equal(values["box_valid"][:, 0], has_mask.astype(np.float32))
    np.testing.assert_array_equal(values["box_classes"][:, 0], -has_mask.astype(np.int32))
    np.testing.assert_array_equal(values["recon_valid"], np.ones(8))
    good = ~has_mask
    np.testing.assert_array_equal(values["images"][good], values["clean_images"][good])


def test_every_synthesis_option_in_the_pipeline(synthetic_root):
    # Each option builds its ops inside tf.data's traced functions, where static shapes can be
    # lost: one batch with all of them on, and the anomaly contract on its images.
    config = _config(
        synthetic_root,
        synthetic_anomaly_prob=1.0,
        synthetic_shading=0.3,
        synthetic_band=0.3,
        synthetic_seamless=0.5,
        synthetic_match_gray=True,
        cache=False,
    )
    _check_anomaly_batch(config, channels=3)


def _check_anomaly_batch(config, channels):
    """One training batch at synthetic_anomaly_prob 1: shapes, value range, labels = masks, and
    every anomaly confined to its mask and visible inside it."""
    dataset, _ = pipeline.make_train_dataset(config)
    batch = next(dataset.take(1).as_numpy_iterator())
    images, clean = batch["images"], batch["clean_images"]
    assert images.shape == clean.shape == (8, 32, 32, channels)
    assert images.min() >= 0 and images.max() <= 1
    has_mask = batch["masks"].reshape(8, -1).max(1) > 0
    assert has_mask.sum() >= 6  # probability 1; a threshold above the noise leaves a few empty
    np.testing.assert_array_equal(batch["labels"], has_mask.astype(np.int32))
    outside = np.broadcast_to(batch["masks"][..., None] == 0, images.shape)
    np.testing.assert_array_equal(images[outside], clean[outside])
    assert np.abs(images - clean).reshape(8, -1).max(1)[has_mask].min() > 0


def test_fsdp_mesh_and_explicit_sharding(synthetic_root):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    sharding = pipeline.batch_sharding(mesh)
    assert sharding.spec == PartitionSpec(("data", "fsdp"))
    batch = next(pipeline.make_train_iterator(_config(synthetic_root), sharding, stage="pretrain"))
    assert set(batch) == {"views1", "views2"}
    for value in batch.values():
        assert value.shape == (8, 32, 32, 3) and value.sharding.spec == PartitionSpec(
            ("data", "fsdp")
        )
        assert {s.data.shape[0] for s in value.addressable_shards} == {1}
    views1, views2 = np.asarray(batch["views1"]), np.asarray(batch["views2"])
    assert views1.min() >= 0 and views1.max() <= 1 and np.abs(views1 - views2).mean() > 0.02
    config = _config(synthetic_root)
    config.train.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 shards"):
        pipeline.make_train_iterator(config, mesh)


def test_deterministic_and_resumable(synthetic_root):
    mesh = jax.make_mesh((8,), ("data",))
    config = _config(synthetic_root)
    first = pipeline.make_train_iterator(config, mesh)
    batches = [_numpy(next(first)) for _ in range(3)]
    again = _numpy(next(pipeline.make_train_iterator(config, mesh)))
    resumed = _numpy(next(pipeline.make_train_iterator(config, mesh, start_step=2)))
    for key in TRAIN_KEYS:
        np.testing.assert_array_equal(again[key], batches[0][key], err_msg=key)
        np.testing.assert_array_equal(resumed[key], batches[2][key], err_msg=key)
    assert not np.array_equal(batches[0]["clean_images"], batches[1]["clean_images"])
    config.seed = 1
    other = _numpy(next(pipeline.make_train_iterator(config, mesh)))
    assert not np.array_equal(other["clean_images"], batches[0]["clean_images"])


def _image_keys(images):
    return sorted(np.round(image * 65535).astype(np.uint16).tobytes() for image in images)


def test_each_epoch_visits_every_training_image_once(synthetic_root):
    config = _config(synthetic_root, synthetic_anomaly_prob=0.0, cache=False)
    dataset, _ = pipeline.make_train_dataset(config)
    batches = dataset.take(4).as_numpy_iterator()
    seen = [next(batches)["clean_images"] for _ in range(4)]
    train = list(pipeline.iterate_eval(config, "train", batch_size=16))
    assert len(train) == 1 and train[0]["valid"].all()
    expected = _image_keys(train[0]["images"])
    assert _image_keys(np.concatenate(seen[:2])) == expected  # epoch 0
    assert _image_keys(np.concatenate(seen[2:])) == expected  # epoch 1, another order
    assert not np.array_equal(np.concatenate(seen[:2]), np.concatenate(seen[2:]))


def test_eval_batches(synthetic_root):
    config = _config(synthetic_root)
    info = pipeline.load_dataset_info(config)
    assert info.class_names == ("defect",) and info.num_classes == 1
    assert info.defect_type_names == synthetic.DEFECT_KINDS
    assert info.counts["train"]["images"] == 16
    # Per category: test good 3 -> 1 to validation; each defect type 2 -> 1 to validation.
    assert info.counts["validation"] == {
        "images": 10,
        "good": 2,
        "defective": 8,
        "per_category": {"fabric": 5, "pill": 5},
        "per_defect_type": {"crack": 2, "good": 2, "hole": 2, "scratch": 2, "stain": 2},
    }
    batches = {
        split: list(pipeline.iterate_eval(config, split)) for split in ("validation", "test")
    }
    assert [int(b["valid"].sum()) for b in batches["validation"]] == [8, 2]
    assert [int(b["valid"].sum()) for b in batches["test"]] == [8, 4]
    last = batches["validation"][-1]
    assert list(last["paths"][2:]) == [""] * 6 and not last["images"][2:].any()
    paths = {split: [p for b in bs for p in b["paths"] if p] for split, bs in batches.items()}
    assert not set(paths["validation"]) & set(paths["test"])
    test_files = {str(p) for p in synthetic_root.glob("*/test/*/*.png")}
    assert set(paths["validation"]) | set(paths["test"]) == test_files
    for batch in batches["validation"] + batches["test"]:
        for row in np.nonzero(batch["valid"])[0]:
            defect = batch["defect_names"][row]
            assert batch["categories"][row] in ("fabric", "pill")
            assert batch["paths"][row].split("/")[-2] == defect
            assert batch["labels"][row] == batch["defect_types"][row] == int(defect != "good")
            assert batch["recon_valid"][row] == 1 - batch["labels"][row]
            mask = batch["masks"][row]
            assert mask.any() == (defect != "good")
            boxes = decode.boxes_from_mask(mask)[:4]
            count = len(boxes)
            np.testing.assert_array_equal(batch["boxes"][row, :count], boxes)
            np.testing.assert_array_equal(batch["box_valid"][row], [1] * count + [0] * (4 - count))
            np.testing.assert_array_equal(batch["box_classes"][row], 0)


def test_supervised_protocol_class_map(synthetic_root):
    config = _config(synthetic_root, protocol="supervised")
    info = pipeline.load_dataset_info(config)
    assert info.class_names == synthetic.DEFECT_KINDS and info.num_classes == 4
    # 2 images per category and type: one to test, one to train (validation would empty train).
    assert info.counts["train"]["per_defect_type"] == {
        "crack": 2,
        "good": 16,
        "hole": 2,
        "scratch": 2,
        "stain": 2,
    }
    for batch in pipeline.iterate_eval(config, "test"):
        for row in np.nonzero(batch["valid"])[0]:
            name = batch["defect_names"][row]
            type_id = 0 if name == "good" else 1 + synthetic.DEFECT_KINDS.index(name)
            assert batch["defect_types"][row] == type_id
            valid = batch["box_valid"][row] > 0
            np.testing.assert_array_equal(batch["box_classes"][row][valid], type_id - 1)
    dataset, _ = pipeline.make_train_dataset(config)
    batch = next(dataset.skip(1).as_numpy_iterator())  # (the first batch has no real defect)
    real = batch["recon_valid"] == 0  # real defects keep their type, mask and boxes
    assert real.any()
    pasted = (batch["labels"] == 1) & ~real  # supervised: a synthetic anomaly's type is unknown
    assert pasted.any() and (batch["defect_types"][pasted] == -1).all()
    assert ((batch["defect_types"][real] >= 1) & (batch["labels"][real] == 1)).all()
    assert batch["masks"][real].reshape(real.sum(), -1).max(1).min() == 1
    np.testing.assert_array_equal(batch["box_classes"][real, 0], batch["defect_types"][real] - 1)
    assert ((batch["defect_types"][real] >= 1) & (batch["labels"][real] == 1)).all()


def test_mvtec_3d_depth_channel(tmp_path):
    depths = write_mvtec_3d(tmp_path, size=24)
    config = _config(tmp_path, format="mvtec_3d", modalities="rgb,depth", image_size=24)
    for batch in pipeline.iterate_eval(config, "test"):
        assert batch["images"].shape == (8, 24, 24, 4)
        for row in np.nonzero(batch["valid"])[0]:
            z = depths[batch["paths"][row]]
            valid = z != 0
            expected = np.where(valid, (z - z[valid].min()) / (z[valid].max() - z[valid].min()), 0)
            np.testing.assert_allclose(batch["images"][row, ..., 3], expected, atol=1e-4)
    dataset, _ = pipeline.make_train_dataset(config)
    assert next(dataset.as_numpy_iterator())["images"].shape == (8, 24, 24, 4)


def test_gray_modality_batches_hold_the_files_luma(synthetic_root):
    """`data.modalities=gray` on RGB files: one channel, the file's luma, in evaluation and
    in training with synthetic anomalies (the anomaly contract on the one channel)."""
    config = _config(synthetic_root, modalities="gray", cache=False)
    batch = next(pipeline.iterate_eval(config, "test"))
    assert batch["images"].shape == (8, 32, 32, 1)
    for row in np.nonzero(batch["valid"])[0][:3]:
        with Image.open(batch["paths"][row]) as image:
            luma = np.asarray(image.convert("L"), np.float32) / 255.0
        np.testing.assert_allclose(batch["images"][row, ..., 0], luma, atol=1e-6)
    config.data.synthetic_anomaly_prob = 1.0
    _check_anomaly_batch(config, channels=1)


def test_bad_file_during_training(tmp_path, caplog):
    for index in range(8):
        save_png(tmp_path / f"cat/train/good/{index:03d}.png", rgb_image(16, 10 * index))
    save_png(tmp_path / "cat/test/crack/000.png", rgb_image(16, 1))
    save_png(tmp_path / "cat/ground_truth/crack/000_mask.png", block_mask(16, [(0, 4, 0, 4)]))
    bad = tmp_path / "cat/train/good/003.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 30])  # header intact: only full decoding notices
    config = _config(tmp_path, image_size=16)
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": truncated or corrupt"):
        next(pipeline.make_train_iterator(config, mesh))
    config.data.skip_bad_files = True
    with caplog.at_level(logging.WARNING):
        batch = next(pipeline.make_train_iterator(config, mesh))
    assert batch["images"].shape == (8, 16, 16, 3)
    assert "skipping bad file (1 so far" in caplog.text and str(bad) in caplog.text


def test_empty_training_split_is_explained(tmp_path):
    write_voc(tmp_path / "steel")
    (tmp_path / "steel/Validation_Images/clean_1.jpg").unlink()
    (tmp_path / "steel/Validation_Annotations/clean_1.xml").unlink()
    config = _config(tmp_path / "steel", format="voc")
    with pytest.raises(DataError, match="training split is empty .*data.protocol=supervised"):
        pipeline.make_train_dataset(config)
    config.data.protocol = "supervised"
    batch = next(pipeline.make_train_dataset(config)[0].as_numpy_iterator())
    assert batch["images"].shape == (8, 32, 32, 3)


def test_tfds_builder_matches_files(synthetic_root, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from m2u_jax.data.tfds_mvtec_ad import mvtec_ad  # noqa: F401  (registers 'mvtec_ad')

    # 'pill' is also an MVTec AD category: its predefined config reads the synthetic tree too.
    builder = tfds.builder("mvtec_ad/pill", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(synthetic_root)),
        file_format="array_record",
    )
    assert builder.info.splits["train"].num_examples == 8
    assert builder.info.splits["test"].num_examples == 3 + 4 * 2
    example = builder.as_data_source("test")[0]
    assert example["path"] == b"pill/test/crack/000.png" and example["label"] == 1
    mask = decode.read_mask(str(synthetic_root / "pill/ground_truth/crack/000_mask.png"))
    np.testing.assert_array_equal(example["mask"][..., 0], mask.astype(np.uint8) * 255)

    files = _config(synthetic_root, categories="pill")
    prepared = _config(
        synthetic_root, categories="pill", format="tfds", tfds_data_dir=str(tmp_path)
    )
    assert pipeline.load_dataset_info(prepared).counts == pipeline.load_dataset_info(files).counts
    for expected, actual in zip(
        pipeline.iterate_eval(files, "test"), pipeline.iterate_eval(prepared, "test"), strict=True
    ):
        for key, value in expected.items():
            np.testing.assert_array_equal(actual[key], value, err_msg=key)
    batch = next(pipeline.make_train_dataset(prepared)[0].as_numpy_iterator())
    assert batch["images"].shape == (8, 32, 32, 3)


def test_benchmark_pipeline_reports_throughput(synthetic_root):
    images_per_sec = pipeline.benchmark_pipeline(_config(synthetic_root), num_batches=2)
    assert np.isfinite(images_per_sec) and images_per_sec > 0


def test_crop_example_keeps_image_mask_boxes_and_labels_consistent():
    from m2u_jax.data import augment

    image = np.arange(8 * 8 * 1, dtype=np.float32).reshape(8, 8, 1)
    mask = np.zeros((8, 8), np.float32)
    mask[1:3, 1:3] = 1.0  # defect at rows/cols 1-2
    example = {
        "images": image,
        "masks": mask,
        # Box 0 covers the defect; box 1 crosses the window's right edge; box 2 is padding.
        "boxes": np.array([[1, 1, 3, 3], [4, 2, 8, 4], [0, 0, 0, 0]], np.float32),
        "box_classes": np.array([2, 1, 0], np.int32),
        "box_valid": np.array([1, 1, 0], np.float32),
        "labels": np.int32(1),
        "defect_types": np.int32(3),
    }
    out = {k: np.asarray(v) for k, v in augment.crop_example(example, 2, 0, 4).items()}
    np.testing.assert_array_equal(out["images"], image[0:4, 2:6])
    np.testing.assert_array_equal(out["masks"], mask[0:4, 2:6])
    # Shifted by x0 = 2 and clipped to [0, 4]: [1,1,3,3] -> [0,1,1,3]; [4,2,8,4] -> [2,2,4,4].
    np.testing.assert_array_equal(out["boxes"], [[0, 1, 1, 3], [2, 2, 4, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["box_valid"], [1, 1, 0])
    assert out["labels"] == 1 and out["defect_types"] == 3
    # A window away from every defect and box: a good example, boxes become padding.
    far = {k: np.asarray(v) for k, v in augment.crop_example(example, 0, 4, 4).items()}
    assert far["masks"].max() == 0 and far["box_valid"].sum() == 0
    assert far["labels"] == 0 and far["defect_types"] == 0
    np.testing.assert_array_equal(far["boxes"], np.zeros((3, 4)))
    # Labelled defective with no mask and no box: where the defect lies is unknown, keep it.
    unknown = {**example, "masks": np.zeros((8, 8), np.float32), "box_valid": np.zeros(3)}
    kept = augment.crop_example(unknown, 4, 4, 4)
    assert int(kept["labels"]) == 1 and int(kept["defect_types"]) == 3


def _zoom_case():
    image = np.random.default_rng(0).uniform(size=(16, 16, 2)).astype(np.float32)
    mask = np.zeros((16, 16), np.float32)
    mask[4:8, 4:8] = 1.0  # defect at rows/cols 4-7
    return {
        "images": image,
        "masks": mask,
        "boxes": np.array([[4, 4, 8, 8], [0, 0, 0, 0]], np.float32),
        "box_classes": np.array([2, 0], np.int32),
        "box_valid": np.array([1, 0], np.float32),
        "labels": np.int32(1),
        "defect_types": np.int32(3),
    }


def _zoom(example, zoom, x0, y0):
    from m2u_jax.data import augment

    args = (np.float32(zoom), np.float32(x0), np.float32(y0))
    return {k: np.asarray(v) for k, v in augment.zoom_example(example, *args).items()}


def test_zoom_example_keeps_image_mask_boxes_and_labels_consistent():
    example = _zoom_case()
    image = example["images"]
    # Zoom 1 at the origin is the identity.
    same = _zoom(example, 1.0, 0.0, 0.0)
    np.testing.assert_allclose(same["images"], image, atol=1e-6)
    np.testing.assert_array_equal(same["masks"], example["masks"])
    np.testing.assert_allclose(same["boxes"], example["boxes"], atol=1e-5)
    # Zoom 2 about the window at 0.25: output pixel j samples input pixel 3.75 + j / 2, so the
    # defect's pixels 4-7 (edges 3.5-7.5) land on pixels 0-7 and box edges [4, 8) on [0, 8).
    enlarged = _zoom(example, 2.0, 0.25, 0.25)
    rows = np.flatnonzero(enlarged["masks"].any(axis=1))
    np.testing.assert_array_equal(rows, np.arange(8))
    np.testing.assert_allclose(enlarged["boxes"], [[0, 0, 8, 8], [0, 0, 0, 0]], atol=1e-5)
    # Output pixel 1 samples input position 4.25 on both axes.
    w = 0.25
    expected = (
        (1 - w) * (1 - w) * image[4, 4]
        + w * (1 - w) * (image[5, 4] + image[4, 5])
        + w * w * image[5, 5]
    )
    np.testing.assert_allclose(enlarged["images"][1, 1], expected, atol=1e-5)
    assert enlarged["labels"] == 1 and enlarged["defect_types"] == 3
    # Zoom 1/2 with a margin of half the image: input pixel p lands on (p + 7.5) / 2, so the
    # image fills pixels 4-11 and the border is the image's own mean colour.
    shrunk = _zoom(example, 0.5, -0.5, -0.5)
    np.testing.assert_allclose(shrunk["images"][0, 0], image.mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(shrunk["images"][15, 15], image.mean(axis=(0, 1)), atol=1e-6)
    rows = np.flatnonzero(shrunk["masks"].any(axis=1))
    np.testing.assert_array_equal(rows, [6, 7])  # edges (3.5 + 7.5) / 2 = 5.5 to 7.5
    np.testing.assert_allclose(shrunk["boxes"][0], [6, 6, 8, 8], atol=1e-5)
    # A window away from the defect: a good example, its box padding.
    away = _zoom(example, 2.0, 0.5, 0.5)
    assert away["masks"].max() == 0 and away["box_valid"].sum() == 0
    assert away["labels"] == 0 and away["defect_types"] == 0
    np.testing.assert_array_equal(away["boxes"], np.zeros((2, 4)))


def test_sample_zoom_draws_in_range_windows_deterministically():
    from m2u_jax.data import augment

    key = np.array([0, 1], np.int64)
    draws = np.array(
        [[float(v) for v in augment.sample_zoom(augment.fold_key(key, i), 0.5)] for i in range(400)]
    )
    zoom, x0, y0 = draws.T
    assert zoom.min() >= 0.5 and zoom.max() <= 1.5 and abs(zoom.mean() - 1.0) < 0.05
    side = 1.0 / zoom
    zoom_in = zoom >= 1.0  # the window stays inside the image, or holds all of it
    for start in (x0, y0):
        end = start + side
        assert (start[zoom_in] >= -1e-6).all() and (end[zoom_in] <= 1 + 1e-6).all()
        assert (start[~zoom_in] <= 1e-6).all() and (end[~zoom_in] >= 1 - 1e-6).all()
    again = [float(v) for v in augment.sample_zoom(augment.fold_key(key, 7), 0.5)]
    np.testing.assert_array_equal(again, draws[7])


def test_random_scale_batches_keep_boxes_on_their_masks(synthetic_root):
    from m2u_jax.data import augment

    def batches(random_scale):
        config = _config(synthetic_root, random_scale=random_scale, synthetic_anomaly_prob=0.0)
        config.data.protocol = "supervised"
        return list(itertools.islice(pipeline.make_train_dataset(config)[0].as_numpy_iterator(), 4))

    plain, zoomed = batches(0.0), batches(0.5)
    masked = 0
    for batch in plain + zoomed:
        assert batch["images"].shape == plain[0]["images"].shape
        assert set(np.unique(batch["masks"])) <= {0.0, 1.0}
        boxes, valid = augment.mask_bounding_boxes(batch["masks"] > 0.5)
        for i in np.flatnonzero(np.asarray(valid)):
            # The boxes of an image's defects span its mask's bounding box, to a pixel.
            own = batch["boxes"][i][batch["box_valid"][i] > 0]
            hull = [*own[:, :2].min(axis=0), *own[:, 2:].max(axis=0)]
            np.testing.assert_allclose(hull, np.asarray(boxes)[i], atol=1.0)
            masked += 1
    assert masked > 4
    batch = zoomed[0]
    plain = plain[0]
    assert not np.allclose(batch["images"], plain["images"])  # the same examples, zoomed


def test_random_transpose_batches_are_the_plain_examples_or_their_transposes(synthetic_root):
    def batches(random_transpose):
        config = _config(
            synthetic_root, random_transpose=random_transpose, synthetic_anomaly_prob=0.0
        )
        config.data.protocol = "supervised"
        return list(itertools.islice(pipeline.make_train_dataset(config)[0].as_numpy_iterator(), 3))

    swapped_count = 0
    for plain, batch in zip(batches(False), batches(True)):
        np.testing.assert_array_equal(batch["labels"], plain["labels"])
        for i in range(len(batch["images"])):
            if np.array_equal(batch["images"][i], plain["images"][i]):
                np.testing.assert_array_equal(batch["boxes"][i], plain["boxes"][i])
                continue
            # Otherwise exactly the transpose: pixels, mask, and boxes with x and y swapped.
            np.testing.assert_array_equal(batch["images"][i], plain["images"][i].transpose(1, 0, 2))
            np.testing.assert_array_equal(batch["masks"][i], plain["masks"][i].T)
            np.testing.assert_array_equal(batch["boxes"][i], plain["boxes"][i][:, [1, 0, 3, 2]])
            swapped_count += 1
    images = 3 * len(batch["images"])
    assert 0.2 * images < swapped_count < 0.8 * images  # about half, with a wide margin


def _mosaic_parts():
    """Four 4x4 one-channel parts (pixel values 100 k + 4 row + col) with two box slots each:
    part 0 a defect at rows/cols 2-3 (type 1), part 1 good, part 2 a defect at row 0, cols 0-1
    (type 2), part 3 a defect at pixel (3, 3) (type 3)."""
    parts = []
    defects = {
        0: (slice(2, 4), slice(2, 4), [2, 2, 4, 4]),
        2: (slice(0, 1), slice(0, 2), [0, 0, 2, 1]),
    }
    defects[3] = (slice(3, 4), slice(3, 4), [3, 3, 4, 4])
    for k in range(4):
        image = (100.0 * k + np.arange(16, dtype=np.float32)).reshape(4, 4, 1)
        mask = np.zeros((4, 4), np.float32)
        boxes, valid, classes = (
            np.zeros((2, 4), np.float32),
            np.zeros(2, np.float32),
            np.zeros(2, np.int32),
        )
        if k in defects:
            rows, cols, box = defects[k]
            mask[rows, cols] = 1.0
            boxes[0], valid[0], classes[0] = box, 1.0, k or 1
        parts.append(
            {
                "images": image,
                "masks": mask,
                "boxes": boxes,
                "box_classes": classes,
                "box_valid": valid,
                "labels": np.int32(k != 1),
                "defect_types": np.int32(k or 1 if k != 1 else 0),
            }
        )
    return parts


def _mosaic(parts, x0, y0):
    from m2u_jax.data import augment

    out = augment.mosaic_example(parts, np.int32(x0), np.int32(y0), 4)
    return {k: np.asarray(v) for k, v in out.items()}


def test_mosaic_example_keeps_image_mask_boxes_and_labels_consistent():
    parts = _mosaic_parts()
    canvas = np.block(
        [
            [parts[0]["images"][..., 0], parts[1]["images"][..., 0]],
            [parts[2]["images"][..., 0], parts[3]["images"][..., 0]],
        ]
    )
    masks = np.block(
        [[parts[0]["masks"], parts[1]["masks"]], [parts[2]["masks"], parts[3]["masks"]]]
    )
    # The window at (2, 2): part 0's whole defect (its box moved by -2), part 1 good, parts 2
    # and 3 shown without their defects (their boxes clipped to nothing: padding).
    out = _mosaic(parts, 2, 2)
    np.testing.assert_array_equal(out["images"][..., 0], canvas[2:6, 2:6])
    np.testing.assert_array_equal(out["masks"], masks[2:6, 2:6])
    np.testing.assert_array_equal(out["boxes"], [[0, 0, 2, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["box_valid"], [1, 0])
    np.testing.assert_array_equal(out["box_classes"], [1, 0])
    assert out["labels"] == 1 and out["defect_types"] == 1
    # The window at (4, 4) is part 3 alone: its defect, box and type.
    alone = _mosaic(parts, 4, 4)
    np.testing.assert_array_equal(alone["images"], parts[3]["images"])
    np.testing.assert_array_equal(alone["boxes"], [[3, 3, 4, 4], [0, 0, 0, 0]])
    assert alone["labels"] == 1 and alone["defect_types"] == 3
    # The window at (1, 3): part 0 shows 2 defect pixels (box [2,2,4,4] -> [1,0,3,1], area 2),
    # part 2 one (box [0,0,2,1] moved by (-1, +1) -> [0,1,1,2], area 1): largest box first,
    # the type of the part with more defect pixels in the window.
    both = _mosaic(parts, 1, 3)
    np.testing.assert_array_equal(both["masks"], masks[3:7, 1:5])
    np.testing.assert_array_equal(both["boxes"], [[1, 0, 3, 1], [0, 1, 1, 2]])
    np.testing.assert_array_equal(both["box_classes"], [1, 2])
    assert both["labels"] == 1 and both["defect_types"] == 1
    # More kept boxes than slots: the smallest go. Part 1 gets a defect at rows 2-3, cols 0-1
    # (box [0, 2, 2, 4]); the window at (1, 3) then keeps three boxes: part 0's [1, 0, 3, 1]
    # (area 2), part 1's moved by (+3, -3) to [3, 0, 4, 1] (area 1) and part 2's (area 1): the
    # two slots take the largest, then the tie in part order (a stable sort).
    crowded = [dict(part) for part in parts]
    crowded[1] = {**parts[1], "labels": np.int32(1), "defect_types": np.int32(2)}
    crowded[1]["masks"] = np.zeros((4, 4), np.float32)
    crowded[1]["masks"][2:4, 0:2] = 1.0
    crowded[1]["boxes"] = np.array([[0, 2, 2, 4], [0, 0, 0, 0]], np.float32)
    crowded[1]["box_valid"] = np.array([1, 0], np.float32)
    crowded[1]["box_classes"] = np.array([2, 0], np.int32)
    full = _mosaic(crowded, 1, 3)
    np.testing.assert_array_equal(full["boxes"], [[1, 0, 3, 1], [3, 0, 4, 1]])
    np.testing.assert_array_equal(full["box_classes"], [1, 2])
    np.testing.assert_array_equal(full["box_valid"], [1, 1])
    assert full["defect_types"] == 1  # 2 defect pixels of part 0 against 1 of parts 1 and 2
    # Labelled defective with no mask and no box: counts whenever the window shows the part.
    unknown = [dict(part) for part in parts]
    unknown[0] = {
        **parts[0],
        "masks": np.zeros((4, 4), np.float32),
        "box_valid": np.zeros(2, np.float32),
    }
    unknown[3] = {**parts[3], "labels": np.int32(0), "defect_types": np.int32(0)}
    unknown[3]["masks"] = np.zeros((4, 4), np.float32)
    unknown[3]["box_valid"] = np.zeros(2, np.float32)
    shown = _mosaic(unknown, 3, 3)  # shows parts 0 (1 px), 1, 2 (no defect), 3 (now good)
    assert shown["labels"] == 1 and shown["defect_types"] == 1 and shown["box_valid"].sum() == 0
    hidden = _mosaic(unknown, 4, 4)  # part 3 alone, good
    assert hidden["labels"] == 0 and hidden["defect_types"] == 0


def test_sample_mosaic_draws_windows_holding_the_centre_deterministically():
    from m2u_jax.data import augment

    key = np.array([0, 1], np.int64)
    draws = [augment.sample_mosaic(augment.fold_key(key, i), 10, 32, 32) for i in range(400)]
    corners = {(int(x0), int(y0)) for _, _, x0, y0 in draws}
    # A full-size window holds the canvas centre (32, 32): corners 0..32 on each axis, all drawn.
    assert {x for x, _ in corners} == set(range(33)) and {y for _, y in corners} == set(range(33))
    partners = np.concatenate([np.asarray(p) for _, p, _, _ in draws])
    assert partners.shape == (1200,) and set(partners.tolist()) == set(range(10))
    uniforms = np.array([float(d) for d, _, _, _ in draws])
    assert 0 <= uniforms.min() and uniforms.max() < 1 and abs(uniforms.mean() - 0.5) < 0.05
    # A 16-px window (a crop of 32-px images) holds the centre from corners 16 .. 32.
    small = {
        int(augment.sample_mosaic(augment.fold_key(key, i), 10, 32, 16)[2]) for i in range(400)
    }
    assert small == set(range(16, 33))
    again = augment.sample_mosaic(augment.fold_key(key, 7), 10, 32, 32)
    for a, b in zip(again, draws[7], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mosaic_batches_until_the_plain_tail(synthetic_root):
    def batches(mosaic_prob):
        config = _config(synthetic_root, mosaic_prob=mosaic_prob, mosaic_off_fraction=0.5)
        config.data.protocol = "supervised"
        config.train.finetune_steps = 4
        return list(itertools.islice(pipeline.make_train_dataset(config)[0].as_numpy_iterator(), 4))

    plain, mosaic = batches(0.0), batches(1.0)
    for step, (one, other) in enumerate(zip(plain, mosaic, strict=True)):
        assert one["images"].shape == other["images"].shape == (8, 32, 32, 3)
        same = np.array_equal(one["images"], other["images"])
        assert same == (step >= 2), step  # mosaics in the first half of the steps only
        # The synthetic data localises every defect: an example is defective iff it shows one,
        # and every kept box is a defective example's.
        defect_pixels = other["masks"].reshape(8, -1).max(axis=1) > 0
        np.testing.assert_array_equal(other["labels"], defect_pixels.astype(np.int32))
        assert (other["labels"][other["box_valid"].sum(axis=1) > 0] == 1).all()
        inside = (other["boxes"] >= 0) & (other["boxes"] <= 32)
        assert inside.all()
    # With data.train_crop the mosaic window is crop-sized (cut from the full-size canvas).
    config = _config(synthetic_root, mosaic_prob=1.0, train_crop=16)
    config.data.protocol = "supervised"
    batch = next(pipeline.make_train_dataset(config)[0].as_numpy_iterator())
    assert batch["images"].shape == (8, 16, 16, 3) and batch["masks"].shape == (8, 16, 16)
    assert (batch["boxes"] <= 16).all()


def test_train_crop_gives_crop_sized_batches_from_every_window(synthetic_root):
    from m2u_jax.data import augment

    config = _config(synthetic_root, train_crop=16)
    dataset, _ = pipeline.make_train_dataset(config)
    batch = next(dataset.as_numpy_iterator())
    assert batch["images"].shape == (8, 16, 16, 3) and batch["masks"].shape == (8, 16, 16)
    assert batch["clean_images"].shape == (8, 16, 16, 3)
    # Crop corners are uniform over the 17 x 17 valid positions and deterministic per key.
    key = np.array([0, 1], np.int64)
    corners = {
        tuple(int(v) for v in augment.sample_crop_origin(augment.fold_key(key, i), 32, 16))
        for i in range(400)
    }
    assert all(0 <= x <= 16 and 0 <= y <= 16 for x, y in corners)
    assert {x for x, _ in corners} == set(range(17))
    again = augment.sample_crop_origin(augment.fold_key(key, 3), 32, 16)
    assert tuple(map(int, again)) == tuple(
        map(int, augment.sample_crop_origin(augment.fold_key(key, 3), 32, 16))
    )
    # Pretraining views are cut from the crop too.
    views = next(pipeline.make_train_dataset(config, stage="pretrain")[0].as_numpy_iterator())
    assert views["views1"].shape == (8, 16, 16, 3)


def test_defect_share_draws_each_real_defect_equally_and_every_good_image_once():
    labels = [0] * 12 + [1] * 2  # natural defect share 1/7
    share = pipeline.DefectShare(labels, 0.25)
    # 12 good images are 75 % of the epoch: 4 defect draws, each of the 2 defects twice.
    assert (share.draws, share.epoch_length, share.active) == (4, 16, True)
    order = share.order(tf.constant([3, 1], tf.int64)).numpy()
    assert np.bincount(order, minlength=14).tolist() == [1] * 12 + [2, 2]
    again = share.order(tf.constant([3, 1], tf.int64)).numpy()
    other = share.order(tf.constant([3, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, other)
    assert np.bincount(other, minlength=14).tolist() == [1] * 12 + [2, 2]
    # 5 draws of 2 defects: counts 3 and 2 (never 4 and 1).
    uneven = pipeline.DefectShare([0] * 15 + [1] * 2, 0.25)
    assert uneven.draws == 5
    counts = np.bincount(uneven.order(tf.constant([0, 0], tf.int64)).numpy(), minlength=17)
    assert counts[:15].tolist() == [1] * 15 and sorted(counts[15:].tolist()) == [2, 3]


@pytest.mark.parametrize(
    "labels, value",
    [([0] * 12 + [1] * 2, 0.0), ([0] * 12 + [1] * 6, 0.25), ([0] * 8, 0.5), ([1] * 8, 0.5)],
)
def test_defect_share_at_or_below_the_natural_share_changes_nothing(labels, value):
    share = pipeline.DefectShare(labels, value)
    assert not share.active
    assert share.epoch_length == len(labels) and share.draws == sum(labels)


def test_defect_share_oversamples_real_defects_in_training_batches(synthetic_root):
    # 16 good + 8 defective training images (one per category and type): natural share 1/3.
    config = _plain_supervised(synthetic_root, cache=False)
    plain, _ = pipeline.make_train_dataset(config)
    config.data.defect_share = 0.5
    shared, _ = pipeline.make_train_dataset(config)
    # Batches of 8: the plain epoch is 24 examples, the shared one 16 good + 16 defect draws.
    real = [batch["labels"].sum() for batch in plain.take(6).as_numpy_iterator()]
    assert sum(real[:3]) == sum(real[3:]) == 8  # each epoch shows each defect once
    batches = list(shared.take(4).as_numpy_iterator())
    assert sum(batch["labels"].sum() for batch in batches) == 16  # one epoch of 32
    good = np.concatenate([batch["clean_images"][batch["labels"] == 0] for batch in batches])
    assert len(set(_image_keys(good))) == 16  # every good image once
    defects = np.concatenate([batch["clean_images"][batch["labels"] == 1] for batch in batches])
    assert sorted(collections.Counter(_image_keys(defects)).values()) == [2] * 8
    masks = np.concatenate([batch["masks"][batch["labels"] == 1] for batch in batches])
    assert masks.reshape(16, -1).max(1).min() == 1  # each draw keeps its real mask
    resumed, _ = pipeline.make_train_dataset(config, start_step=3)
    np.testing.assert_array_equal(next(resumed.as_numpy_iterator())["images"], batches[3]["images"])


def test_paste_defect_puts_the_donors_defect_pixels_and_labels_on_the_good_image():
    size = 6
    good = {
        "images": tf.fill([size, size, 1], 0.2),
        "masks": tf.zeros([size, size]),
        "boxes": tf.zeros([2, 4]),
        "box_classes": tf.zeros([2], tf.int32),
        "box_valid": tf.zeros([2]),
        "labels": tf.constant(0, tf.int32),
        "defect_types": tf.constant(0, tf.int32),
    }
    mask = np.zeros((size, size), np.float32)
    mask[1:3, 2:5] = 1.0
    donor = {
        "images": tf.fill([size, size, 1], 0.9),
        "masks": tf.constant(mask),
        "boxes": tf.constant([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]),
        "box_classes": tf.constant([3, 0], tf.int32),
        "box_valid": tf.constant([1.0, 0.0]),
        "labels": tf.constant(1, tf.int32),
        "defect_types": tf.constant(2, tf.int32),
    }
    pasted = _numpy(augment.paste_defect(good, donor))
    expected = np.where(mask[..., None] > 0, 0.9, 0.2).astype(np.float32)
    np.testing.assert_array_equal(pasted["images"], expected)
    np.testing.assert_array_equal(pasted["masks"], mask)
    np.testing.assert_array_equal(pasted["boxes"], donor["boxes"].numpy())
    assert pasted["box_classes"].tolist() == [3, 0] and pasted["box_valid"].tolist() == [1, 0]
    assert (int(pasted["labels"]), int(pasted["defect_types"])) == (1, 2)
    # Not drawn: nothing pasted.
    not_drawn = _numpy(augment.paste_defect(good, donor, tf.constant(False)))
    for name, value in good.items():
        np.testing.assert_array_equal(not_drawn[name], value.numpy())
    # A donor without mask pixels (a defect labelled by class only) pastes nothing.
    donor["masks"] = tf.zeros([size, size])
    unchanged = _numpy(augment.paste_defect(good, donor))
    for name, value in good.items():
        np.testing.assert_array_equal(unchanged[name], value.numpy())


def test_sample_paste_draws_deterministically_in_range():
    keys = [tf.constant([seed, 7], tf.int64) for seed in range(200)]
    draws = [augment.sample_paste(key, 5) for key in keys]
    again = augment.sample_paste(keys[3], 5)
    assert (float(again[0]), int(again[1])) == (float(draws[3][0]), int(draws[3][1]))
    uniforms = np.array([float(draw) for draw, _ in draws])
    donors = np.array([int(donor) for _, donor in draws])
    assert uniforms.min() >= 0 and uniforms.max() < 1 and 0.4 < uniforms.mean() < 0.6
    assert sorted(set(donors.tolist())) == [0, 1, 2, 3, 4]


def test_real_paste_turns_good_images_into_real_defects_on_their_background(synthetic_root):
    # 16 good + 8 defective training images (one per category and type), no synthesis, no flips:
    # with real_paste_prob=1 every good image carries one of the 8 real defects.
    config = _plain_supervised(synthetic_root, real_paste_prob=1.0)
    (train,) = pipeline.iterate_eval(config, "train", batch_size=24)
    defective = train["labels"] == 1
    donor_images, donor_masks = train["images"][defective], train["masks"][defective]
    donor_keys = set(_image_keys(donor_images))
    dataset, _ = pipeline.make_train_dataset(config)
    batches = list(dataset.take(3).as_numpy_iterator())  # one epoch of 24
    assert all(batch["labels"].all() for batch in batches)
    pasted = 0
    for batch in batches:
        for image, mask in zip(batch["images"], batch["masks"]):
            if _image_keys(image[None])[0] in donor_keys:
                continue  # a real defect as it is
            pasted += 1
            donor = next(j for j, m in enumerate(donor_masks) if np.array_equal(m, mask))
            inside = mask[..., None] > 0
            assert inside.any()
            np.testing.assert_array_equal(
                np.where(inside, image, 0), np.where(inside, donor_images[donor], 0)
            )
            # Outside the mask, one of the good images.
            assert any(
                np.array_equal(np.where(inside, 0, image), np.where(inside, 0, good))
                for good in train["images"][~defective]
            )
    assert pasted == 16  # every good image once
    # Half the good images at 0.5, the same ones on every build (seeded draws).
    config.data.real_paste_prob = 0.5
    half = [
        [
            batch["labels"]
            for batch in pipeline.make_train_dataset(config)[0].take(3).as_numpy_iterator()
        ]
        for _ in range(2)
    ]
    np.testing.assert_array_equal(half[0], half[1])
    assert 8 + 4 <= np.concatenate(half[0]).sum() <= 8 + 12


def test_real_paste_flips_mirror_each_pasted_defect_on_its_own_draw(synthetic_root):
    # As above with data.real_paste_flips: a pasted defect is one of the real ones in one of its
    # four poses (as is, mirrored left-right, top-bottom, both), mask, pixels and box alike.
    config = _plain_supervised(synthetic_root, real_paste_prob=1.0, real_paste_flips=True)
    (train,) = pipeline.iterate_eval(config, "train", batch_size=24)
    defective = train["labels"] == 1
    donors = {
        "images": train["images"][defective],
        "masks": train["masks"][defective],
        "boxes": train["boxes"][defective],
    }
    donor_keys = set(_image_keys(donors["images"]))
    size = train["masks"].shape[-1]
    poses = {"none": (False, False), "lr": (True, False), "tb": (False, True), "both": (True, True)}
    seen = []
    for batch in pipeline.make_train_dataset(config)[0].take(3).as_numpy_iterator():
        for image, mask, boxes in zip(batch["images"], batch["masks"], batch["boxes"]):
            if _image_keys(image[None])[0] in donor_keys:
                continue
            inside = mask[..., None] > 0
            found = []
            for name, (horizontal, vertical) in poses.items():
                for j in range(len(donors["masks"])):
                    donor_mask = donors["masks"][j]
                    donor_image = donors["images"][j]
                    if horizontal:
                        donor_mask, donor_image = donor_mask[:, ::-1], donor_image[:, ::-1]
                    if vertical:
                        donor_mask, donor_image = donor_mask[::-1], donor_image[::-1]
                    if np.array_equal(donor_mask, mask) and np.array_equal(
                        np.where(inside, image, 0), np.where(inside, donor_image, 0)
                    ):
                        found.append((name, j))
            assert found, "a pasted defect that is none of the real ones in any pose"
            name, j = found[0]
            # The box follows the pose: [x1, x2) -> [S - x2, S - x1) when mirrored left-right.
            x1, y1, x2, y2 = donors["boxes"][j][0]
            if poses[name][0]:
                x1, x2 = size - x2, size - x1
            if poses[name][1]:
                y1, y2 = size - y2, size - y1
            np.testing.assert_allclose(boxes[0], [x1, y1, x2, y2])
            seen.append(name)
    assert len(seen) == 16
    # 16 independent draws, each mirrored with probability 3/4 (seeded, so this cannot flake).
    assert seen.count("none") < 16 and len(set(seen)) >= 3
    # The draws themselves: deterministic per key, each mirror about half the time.
    keys = [tf.constant([seed, 7], tf.int64) for seed in range(400)]
    mirrors = np.array([[bool(m) for m in augment.sample_paste_flips(key)] for key in keys])
    assert [bool(m) for m in augment.sample_paste_flips(keys[5])] == mirrors[5].tolist()
    assert np.all((0.4 < mirrors.mean(axis=0)) & (mirrors.mean(axis=0) < 0.6))
    # Not the example's own flips: the two streams differ on these keys.
    own = np.array([[bool(m) for m in augment.sample_flips(key)] for key in keys])
    assert not np.array_equal(mirrors, own)


def test_real_paste_without_labelled_defects_pastes_nothing(synthetic_root, caplog):
    # The unsupervised protocol trains on good images only: the same batches as without it.
    config = _config(synthetic_root, random_flips=False)
    plain = next(pipeline.make_train_dataset(config)[0].as_numpy_iterator())
    config.data.real_paste_prob = 0.5
    with caplog.at_level(logging.WARNING, logger=pipeline.logger.name):
        pasted = next(pipeline.make_train_dataset(config)[0].as_numpy_iterator())
    assert "holds no labelled defect to paste (protocol unsupervised)" in caplog.text
    for name, value in plain.items():
        np.testing.assert_array_equal(pasted[name], value)
