"""Tests of m2u_jax.losses against hand-computed values and NumPy/SciPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage

from configs import default as default_config
from m2u_jax import boxes as box_ops
from m2u_jax import losses
from m2u_jax.config import assign_rules

LN2 = math.log(2.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- focal


def test_focal_without_alpha_and_gamma_is_bce():
    logits = jnp.array([-30.0, -2.5, -0.1, 0.0, 0.7, 3.0, 25.0])
    targets = jnp.array([0.0, 1.0, 0.0, 1.0, 0.3, 0.0, 1.0])
    expected = optax.sigmoid_binary_cross_entropy(logits, targets)
    np.testing.assert_array_equal(losses.sigmoid_focal_loss(logits, targets, None, 0.0), expected)
    np.testing.assert_array_equal(losses.sigmoid_focal_loss(logits, targets, -1.0, 0.0), expected)


def test_focal_hand_computed():
    values = losses.sigmoid_focal_loss(jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0]), 0.25, 2.0)
    # logit 0, target 1: p_t = 0.5, BCE = ln 2, (1 - p_t)² = 0.25, alpha_t = 0.25.
    # logit 2, target 0: p_t = 1 - s(2), BCE = softplus(2), (1 - p_t)² = s(2)², alpha_t = 0.75.
    expected = [0.25 * 0.25 * LN2, 0.75 * _sigmoid(2.0) ** 2 * math.log1p(math.exp(2.0))]
    np.testing.assert_allclose(values, expected, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_gradient_is_finite_at_confident_logits(gamma):
    # (1 - p_t)^gamma with gamma < 1 has an infinite slope at p_t = 1: a direct power form gives
    # 0 * inf = NaN at a confident correct logit; the log-space form gives ~0.
    grad = jax.grad(lambda x: losses.sigmoid_focal_loss(x, jnp.array(1.0), 0.25, gamma))
    confident = float(grad(jnp.array(40.0)))
    assert math.isfinite(confident) and abs(confident) < 1e-20
    # Away from saturation the gradient matches a central difference of the loss.
    step = 1e-2
    loss = lambda x: float(losses.sigmoid_focal_loss(jnp.array(x), jnp.array(1.0), 0.25, gamma))
    numeric = (loss(1.0 + step) - loss(1.0 - step)) / (2 * step)
    np.testing.assert_allclose(float(grad(jnp.array(1.0))), numeric, rtol=1e-3)


# ---------------------------------------------------------------- IoU losses

SQUARE_A = jnp.array([0.0, 0.0, 2.0, 2.0])
SQUARE_B = jnp.array([1.0, 1.0, 3.0, 3.0])


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("iou", 1 - 1 / 7),
        ("giou", 1 - (1 / 7 - 2 / 9)),
        ("diou", 1 - (1 / 7 - 2 / 18)),
        ("ciou", 1 - (1 / 7 - 2 / 18)),  # equal aspect ratios: no aspect term
    ],
)
def test_iou_loss_hand_computed(kind, expected):
    np.testing.assert_allclose(losses.iou_loss(SQUARE_A, SQUARE_B, kind), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.iou_loss(SQUARE_A, SQUARE_A, kind), 0.0, atol=1e-6)
    batched = losses.iou_loss(jnp.stack([SQUARE_A, SQUARE_A]), jnp.stack([SQUARE_B, SQUARE_A]))
    assert batched.shape == (2,)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_iou_loss_gradients_finite_at_zero_area_and_identical_boxes(kind):
    cases = [
        (jnp.zeros(4), jnp.zeros(4)),
        (SQUARE_A, SQUARE_A),
        (jnp.array([1.0, 1.0, 1.0, 1.0]), SQUARE_B),
        (SQUARE_B, jnp.array([2.0, 2.0, 2.0, 2.0])),
    ]
    for pred, target in cases:
        grad = jax.grad(lambda p, t=target: losses.iou_loss(p, t, kind))(pred)
        assert np.all(np.isfinite(grad)), (kind, pred, target, grad)


def test_iou_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind='eiou'"):
        losses.iou_loss(SQUARE_A, SQUARE_B, "eiou")


# ---------------------------------------------------------------- dice


def test_dice_loss_hand_computed():
    logits = jnp.zeros((2, 2, 2))  # p = 0.5 everywhere
    targets = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # Image 0: Σpt = 0.5, Σp + Σt = 3 -> 1 - (1 + 1) / (3 + 1). Image 1: 1 - 1 / (2 + 1).
    np.testing.assert_allclose(losses.dice_loss(logits, targets), [0.5, 2 / 3], rtol=1e-6)


# ---------------------------------------------------------------- SSIM / reconstruction


def _reference_ssim(images_a, images_b):
    """SSIM per image with scipy's Gaussian filter, cropped to the fully-covered region."""
    side, sigma = losses.ssim_window(*images_a.shape[1:3])
    radius = side // 2

    def blur(image):
        filtered = ndimage.gaussian_filter(
            image.astype(np.float64), sigma=(sigma, sigma, 0), radius=(radius, radius, 0)
        )
        return filtered[radius : image.shape[0] - radius, radius : image.shape[1] - radius]

    c1, c2 = 0.01**2, 0.03**2
    result = []
    for a, b in zip(images_a, images_b):
        mean_a, mean_b = blur(a), blur(b)
        var_a = blur(a * a) - mean_a**2
        var_b = blur(b * b) - mean_b**2
        covariance = blur(a * b) - mean_a * mean_b
        ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
            (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
        )
        result.append(ssim_map.mean())
    return np.array(result)


def test_ssim_window_sizes():
    assert losses.ssim_window(32, 32) == (11, 1.5)
    side, sigma = losses.ssim_window(8, 12)
    assert side == 7 and sigma == pytest.approx(1.5 * 7 / 11)


@pytest.mark.parametrize("size", [20, 8])
def test_ssim_matches_scipy_reference(size):
    rng = np.random.default_rng(size)
    clean = rng.uniform(0, 1, (3, size, size, 2)).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    noisy[2] = rng.uniform(0, 1, noisy[2].shape)  # an unrelated image: low SSIM
    values = losses.ssim(jnp.asarray(noisy), jnp.asarray(clean))
    assert values.shape == (3,)
    np.testing.assert_allclose(values, _reference_ssim(noisy, clean), atol=1e-5)
    assert values[2] < 0.2 < values[0] < 0.99


def test_reconstruction_loss_zero_for_identical_and_weighted_mean():
    rng = np.random.default_rng(1)
    clean = rng.uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.ssim(clean, clean), 1.0, atol=1e-5)
    assert float(losses.reconstruction_loss(clean, clean, jnp.ones(3))) == pytest.approx(
        0.0, abs=1e-5
    )
    recon = np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1).astype(np.float32)
    weights = np.array([1.0, 0.0, 0.5], np.float32)
    per_image = np.mean((recon - clean) ** 2, axis=(1, 2, 3)) + 1 - _reference_ssim(recon, clean)
    expected = (per_image * weights).sum() / weights.sum()
    np.testing.assert_allclose(
        losses.reconstruction_loss(recon, clean, weights), expected, rtol=1e-4
    )
    np.testing.assert_allclose(
        losses.reconstruction_loss(recon, clean), per_image.mean(), rtol=1e-4
    )
    # No valid target in the batch: zero, not NaN.
    assert float(losses.reconstruction_loss(recon, clean, jnp.zeros(3))) == 0.0


def test_reconstruction_loss_branch_follows_the_traced_weights():
    """Under jit the weights are data: the same program gives the weighted loss and its
    gradient for a batch with targets and exact zeros for one without (the skipped branch)."""
    rng = np.random.default_rng(4)
    clean = rng.uniform(0, 1, (2, 16, 16, 1)).astype(np.float32)
    recon = np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1).astype(np.float32)
    loss_and_grad = jax.jit(jax.value_and_grad(losses.reconstruction_loss))
    value, grad = loss_and_grad(recon, clean, jnp.zeros(2))
    assert float(value) == 0.0 and not np.any(np.asarray(grad))
    weights = jnp.array([0.0, 1.0])
    value, grad = loss_and_grad(recon, clean, weights)
    per_image = np.mean((recon - clean) ** 2, axis=(1, 2, 3)) + 1 - _reference_ssim(recon, clean)
    np.testing.assert_allclose(value, per_image[1], rtol=1e-4)
    # Only the image with a target gets a gradient, the same as outside jit.
    assert not np.any(np.asarray(grad[0])) and np.any(np.asarray(grad[1]))
    eager = jax.grad(lambda r: losses.reconstruction_loss(r, clean, weights))(recon)
    np.testing.assert_allclose(grad, eager, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- contrastive


def _normalize(vectors):
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_nt_xent_matches_numpy_loops():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    temperature = 0.5
    embeddings = _normalize(np.concatenate([z1, z2]))
    total = 0.0
    for i in range(6):
        partner = (i + 3) % 6
        denominator = sum(
            math.exp(embeddings[i] @ embeddings[j] / temperature) for j in range(6) if j != i
        )
        total += -math.log(
            math.exp(embeddings[i] @ embeddings[partner] / temperature) / denominator
        )
    value = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature)
    np.testing.assert_allclose(value, total / 6, rtol=1e-5)
    grads = jax.grad(losses.nt_xent, argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2), 0.5)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_moco_v3_loss_matches_numpy_and_stops_key_gradients():
    rng = np.random.default_rng(3)
    q1, q2, k1, k2 = (rng.normal(size=(4, 6)) for _ in range(4))
    temperature = 0.2

    def contrastive(queries, keys):
        queries, keys = _normalize(queries), _normalize(keys)
        total = 0.0
        for i in range(len(queries)):
            logits = [queries[i] @ keys[j] / temperature for j in range(len(keys))]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        return total / len(queries) * 2 * temperature

    expected = contrastive(q1, k2) + contrastive(q2, k1)
    arrays = [jnp.asarray(x) for x in (q1, q2, k1, k2)]
    np.testing.assert_allclose(losses.moco_v3_loss(*arrays, temperature), expected, rtol=1e-5)
    grads = jax.grad(losses.moco_v3_loss, argnums=(0, 1, 2, 3))(*arrays, temperature)
    assert np.any(grads[0] != 0) and np.any(grads[1] != 0)
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)


# ---------------------------------------------------------------- detection / multitask


def _det_points(image_size, strides):
    points, point_strides = [], []
    for stride in strides:
        side = image_size // stride
        ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        level = np.stack([xs.ravel(), ys.ravel()], -1) * stride + stride / 2
        points.append(level)
        point_strides.append(np.full(len(level), stride))
    return (
        jnp.asarray(np.concatenate(points), jnp.float32),
        jnp.asarray(np.concatenate(point_strides), jnp.float32),
    )


def _box_batch():
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, 0] = [0, 0, 8, 8]  # class 1, four stride-4 points inside
    boxes[0, 1] = [8, 4, 16, 12]  # unknown class
    boxes[1, 0] = [2, 2, 14, 14]  # class 0
    return {
        "boxes": jnp.asarray(boxes),
        "box_classes": jnp.array([[1, -1, 0], [0, 0, 0]], jnp.int32),
        "box_valid": jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32),
    }


def _zero_det(num_classes: int, **extra) -> dict:
    """Head outputs at zero logits and zero distances on a 16-px image, levels 4 and 8 (2
    images), plus `extra` entries."""
    points, strides = _det_points(16, (4, 8))
    num_anchors = points.shape[0]
    return {
        "points": points,
        "strides": strides,
        "obj_logits": jnp.zeros((2, num_anchors)),
        "cls_logits": jnp.zeros((2, num_anchors, num_classes)),
        "box_ltrb": jnp.zeros((2, num_anchors, 4)),
        **extra,
    }


def test_detection_loss_values_at_zero_logits_and_at_perfect_boxes():
    num_classes = 3
    det = _zero_det(num_classes)
    points, strides = det["points"], det["strides"]
    num_anchors = points.shape[0]
    batch = _box_batch()
    terms = jax.jit(losses.detection_loss)(det, batch)
    assert set(terms) == {"det_obj", "det_cls", "det_box", "det_dfl"}
    assert float(terms["det_dfl"]) == 0.0  # no `box_bins`: no distribution to train
    targets = jax.jit(box_ops.assign_targets, static_argnames=("num_classes",))(
        points,
        strides,
        batch["boxes"],
        batch["box_classes"],
        batch["box_valid"],
        num_classes=num_classes,
    )
    num_pos = float(targets["fg_mask"].sum())
    num_known = float(targets["cls_weights"].sum())
    assert num_pos > num_known > 0
    # At logit 0 the focal loss is 0.25² ln 2 for a positive and 0.75 · 0.25 ln 2 for a negative.
    positive, negative = 0.0625 * LN2, 0.1875 * LN2
    expected_obj = (num_pos * positive + (2 * num_anchors - num_pos) * negative) / num_pos
    np.testing.assert_allclose(terms["det_obj"], expected_obj, rtol=1e-5)
    np.testing.assert_allclose(terms["det_cls"], positive + (num_classes - 1) * negative, rtol=1e-5)
    # Zero distances decode to points strictly inside their boxes: GIoU 0, loss 1 each.
    np.testing.assert_allclose(terms["det_box"], 1.0, rtol=1e-5)

    # Boxes decoded exactly onto the targets: zero box loss.
    perfect = dict(det, box_ltrb=box_ops.encode_ltrb(points, targets["box_targets"]))
    perfect["box_ltrb"] = jnp.where(targets["fg_mask"][..., None] > 0, perfect["box_ltrb"], 0.0)
    perfect_terms = jax.jit(losses.detection_loss)(perfect, batch)
    np.testing.assert_allclose(perfect_terms["det_box"], 0.0, atol=1e-5)


def test_distribution_focal_loss_by_hand():
    """Cross-entropy with the two bins around the target, weighted by nearness; targets outside
    [0, R-1) clip to the end bins."""
    logits = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    log_p = logits - np.log(np.sum(np.exp(logits)))
    targets = jnp.array([1.3, 0.0, -2.0, 10.0, 2.0])
    loss = losses.distribution_focal_loss(jnp.tile(logits, (5, 1)), targets)
    expected = [
        -(0.7 * log_p[1] + 0.3 * log_p[2]),
        -log_p[0],
        -log_p[0],  # below 0: bin 0
        -(0.01 * log_p[2] + 0.99 * log_p[3]),  # beyond the last bin: clipped to 2.99
        -log_p[2],
    ]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Its minimum over distributions puts the target's two weights on its two bins.
    exact = jnp.log(jnp.array([[1e-9, 0.7, 0.3, 1e-9]]))
    entropy = -(0.7 * np.log(0.7) + 0.3 * np.log(0.3))
    np.testing.assert_allclose(
        losses.distribution_focal_loss(exact, jnp.array([1.3])), [entropy], rtol=1e-5
    )


def test_detection_loss_trains_box_bins_by_distribution_focal_loss():
    """With `box_bins` the det_dfl term is the mean over positives of the 4 sides' DFL against
    the point-to-side distances in strides; det_box still uses `box_ltrb`."""
    num_classes, num_bins = 3, 6
    points, strides = _det_points(16, (4, 8))
    batch = _box_batch()
    rng = np.random.default_rng(3)
    bins = rng.normal(size=(2, points.shape[0], 4, num_bins)).astype(np.float32)
    det = _zero_det(num_classes, box_bins=jnp.asarray(bins))
    terms = jax.jit(losses.detection_loss)(det, batch)
    targets = box_ops.assign_targets(
        points, strides, batch["boxes"], batch["box_classes"], batch["box_valid"], num_classes
    )
    fg = np.asarray(targets["fg_mask"])
    boxes = np.asarray(targets["box_targets"])
    pts, strd = np.asarray(points), np.asarray(strides)
    log_p = bins - np.log(np.sum(np.exp(bins), axis=-1, keepdims=True))
    total = 0.0
    for image, anchor in zip(*np.nonzero(fg)):
        x, y = pts[anchor]
        x1, y1, x2, y2 = boxes[image, anchor]
        sides = np.array([x - x1, y - y1, x2 - x, y2 - y]) / strd[anchor]
        for side, target in enumerate(np.clip(sides, 0, num_bins - 1.01)):
            low = int(np.floor(target))
            weight = target - low
            row = log_p[image, anchor, side]
            total += -((1 - weight) * row[low] + weight * row[low + 1]) / 4
    assert fg.sum() > 0
    np.testing.assert_allclose(terms["det_dfl"], total / fg.sum(), rtol=1e-5)
    np.testing.assert_allclose(terms["det_box"], 1.0, rtol=1e-5)  # from box_ltrb, as before


def test_aligned_assigner_feeds_the_detection_loss():
    num_classes = 3
    points, strides = _det_points(16, (4, 8))
    num_anchors = points.shape[0]
    batch = _box_batch()
    rng = np.random.default_rng(0)
    det = {
        "points": points,
        "strides": strides,
        "obj_logits": jnp.asarray(rng.normal(size=(2, num_anchors)), jnp.float32),
        "cls_logits": jnp.asarray(rng.normal(size=(2, num_anchors, num_classes)), jnp.float32),
        "box_ltrb": jnp.asarray(rng.uniform(1, 6, size=(2, num_anchors, 4)), jnp.float32),
    }
    pred_boxes = box_ops.decode_boxes(points, det["box_ltrb"])
    targets = box_ops.align_targets(
        points,
        strides,
        *(batch[k] for k in ("boxes", "box_classes", "box_valid")),
        pred_boxes,
        jax.nn.sigmoid(det["obj_logits"]),
        jax.nn.sigmoid(det["cls_logits"]),
    )
    fg = np.asarray(targets["fg_mask"])
    # Fewer than 10 points inside each box, so each takes them all: box 0 (0, 0, 8, 8) has 4
    # stride-4 points and the stride-8 point (4, 4); box 1 4 stride-4 points (the stride-8 points
    # lie on its edges); image 1's box (2, 2, 14, 14) 4 of each stride.
    assert fg[0].sum() == 9 and fg[1].sum() == 8
    loss = jax.jit(losses.detection_loss, static_argnames=("assigner",))
    terms = loss(det, batch, assigner="aligned")
    expected_obj = losses.sigmoid_focal_loss(det["obj_logits"], targets["obj_targets"])
    np.testing.assert_allclose(terms["det_obj"], expected_obj.sum() / fg.sum(), rtol=1e-5)
    expected_box = losses.iou_loss(pred_boxes, targets["box_targets"]) * targets["fg_mask"]
    np.testing.assert_allclose(terms["det_box"], expected_box.sum() / fg.sum(), rtol=1e-5)
    assert not np.isclose(float(terms["det_obj"]), float(loss(det, batch)["det_obj"]))
    with pytest.raises(ValueError, match="assigner='nearest'"):
        losses.detection_loss(det, batch, assigner="nearest")


def test_quality_focal_loss_hand_computed_and_minimised_at_the_target():
    logits = jnp.array([0.0, 0.0, math.log(3.0)])
    targets = jnp.array([0.5, 1.0, 0.0])
    # BCE · |t − p|²: p = 0.5 at the target 0.5 costs nothing; (ln 2)(0.5²); (ln 4)(0.75²).
    expected = [0.0, 0.25 * LN2, 0.5625 * math.log(4.0)]
    np.testing.assert_allclose(losses.quality_focal_loss(logits, targets), expected, rtol=1e-6)
    # Unlike the focal loss with a soft target, the minimum over the logit is at p = target.
    target = 0.3
    slope = jax.grad(lambda x: losses.quality_focal_loss(x, jnp.float32(target)))
    assert abs(float(slope(jnp.float32(math.log(target / (1 - target)))))) < 1e-6
    focal_slope = jax.grad(lambda x: losses.sigmoid_focal_loss(x, jnp.float32(target), None))
    assert abs(float(focal_slope(jnp.float32(math.log(target / (1 - target)))))) > 1e-2


def test_iou_objectness_targets_the_fit_of_the_predicted_box():
    num_classes = 3
    points, strides = _det_points(16, (4, 8))
    batch = _box_batch()
    targets = box_ops.assign_targets(
        points, strides, batch["boxes"], batch["box_classes"], batch["box_valid"], num_classes
    )
    fg = targets["fg_mask"]
    confident = jnp.where(fg > 0, 10.0, -10.0)  # sure of every positive, of no negative
    perfect_ltrb = jnp.where(
        fg[..., None] > 0, box_ops.encode_ltrb(points, targets["box_targets"]), 0.0
    )
    det = {
        "points": points,
        "strides": strides,
        "obj_logits": confident,
        "cls_logits": jnp.zeros(fg.shape + (num_classes,)),
        "box_ltrb": perfect_ltrb,
    }
    loss = jax.jit(losses.detection_loss, static_argnames=("obj_target",))
    # Boxes that fit (IoU 1): the confident objectness is right, the loss ~ 0.
    assert float(loss(det, batch, obj_target="iou")["det_obj"]) < 1e-3
    # Zero distances decode to zero-area boxes (IoU 0): every positive's target is 0, so each
    # costs BCE(10, 0) · σ(10)² ≈ 10 and det_obj (normalised by the positives) ≈ 10.
    misfit = dict(det, box_ltrb=jnp.zeros_like(perfect_ltrb))
    per_positive = (10.0 + math.log1p(math.exp(-10.0))) / (1.0 + math.exp(-10.0)) ** 2
    np.testing.assert_allclose(
        loss(misfit, batch, obj_target="iou")["det_obj"], per_positive, rtol=1e-3
    )
    # The binary target does not look at the boxes: both cost the same there.
    np.testing.assert_allclose(
        loss(misfit, batch, obj_target="binary")["det_obj"],
        loss(det, batch, obj_target="binary")["det_obj"],
        rtol=1e-6,
    )
    # The IoU is a target, not a path for gradients into the boxes.
    box_grad = jax.grad(
        lambda ltrb: losses.detection_loss(dict(det, box_ltrb=ltrb), batch, obj_target="iou")[
            "det_obj"
        ]
    )(perfect_ltrb * 0.9)
    assert float(jnp.max(jnp.abs(box_grad))) == 0.0
    with pytest.raises(ValueError, match="obj_target='iou2' is not one of"):
        losses.detection_loss(det, batch, obj_target="iou2")


def _fake_outputs_and_batch(rng, num_classes=3, size=16):
    points, strides = _det_points(size, (4, 8))
    num_anchors = points.shape[0]
    outputs = {
        "recon": jnp.asarray(rng.uniform(0, 1, (2, size, size, 3)), jnp.float32),
        "pixel_logits": jnp.asarray(rng.normal(size=(2, size, size)), jnp.float32),
        "image_logits": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
        "type_logits": jnp.asarray(rng.normal(size=(2, num_classes + 1)), jnp.float32),
        "embedding": jnp.zeros((2, 8)),
        "det": {
            "points": points,
            "strides": strides,
            "obj_logits": jnp.asarray(rng.normal(size=(2, num_anchors)), jnp.float32),
            "cls_logits": jnp.asarray(rng.normal(size=(2, num_anchors, num_classes)), jnp.float32),
            "box_ltrb": jnp.asarray(rng.uniform(0, 6, (2, num_anchors, 4)), jnp.float32),
            "box_bins": jnp.asarray(rng.normal(size=(2, num_anchors, 4, 5)), jnp.float32),
        },
    }
    masks = np.zeros((2, size, size), np.float32)
    masks[0, 0:8, 0:8] = 1
    batch = {
        "images": jnp.asarray(rng.uniform(0, 1, (2, size, size, 3)), jnp.float32),
        "clean_images": jnp.asarray(rng.uniform(0, 1, (2, size, size, 3)), jnp.float32),
        "recon_valid": jnp.array([0.0, 1.0]),
        "masks": jnp.asarray(masks),
        "labels": jnp.array([1, 0], jnp.int32),
        "defect_types": jnp.array([2, 0], jnp.int32),
        **_box_batch(),
    }
    return outputs, batch


def test_multitask_loss_passes_the_config_assign_rules_to_the_assignment(monkeypatch):
    # (On this small batch every rule picks the same points, so the call itself is checked.)
    outputs, batch = _fake_outputs_and_batch(np.random.default_rng(4))
    train = default_config.get_config().train
    weights = dict(train.loss_weights)
    seen = []
    assign = losses.box_ops.assign_targets

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return assign(*args, **kwargs)

    monkeypatch.setattr(losses.box_ops, "assign_targets", spy)
    train.det_level_size, train.det_min_level_points, train.det_fallback = "box", 3, "inside"
    train.det_center_radius = 1.5
    losses.multitask_loss(outputs, batch, weights, det_assign_rules=assign_rules(train))
    losses.multitask_loss(outputs, batch, weights)
    rules = dict(fallback="inside", level_size="box", min_level_points=3, center_radius=1.5)
    assert seen == [rules, {}]


def test_multitask_loss_total_is_weighted_sum_and_gradients_finite():
    outputs, batch = _fake_outputs_and_batch(np.random.default_rng(4))
    weights = default_config.get_config().train.loss_weights
    total, terms = jax.jit(losses.multitask_loss)(outputs, batch, dict(weights))
    assert set(terms) == set(losses.LOSS_TERMS)
    for name, value in terms.items():
        assert value.shape == () and np.isfinite(value), name
        assert float(value) > 0, name
    expected_total = sum(weights[name] * float(terms[name]) for name in losses.LOSS_TERMS)
    np.testing.assert_allclose(total, expected_total, rtol=1e-6)

    # Each term is what its own loss function gives.
    np.testing.assert_allclose(
        terms["recon"],
        losses.reconstruction_loss(outputs["recon"], batch["clean_images"], batch["recon_valid"]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        terms["seg_dice"], losses.dice_loss(outputs["pixel_logits"], batch["masks"]).mean()
    )
    detection = jax.jit(losses.detection_loss)(outputs["det"], batch)
    for name in ("det_obj", "det_cls", "det_box", "det_dfl"):
        np.testing.assert_allclose(terms[name], detection[name], rtol=1e-6)
    # `det_box_loss` (train.det_box_loss) picks the box loss's IoU measure.
    _, terms_ciou = losses.multitask_loss(outputs, batch, dict(weights), det_box_loss="ciou")
    ciou = losses.detection_loss(outputs["det"], batch, box_loss_kind="ciou")
    np.testing.assert_allclose(terms_ciou["det_box"], ciou["det_box"], rtol=1e-6)
    assert abs(float(terms_ciou["det_box"]) - float(terms["det_box"])) > 1e-4
    np.testing.assert_allclose(terms_ciou["det_obj"], terms["det_obj"], rtol=1e-6)

    # 'cls' adds the defect-type cross-entropy when the batch has defect_types.
    without_types = {k: v for k, v in batch.items() if k != "defect_types"}
    _, terms_without = jax.jit(losses.multitask_loss)(outputs, without_types, dict(weights))
    type_logits = np.asarray(outputs["type_logits"], np.float64)
    log_probs = type_logits - np.log(np.exp(type_logits).sum(-1, keepdims=True))
    type_ce = -np.mean(log_probs[[0, 1], [2, 0]])
    np.testing.assert_allclose(terms["cls"] - terms_without["cls"], type_ce, rtol=1e-5)

    # An unknown type (-1, a synthetic anomaly under the supervised protocol) is left out of the
    # cross-entropy instead of wrapping around to the last class.
    one_unknown = dict(batch, defect_types=jnp.array([-1, 0], jnp.int32))
    _, terms_unknown = jax.jit(losses.multitask_loss)(outputs, one_unknown, dict(weights))
    np.testing.assert_allclose(
        terms_unknown["cls"] - terms_without["cls"], -log_probs[1, 0], rtol=1e-5
    )

    differentiable = {k: v for k, v in outputs.items() if k != "det"}
    differentiable["det"] = {
        k: v for k, v in outputs["det"].items() if k not in ("points", "strides")
    }

    def total_loss(trainable):
        full = dict(trainable, det=dict(trainable["det"], points=outputs["det"]["points"]))
        full["det"]["strides"] = outputs["det"]["strides"]
        return losses.multitask_loss(full, batch, weights)[0]

    grads = jax.jit(jax.grad(total_loss))(differentiable)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(grad)), path
    assert np.any(grads["det"]["box_ltrb"] != 0) and np.any(grads["recon"] != 0)


def test_seg_focal_alpha_weighs_defect_and_normal_pixels():
    outputs, batch = _fake_outputs_and_batch(np.random.default_rng(6))
    outputs = dict(outputs, pixel_logits=jnp.zeros_like(outputs["pixel_logits"]))
    weights = dict(default_config.get_config().train.loss_weights)
    defect_fraction = float(np.mean(batch["masks"]))  # 64 of 512 pixels
    assert defect_fraction == 0.125
    for alpha in (0.25, 0.5, 0.9):
        _, terms = losses.multitask_loss(outputs, batch, weights, seg_focal_alpha=alpha)
        # At logit 0 every pixel costs (1 − 0.5)² ln 2 times its alpha weight.
        expected = 0.25 * LN2 * (alpha * defect_fraction + (1 - alpha) * (1 - defect_fraction))
        np.testing.assert_allclose(terms["seg_focal"], expected, rtol=1e-5)


def test_multitask_loss_rejects_wrong_weights_and_missing_keys():
    outputs, batch = _fake_outputs_and_batch(np.random.default_rng(5))
    weights = dict(default_config.get_config().train.loss_weights)
    with pytest.raises(ValueError, match="train.loss_weights"):
        losses.multitask_loss(outputs, batch, {**weights, "extra": 1.0})
    without_masks = {k: v for k, v in batch.items() if k != "masks"}
    with pytest.raises(KeyError, match="masks"):
        losses.multitask_loss(outputs, without_masks, weights)
