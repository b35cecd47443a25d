"""Tests of m2u_jax.boxes: overlap measures, ltrb coding, target assignment, NMS."""

import fractions
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2u_jax import boxes as box_ops

SQUARE_A = [0.0, 0.0, 2.0, 2.0]
SQUARE_B = [1.0, 1.0, 3.0, 3.0]


def test_box_area_clamps_inverted_boxes():
    areas = box_ops.box_area(jnp.array([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]]))
    np.testing.assert_allclose(areas, [6.0, 0.0])


def test_iou_and_giou_hand_computed():
    a, b = jnp.array(SQUARE_A), jnp.array(SQUARE_B)
    # Intersection 1, union 4 + 4 - 1 = 7, enclosing box [0, 0, 3, 3] of area 9.
    np.testing.assert_allclose(box_ops.box_iou(a, b), 1 / 7, rtol=1e-6)
    np.testing.assert_allclose(box_ops.generalized_iou(a, b), 1 / 7 - 2 / 9, rtol=1e-6)
    # Disjoint: IoU 0, enclosing [0, 0, 3, 1] of area 3, union 2.
    left, right = jnp.array([0.0, 0.0, 1.0, 1.0]), jnp.array([2.0, 0.0, 3.0, 1.0])
    np.testing.assert_allclose(box_ops.box_iou(left, right), 0.0, atol=1e-7)
    np.testing.assert_allclose(box_ops.generalized_iou(left, right), -1 / 3, rtol=1e-6)
    np.testing.assert_allclose(box_ops.box_iou(a, a), 1.0, rtol=1e-6)
    np.testing.assert_allclose(box_ops.generalized_iou(a, a), 1.0, rtol=1e-6)


def test_diou_and_ciou_hand_computed():
    a, b = jnp.array(SQUARE_A), jnp.array(SQUARE_B)
    # Centres (1, 1) and (2, 2): distance² 2; enclosing diagonal² 3² + 3² = 18.
    np.testing.assert_allclose(box_ops.distance_iou(a, b), 1 / 7 - 2 / 18, rtol=1e-5)
    # Same aspect ratio: CIoU = DIoU.
    np.testing.assert_allclose(box_ops.complete_iou(a, b), 1 / 7 - 2 / 18, rtol=1e-5)
    wide = jnp.array([1.0, 1.0, 5.0, 3.0])
    # Intersection 1, union 4 + 8 - 1 = 11; centres (1, 1), (3, 2): distance² 5;
    # enclosing [0, 0, 5, 3]: diagonal² 34; v = 4/pi² (atan(4/2) - atan(2/2))².
    iou = 1 / 11
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    alpha = v / (1 - iou + v)
    np.testing.assert_allclose(box_ops.complete_iou(a, wide), iou - 5 / 34 - alpha * v, rtol=1e-5)


def test_pairwise_iou_matches_elementwise_and_broadcasts_batches():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 20, size=(2, 5, 2))
    boxes_a = np.concatenate([corners, corners + rng.uniform(1, 10, (2, 5, 2))], -1)
    corners = rng.uniform(0, 20, size=(2, 3, 2))
    boxes_b = np.concatenate([corners, corners + rng.uniform(1, 10, (2, 3, 2))], -1)
    pairwise = box_ops.pairwise_iou(jnp.asarray(boxes_a), jnp.asarray(boxes_b))
    assert pairwise.shape == (2, 5, 3)
    # Every pair through the elementwise function at once, via explicit index arrays.
    batch, i, j = np.meshgrid(np.arange(2), np.arange(5), np.arange(3), indexing="ij")
    expected = box_ops.box_iou(jnp.asarray(boxes_a[batch, i]), jnp.asarray(boxes_b[batch, j]))
    np.testing.assert_allclose(pairwise, expected, rtol=1e-6)
    assert float(pairwise.max()) > 0  # the random case has overlapping pairs
    assert box_ops.pairwise_iou(jnp.asarray(boxes_a[0]), jnp.asarray(boxes_b[0])).shape == (5, 3)


@pytest.mark.parametrize(
    "metric",
    [box_ops.box_iou, box_ops.generalized_iou, box_ops.distance_iou, box_ops.complete_iou],
)
def test_overlap_gradients_finite_for_degenerate_boxes(metric):
    target = jnp.array(SQUARE_B)
    for pred, other in [
        (jnp.zeros(4), jnp.zeros(4)),  # both zero-area (padding)
        (jnp.array(SQUARE_A), jnp.array(SQUARE_A)),  # identical
        (jnp.array([1.0, 1.0, 1.0, 1.0]), target),  # a point against a real box
        (jnp.array([1.0, 1.0, 1.0, 3.0]), target),  # zero width
    ]:
        value, grad = jax.value_and_grad(metric)(pred, other)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), (pred, other)


def test_decode_encode_round_trip():
    points = jnp.array([[4.0, 4.0], [12.0, 4.0], [8.0, 20.0]])
    box_ltrb = jnp.array([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 2.0, 7.0]]])
    decoded = box_ops.decode_boxes(points, box_ltrb)
    np.testing.assert_allclose(
        decoded,
        [[[3.0, 2.0, 7.0, 8.0], [12.0, 4.0, 12.0, 4.0], [3.0, 19.0, 10.0, 27.0]]],
    )
    np.testing.assert_allclose(box_ops.encode_ltrb(points, decoded), box_ltrb)
    # A point outside its box gets negative distances.
    np.testing.assert_allclose(
        box_ops.encode_ltrb(points[:1], jnp.array([[10.0, 10.0, 20.0, 20.0]])),
        [[-6.0, -6.0, 16.0, 16.0]],
    )


def _two_level_points(image_size=64, strides=(8, 16)):
    points, point_strides = [], []
    for stride in strides:
        side = image_size // stride
        for row in range(side):
            for col in range(side):
                points.append((stride / 2 + stride * col, stride / 2 + stride * row))
                point_strides.append(stride)
    return np.array(points, np.float32), np.array(point_strides, np.float32)


def _assert_targets_of_image_0(targets, expected_box, boxes, box_classes, num_classes):
    """The target arrays equal those of `expected_box` ({anchor: box index}, image 0's
    positives; every other anchor, and the second image, negative)."""
    num_anchors = targets["fg_mask"].shape[1]
    expected_fg = np.zeros((2, num_anchors), np.float32)
    expected_cls = np.zeros((2, num_anchors, num_classes), np.float32)
    expected_weights = np.zeros((2, num_anchors), np.float32)
    expected_boxes = np.zeros((2, num_anchors, 4), np.float32)
    for anchor, box in expected_box.items():
        expected_fg[0, anchor] = 1
        expected_boxes[0, anchor] = boxes[0, box]
        if box_classes[0, box] >= 0:
            expected_cls[0, anchor, box_classes[0, box]] = 1
            expected_weights[0, anchor] = 1
    np.testing.assert_array_equal(targets["fg_mask"], expected_fg)
    np.testing.assert_array_equal(targets["obj_targets"], expected_fg)
    np.testing.assert_array_equal(targets["cls_targets"], expected_cls)
    np.testing.assert_array_equal(targets["cls_weights"], expected_weights)
    np.testing.assert_array_equal(targets["box_targets"], expected_boxes)


def test_assign_targets_hand_built_case():
    points, strides = _two_level_points()
    index = {(x, y, s): a for a, ((x, y), s) in enumerate(zip(points.tolist(), strides.tolist()))}
    boxes = np.zeros((2, 6, 4), np.float32)
    boxes[0] = [
        [0, 0, 16, 16],  # 0: small, class 2
        [0, 0, 64, 64],  # 1: whole image, class 1 -> coarse level only (farthest edge > 32)
        [0, 0, 40, 40],  # 2: medium, class 0; shares point (12, 12) with box 0
        [49, 49, 51, 51],  # 3: tiny, between the anchor points, class 3
        [40, 0, 56, 16],  # 4: unknown class
        [0, 48, 16, 64],  # 5: padding (box_valid 0)
    ]
    box_classes = np.array([[2, 1, 0, 3, -1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
    box_valid = np.array([[1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], np.float32)

    expected_box = {}
    for x, y in [(4, 4), (12, 4), (4, 12), (12, 12)]:  # (12, 12): tie -> smaller box 0
        expected_box[index[(x, y, 8)]] = 0
    for x in (8, 24, 40, 56):
        for y in (8, 24, 40, 56):
            expected_box[index[(x, y, 16)]] = 1
    for x in (12, 20, 28):
        for y in (12, 20, 28):
            if (x, y) != (12, 12):
                expected_box[index[(x, y, 8)]] = 2
    expected_box[index[(52, 52, 8)]] = 3  # nearest finest-level point to (50, 50)
    for x, y in [(44, 4), (52, 4), (44, 12), (52, 12)]:
        expected_box[index[(x, y, 8)]] = 4
    assert len(expected_box) == 33

    assign = jax.jit(functools.partial(box_ops.assign_targets, num_classes=4))
    targets = assign(points, strides, boxes, box_classes, box_valid)
    num_anchors = len(points)
    assert targets["obj_targets"].shape == (2, num_anchors)
    assert targets["cls_targets"].shape == (2, num_anchors, 4)
    assert targets["box_targets"].shape == (2, num_anchors, 4)

    _assert_targets_of_image_0(targets, expected_box, boxes, box_classes, num_classes=4)
    # Unknown class: foreground with a box target but no class supervision.
    unknown_anchor = index[(44, 4, 8)]
    assert targets["fg_mask"][0, unknown_anchor] == 1
    assert targets["cls_weights"][0, unknown_anchor] == 0
    # Padding is ignored: the points inside box 5 stay negative.
    assert targets["fg_mask"][0, index[(4, 52, 8)]] == 0


def test_assign_targets_scale_range_factor_moves_boxes_between_levels():
    points, strides = _two_level_points()
    boxes = np.array([[[0, 0, 40, 40]]], np.float32)
    classes, valid = np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32)
    assign = jax.jit(box_ops.assign_targets, static_argnames=("num_classes",))
    fine = assign(points, strides, boxes, classes, valid, num_classes=1)
    # With factor 1 the stride-8 level only takes farthest edges <= 8, so the box goes coarse.
    coarse = assign(points, strides, boxes, classes, valid, num_classes=1, scale_range_factor=1.0)
    fine_fg, coarse_fg = np.asarray(fine["fg_mask"][0]), np.asarray(coarse["fg_mask"][0])
    assert fine_fg[strides == 8].sum() == 9 and fine_fg[strides == 16].sum() == 0
    # Stride-16 points strictly inside [0, 40]: x, y in {8, 24}; farthest edges 32 and 24 > 16.
    assert coarse_fg[strides == 8].sum() == 0 and coarse_fg[strides == 16].sum() == 4


def test_assign_targets_inside_fallback_gives_a_thin_box_its_row_of_points():
    points, strides = _two_level_points()
    boxes = np.array([[[2, 10, 62, 14], [0, 0, 16, 16]]], np.float32)  # a scratch; a small box
    classes, valid = np.array([[1, 0]], np.int32), np.ones((1, 2), np.float32)
    assign = jax.jit(box_ops.assign_targets, static_argnames=("num_classes", "fallback"))
    nearest = assign(points, strides, boxes, classes, valid, num_classes=2)
    inside = assign(points, strides, boxes, classes, valid, num_classes=2, fallback="inside")

    def positives(targets, cls):
        on = (np.asarray(targets["fg_mask"][0]) == 1) & (
            np.asarray(targets["cls_targets"][0, :, cls]) == 1
        )
        return sorted((*points[a].tolist(), float(strides[a])) for a in np.flatnonzero(on))

    # The scratch's stride-8 points at y = 12 have farthest edges 34..58 > 4 * 8 (too long for the
    # fine level), and no stride-16 point lies in its 4-px band: no candidate. 'nearest' gives it
    # the finest point nearest its centre (32, 12): (28, 12) and (36, 12) tie, the first wins.
    assert positives(nearest, 1) == [(28.0, 12.0, 8.0)]
    # 'inside': every point inside it within 2.5 strides (20 px) of its centre, on any level.
    assert positives(inside, 1) == [(x, 12.0, 8.0) for x in (20.0, 28.0, 36.0, 44.0)]
    scratch_points = np.asarray(inside["cls_targets"][0, :, 1]) == 1
    np.testing.assert_array_equal(inside["box_targets"][0, scratch_points], [[2, 10, 62, 14]] * 4)
    # A box with candidates is untouched: its four stride-8 points either way.
    small = [(x, y, 8.0) for x in (4.0, 12.0) for y in (4.0, 12.0)]
    assert positives(nearest, 0) == positives(inside, 0) == sorted(small)
    with pytest.raises(ValueError, match="fallback='all'"):
        box_ops.assign_targets(points, strides, boxes, classes, valid, 2, fallback="all")


def test_assign_targets_level_by_box_size_keeps_thin_boxes_fine_and_big_boxes_coarse():
    points, strides = _two_level_points(image_size=128)
    boxes = np.array(
        [
            [
                [2, 10, 62, 14],  # a scratch 60 x 4: sqrt(240) / 2 = 7.7 -> stride 8
                [0, 48, 96, 128],  # 96 x 80: sqrt(7680) / 2 = 43.8 > 4 * 8 -> stride 16
            ]
        ],
        np.float32,
    )
    classes, valid = np.array([[0, 1]], np.int32), np.ones((1, 2), np.float32)
    assign = jax.jit(box_ops.assign_targets, static_argnames=("num_classes", "level_size"))
    by_box = assign(points, strides, boxes, classes, valid, num_classes=2, level_size="box")
    by_edge = assign(points, strides, boxes, classes, valid, num_classes=2)

    def positives(targets, cls):
        on = (np.asarray(targets["fg_mask"][0]) == 1) & (
            np.asarray(targets["cls_targets"][0, :, cls]) == 1
        )
        return sorted((*points[a].tolist(), float(strides[a])) for a in np.flatnonzero(on))

    # The scratch: under 'box' its stride-8 points in its band within 20 px of its centre
    # (32, 12); under 'edge' their farthest edges (34..58 px) send it to stride 16, whose points
    # miss its band, and it falls back to the one nearest stride-8 point.
    assert positives(by_box, 0) == [(x, 12.0, 8.0) for x in (20.0, 28.0, 36.0, 44.0)]
    assert positives(by_edge, 0) == [(28.0, 12.0, 8.0)]
    # The big box: under 'box' only stride-16 points, inside it and within 40 px of its centre
    # (48, 88): x in {24, 40, 56, 72}, y in {56, 72, 88, 104, 120}.
    big = [(x, y, 16.0) for x in (24.0, 40.0, 56.0, 72.0) for y in (56.0, 72.0, 88.0, 104.0, 120.0)]
    assert positives(by_box, 1) == sorted(big)
    # Under 'edge' the same: no point lies within 32 px of all four edges of a 96-px box.
    assert positives(by_edge, 1) == sorted(big)
    with pytest.raises(ValueError, match="level_size='area'"):
        box_ops.assign_targets(points, strides, boxes, classes, valid, 2, level_size="area")


def test_assign_targets_min_level_points_keeps_a_scratch_on_the_level_that_holds_it():
    points, strides = _two_level_points(image_size=128, strides=(8, 16, 32))
    # Image 0: a vertical scratch 10 x 100 centred at (57, 64). No stride-32 point (columns 16,
    # 48, 80, 112) lies in its band; stride 16 has the column x = 56 with y in {40, 56, 72, 88}
    # within 40 px of the centre; stride 8 the column x = 60 with y in {52, 60, 68, 76}.
    # Image 1: a 112-px square centred at (64, 64), which all 16 stride-32 points lie in.
    boxes = np.array([[[52, 14, 62, 114]], [[8, 8, 120, 120]]], np.float32)
    classes, valid = np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32)
    assign = jax.jit(
        box_ops.assign_targets, static_argnames=("num_classes", "fallback", "min_level_points")
    )

    def positives(min_level_points, image):
        targets = assign(
            points,
            strides,
            boxes,
            classes,
            valid,
            num_classes=1,
            fallback="inside",
            min_level_points=min_level_points,
        )
        on = np.flatnonzero(np.asarray(targets["fg_mask"][image]) == 1)
        return sorted((*points[a].tolist(), float(strides[a])) for a in on)

    # Sizes (farthest edge): stride 8 <= 32 px, stride 16 in (32, 64], stride 32 above.
    # Plain rule: of the stride-16 points only y = 56 and 72 are within 64 px of both ends
    # (farthest edges 58); y = 40 and 88 (74 px) belong to stride 32, which misses the band; the
    # stride-8 points' farthest edges (50..62 px) are above 32.
    assert positives(0, 0) == [(56.0, 56.0, 16.0), (56.0, 72.0, 16.0)]
    # One point: stride 16 is the coarsest level holding the scratch and takes all four.
    scratch = [(56.0, y, 16.0) for y in (40.0, 56.0, 72.0, 88.0)]
    assert positives(1, 0) == scratch
    assert positives(4, 0) == scratch
    # Five: no level holds five of its points, so the scratch keeps every level (plain rule).
    assert positives(5, 0) == positives(0, 0)
    # The square: stride 32 (all 16 points, farthest edges >= 72 px) and the four stride-16
    # points whose farthest edge is 64 px, under every setting (stride 32 is the coarsest).
    square = [(x, y, 32.0) for x in (16.0, 48.0, 80.0, 112.0) for y in (16.0, 48.0, 80.0, 112.0)]
    square += [(x, y, 16.0) for x in (56.0, 72.0) for y in (56.0, 72.0)]
    for min_level_points in (0, 1, 16):
        assert positives(min_level_points, 1) == sorted(square), min_level_points
    with pytest.raises(ValueError, match="min_level_points=-1 is negative"):
        box_ops.assign_targets(points, strides, boxes, classes, valid, 1, min_level_points=-1)


def test_assign_targets_center_radius_bounds_the_square_of_positives():
    points, strides = _two_level_points(image_size=128, strides=(8, 16, 32))
    boxes = np.array([[[8, 8, 120, 120]]], np.float32)  # centre (64, 64)
    classes, valid = np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32)

    def positives(center_radius):
        targets = box_ops.assign_targets(
            points, strides, boxes, classes, valid, 1, center_radius=center_radius
        )
        on = np.flatnonzero(np.asarray(targets["fg_mask"][0]) == 1)
        return sorted((*points[a].tolist(), float(strides[a])) for a in on)

    # 1.5 strides: stride 32 keeps x, y in {48, 80} (|16 - 64| = 48 is not below 48); stride 16
    # x, y in {48, 56, 72, 80}, of which only {56, 72}² have farthest edges <= 64 px.
    inner = [(x, y, 32.0) for x in (48.0, 80.0) for y in (48.0, 80.0)]
    inner += [(x, y, 16.0) for x in (56.0, 72.0) for y in (56.0, 72.0)]
    assert positives(1.5) == sorted(inner)
    # 2.5 (the default): every stride-32 point inside the box (tests above).
    assert len(positives(2.5)) == 16 + 4


def test_align_targets_hand_built_case():
    points, strides = _two_level_points()
    index = {(x, y, s): a for a, ((x, y), s) in enumerate(zip(points.tolist(), strides.tolist()))}
    num_anchors = len(points)
    boxes = np.zeros((2, 5, 4), np.float32)
    boxes[0] = [
        [0, 0, 24, 24],  # 0: class 0; 10 points inside (9 stride-8, 1 stride-16)
        [16, 16, 40, 40],  # 1: class 1; shares the stride-8 point (20, 20) with box 0
        [49, 49, 51, 51],  # 2: class 2, no point inside
        [40, 0, 64, 16],  # 3: unknown class
        [0, 48, 16, 64],  # 4: padding
    ]
    box_classes = np.array([[0, 1, 2, -1, 0], [0, 0, 0, 0, 0]], np.int32)
    box_valid = np.array([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], np.float32)

    pred_boxes = np.zeros((2, num_anchors, 4), np.float32)  # IoU 0 with every box
    pred_obj = np.ones((2, num_anchors), np.float32)
    pred_cls = np.ones((2, num_anchors, 3), np.float32)
    pred_boxes[0, index[(4, 4, 8)]] = boxes[0, 0]  # box 0: t = 1
    # Overlaps box 0 (IoU 196 / 956 = 0.205) and box 1 (324 / 828 = 0.391).
    pred_boxes[0, index[(20, 20, 8)]] = [10, 10, 34, 34]
    pred_boxes[0, index[(28, 28, 8)]] = boxes[0, 1]  # box 1: t = 1
    # A perfect box with a class-1 probability of 0.001: t = 0.001 < 0.391**6 = 0.0036.
    pred_boxes[0, index[(36, 36, 8)]] = boxes[0, 1]
    pred_cls[0, index[(36, 36, 8)], 1] = 0.001
    # Box 3 has no class: t = obj * IoU**6, whatever the class probabilities say.
    pred_boxes[0, index[(44, 4, 8)]] = boxes[0, 3]  # t = 1
    pred_boxes[0, index[(52, 12, 8)]] = boxes[0, 3]
    pred_obj[0, index[(52, 12, 8)]] = 0.5  # t = 0.5
    pred_boxes[0, index[(56, 8, 16)]] = boxes[0, 3]
    pred_cls[0, index[(56, 8, 16)]] = 0.0  # t = 1
    pred_boxes[0, index[(4, 52, 8)]] = boxes[0, 4]  # inside the padding box only: ignored

    align = jax.jit(box_ops.align_targets, static_argnames=("top_k",))
    args = (points, strides, boxes, box_classes, box_valid, pred_boxes, pred_obj, pred_cls)
    targets = align(*args, top_k=2)
    expected_box = {
        index[(4, 4, 8)]: 0,  # box 0's best; its second, (20, 20), went to box 1
        # Box 1 takes (28, 28) and (20, 20) (t 0.0036 beats the perfect but unsure (36, 36));
        # (20, 20) is box 0's second choice too and keeps box 1, which its box overlaps more.
        index[(28, 28, 8)]: 1,
        index[(20, 20, 8)]: 1,
        index[(52, 52, 8)]: 2,  # the finest-level point nearest (50, 50)
        index[(44, 4, 8)]: 3,
        index[(56, 8, 16)]: 3,
    }
    _assert_targets_of_image_0(targets, expected_box, boxes, box_classes, num_classes=3)

    # top_k above the number of candidates: every point inside a valid box is a positive.
    # Boxes 0 and 1 have 10 points inside each, sharing one; box 3 has 7; box 2 its fallback.
    everything = align(*args, top_k=50)
    assert float(everything["fg_mask"].sum()) == 10 + 10 - 1 + 7 + 1
    assert float(everything["fg_mask"][1].sum()) == 0  # no valid box in the second image
    assert everything["fg_mask"][0, index[(4, 52, 8)]] == 0


def _reference_nms(boxes, scores, classes, max_detections, iou_threshold, score_threshold):
    """Textbook greedy NMS on one image (NumPy, explicit loops)."""

    def iou(a, b):
        inter_w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
        inter_h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
        inter = inter_w * inter_h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < score_threshold:
            break
        if all(classes[j] != classes[i] or iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return kept[:max_detections]


def _random_boxes(rng, shape):
    # Crowded: boxes of 10-16 px with corners in a 16 px square overlap a lot.
    corners = rng.uniform(0, 16, size=(*shape, 2))
    return np.concatenate([corners, corners + rng.uniform(10, 16, size=(*shape, 2))], -1)


@pytest.mark.parametrize("num_boxes,max_detections", [(40, 30), (200, 8)])
def test_batched_nms_matches_numpy_reference(num_boxes, max_detections):
    rng = np.random.default_rng(num_boxes)
    batch_size = 4
    boxes = _random_boxes(rng, (batch_size, num_boxes)).astype(np.float32)
    classes = rng.integers(0, 3, size=(batch_size, num_boxes)).astype(np.int32)
    scores = rng.uniform(0, 1, size=(batch_size, num_boxes)).astype(np.float32)
    if num_boxes > 8 * max_detections:
        # Fewer passing boxes than the k = 8 M pre-selected candidates: NMS is then exact.
        scores[:, 30:] *= 0.2
    nms = jax.jit(
        functools.partial(
            box_ops.batched_nms,
            max_detections=max_detections,
            iou_threshold=0.5,
            score_threshold=0.3,
        )
    )
    result = nms(boxes, scores, classes)
    assert result["boxes_xyxy"].shape == (batch_size, max_detections, 4)
    assert result["scores"].shape == (batch_size, max_detections)
    assert result["classes"].dtype == jnp.int32 and result["valid"].dtype == jnp.bool_
    total_kept = total_passing = 0
    for image in range(batch_size):
        kept = _reference_nms(boxes[image], scores[image], classes[image], num_boxes, 0.5, 0.3)
        total_kept += len(kept)
        total_passing += int(np.sum(scores[image] >= 0.3))
        kept = kept[:max_detections]
        count = len(kept)
        np.testing.assert_array_equal(result["valid"][image], np.arange(max_detections) < count)
        np.testing.assert_allclose(result["boxes_xyxy"][image, :count], boxes[image, kept])
        np.testing.assert_allclose(result["scores"][image, :count], scores[image, kept])
        np.testing.assert_array_equal(result["classes"][image, :count], classes[image, kept])
        np.testing.assert_array_equal(result["boxes_xyxy"][image, count:], 0.0)
        np.testing.assert_array_equal(result["scores"][image, count:], 0.0)
    # The case really suppresses: 72 of 108 passing boxes survive (40 boxes), 64 of 90 (200).
    assert batch_size < total_kept < total_passing - 20


def _exact_greedy_nms(boxes, scores, classes, *, num_candidates, iou_threshold, score_threshold):
    """Greedy NMS over the `num_candidates` best boxes (stable score order, as `lax.top_k`) of
    one image, with IoU as an exact fraction: integer-corner boxes make every comparison with
    the threshold exact, ties at the threshold included. Returns the kept indices in order."""
    threshold = fractions.Fraction(str(iou_threshold))

    def iou(a, b):
        inter_w = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        inter_h = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = int(inter_w * inter_h)
        union = int((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
        return fractions.Fraction(inter, union) if union else fractions.Fraction(0)

    kept = []
    for i in np.argsort(-scores, kind="stable")[:num_candidates]:
        if scores[i] < score_threshold:
            break
        if all(classes[j] != classes[i] or iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(int(i))
    return kept


@pytest.mark.parametrize(
    "num_boxes,max_detections",
    [(90, 4), (40, 32), (7, 8)],  # more passing boxes than k = 8 M; k = A; A < M (padding)
)
def test_batched_nms_equals_exact_greedy_nms_on_many_random_cases(num_boxes, max_detections):
    # Seeded batches of 16 images: integer boxes crowded enough for chains of suppression,
    # ties in score (scores on a 1/8 grid) and in IoU (exactly at the threshold), 1-3 classes,
    # zero-area boxes, and several thresholds (traced, so each shape compiles once).
    nms = jax.jit(functools.partial(box_ops.batched_nms, max_detections=max_detections))
    num_candidates = min(max(num_boxes, max_detections), 8 * max_detections)
    kept_total = passing_total = 0
    for case, (iou_threshold, score_threshold) in enumerate(
        [(0.5, 0.0), (0.3, 0.25), (0.7, 0.5), (0.5, 0.25)]
    ):
        rng = np.random.default_rng([num_boxes, case])
        batch = 16
        spread = rng.integers(4, 24, size=(batch, 1, 1))  # crowding differs per image
        corners = np.floor(rng.random((batch, num_boxes, 2)) * spread)
        sizes = rng.integers(2, 16, size=(batch, num_boxes, 2))
        sizes = sizes * (rng.random((batch, num_boxes, 1)) > 0.05)  # a few zero-area boxes
        boxes = np.concatenate([corners, corners + sizes], -1).astype(np.float32)
        scores = (rng.integers(0, 9, size=(batch, num_boxes)) / 8).astype(np.float32)
        num_classes = rng.integers(1, 4, size=(batch, 1))
        classes = np.floor(rng.random((batch, num_boxes)) * num_classes).astype(np.int32)
        result = nms(
            boxes,
            scores,
            classes,
            iou_threshold=np.float32(iou_threshold),
            score_threshold=np.float32(score_threshold),
        )
        for image in range(batch):
            kept = _exact_greedy_nms(
                boxes[image],
                scores[image],
                classes[image],
                num_candidates=num_candidates,
                iou_threshold=iou_threshold,
                score_threshold=score_threshold,
            )
            kept_total += len(kept)
            passing_total += int(np.sum(scores[image] >= score_threshold))
            kept = kept[:max_detections]
            count = len(kept)
            message = f"case {case}, image {image}"
            np.testing.assert_array_equal(
                result["valid"][image], np.arange(max_detections) < count, err_msg=message
            )
            for key, values in (("boxes_xyxy", boxes), ("scores", scores), ("classes", classes)):
                np.testing.assert_array_equal(
                    result[key][image, :count], values[image, kept], err_msg=message
                )
                np.testing.assert_array_equal(result[key][image, count:], 0, err_msg=message)
    # Suppression really happens: kept 1717 of 4439 passing (A = 90), 1602 of 1976, 335 of 353.
    assert kept_total <= 0.95 * passing_total


def _chain_of_boxes(length):
    # Box i is [3i, 0, 3i + 10, 10]: IoU 7/13 with its neighbours, at most 4/16 with the rest,
    # so greedy NMS at 0.5 keeps every other box, and each decision depends on the one before.
    starts = 3.0 * np.arange(length)
    zeros = np.zeros(length)
    return np.stack([starts, zeros, starts + 10, zeros + 10], -1).astype(np.float32)


def test_batched_nms_resolves_a_long_chain_of_suppressions():
    # The worst case of the fixed-point iteration: one chain over all 40 candidates needs 40
    # updates, where a fixed number of updates would keep boxes that greedy NMS suppresses.
    length = 40
    boxes = _chain_of_boxes(length)[None]
    scores = np.linspace(1.0, 0.5, length, dtype=np.float32)[None]
    result = box_ops.batched_nms(
        boxes,
        scores,
        np.zeros((1, length), np.int32),
        max_detections=length,
        iou_threshold=0.5,
        score_threshold=0.0,
    )
    np.testing.assert_array_equal(result["valid"][0], np.arange(length) < length // 2)
    np.testing.assert_array_equal(result["boxes_xyxy"][0, : length // 2], boxes[0, ::2])


def test_greedy_nms_keep_matches_sequential_rule_on_random_graphs():
    # Any strictly upper-triangular suppression graph, from sparse to dense.
    rng = np.random.default_rng(3)
    size = 24
    for density in (0.05, 0.2, 0.5, 0.9):
        suppresses = np.triu(rng.random((16, size, size)) < density, k=1)
        valid = rng.random((16, size)) > 0.2
        keep = np.asarray(jax.jit(box_ops.greedy_nms_keep)(suppresses, valid))
        for image in range(16):
            expected = np.zeros(size, bool)
            for j in range(size):
                expected[j] = valid[image, j] and not np.any(
                    expected[:j] & suppresses[image, :j, j]
                )
            np.testing.assert_array_equal(keep[image], expected)


def test_batched_nms_hand_built_cases():
    boxes = jnp.array(
        [
            [
                [0, 0, 10, 10],  # class 0, 0.9: kept
                [1, 1, 11, 11],  # class 0, 0.8: IoU 81/119 with the first -> suppressed
                [0, 0, 10, 10],  # class 1, 0.7: other class -> kept
                [50, 50, 60, 60],  # class 0, 0.2: below the score threshold
            ],
            [
                # A chain: A suppresses B (IoU 7/13); B would suppress C but is gone, so C stays
                # (IoU(A, C) = 4/16).
                [0, 0, 10, 10],
                [3, 0, 13, 10],
                [6, 0, 16, 10],
                [0, 0, 0, 0],
            ],
        ],
        jnp.float32,
    )
    scores = jnp.array([[0.9, 0.8, 0.7, 0.2], [0.9, 0.8, 0.7, 0.0]])
    classes = jnp.array([[0, 0, 1, 0], [2, 2, 2, 2]])
    result = box_ops.batched_nms(
        boxes, scores, classes, max_detections=5, iou_threshold=0.5, score_threshold=0.25
    )
    np.testing.assert_array_equal(
        result["valid"], [[True, True, False, False, False], [True, True, False, False, False]]
    )
    np.testing.assert_allclose(result["scores"], [[0.9, 0.7, 0, 0, 0], [0.9, 0.7, 0, 0, 0]])
    np.testing.assert_array_equal(result["classes"], [[0, 1, 0, 0, 0], [2, 2, 0, 0, 0]])
    np.testing.assert_allclose(result["boxes_xyxy"][0, :2], [[0, 0, 10, 10], [0, 0, 10, 10]])
    np.testing.assert_allclose(result["boxes_xyxy"][1, :2], [[0, 0, 10, 10], [6, 0, 16, 10]])
    np.testing.assert_array_equal(result["boxes_xyxy"][:, 2:], 0.0)


def test_batched_nms_merge_replaces_a_kept_box_by_its_weighted_cluster_mean():
    boxes = jnp.array(
        [
            [
                [0, 0, 10, 10],  # class 0, 0.9: kept, merged with the next box
                [1, 1, 11, 11],  # class 0, 0.8: IoU 81/119 with the first -> in its mean
                [0, 0, 10, 10],  # class 1, 0.7: kept, alone in its class
                [5, 0, 15, 10],  # class 0, 0.6: IoU 1/3 and 54/146 with the first two -> kept alone
                [2, 0, 12, 10],  # class 0, 0.2: overlaps the first, but under the score floor
            ]
        ],
        jnp.float32,
    )
    scores = jnp.array([[0.9, 0.8, 0.7, 0.6, 0.2]])
    classes = jnp.array([[0, 0, 1, 0, 0]])
    kwargs = dict(max_detections=4, iou_threshold=0.5, score_threshold=0.25)
    plain = box_ops.batched_nms(boxes, scores, classes, **kwargs)
    merged = jax.jit(functools.partial(box_ops.batched_nms, merge=True, **kwargs))(
        boxes, scores, classes
    )
    # Which boxes are kept, their scores and classes: as without merging.
    for key in ("valid", "scores", "classes"):
        np.testing.assert_array_equal(merged[key], plain[key])
    np.testing.assert_array_equal(merged["valid"][0], [True, True, True, False])
    # The first kept box: (0.9 * 1 * A + 0.8 * (81/119) * B) / (0.9 + 0.8 * 81/119).
    weight_b = 0.8 * 81 / 119
    expected = (0.9 * np.array([0, 0, 10, 10]) + weight_b * np.array([1, 1, 11, 11])) / (
        0.9 + weight_b
    )
    np.testing.assert_allclose(merged["boxes_xyxy"][0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(merged["boxes_xyxy"][0, 0, :2], [0.377, 0.377], atol=1e-3)
    # The other class's box and the box beyond the threshold keep their own coordinates.
    np.testing.assert_array_equal(merged["boxes_xyxy"][0, 1:3], [[0, 0, 10, 10], [5, 0, 15, 10]])
    np.testing.assert_array_equal(merged["boxes_xyxy"][0, 3], 0.0)


def _three_point_head_outputs():
    """Head outputs of one image, three points, two classes: points 0 and 1 propose boxes with
    IoU 49/79, point 2 a box apart from both."""
    return {
        "points": jnp.array([[8.0, 8.0], [9.0, 9.0], [40.0, 40.0]]),
        "strides": jnp.array([8.0, 8.0, 8.0]),
        "box_ltrb": jnp.array([[[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, 4.0], [2.0, 2.0, 6.0, 6.0]]]),
        "obj_logits": jnp.array([[2.0, 1.0, 0.5]]),
        "cls_logits": jnp.array([[[3.0, -1.0], [2.0, 0.0], [-2.0, 1.0]]]),
    }


def test_postprocess_scores_decodes_and_suppresses():
    det = _three_point_head_outputs()
    result = jax.jit(
        functools.partial(
            box_ops.postprocess, max_detections=4, iou_threshold=0.5, score_threshold=0.1
        )
    )(det)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    # Anchor 1 (class 0, IoU 49/79 with anchor 0) is suppressed; anchor 2 is class 1.
    np.testing.assert_allclose(
        result["scores"][0],
        [sigmoid(2.0) * sigmoid(3.0), sigmoid(0.5) * sigmoid(1.0), 0, 0],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(result["classes"][0], [0, 1, 0, 0])
    np.testing.assert_allclose(
        result["boxes_xyxy"][0, :2], [[4.0, 4.0, 12.0, 12.0], [38.0, 38.0, 46.0, 46.0]]
    )
    np.testing.assert_array_equal(result["valid"][0], [True, True, False, False])


def test_postprocess_multi_label_keeps_a_box_for_each_likely_class():
    # The head outputs above. With one label, point 1 proposes only its best class (0)
    # and loses it to point 0. With a box per class, its class-1 box (score s(1) s(0)) stands,
    # as no other class-1 box overlaps it by more than 0.5 (point 0's class-1 box, IoU 49/79
    # with it, scores lower and is the one suppressed); point 2's class-0 box scores
    # s(0.5) s(-2) = 0.074, under the 0.1 floor.
    det = _three_point_head_outputs()
    result = jax.jit(
        functools.partial(
            box_ops.postprocess,
            max_detections=4,
            iou_threshold=0.5,
            score_threshold=0.1,
            multi_label=True,
        )
    )(det)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    np.testing.assert_allclose(
        result["scores"][0],
        [sigmoid(2.0) * sigmoid(3.0), sigmoid(0.5) * sigmoid(1.0), sigmoid(1.0) * 0.5, 0],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(result["classes"][0], [0, 1, 1, 0])
    np.testing.assert_allclose(
        result["boxes_xyxy"][0, :3],
        [[4.0, 4.0, 12.0, 12.0], [38.0, 38.0, 46.0, 46.0], [5.0, 5.0, 13.0, 13.0]],
    )
    np.testing.assert_array_equal(result["valid"][0], [True, True, True, False])


@pytest.mark.parametrize("merge", [False, True])
def test_batched_nms_exports_to_onnx_with_exact_parity(merge):
    jax2onnx = pytest.importorskip("jax2onnx")
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(7)
    boxes = _random_boxes(rng, (3, 40)).astype(np.float32)
    scores = rng.uniform(0, 1, (3, 40)).astype(np.float32)
    classes = rng.integers(0, 3, (3, 40)).astype(np.int32)
    # Image 2 is one chain of suppressions: ONNX's Loop must also run until nothing changes.
    boxes[2], scores[2], classes[2] = _chain_of_boxes(40), np.linspace(1, 0.5, 40), 0

    def nms(boxes_xyxy, box_scores, box_classes):
        result = box_ops.batched_nms(
            boxes_xyxy,
            box_scores,
            box_classes,
            max_detections=8,
            iou_threshold=0.5,
            score_threshold=0.3,
            merge=merge,
        )
        return result["boxes_xyxy"], result["scores"], result["classes"], result["valid"]

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (boxes, scores, classes)]
    model = jax2onnx.to_onnx(nms, specs, opset=17)
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    input_names = [spec.name for spec in session.get_inputs()]
    exported = session.run(None, dict(zip(input_names, (boxes, scores, classes))))
    for onnx_value, jax_value in zip(exported[1:], nms(boxes, scores, classes)[1:]):
        np.testing.assert_array_equal(onnx_value, np.asarray(jax_value))
    # Merged coordinates are sums of products, whose order ONNX Runtime may choose.
    np.testing.assert_allclose(
        exported[0], nms(boxes, scores, classes)[0], atol=1e-4 if merge else 0
    )
    assert exported[3][:2].sum() > 0
    if not merge:
        np.testing.assert_array_equal(exported[0][2], boxes[2, :16:2])  # every other chain box


def test_postprocess_multi_label_exports_with_a_free_batch():
    """The per-class candidates (repeat + reshape over points × classes) export to ONNX with a
    symbolic batch axis, and ONNX Runtime keeps the same boxes as jax."""
    jax2onnx = pytest.importorskip("jax2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(3)
    num_points, num_classes = 30, 3
    points = jnp.asarray(rng.uniform(0, 64, (num_points, 2)).astype(np.float32))

    def boxes_of(box_ltrb, obj_logits, cls_logits):
        det = {"points": points, "box_ltrb": box_ltrb, "obj_logits": obj_logits}
        det["cls_logits"] = cls_logits
        result = box_ops.postprocess(
            det, max_detections=8, iou_threshold=0.5, score_threshold=0.2, multi_label=True
        )
        return result["boxes_xyxy"], result["scores"], result["classes"], result["valid"]

    inputs = (
        rng.uniform(1, 12, (2, num_points, 4)).astype(np.float32),
        rng.normal(0, 2, (2, num_points)).astype(np.float32),
        rng.normal(0, 2, (2, num_points, num_classes)).astype(np.float32),
    )
    shapes = [("batch", *x.shape[1:]) for x in inputs]
    model = jax2onnx.to_onnx(boxes_of, shapes, opset=17)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [spec.name for spec in session.get_inputs()]
    exported = session.run(None, dict(zip(names, inputs)))
    expected = boxes_of(*map(jnp.asarray, inputs))
    assert np.asarray(expected[3]).sum() >= 4  # enough boxes kept for the check to mean something
    assert set(np.asarray(expected[2])[np.asarray(expected[3])]) == {0, 1, 2}
    for onnx_value, jax_value in zip(exported, expected):
        np.testing.assert_allclose(onnx_value, np.asarray(jax_value), rtol=1e-6, atol=1e-6)
