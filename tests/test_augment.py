"""Synthetic anomalies and contrastive views as TF ops (m2u_jax.data.augment)."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from m2u_jax.data import augment  # noqa: E402

SIZE = 32


def _numpy_bbox(mask):
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_mask_bounding_boxes():
    masks = np.zeros((3, 8, 10), bool)
    masks[0, 1:3, 2:4] = True
    masks[0, 6, 8] = True  # a second blob: one box covers both
    masks[1, 0, 0] = True
    boxes, valid = augment.mask_bounding_boxes(tf.constant(masks))
    np.testing.assert_array_equal(boxes.numpy(), [[2, 1, 9, 7], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(valid.numpy(), [True, True, False])


def _params(labels, prob=1.0, channels=3, seed=0):
    base = tf.constant([seed, 1], tf.int64)
    per_example = [
        augment.sample_anomaly_params(augment.fold_key(base, i), tf.constant(label), prob, channels)
        for i, label in enumerate(labels)
    ]
    return tf.nest.map_structure(lambda *xs: tf.stack(xs), *per_example)


def _batch(labels, max_boxes=3, seed=0):
    rng = np.random.default_rng(seed)
    batch_size = len(labels)
    masks = np.zeros((batch_size, SIZE, SIZE), np.float32)
    boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
    box_valid = np.zeros((batch_size, max_boxes), np.float32)
    for i, label in enumerate(labels):
        if label:
            masks[i, 2:5, 3:9] = 1
            boxes[i, 0] = [3, 2, 9, 5]
            box_valid[i, 0] = 1
    return {
        "images": tf.constant(rng.uniform(size=(batch_size, SIZE, SIZE, 3)).astype(np.float32)),
        "masks": tf.constant(masks),
        "labels": tf.constant(labels, tf.int32),
        "defect_types": tf.constant(labels, tf.int32) * 2,
        "boxes": tf.constant(boxes),
        "box_classes": tf.constant(
            np.array(labels, np.int32)[:, None] * np.ones((1, max_boxes), np.int32)
        ),
        "box_valid": tf.constant(box_valid),
        "recon_valid": tf.constant(1 - np.array(labels, np.float32)),
    }


def test_apply_anomalies_contract():
    labels = [0, 0, 0, 0, 0, 0, 1, 0]
    batch = _batch(labels)
    params = _params(labels)
    out = {k: v.numpy() for k, v in augment.apply_anomalies(batch, params, -1).items()}
    images = batch["images"].numpy()
    np.testing.assert_array_equal(out["clean_images"], images)
    kinds = params["use_noise"].numpy()
    assert 0 < kinds[:6].sum() < 6  # both kinds occur in this batch
    for i, label in enumerate(labels):
        mask = out["masks"][i] > 0
        if label:  # Real defects are left alone.
            np.testing.assert_array_equal(out["images"][i], images[i])
            np.testing.assert_array_equal(out["masks"][i], batch["masks"].numpy()[i])
            assert out["labels"][i] == 1 and out["defect_types"][i] == 2
            np.testing.assert_array_equal(out["box_classes"][i], [1, 1, 1])
            continue
        assert mask.any(), i
        assert 0.002 < mask.mean() < 0.5
        # Pixels change only inside the mask, and do change there.
        np.testing.assert_array_equal(out["images"][i][~mask], images[i][~mask])
        assert np.abs(out["images"][i][mask] - images[i][mask]).mean() > 0.02
        assert out["labels"][i] == 1 and out["defect_types"][i] == -1
        np.testing.assert_array_equal(out["boxes"][i, 0], _numpy_bbox(mask))
        np.testing.assert_array_equal(out["boxes"][i, 1:], 0)
        np.testing.assert_array_equal(out["box_classes"][i], [-1, 0, 0])
        np.testing.assert_array_equal(out["box_valid"][i], [1, 0, 0])
    assert out["images"].min() >= 0 and out["images"].max() <= 1
    np.testing.assert_array_equal(out["recon_valid"], 1 - np.array(labels))


def test_probability_zero_and_determinism():
    labels = [0, 0, 0, 0]
    batch = _batch(labels)
    out = augment.apply_anomalies(batch, _params(labels, prob=0.0))
    np.testing.assert_array_equal(out["images"].numpy(), batch["images"].numpy())
    np.testing.assert_array_equal(out["labels"].numpy(), [0, 0, 0, 0])
    np.testing.assert_array_equal(out["box_valid"].numpy(), np.zeros((4, 3)))
    agnostic = augment.apply_anomalies(batch, _params(labels, seed=5), synthetic_type=1)
    applied = agnostic["labels"].numpy() == 1
    assert applied.any()
    np.testing.assert_array_equal(agnostic["defect_types"].numpy(), applied.astype(np.int32))
    first = augment.apply_anomalies(batch, _params(labels, seed=5))
    again = augment.apply_anomalies(batch, _params(labels, seed=5))
    other = augment.apply_anomalies(batch, _params(labels, seed=6))
    np.testing.assert_array_equal(first["images"].numpy(), again["images"].numpy())
    assert not np.array_equal(first["masks"].numpy(), other["masks"].numpy())


def test_cutpaste_geometry_is_exact():
    # Image value = row / 64: bilinear sampling of a linear ramp is exact, so the pasted patch
    # must equal the ramp shifted from the source rectangle to the target one.
    rows = np.arange(SIZE, dtype=np.float32)[:, None, None] / 64
    images = tf.constant(np.broadcast_to(rows, (SIZE, SIZE, 3))[None])
    uniforms = np.full((1, 20), 0.5, np.float32)  # angle 0, brightness +0, contrast x1
    uniforms[0, 4:8] = [0.2, 0.1, 0.8, 0.9]  # source x, y; target x, y
    params = {
        "uniforms": tf.constant(uniforms),
        "use_noise": tf.constant([False]),
        "gains": tf.ones([1, 3]),
        "noise_4": tf.zeros([1, 4, 4, 1]),
        "noise_8": tf.zeros([1, 8, 8, 1]),
    }
    out, masks = augment._synthesize(images, params)
    area = 0.085 * SIZE * SIZE
    aspect = np.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * 0.5)
    width, height = np.sqrt(area / aspect), np.sqrt(area * aspect)
    source_y = height / 2 + 0.1 * (SIZE - height)
    target_x = width / 2 + 0.8 * (SIZE - width)
    target_y = height / 2 + 0.9 * (SIZE - height)
    grid_y, grid_x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    expected_mask = (np.abs(grid_x - target_x) <= width / 2) & (
        np.abs(grid_y - target_y) <= height / 2
    )
    np.testing.assert_array_equal(masks.numpy()[0], expected_mask)
    expected = (grid_y - target_y + source_y) / 64
    np.testing.assert_allclose(
        out.numpy()[0, ..., 0][expected_mask], expected[expected_mask], atol=1e-5
    )
    np.testing.assert_array_equal(out.numpy()[0][~expected_mask], images.numpy()[0][~expected_mask])


def _identity_view_uniforms(batch_size):
    uniforms = np.zeros((batch_size, 16), np.float32)
    uniforms[:, 0] = 1.0  # crop scale 1
    uniforms[:, 1] = 0.5  # aspect 1
    uniforms[:, 4:7] = 0.9  # no flips, no colour jitter
    uniforms[:, 11:13] = 0.9  # no grayscale, no blur
    return uniforms


def test_views_identity_flip_and_grayscale():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, SIZE, SIZE, 4)).astype(np.float32)  # rgb + thermal
    uniforms = _identity_view_uniforms(2)
    same = augment.make_views(tf.constant(images), tf.constant(uniforms), rgb_offset=0).numpy()
    np.testing.assert_allclose(same, images, atol=1e-5)
    uniforms[0, 4] = 0.1  # horizontal flip
    uniforms[1, 11] = 0.1  # grayscale
    views = augment.make_views(tf.constant(images), tf.constant(uniforms), rgb_offset=0).numpy()
    np.testing.assert_allclose(views[0], images[0, :, ::-1], atol=1e-5)
    gray = images[1, ..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    for channel in range(3):
        np.testing.assert_allclose(views[1, ..., channel], gray, atol=1e-5)
    np.testing.assert_allclose(views[1, ..., 3], images[1, ..., 3], atol=1e-5)  # thermal kept


def test_random_views_differ_and_stay_in_range():
    images = tf.constant(
        np.random.default_rng(1).uniform(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    )
    keys = [augment.fold_key(tf.constant([0, 2], tf.int64), i) for i in range(8)]
    uniforms = tf.stack([augment.sample_view_params(key) for key in keys])
    views1 = augment.make_views(images, uniforms[:4], rgb_offset=0).numpy()
    views2 = augment.make_views(images, uniforms[4:], rgb_offset=0).numpy()
    assert views1.shape == (4, SIZE, SIZE, 3)
    assert views1.min() >= 0 and views1.max() <= 1
    assert np.abs(views1 - views2).mean() > 0.05
    again = augment.make_views(images, uniforms[:4], rgb_offset=0).numpy()
    np.testing.assert_array_equal(views1, again)


def test_blur_keeps_constant_images():
    images = tf.fill([2, SIZE, SIZE, 1], 0.25)
    blurred = augment._gaussian_blur(images, tf.constant([0.5, 2.0]), max_sigma=2.0)
    np.testing.assert_allclose(blurred.numpy(), 0.25, atol=1e-6)
    impulse = np.zeros((1, SIZE, SIZE, 1), np.float32)
    impulse[0, 16, 16] = 1
    blurred = augment._gaussian_blur(
        tf.constant(impulse), tf.constant([1.0]), max_sigma=1.0
    ).numpy()
    taps = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    taps /= taps.sum()
    np.testing.assert_allclose(blurred[0, 13:20, 13:20, 0], np.outer(taps, taps), atol=1e-6)


def test_flip_example_moves_mask_and_boxes_together():
    # A 1-pixel-tall bar at rows 1, columns 2..4 of a 6x8 image; its box is [2, 1, 5, 2).
    image = np.zeros((6, 8, 3), np.float32)
    mask = np.zeros((6, 8), np.float32)
    image[1, 2:5] = 1.0
    mask[1, 2:5] = 1.0
    example = {
        "images": tf.constant(image),
        "masks": tf.constant(mask),
        "boxes": tf.constant([[2.0, 1.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0]]),
        "box_valid": tf.constant([1.0, 0.0]),
        "labels": tf.constant(1),
    }
    both = augment.flip_example(example, tf.constant(True), tf.constant(True))
    # Mirrored left-right: columns 8-5=3 .. 8-2=6; top-bottom: row 6-2=4.
    np.testing.assert_array_equal(both["boxes"].numpy(), [[3.0, 4.0, 6.0, 5.0], [0.0] * 4])
    expected_mask = np.zeros((6, 8), np.float32)
    expected_mask[4, 3:6] = 1.0
    np.testing.assert_array_equal(both["masks"].numpy(), expected_mask)
    np.testing.assert_array_equal(both["images"].numpy()[..., 0], expected_mask)
    # The box still bounds the mirrored mask exactly (the same rule as the anomalies' boxes).
    recomputed, _ = augment.mask_bounding_boxes(tf.constant(expected_mask[None] > 0))
    np.testing.assert_array_equal(recomputed.numpy()[0], both["boxes"].numpy()[0])
    assert int(both["labels"]) == 1
    horizontal = augment.flip_example(example, tf.constant(True), tf.constant(False))
    np.testing.assert_array_equal(horizontal["boxes"].numpy()[0], [3.0, 1.0, 6.0, 2.0])
    unchanged = augment.flip_example(example, tf.constant(False), tf.constant(False))
    np.testing.assert_array_equal(unchanged["images"].numpy(), image)
    np.testing.assert_array_equal(unchanged["boxes"].numpy(), example["boxes"].numpy())


def test_sample_flips_is_stateless_and_balanced():
    keys = [augment.fold_key(tf.constant([0, 1], tf.int64), index) for index in range(400)]
    draws = np.array([[bool(flag) for flag in augment.sample_flips(key)] for key in keys])
    again = np.array([[bool(flag) for flag in augment.sample_flips(key)] for key in keys[:20]])
    np.testing.assert_array_equal(draws[:20], again)
    # 400 fair coins per axis: the mean is within 0.5 +- 0.1 with overwhelming probability.
    assert np.all(np.abs(draws.mean(0) - 0.5) < 0.1)
    assert 0.1 < np.mean(draws[:, 0] & draws[:, 1]) < 0.4
