"""Loss functions of every training stage (pure jnp, float32 math whatever the input dtype).

Sharded training needs no collectives here: under `jax.jit` with sharded inputs each loss sees the
global (logical) batch arrays, and XLA inserts whatever cross-device reductions the batch means
and sums need. The contrastive losses therefore see every negative of the global batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2u_jax import boxes as box_ops
from m2u_jax.config import DET_ASSIGNERS, DET_OBJ_TARGETS

LOSS_TERMS = (
    "recon",
    "seg_focal",
    "seg_dice",
    "cls",
    "det_obj",
    "det_cls",
    "det_box",
    "det_dfl",
)

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def sigmoid_focal_loss(
    logits: jax.Array,
    targets: jax.Array,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
) -> jax.Array:
    """Elementwise binary focal loss (Lin et al. 2017) → same shape as `logits`, computed in
    float32 by `optax.sigmoid_focal_loss` (log-space: finite gradients for any gamma > 0, also
    gamma < 1 at a confident correct logit, where (1 - p_t)^gamma has an infinite slope).

    loss = alpha_t · (1 - p_t)^gamma · BCE(logits, targets), p_t = p if t = 1 else 1 - p,
    alpha_t = alpha if t = 1 else 1 - alpha. `alpha=None` or `alpha < 0` disables the alpha
    weighting; with gamma = 0 as well this is exactly binary cross-entropy. Targets may be soft.
    """
    return optax.sigmoid_focal_loss(
        logits.astype(jnp.float32),
        targets.astype(jnp.float32),
        alpha=None if alpha is None or alpha < 0 else alpha,
        gamma=gamma,
    )


def quality_focal_loss(logits: jax.Array, targets: jax.Array, beta: float = 2.0) -> jax.Array:
    """Elementwise quality focal loss (Li et al. 2020, GFL) → same shape as `logits`, float32:
    BCE(logits, targets) · |targets − sigmoid(logits)|^beta, for soft targets in [0, 1].

    Hand-written because optax's focal loss with a soft target is not minimised at
    p = target (its (1 − p_t)^gamma factor stays positive there); this one is, for any target.
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    distance = jnp.abs(targets - jax.nn.sigmoid(logits))
    return optax.sigmoid_binary_cross_entropy(logits, targets) * distance**beta


def iou_loss(pred_xyxy: jax.Array, target_xyxy: jax.Array, kind: str = "giou") -> jax.Array:
    """Elementwise 1 - overlap for `[..., 4]` xyxy boxes → `[...]`.

    kind: 'iou' (in [0, 1]), 'giou' (in [0, 2]), 'diou' or 'ciou'. Finite gradients for
    zero-area and identical boxes (see `m2u_jax.boxes`).
    """
    metrics = {
        "iou": box_ops.box_iou,
        "giou": box_ops.generalized_iou,
        "diou": box_ops.distance_iou,
        "ciou": box_ops.complete_iou,
    }
    if kind not in metrics:
        raise ValueError(f"iou_loss kind={kind!r}: use one of {sorted(metrics)}")
    pred_xyxy = pred_xyxy.astype(jnp.float32)
    target_xyxy = target_xyxy.astype(jnp.float32)
    return 1.0 - metrics[kind](pred_xyxy, target_xyxy)


def distribution_focal_loss(bin_logits: jax.Array, targets: jax.Array) -> jax.Array:
    """GFL's distribution focal loss: `bin_logits [..., R]` over the bins 0, 1, …, R−1 and a
    real target `[...]` (in bins) → `[...]` the cross-entropy with the two bins around the
    target, weighted by nearness: t = 2.3 gives 0.7·(−log p₂) + 0.3·(−log p₃), so the
    distribution's expectation is pulled to t. Targets are clipped into [0, R−1−0.01] (a box
    side farther than the last bin trains towards it)."""
    num_bins = bin_logits.shape[-1]
    targets = jnp.clip(targets.astype(jnp.float32), 0.0, num_bins - 1 - 0.01)
    lower = jnp.floor(targets)
    upper_weight = targets - lower
    log_probs = jax.nn.log_softmax(bin_logits.astype(jnp.float32), axis=-1)
    lower_index = lower.astype(jnp.int32)[..., None]
    log_lower = jnp.take_along_axis(log_probs, lower_index, axis=-1)[..., 0]
    log_upper = jnp.take_along_axis(log_probs, lower_index + 1, axis=-1)[..., 0]
    return -((1.0 - upper_weight) * log_lower + upper_weight * log_upper)


def dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Soft dice loss per image: logits and targets `[B, H, W]` (any trailing dims) → `[B]`.

    1 - (2 Σ p t + smooth) / (Σ p + Σ t + smooth) with p = sigmoid(logits). The smoothing term
    keeps defect-free images (Σ t = 0) well defined: their loss pushes Σ p towards 0.
    """
    probs = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    targets = targets.astype(jnp.float32).reshape(targets.shape[0], -1)
    intersection = jnp.sum(probs * targets, axis=-1)
    total = jnp.sum(probs, axis=-1) + jnp.sum(targets, axis=-1)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """(window side, Gaussian sigma) that `ssim` uses for an image of this size.

    The standard 11×11, sigma 1.5 window (Wang et al. 2004); images smaller than 11 pixels use
    the largest odd side that fits, with sigma scaled by side / 11.
    """
    side = min(_SSIM_WINDOW, min(height, width))
    side = side if side % 2 else side - 1
    if side < 1:
        raise ValueError(f"ssim: image of {height}x{width} pixels is too small")
    return side, _SSIM_SIGMA * side / _SSIM_WINDOW


def _gaussian_kernel_1d(side: int, sigma: float) -> np.ndarray:
    offsets = np.arange(side, dtype=np.float64) - (side - 1) / 2
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _valid_filter_matrix(size: int, kernel: np.ndarray) -> np.ndarray:
    """`[size - side + 1, size]` banded matrix: row i holds `kernel` at columns i..i+side-1,
    so `matrix @ x` is the 'valid' 1-D correlation of x with the kernel."""
    side = kernel.shape[0]
    matrix = np.zeros((size - side + 1, size), np.float32)
    for row in range(size - side + 1):
        matrix[row, row : row + side] = kernel
    return matrix


def ssim(images_a: jax.Array, images_b: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Mean SSIM per image: `[B, H, W, C]` × `[B, H, W, C]` → `[B]`.

    Local statistics use a separable Gaussian window (`ssim_window`) over the 'valid' region
    (no padding, as in the reference implementation); constants C1 = (0.01 L)², C2 = (0.03 L)²
    with L = `max_value`. Each 1-D pass is a matmul with a constant banded matrix rather than a
    depthwise (feature-grouped) convolution: XLA's CPU backend runs grouped convolutions and
    their gradients 10-70x slower than the matmul (it was most of a CPU train step; see
    docs/performance.md). The matmul spends ~(size / side) x more FLOPs than the taps, a few
    percent of a train step at 256 px on a GPU.
    """
    images_a = images_a.astype(jnp.float32)
    images_b = images_b.astype(jnp.float32)
    height, width = images_a.shape[1:3]
    side, sigma = ssim_window(height, width)
    kernel = _gaussian_kernel_1d(side, sigma)
    # One pass over all five statistics' inputs stacked on the channel axis.
    stacked = jnp.concatenate(
        [images_a, images_b, images_a**2, images_b**2, images_a * images_b], axis=-1
    )
    highest = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on GPU/TPU: SSIM needs f32
    filtered = jnp.einsum(
        "Hh,bhwc->bHwc",
        jnp.asarray(_valid_filter_matrix(height, kernel)),
        stacked,
        precision=highest,
    )
    filtered = jnp.einsum(
        "Ww,bhwc->bhWc",
        jnp.asarray(_valid_filter_matrix(width, kernel)),
        filtered,
        precision=highest,
    )
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = jnp.split(filtered, 5, axis=-1)
    var_a = mean_aa - mean_a**2
    var_b = mean_bb - mean_b**2
    covariance = mean_ab - mean_a * mean_b
    c1 = (0.01 * max_value) ** 2
    c2 = (0.03 * max_value) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(jnp.float32)
    # All-zero weights (no valid target in the batch) give 0, not NaN.
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def reconstruction_loss(
    recon: jax.Array, target: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Reconstruction loss: scalar weighted mean over images of L2 + (1 - SSIM).

    Args:
      recon, target: `[B, H, W, C]` images in [0, 1].
      weights: `[B]` (the batch's `recon_valid`): images whose clean target is not real
        (actual defects) get weight 0. None = plain mean.
    Per image: mean squared error over pixels and channels + 1 - `ssim(recon, target)`.
    A batch whose weights are all 0 gives 0 without computing either term.
    """
    recon = recon.astype(jnp.float32)
    target = target.astype(jnp.float32)

    def weighted_loss(recon, target):
        per_image = jnp.mean((recon - target) ** 2, axis=(1, 2, 3)) + 1.0 - ssim(recon, target)
        return _weighted_mean(per_image, weights)

    if weights is None:
        return weighted_loss(recon, target)
    # A set with no defect-free image (NEU-DET: every image has boxes) never has a target: the
    # branch skips SSIM and its gradient: 3-9 % of a cpu_real train step (docs/performance.md).
    return jax.lax.cond(
        jnp.any(weights > 0),
        weighted_loss,
        lambda recon, target: jnp.zeros((), jnp.float32),
        recon,
        target,
    )


def _l2_normalize(vectors: jax.Array) -> jax.Array:
    vectors = vectors.astype(jnp.float32)
    return vectors * jax.lax.rsqrt(jnp.maximum(jnp.sum(vectors**2, -1, keepdims=True), 1e-12))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
    """SimCLR NT-Xent loss (Chen et al. 2020) → scalar.

    Args:
      z1, z2: `[B, D]` projections of the two views; row i of each comes from image i.
      temperature: softmax temperature tau.
    Each of the 2B L2-normalised embeddings is classified against the other 2B - 1 (its partner
    view is the positive, the rest are negatives) with logits cos / tau; mean over the 2B
    anchors. Call it on the global batch (see the module docstring).
    """
    batch_size = z1.shape[0]
    embeddings = _l2_normalize(jnp.concatenate([z1, z2], axis=0))  # [2B, D]
    logits = embeddings @ embeddings.T / temperature
    # An embedding is never its own negative; -inf keeps it out of the softmax.
    logits = jnp.where(jnp.eye(2 * batch_size, dtype=bool), -jnp.inf, logits)
    positives = jnp.concatenate([jnp.arange(batch_size) + batch_size, jnp.arange(batch_size)])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, positives[:, None], axis=-1))


def _info_nce(queries: jax.Array, keys: jax.Array, temperature: float) -> jax.Array:
    queries = _l2_normalize(queries)
    keys = _l2_normalize(jax.lax.stop_gradient(keys))
    logits = queries @ keys.T / temperature  # [B, B]; the diagonal holds the positives.
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.diagonal(log_probs))


def moco_v3_loss(
    q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, temperature: float
) -> jax.Array:
    """Symmetric MoCo v3 InfoNCE (Chen, Xie & He 2021) → scalar.

    Args:
      q1, q2: `[B, D]` predictor outputs of the online encoder for views 1 and 2.
      k1, k2: `[B, D]` momentum-encoder outputs for views 1 and 2 (gradients are stopped).
      temperature: tau.
    loss = ctr(q1, k2) + ctr(q2, k1), where ctr is the cross-entropy of each query against all B
    keys of the (global) batch with the same-image key as the positive, multiplied by 2·tau as in
    the official MoCo v3 code (it makes the gradient scale independent of tau).
    """
    scale = 2.0 * temperature
    return scale * (_info_nce(q1, k2, temperature) + _info_nce(q2, k1, temperature))


def detection_loss(
    det: Mapping[str, jax.Array],
    batch: Mapping[str, jax.Array],
    *,
    focal_alpha: float | None = 0.25,
    focal_gamma: float = 2.0,
    box_loss_kind: str = "giou",
    obj_target: str = "binary",
    assigner: str = "center",
    assign_rules: Mapping | None = None,
) -> dict[str, jax.Array]:
    """Detection losses from the head outputs and the batch's boxes (unweighted scalars).

    Args:
      det: head outputs (docs/interfaces.md): `obj_logits` `[B, A]`, `cls_logits` `[B, A, K]`,
        `box_ltrb` `[B, A, 4]`, `points` `[A, 2]`, `strides` `[A]`, and `box_bins`
        `[B, A, 4, R]` when the head predicts bins (`model.det_box_bins`).
      batch: `boxes` `[B, G, 4]`, `box_classes` `[B, G]`, `box_valid` `[B, G]`.
    Targets come from `boxes.assign_targets(..., **assign_rules)` (`config.assign_rules`; its
    defaults when None) with `assigner='center'`, or from `boxes.align_targets` on the current
    predictions with 'aligned'. With P = max(number of positives, 1) over the (global) batch and
    P_known the same over positives of a known class:
      det_obj = Σ focal(obj) over all anchors / P with `obj_target='binary'` (target 1 on
        positives); with 'iou' the positives' target is the IoU of their predicted box with the
        assigned box (no gradient through it) and the loss `quality_focal_loss`, so the box
        score ranks boxes by how well they fit,
      det_cls = Σ focal(cls) over positives of a known class and all K classes / P_known,
      det_box = Σ (1 - GIoU) over positives / P,
      det_dfl = Σ `distribution_focal_loss` over positives / P, mean over the 4 sides, each
        target distance in strides (the point's distance to the assigned box side, ≥ 0); 0
        without `box_bins`.
    Returns {'det_obj', 'det_cls', 'det_box', 'det_dfl'}.
    """
    num_classes = det["cls_logits"].shape[-1]
    if obj_target not in DET_OBJ_TARGETS:
        raise ValueError(f"obj_target={obj_target!r} is not one of {DET_OBJ_TARGETS}")
    if assigner not in DET_ASSIGNERS:
        raise ValueError(f"assigner={assigner!r} is not one of {DET_ASSIGNERS}")
    pred_boxes = box_ops.decode_boxes(det["points"], det["box_ltrb"].astype(jnp.float32))
    box_keys = (batch["boxes"], batch["box_classes"], batch["box_valid"])
    if assigner == "aligned":
        targets = box_ops.align_targets(
            det["points"],
            det["strides"],
            *box_keys,
            pred_boxes,
            jax.nn.sigmoid(det["obj_logits"].astype(jnp.float32)),
            jax.nn.sigmoid(det["cls_logits"].astype(jnp.float32)),
        )
    else:
        targets = box_ops.assign_targets(
            det["points"],
            det["strides"],
            *box_keys,
            num_classes,
            **(assign_rules or {}),
        )
    fg_mask = targets["fg_mask"]
    num_positives = jnp.maximum(jnp.sum(fg_mask), 1.0)
    num_known = jnp.maximum(jnp.sum(targets["cls_weights"]), 1.0)

    if obj_target == "iou":
        fit = jax.lax.stop_gradient(box_ops.box_iou(pred_boxes, targets["box_targets"]))
        obj_loss = quality_focal_loss(det["obj_logits"], fg_mask * fit)
    else:
        obj_loss = sigmoid_focal_loss(
            det["obj_logits"], targets["obj_targets"], focal_alpha, focal_gamma
        )
    cls_loss = sigmoid_focal_loss(
        det["cls_logits"], targets["cls_targets"], focal_alpha, focal_gamma
    )
    cls_loss = jnp.sum(cls_loss, axis=-1) * targets["cls_weights"]
    box_loss = iou_loss(pred_boxes, targets["box_targets"], box_loss_kind) * fg_mask
    dfl = jnp.zeros((), jnp.float32)
    if "box_bins" in det:
        # The point's distance to each side of its box, in strides (negative where a fallback
        # point lies outside its box: clipped to bin 0 by the loss).
        target_ltrb = box_ops.encode_ltrb(det["points"], targets["box_targets"])
        target_bins = target_ltrb / det["strides"].astype(jnp.float32)[:, None]
        side_loss = distribution_focal_loss(det["box_bins"], target_bins)
        dfl = jnp.sum(jnp.mean(side_loss, axis=-1) * fg_mask) / num_positives
    return {
        "det_obj": jnp.sum(obj_loss) / num_positives,
        "det_cls": jnp.sum(cls_loss) / num_known,
        "det_box": jnp.sum(box_loss) / num_positives,
        "det_dfl": dfl,
    }


def _require(mapping: Mapping, keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise KeyError(f"multitask_loss: {what} lacks {missing}")


def multitask_loss(
    outputs: Mapping,
    batch: Mapping,
    weights: Mapping[str, float],
    det_obj_target: str = "binary",
    seg_focal_alpha: float = 0.25,
    det_assigner: str = "center",
    det_box_loss: str = "giou",
    det_assign_rules: Mapping | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fine-tuning loss: (weighted total, {term: unweighted scalar}).

    Args:
      outputs: model outputs (docs/interfaces.md): `recon`, `pixel_logits`, `image_logits`,
        `type_logits`, `det`.
      batch: fine-tuning batch: `clean_images`, `recon_valid`, `masks`, `labels`, the box keys,
        and optionally `defect_types`.
      weights: `config.train.loss_weights`, exactly the keys of `LOSS_TERMS`.
    Terms:
      recon: `reconstruction_loss(recon, clean_images, recon_valid)`;
      seg_focal: pixel focal loss on `pixel_logits` vs `masks`, mean over pixels, defect pixels
        weighted `seg_focal_alpha` and normal ones 1 − it (`train.seg_focal_alpha`);
      seg_dice: `dice_loss(pixel_logits, masks)`, mean over images;
      cls: image focal loss on `image_logits` vs `labels`, mean over images, plus — when the
        batch has `defect_types` — the softmax cross-entropy of `type_logits` [B, K+1] against
        them, skipping images whose type is -1 (unknown) (both are image-level
        classification, so they share one weight);
      det_obj, det_cls, det_box, det_dfl: `detection_loss(outputs['det'], batch)` with
        `obj_target=det_obj_target` (`train.det_obj_target`), `assigner=det_assigner`
        (`train.det_assigner`), `box_loss_kind=det_box_loss` (`train.det_box_loss`) and
        `assign_rules=det_assign_rules` (`config.assign_rules(config.train)`).
    """
    weight_keys = set(weights.keys())
    if weight_keys != set(LOSS_TERMS):
        raise ValueError(
            f"train.loss_weights has keys {sorted(weight_keys)}; expected {sorted(LOSS_TERMS)}"
        )
    _require(outputs, ("recon", "pixel_logits", "image_logits", "det"), "outputs")
    _require(
        batch,
        ("clean_images", "recon_valid", "masks", "labels", "boxes", "box_classes", "box_valid"),
        "batch",
    )
    terms = {
        "recon": reconstruction_loss(outputs["recon"], batch["clean_images"], batch["recon_valid"]),
        "seg_focal": jnp.mean(
            sigmoid_focal_loss(outputs["pixel_logits"], batch["masks"], seg_focal_alpha)
        ),
        "seg_dice": jnp.mean(dice_loss(outputs["pixel_logits"], batch["masks"])),
    }
    cls_loss = jnp.mean(sigmoid_focal_loss(outputs["image_logits"], batch["labels"]))
    if "defect_types" in batch:
        _require(outputs, ("type_logits",), "outputs (the batch has defect_types)")
        type_log_probs = jax.nn.log_softmax(outputs["type_logits"].astype(jnp.float32), axis=-1)
        defect_types = batch["defect_types"].astype(jnp.int32)
        # -1 marks an image whose type is unknown (a synthetic anomaly under the supervised
        # protocol): it trains the good/defective focal term but not the type cross-entropy.
        known = (defect_types >= 0).astype(jnp.float32)
        picked = jnp.take_along_axis(
            type_log_probs, jnp.maximum(defect_types, 0)[:, None], axis=-1
        )[:, 0]
        cls_loss = cls_loss - jnp.sum(picked * known) / jnp.maximum(jnp.sum(known), 1.0)
    terms["cls"] = cls_loss
    terms.update(
        detection_loss(
            outputs["det"],
            batch,
            obj_target=det_obj_target,
            assigner=det_assigner,
            box_loss_kind=det_box_loss,
            assign_rules=det_assign_rules,
        )
    )
    # jnp.asarray rather than float(): the weights may arrive traced (as a jit argument).
    total = sum(jnp.asarray(weights[name], jnp.float32) * terms[name] for name in LOSS_TERMS)
    return total, terms
