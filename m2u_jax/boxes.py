"""Box geometry, anchor-free target assignment and static-shape NMS (pure jnp).

Boxes are `xyxy` in pixels: `[..., 4] = (x1, y1, x2, y2)` with `x1 <= x2`, `y1 <= y2`. Every
function is shape-polymorphic over leading dimensions, jit-able, and free of data-dependent
shapes, so the detection post-processing exports to ONNX as a static graph.

The overlap measures divide by `area + eps` and clamp negative extents, so they and their
gradients stay finite for zero-area boxes (e.g. padding) and for identical boxes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from m2u_jax.config import ASSIGN_FALLBACKS, LEVEL_SIZES

EPS = 1e-7


def box_area(boxes_xyxy: jax.Array) -> jax.Array:
    """Area of `[..., 4]` xyxy boxes → `[...]`; inverted boxes count as zero area."""
    widths = jnp.maximum(boxes_xyxy[..., 2] - boxes_xyxy[..., 0], 0.0)
    heights = jnp.maximum(boxes_xyxy[..., 3] - boxes_xyxy[..., 1], 0.0)
    return widths * heights


def _intersection_and_union(boxes_a: jax.Array, boxes_b: jax.Array):
    top_left = jnp.maximum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = jnp.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    overlap = jnp.maximum(bottom_right - top_left, 0.0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = box_area(boxes_a) + box_area(boxes_b) - intersection
    return intersection, union


def _enclosing_box(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    top_left = jnp.minimum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = jnp.maximum(boxes_a[..., 2:], boxes_b[..., 2:])
    return jnp.concatenate([top_left, bottom_right], axis=-1)


def box_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = EPS) -> jax.Array:
    """Elementwise IoU of `[..., 4]` and `[..., 4]` xyxy boxes (broadcasting) → `[...]`."""
    intersection, union = _intersection_and_union(boxes_a, boxes_b)
    return intersection / (union + eps)


def pairwise_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = EPS) -> jax.Array:
    """IoU of every pair: `[..., N, 4]` × `[..., M, 4]` → `[..., N, M]` (leading dims broadcast).

    The same operations in the same order as `box_iou`, but one coordinate at a time: in the
    exported NMS graph ONNX Runtime broadcasts `[..., N, 1]` against `[..., 1, M]` several times
    faster than `[..., N, 1, 2]` against `[..., 1, M, 2]`."""

    def corner(boxes: jax.Array, coordinate: int, axis: int) -> jax.Array:
        return jnp.expand_dims(boxes[..., coordinate], axis)

    def overlap(low: int, high: int) -> jax.Array:
        start = jnp.maximum(corner(boxes_a, low, -1), corner(boxes_b, low, -2))
        stop = jnp.minimum(corner(boxes_a, high, -1), corner(boxes_b, high, -2))
        return jnp.maximum(stop - start, 0.0)

    intersection = overlap(0, 2) * overlap(1, 3)
    union = (
        jnp.expand_dims(box_area(boxes_a), -1)
        + jnp.expand_dims(box_area(boxes_b), -2)
        - intersection
    )
    return intersection / (union + eps)


def generalized_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = EPS) -> jax.Array:
    """Elementwise GIoU (Rezatofighi et al. 2019) → `[...]`, in [-1, 1].

    GIoU = IoU - (enclosing area - union) / enclosing area.
    """
    intersection, union = _intersection_and_union(boxes_a, boxes_b)
    iou = intersection / (union + eps)
    enclosing_area = box_area(_enclosing_box(boxes_a, boxes_b))
    return iou - (enclosing_area - union) / (enclosing_area + eps)


def _center_distance_penalty(boxes_a: jax.Array, boxes_b: jax.Array, eps: float) -> jax.Array:
    # Squared centre distance over the squared diagonal of the enclosing box (Zheng et al. 2020);
    # squared lengths avoid the sqrt whose gradient is infinite at zero.
    centers_a = (boxes_a[..., :2] + boxes_a[..., 2:]) / 2
    centers_b = (boxes_b[..., :2] + boxes_b[..., 2:]) / 2
    center_distance_sq = jnp.sum((centers_a - centers_b) ** 2, axis=-1)
    enclosing = _enclosing_box(boxes_a, boxes_b)
    diagonal_sq = jnp.sum((enclosing[..., 2:] - enclosing[..., :2]) ** 2, axis=-1)
    return center_distance_sq / (diagonal_sq + eps)


def distance_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = EPS) -> jax.Array:
    """Elementwise DIoU = IoU - centre distance² / enclosing diagonal² → `[...]`."""
    return box_iou(boxes_a, boxes_b, eps) - _center_distance_penalty(boxes_a, boxes_b, eps)


def complete_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = EPS) -> jax.Array:
    """Elementwise CIoU = DIoU - alpha * v with the aspect-ratio term v (Zheng et al. 2020).

    v = 4/pi² (atan(w_b/h_b) - atan(w_a/h_a))², alpha = v / (1 - IoU + v). As in the paper's
    reference code, alpha is a weight and is not differentiated (stop_gradient).
    """
    iou = box_iou(boxes_a, boxes_b, eps)
    widths_a = jnp.maximum(boxes_a[..., 2] - boxes_a[..., 0], 0.0)
    heights_a = jnp.maximum(boxes_a[..., 3] - boxes_a[..., 1], 0.0)
    widths_b = jnp.maximum(boxes_b[..., 2] - boxes_b[..., 0], 0.0)
    heights_b = jnp.maximum(boxes_b[..., 3] - boxes_b[..., 1], 0.0)
    aspect_gap = jnp.arctan(widths_b / (heights_b + eps)) - jnp.arctan(widths_a / (heights_a + eps))
    aspect_term = (4 / math.pi**2) * aspect_gap**2
    alpha = jax.lax.stop_gradient(aspect_term / (1 - iou + aspect_term + eps))
    return iou - _center_distance_penalty(boxes_a, boxes_b, eps) - alpha * aspect_term


def decode_boxes(points: jax.Array, box_ltrb: jax.Array) -> jax.Array:
    """Anchor points `[A, 2]` (x, y) + distances `[..., A, 4]` (left, top, right, bottom)
    → xyxy boxes `[..., A, 4]`."""
    return jnp.concatenate([points - box_ltrb[..., :2], points + box_ltrb[..., 2:]], axis=-1)


def encode_ltrb(points: jax.Array, boxes_xyxy: jax.Array) -> jax.Array:
    """Inverse of `decode_boxes`: points `[A, 2]`, boxes `[..., A, 4]` → ltrb `[..., A, 4]`.

    Distances are negative where the point lies outside its box."""
    return jnp.concatenate([points - boxes_xyxy[..., :2], boxes_xyxy[..., 2:] - points], axis=-1)


def assign_targets(
    points: jax.Array,
    strides: jax.Array,
    boxes: jax.Array,
    box_classes: jax.Array,
    box_valid: jax.Array,
    num_classes: int,
    *,
    center_radius: float = 2.5,
    scale_range_factor: float = 4.0,
    fallback: str = "nearest",
    level_size: str = "edge",
    min_level_points: int = 0,
) -> dict[str, jax.Array]:
    """Anchor-free (FCOS / YOLOX centre sampling) assignment of ground-truth boxes to points.

    Args:
      points: `[A, 2]` anchor centres (x, y) in pixels, all levels concatenated.
      strides: `[A]` stride in pixels of each anchor's level.
      boxes: `[B, G, 4]` xyxy ground-truth boxes in pixels (zero-padded).
      box_classes: `[B, G]` int class in 0..K-1, or -1 for an unknown class.
      box_valid: `[B, G]` 1 for real boxes, 0 for padding.
      num_classes: K.
      center_radius: centre-sampling radius in units of the anchor's stride.
      scale_range_factor: sets the per-level size ranges (below).
      fallback: what a box without a candidate takes (`ASSIGN_FALLBACKS`, below).
      level_size: the size m of rule 3 (`LEVEL_SIZES`): 'edge' = the point's farthest box edge
        max(l, t, r, b) (FCOS); 'box' = half the box's geometric-mean side, sqrt(w h) / 2,
        the same for every point of the box (FPN's rule by area: a long thin box counts as
        small and stays on the fine levels, whose points lie in its band).
      min_level_points: with n > 0, a box uses only the levels that hold at least n points
        meeting rules 1 and 2 for it, and the coarsest of these takes no upper bound in rule 3
        (it learns the box's points that the size ranges would send to a coarser level). A
        narrow box (a scratch) that a coarse level's sparse points miss stays on the finer
        levels whose points lie in its band, with all of them; a box that no level holds n
        points of keeps every level. 0: every level for every box.

    Rules. Point `a` is a candidate for valid box `g` when all three hold:
      1. it lies strictly inside the box;
      2. it lies within the square of half-side `center_radius * stride[a]` around the box
         centre (centre sampling: the border of a box is a poor anchor);
      3. its size m (`level_size`; 'edge': its farthest box edge) is in the level's range
         (f * s_prev, f * s] with f = `scale_range_factor`, s = stride[a] and s_prev the next
         finer stride present; the finest level has no lower bound and the coarsest no upper
         bound. With f = 4, a stride-s level learns boxes up to about 8 s wide, so large boxes
         go to coarse levels (FCOS uses f = 8 for its 800-px images; our images are small).
    A valid box with no candidate (a tiny box between anchor points, or one that lost all its
    points to the rules above) takes the finest-level point nearest to its centre, so every box
    is learned. With `fallback='inside'` it first takes every point of any level that meets
    rules 1 and 2: a long thin box (a scratch) is sent by its far edge to a coarse level whose
    points miss its narrow band, while finer levels have a row of points inside it. A point
    that is a candidate for several boxes takes the smallest-area one (ties: the lower box
    index).

    Returns a dict of float32 arrays:
      `obj_targets` `[B, A]` (1 for positives), `cls_targets` `[B, A, K]` one-hot (all zero for
      negatives and unknown classes), `cls_weights` `[B, A]` (1 for positives of a known class),
      `box_targets` `[B, A, 4]` xyxy of the assigned box (zeros for negatives), `fg_mask` `[B, A]`.
    """
    points = points.astype(jnp.float32)
    strides = strides.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)
    valid = box_valid > 0  # [B, G]

    # Distances from every point to every box's edges: [B, A, G, 4].
    ltrb = encode_ltrb(points[None, :, None, :], boxes[:, None, :, :])
    inside_box = jnp.min(ltrb, axis=-1) > 0

    centers = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, G, 2]
    offset_from_center = jnp.abs(points[None, :, None, :] - centers[:, None, :, :])  # [B, A, G, 2]
    radius = center_radius * strides[None, :, None, None]
    inside_center = jnp.all(offset_from_center < radius, axis=-1)

    # The next finer stride present, for each point: sorting keeps this O(A log A) instead of an
    # [A, A] comparison, and works for any set of level strides.
    sorted_strides = jnp.sort(strides)
    finer_index = jnp.searchsorted(sorted_strides, strides, side="left") - 1
    finer_stride = jnp.where(finer_index >= 0, sorted_strides[jnp.maximum(finer_index, 0)], 0.0)
    is_finest = strides <= sorted_strides[0]
    is_coarsest = strides >= sorted_strides[-1]
    lower = scale_range_factor * finer_stride  # 0 on the finest level.
    upper = jnp.where(is_coarsest, jnp.inf, scale_range_factor * strides)
    if fallback not in ASSIGN_FALLBACKS:
        raise ValueError(f"fallback={fallback!r} is not one of {ASSIGN_FALLBACKS}")
    if level_size not in LEVEL_SIZES:
        raise ValueError(f"level_size={level_size!r} is not one of {LEVEL_SIZES}")
    if min_level_points < 0:
        raise ValueError(f"min_level_points={min_level_points} is negative")
    if level_size == "box":
        sides = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)  # [B, G, 2]
        size = (jnp.sqrt(sides[..., 0] * sides[..., 1]) / 2)[:, None, :]  # [B, 1, G]
    else:
        size = jnp.max(ltrb, axis=-1)  # [B, A, G]: the farthest edge
    near_inside = inside_box & inside_center & valid[:, None, :]
    upper = upper[None, :, None]  # [1, A, 1]; [B, A, G] once it depends on the box
    if min_level_points > 0:
        upper, usable_level = _levels_holding_the_box(near_inside, strides, upper, min_level_points)
        near_inside = near_inside & usable_level
    in_scale_range = (size > lower[None, :, None]) & (size <= upper)
    candidate = near_inside & in_scale_range
    if fallback == "inside":
        no_candidate = ~jnp.any(candidate, axis=1)  # [B, G]
        candidate = candidate | (near_inside & no_candidate[:, None, :])

    # Boxes without any candidate: the nearest finest-level point to the centre.
    candidate = _with_nearest_fallback(candidate, offset_from_center, is_finest, valid)
    areas = box_area(boxes)  # [B, G]
    candidate_areas = jnp.where(candidate, areas[:, None, :], jnp.inf)
    assigned_box = jnp.argmin(candidate_areas, axis=-1)  # [B, A]
    return _targets_from_assignment(candidate, assigned_box, boxes, box_classes, num_classes)


def align_targets(
    points: jax.Array,
    strides: jax.Array,
    boxes: jax.Array,
    box_classes: jax.Array,
    box_valid: jax.Array,
    pred_boxes: jax.Array,
    pred_obj: jax.Array,
    pred_cls: jax.Array,
    *,
    top_k: int = 10,
    alpha: float = 1.0,
    beta: float = 6.0,
) -> dict[str, jax.Array]:
    """Task-aligned assignment (TOOD's idea, as YOLOv8 uses it): each box takes the points that
    predict it best.

    Args:
      points, strides, boxes, box_classes, box_valid: as in `assign_targets`.
      pred_boxes: `[B, A, 4]` each point's decoded predicted box (xyxy pixels).
      pred_obj: `[B, A]` objectness probability; pred_cls: `[B, A, K]` class probabilities.

    Rules. Every point strictly inside valid box `g` is a candidate for it, on any level (no
    size ranges and no centre square: the predictions choose). Its alignment with `g` is
    t = s**alpha * IoU**beta, where s = obj * cls[class of g] (obj alone for an unknown class)
    and IoU is that of its predicted box with `g`. Each box takes its `top_k` candidates of
    highest t (all of them when it has fewer); a box with no point inside it takes the
    finest-level point nearest its centre. A point taken by several boxes keeps the one its
    predicted box overlaps most (ties: the lower box index). The inputs are read as constants
    (no gradient flows through the assignment).

    Returns the dict of `assign_targets`.
    """
    points = points.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)
    pred_boxes = jax.lax.stop_gradient(pred_boxes.astype(jnp.float32))
    pred_obj = jax.lax.stop_gradient(pred_obj.astype(jnp.float32))
    pred_cls = jax.lax.stop_gradient(pred_cls.astype(jnp.float32))
    valid = box_valid > 0  # [B, G]
    num_anchors = points.shape[0]
    num_classes = pred_cls.shape[-1]

    ltrb = encode_ltrb(points[None, :, None, :], boxes[:, None, :, :])  # [B, A, G, 4]
    candidate = (jnp.min(ltrb, axis=-1) > 0) & valid[:, None, :]  # [B, A, G]

    overlap = pairwise_iou(pred_boxes, boxes)  # [B, A, G]
    class_onehot = jax.nn.one_hot(box_classes, num_classes)  # [B, G, K]; zeros for -1
    class_prob = jnp.einsum("bak,bgk->bag", pred_cls, class_onehot)
    class_prob = jnp.where((box_classes >= 0)[:, None, :], class_prob, 1.0)
    alignment = (pred_obj[..., None] * class_prob) ** alpha * overlap**beta
    # -1 marks a non-candidate: every candidate's alignment is >= 0, so it ranks first.
    ranked = jnp.where(candidate, alignment, -1.0).transpose(0, 2, 1)  # [B, G, A]
    top_values, top_index = jax.lax.top_k(ranked, min(top_k, num_anchors))  # [B, G, k]
    taken = jax.nn.one_hot(top_index, num_anchors) * (top_values >= 0)[..., None]
    chosen = (jnp.sum(taken, axis=2) > 0).transpose(0, 2, 1)  # [B, A, G]

    centers = (boxes[..., :2] + boxes[..., 2:]) / 2
    offset_from_center = jnp.abs(points[None, :, None, :] - centers[:, None, :, :])
    strides = strides.astype(jnp.float32)
    is_finest = strides <= jnp.min(strides)
    chosen = _with_nearest_fallback(chosen, offset_from_center, is_finest, valid)
    assigned_box = jnp.argmax(jnp.where(chosen, overlap, -1.0), axis=-1)  # [B, A]
    return _targets_from_assignment(chosen, assigned_box, boxes, box_classes, num_classes)


def _levels_holding_the_box(
    near_inside: jax.Array, strides: jax.Array, upper: jax.Array, min_points: int
) -> tuple[jax.Array, jax.Array]:
    """The `min_level_points` rule of `assign_targets`: (upper size bounds `[B, A, G]` with the
    coarsest usable level of each box unbounded, usable `[B, A, G]`: the point's level holds
    `min_points` points of `near_inside` `[B, A, G]` for the box, or the box has no such level)."""
    # An [A, A] same-level mask rather than a static number of levels: it works for any set of
    # strides, for B * A * A * G multiply-adds (small beside the network), only when the rule is on.
    same_level = (strides[:, None] == strides[None, :]).astype(jnp.float32)  # [A, A]
    # For point a and box g: how many points of a's level lie inside g near its centre.
    level_count = jnp.einsum("bcg,ca->bag", near_inside.astype(jnp.float32), same_level)
    holds = level_count >= min_points
    coarsest = jnp.max(jnp.where(holds, strides[None, :, None], 0.0), axis=1)[:, None, :]
    restricted = coarsest > 0  # [B, 1, G]; a box no level holds keeps every level
    usable = ~restricted | (strides[None, :, None] <= coarsest)
    unbounded = restricted & (strides[None, :, None] == coarsest)
    return jnp.where(unbounded, jnp.inf, upper), usable


def _with_nearest_fallback(
    candidate: jax.Array, offset_from_center: jax.Array, is_finest: jax.Array, valid: jax.Array
) -> jax.Array:
    """`candidate` `[B, A, G]` plus, for each valid box without a candidate, the finest-level
    point nearest its centre (`offset_from_center` `[B, A, G, 2]`; ties: the lower index)."""
    num_anchors = candidate.shape[1]
    center_distance_sq = jnp.sum(offset_from_center**2, axis=-1)  # [B, A, G]
    center_distance_sq = jnp.where(is_finest[None, :, None], center_distance_sq, jnp.inf)
    nearest_point = jnp.argmin(center_distance_sq, axis=1)  # [B, G]
    needs_fallback = valid & ~jnp.any(candidate, axis=1)  # [B, G]
    fallback = (jnp.arange(num_anchors)[None, :, None] == nearest_point[:, None, :]) & (
        needs_fallback[:, None, :]
    )
    return candidate | fallback


def _targets_from_assignment(
    candidate: jax.Array,
    assigned_box: jax.Array,
    boxes: jax.Array,
    box_classes: jax.Array,
    num_classes: int,
) -> dict[str, jax.Array]:
    """The target arrays of `assign_targets` from the positives (`candidate` `[B, A, G]`, any
    box) and each point's box index (`assigned_box` `[B, A]`)."""
    fg = jnp.any(candidate, axis=-1)  # [B, A]
    assigned_class = jnp.take_along_axis(box_classes, assigned_box, axis=1)  # [B, A]
    known_class = fg & (assigned_class >= 0)
    # one_hot of -1 is all zeros; the mask also clears negatives.
    cls_targets = jax.nn.one_hot(assigned_class, num_classes) * known_class[..., None]
    box_targets = jnp.take_along_axis(boxes, assigned_box[..., None], axis=1)  # [B, A, 4]
    fg_float = fg.astype(jnp.float32)
    return {
        "obj_targets": fg_float,
        "cls_targets": cls_targets.astype(jnp.float32),
        "cls_weights": known_class.astype(jnp.float32),
        "box_targets": box_targets * fg_float[..., None],
        "fg_mask": fg_float,
    }


def greedy_nms_keep(suppresses: jax.Array, valid: jax.Array) -> jax.Array:
    """Exact greedy NMS keep mask from the suppression matrix, by fixed-point iteration.

    Args:
      suppresses: `[B, k, k]` bool; `suppresses[b, i, j]` = candidate i would suppress candidate
        j if i is kept. Must be strictly upper triangular (only i < j: candidates are in
        descending score order).
      valid: `[B, k]` bool, the candidates allowed at all (score threshold).

    Returns:
      `[B, k]` bool, the greedy rule: j is kept iff valid and no kept i < j suppresses it.

    The iteration `keep <- valid & ~any_i(keep_i & suppresses[i, j])` (the Cluster-NMS update,
    Zheng et al. 2021) starts from `valid` and runs as a `lax.while_loop` until `keep` stops
    changing. Why this is exactly greedy NMS: call the update F. Greedy NMS's mask g is a fixed
    point of F by definition, and the only one: F(x)_j reads x only at i < j (the matrix is
    strictly upper triangular), so by induction on j every fixed point equals g. It is reached:
    after t updates the first t entries are final (entry j < t depends on entries < j, which
    were final one update earlier), so at most k updates reach g, and the loop stops at the
    first repeat, which is a fixed point, i.e. g. Each update is one `[1, k] x [k, k]` matmul
    per image (counts of kept suppressors, exact integers in float32), and the number of
    updates is the length of the longest chain of suppressions (a box suppressed by a box
    that another box suppressed ...) plus one: on the trained demo model's outputs 2-12 per
    image (median 3), where the textbook loop always takes k steps. The worst case, one chain
    through all k candidates, takes k + 1 updates.
    """

    def update(keep, valid, suppression_matrix):
        # matmul, not any(&): ONNX gets one MatMul instead of And + Cast + ReduceMax.
        kept = keep.astype(jnp.float32)[:, None, :]  # [B, 1, k]
        kept_suppressors = jnp.matmul(kept, suppression_matrix)[:, 0, :]  # [B, k]
        return valid & (kept_suppressors < 0.5)

    def changed(state):
        keep, previous, _, _ = state
        return jnp.any(keep != previous)

    def step(state):
        keep, _, valid, suppression_matrix = state
        return update(keep, valid, suppression_matrix), keep, valid, suppression_matrix

    # The loop invariants travel in the loop state rather than as closures: jax2onnx's Loop
    # lowering of fori_loop could not capture traced values from the enclosing graph.
    suppression_matrix = suppresses.astype(jnp.float32)
    first = update(valid, valid, suppression_matrix)
    keep, _, _, _ = jax.lax.while_loop(changed, step, (first, valid, valid, suppression_matrix))
    return keep


def batched_nms(
    boxes_xyxy: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    *,
    max_detections: int,
    iou_threshold: float,
    score_threshold: float,
    merge: bool = False,
    candidates_per_detection: int = 8,
) -> dict[str, jax.Array]:
    """Class-aware greedy NMS with static shapes (jit-able, exports to ONNX).

    Args:
      boxes_xyxy: `[B, A, 4]` boxes; scores: `[B, A]`; classes: `[B, A]` int.
      max_detections: M, boxes returned per image.
      iou_threshold: a box is suppressed by a higher-scored kept box of the same class whose
        IoU with it is above this.
      score_threshold: boxes scoring below this are dropped.
      merge: weighted NMS (YOLOv5's 'merge'): each kept box is replaced by the mean of the
        candidates of its class that overlap it by more than `iou_threshold` (itself included),
        weighted by score x IoU with it; its score and class stay its own. Kept boxes of a
        class overlap by at most `iou_threshold`, so no kept box enters another's mean.
      candidates_per_detection: only the top `k = min(A, candidates_per_detection * M)` boxes by
        score enter NMS (`lax.top_k`, ties in index order), which bounds the k² IoU matrix. The
        result equals exact greedy NMS over all A boxes whenever fewer than k boxes pass the
        score threshold.

    The keep mask is the textbook greedy rule (kept iff no higher-scored *kept* box of the same
    class overlaps it by more than `iou_threshold`), computed by `greedy_nms_keep` in a few
    matrix steps instead of a k-step loop, with no data-dependent shapes; the kept boxes are
    then moved to the front with a second `top_k`.

    Returns a dict: `boxes_xyxy` `[B, M, 4]`, `scores` `[B, M]`, `classes` `[B, M]` int32,
    `valid` `[B, M]` bool, sorted by descending score and zero-padded past the kept boxes.
    """
    num_boxes = scores.shape[1]
    scores = scores.astype(jnp.float32)
    classes = classes.astype(jnp.int32)
    if num_boxes < max_detections:
        # top_k needs at least M entries: pad with boxes that can never pass the threshold.
        pad = max_detections - num_boxes
        boxes_xyxy = jnp.pad(boxes_xyxy, ((0, 0), (0, pad), (0, 0)))
        scores = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        classes = jnp.pad(classes, ((0, 0), (0, pad)))
        num_boxes = max_detections
    num_candidates = min(num_boxes, candidates_per_detection * max_detections)

    candidate_scores, candidate_index = jax.lax.top_k(scores, num_candidates)  # [B, k]
    candidate_boxes = jnp.take_along_axis(boxes_xyxy, candidate_index[..., None], axis=1)
    candidate_classes = jnp.take_along_axis(classes, candidate_index, axis=1)

    iou = pairwise_iou(candidate_boxes, candidate_boxes)
    overlaps = iou > iou_threshold
    same_class = candidate_classes[:, :, None] == candidate_classes[:, None, :]
    later = np.arange(num_candidates)[None, :] > np.arange(num_candidates)[:, None]
    # suppresses[b, i, j]: candidate i (higher score) suppresses candidate j if i is kept.
    suppresses = overlaps & same_class & later[None]
    passing = candidate_scores >= score_threshold
    keep = greedy_nms_keep(suppresses, passing)
    if merge:
        candidate_boxes = _merged_boxes(
            candidate_boxes, candidate_scores, iou, overlaps & same_class, passing
        )

    # Kept candidates first, in score order: rank key k - position for kept, 0 otherwise.
    rank_key = jnp.where(keep, num_candidates - jnp.arange(num_candidates), 0)
    _, order = jax.lax.top_k(rank_key.astype(jnp.float32), max_detections)  # [B, M]
    valid = jnp.take_along_axis(keep, order, axis=1)
    out_boxes = jnp.take_along_axis(candidate_boxes, order[..., None], axis=1)
    out_scores = jnp.take_along_axis(candidate_scores, order, axis=1)
    out_classes = jnp.take_along_axis(candidate_classes, order, axis=1)
    return {
        "boxes_xyxy": jnp.where(valid[..., None], out_boxes, 0.0),
        "scores": jnp.where(valid, out_scores, 0.0),
        "classes": jnp.where(valid, out_classes, 0).astype(jnp.int32),
        "valid": valid,
    }


def _merged_boxes(
    boxes_xyxy: jax.Array,
    scores: jax.Array,
    iou: jax.Array,
    overlaps: jax.Array,
    passing: jax.Array,
) -> jax.Array:
    """`[B, k, 4]`: box i = mean of the passing boxes j with `overlaps[b, i, j]`, weighted by
    score_j x IoU_ij (`batched_nms`'s `merge`; the diagonal always overlaps, so the weights
    never all vanish for a passing box). Rows of boxes that do not pass are left as they were."""
    weights = jnp.where(overlaps & passing[:, None, :], iou * scores[:, None, :], 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # matmul: one MatMul in ONNX; rows with no weight keep their own box.
    merged = jnp.matmul(weights, boxes_xyxy) / jnp.maximum(total, EPS)
    return jnp.where(total > 0, merged, boxes_xyxy)


def postprocess(
    det: dict[str, jax.Array],
    *,
    max_detections: int,
    iou_threshold: float,
    score_threshold: float,
    merge: bool = False,
    multi_label: bool = False,
) -> dict[str, jax.Array]:
    """Detection head outputs → final boxes (see docs/interfaces.md for `det`).

    Box score = sigmoid(obj) × sigmoid(cls_k). One label (default): each point proposes its box
    once, for its best class k = argmax. `multi_label`: each point proposes its box once per
    class, scored per class, so a point torn between two classes keeps a box in each (the
    rule YOLOv5/v8 validate with); NMS stays per class. Then `batched_nms` (`merge`: weighted
    NMS).
    Returns the `batched_nms` dict: `boxes_xyxy` `[B, M, 4]`, `scores` `[B, M]`,
    `classes` `[B, M]` int32, `valid` `[B, M]` bool.
    """
    boxes_xyxy = decode_boxes(det["points"], det["box_ltrb"].astype(jnp.float32))
    class_probs = jax.nn.sigmoid(det["cls_logits"].astype(jnp.float32))
    objectness = jax.nn.sigmoid(det["obj_logits"].astype(jnp.float32))
    if multi_label:
        batch, num_points, num_classes = class_probs.shape
        scores = (objectness[..., None] * class_probs).reshape(batch, num_points * num_classes)
        classes = jnp.broadcast_to(jnp.arange(num_classes), class_probs.shape)
        classes = classes.reshape(batch, num_points * num_classes)
        boxes_xyxy = jnp.repeat(boxes_xyxy, num_classes, axis=1)  # point-major, as the scores
    else:
        scores = objectness * jnp.max(class_probs, axis=-1)
        classes = jnp.argmax(class_probs, axis=-1)
    return batched_nms(
        boxes_xyxy,
        scores,
        classes,
        max_detections=max_detections,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        merge=merge,
    )
