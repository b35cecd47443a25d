"""M2UNet: the full network (MS-ViT backbone + anomaly decoder + detection head + image head).

Build it from the config with `build_model(config.model)`. Calls (all through `model.apply`):

- `model.apply(variables, images, train=...)` → `(outputs, aux)` per docs/interfaces.md;
  dropout needs `rngs={'dropout': key}` when `train=True`.
- `method=M2UNet.trunk`: images → `(trunk_state, aux)`, everything before the last
  `mc_dropout_blocks` backbone blocks, deterministic (run once for MC dropout). `trunk_state`
  is the tokens `[B, N, D]`, or, with `detail_channels > 0`, `{'tokens': [B, N, D],
  'detail': {stride: [B, H/stride, W/stride, C_stride]}}` (the `DetailStem` maps, which
  are deterministic too) and, with `pixel_head_recon`, `'images'` (the input, which the pixel
  head compares with the reconstruction). Treat it as an opaque pytree.
- `method=M2UNet.stochastic_tail`: `(trunk_state, image_hw=(H, W), train=True)` →
  `(outputs, aux)`, the last blocks, final norm and every head. `__call__` is exactly
  `stochastic_tail ∘ trunk`.
- `method=M2UNet.embed`: images → pooled backbone embedding `[B, D]` only (contrastive
  pretraining; skips the heads).
- `method=M2UNet.predict` or `predict(model, variables, images)`: deterministic inference →
  anomaly map, image score and post-processed boxes. With `test_time_flips` > 1 the anomaly,
  image and type probabilities are the means over the image and its flips (`flip_views`,
  `merge_flip_views`), and so are the dense detection outputs (each view's anchors and box
  sides mapped back) before boxes are decoded and suppressed.

Image score (`image_score`): `(1 - w) * map score + w * sigmoid(image_logits)` with
w = `image_score_classifier`; the map score is the mean of the top-k pixel probabilities,
k = max(1, round(image_score_topk × H × W)), of the anomaly map after a
`image_score_smoothing`-pixel mean filter (`m2u_jax.scoring`). The defaults (w = ½, no filter,
top 1 %) are the demo's rule; docs/quality.md compares the reductions on real data.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2u_jax import boxes, scoring
from m2u_jax.heads import (
    PER_IMAGE_DET_KEYS,
    AnomalyDecoder,
    DetailStem,
    DetectionHead,
    ImageHead,
    anchor_points,
    decoder_start_stride,
)
from m2u_jax.layers import ATTENTION_IMPLEMENTATIONS, Dtype, mean
from m2u_jax.modalities import MODALITY_CHANNELS, num_channels, split_list
from m2u_jax.vit import VARIANTS, Backbone, stream_grids

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The parameter collections of the heads that `detach_aux_heads` trains on stop-gradient
# features (M2UNet's submodule names; the optimizer can clip their gradients apart).
DETACHED_HEADS = ("detection_head", "image_head")

# `model.test_time_flips` → the views of an image whose predictions are averaged, each as the
# axes of `[B, H, W, C]` it reverses: 2 = left-right, 1 = up-down. Flips, not 90° turns, so that
# non-square inputs keep their shape.
FLIP_VIEWS = {1: ((),), 2: ((), (2,)), 4: ((), (2,), (1,), (1, 2))}


def flip_views(images: jax.Array, count: int) -> jax.Array:
    """images `[B, H, W, C]` → `[count·B, H, W, C]`: the views of `FLIP_VIEWS[count]`, view-major
    (the images themselves first)."""
    if count == 1:
        return images
    views = [jnp.flip(images, axes) if axes else images for axes in FLIP_VIEWS[count]]
    # Stacked then reshaped, not concatenated: jax2onnx 0.17 gives a concatenation of symbolic
    # batches the symbolic batch of one (a dynamic-batch export then fails to split the views).
    return jnp.stack(views).reshape(-1, *images.shape[1:])


def _logsumexp0(values: jax.Array) -> jax.Array:
    """log Σ exp over axis 0 of finite values. Written out: jax.nn.logsumexp guards infinities
    with IsInf, which the TensorRT 8.5 ONNX parser rejects."""
    peak = jax.lax.stop_gradient(jnp.max(values, axis=0))
    return peak + jnp.log(jnp.sum(jnp.exp(values - peak), axis=0))


def _log_sigmoid(values: jax.Array) -> jax.Array:
    """log σ(x) = min(x, 0) − log(1 + e^−|x|), finite for every finite x. Written out because
    the exported graph lowers `jax.nn.log_sigmoid` to −log(1 + e^−x), whose e^−x overflows to
    inf for a confident logit (x < −89 in float32): −inf, then NaN in the log-sum-exp below."""
    return jnp.minimum(values, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(values)))


def _mean_probability_logit(logits: jax.Array) -> jax.Array:
    """`[V, ...]` logits → the logit of the mean of their sigmoids over V, computed exactly in
    log space: log mean σ(x) − log mean σ(−x) = LSE log σ(x) − LSE log σ(−x)."""
    return _logsumexp0(_log_sigmoid(logits)) - _logsumexp0(_log_sigmoid(-logits))


# Box distances (left, top, right, bottom) of a flipped view, in the unflipped image's order.
_LTRB_UNFLIP = {(): (0, 1, 2, 3), (2,): (2, 1, 0, 3), (1,): (0, 3, 2, 1), (1, 2): (2, 3, 0, 1)}


def _anchor_unflip(image_hw: tuple[int, int], strides: tuple[int, ...], axes) -> np.ndarray:
    """Index `[A]` taking a flipped view's anchors to the unflipped image's: anchor a of the
    image is anchor `index[a]` of the view, found by mirroring `heads.anchor_points` (the head's
    own layout). Cell centres are symmetric under a flip, so every anchor has its mirror."""
    points, point_strides = anchor_points(image_hw, strides)
    mirrored = points.copy()
    # axes index [B, H, W, C]: 2 = left-right (x), 1 = up-down (y).
    for axis in axes:
        coordinate = 0 if axis == 2 else 1
        mirrored[:, coordinate] = image_hw[1 - coordinate] - points[:, coordinate]
    position = {(x, y, s): a for a, (x, y, s) in enumerate(zip(*points.T, point_strides))}
    return np.array([position[(x, y, s)] for x, y, s in zip(*mirrored.T, point_strides)])


def _merge_flip_detections(det: dict, count: int, image_hw, strides) -> dict:
    """The dense detection outputs of the views → the image's: each view's anchors mapped back
    (`_anchor_unflip`) and its box distances swapped back (`_LTRB_UNFLIP`); objectness and
    class probabilities averaged as the maps are, box distances averaged."""
    per_view = {
        name: det[name].reshape(count, -1, *det[name].shape[1:]) for name in PER_IMAGE_DET_KEYS
    }
    unflipped = {name: [] for name in PER_IMAGE_DET_KEYS}
    for view, axes in enumerate(FLIP_VIEWS[count]):
        index = _anchor_unflip(image_hw, strides, axes) if axes else None
        for name in PER_IMAGE_DET_KEYS:
            values = per_view[name][view]
            if axes:  # the unflipped view needs no gathers
                values = jnp.take(values, index, axis=1)
                if name == "box_ltrb":
                    values = jnp.take(values, np.asarray(_LTRB_UNFLIP[axes]), axis=-1)
            unflipped[name].append(values)
    # The views' bin logits (`box_bins`, training only) are not merged: the distances are.
    merged = {name: value for name, value in det.items() if name != "box_bins"}
    merged["obj_logits"] = _mean_probability_logit(jnp.stack(unflipped["obj_logits"]))
    merged["cls_logits"] = _mean_probability_logit(jnp.stack(unflipped["cls_logits"]))
    merged["box_ltrb"] = jnp.mean(jnp.stack(unflipped["box_ltrb"]), axis=0)
    return merged


def merge_flip_views(outputs: dict, count: int, det_strides: tuple[int, ...] | None = None) -> dict:
    """The outputs of `flip_views(images, count)` (leading axis count·B; `pixel_logits`,
    `image_logits`, `type_logits` and optionally the rest) → outputs for the B images:
    `pixel_logits` (each map flipped back), `image_logits` and `type_logits` are the logits of
    the views' mean probabilities (float32). With `det_strides` (the detection head's), the dense
    detection outputs are merged the same way, each view's anchors and box sides mapped back
    (boxes are decoded and suppressed afterwards, as for one view); without, they and every
    other output (reconstruction, embedding) are the unflipped view's."""
    if count == 1:
        return outputs

    def by_view(value: jax.Array) -> jax.Array:  # [count·B, ...] → [count, B, ...]
        # -1, not B = count·B // count: the batch may be symbolic (a dynamic-batch export).
        return value.reshape(count, -1, *value.shape[1:])

    merged = {name: by_view(value)[0] for name, value in outputs.items() if name != "det"}
    if "det" in outputs:  # (MC-dropout samples of the heads carry no boxes)
        if det_strides:
            image_hw = tuple(outputs["pixel_logits"].shape[1:3])
            merged["det"] = _merge_flip_detections(outputs["det"], count, image_hw, det_strides)
        else:
            merged["det"] = {
                name: by_view(value)[0] if name in PER_IMAGE_DET_KEYS else value
                for name, value in outputs["det"].items()
                if name != "box_bins"
            }
    logits = {
        name: by_view(outputs[name].astype(jnp.float32))
        for name in ("pixel_logits", "image_logits", "type_logits")
    }
    maps = [
        jnp.flip(view, axes) if axes else view
        for view, axes in zip(logits["pixel_logits"], FLIP_VIEWS[count], strict=True)
    ]
    merged["pixel_logits"] = _mean_probability_logit(jnp.stack(maps))
    merged["image_logits"] = _mean_probability_logit(logits["image_logits"])
    # log of the mean class distribution (softmax ignores the constant log count).
    log_probs = jax.nn.log_softmax(logits["type_logits"], axis=-1)
    merged["type_logits"] = _logsumexp0(log_probs) - jnp.log(float(count))
    return merged


def image_score(
    outputs: dict,
    topk_fraction: float,
    smoothing: int = 1,
    classifier_weight: float = 0.5,
) -> jax.Array:
    """Image anomaly score `[B]` in [0, 1] (see module docstring) from `pixel_logits [B, H, W]`
    and `image_logits [B]`."""
    pixel_logits = outputs["pixel_logits"].astype(jnp.float32)
    if smoothing > 1:
        maps = scoring.smooth_maps(jax.nn.sigmoid(pixel_logits), smoothing)
        map_score = scoring.topk_mean(maps, topk_fraction)
    else:
        # Top-k on logits then sigmoid: sigmoid is monotonic, so this is the top-k of the
        # probabilities, and the sigmoid runs on k values only.
        batch = pixel_logits.shape[0]
        flat = pixel_logits.reshape(batch, -1)
        k = max(1, int(round(topk_fraction * flat.shape[1])))
        top_logits, _ = jax.lax.top_k(flat, k)
        map_score = mean(jax.nn.sigmoid(top_logits), -1)
    if classifier_weight <= 0.0:
        return map_score
    classifier = jax.nn.sigmoid(outputs["image_logits"].astype(jnp.float32))
    return (1.0 - classifier_weight) * map_score + classifier_weight * classifier


class M2UNet(nn.Module):
    """Multi-scale, multi-modal, uncertainty-aware inspection network (see module docstring).

    Inputs are images `[B, H, W, C]` float32 in [0, 1] (C = stacked modality channels);
    normalisation to [-1, 1] happens inside. H and W may differ from `image_size` as long as the
    patches tile every scale exactly; the position table is resampled.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    modalities: tuple[str, ...] = ("rgb",)
    image_size: int = 256
    scales: tuple[float, ...] = (1.0, 0.5)
    patch_size: int = 16
    patch_stride: int = 16
    fusion_every: int = 2
    posemb: str = "learn"
    dropout_rate: float = 0.1
    mc_dropout_blocks: int = 2
    attention: str = "dot_product"
    scan_blocks: bool = False
    remat: bool = False
    decoder_channels: int = 64
    detail_channels: int = 0
    detail_growth: int = 1
    pixel_head_recon: bool = False
    detach_aux_heads: bool = False
    det_channels: int = 128
    det_decoupled: bool = False
    det_branch_convs: int = 1
    det_norm_groups: int = 0
    det_box_bins: int = 0
    num_defect_classes: int = 4
    det_strides: tuple[int, ...] = (16, 32)
    det_max_detections: int = 32
    det_score_threshold: float = 0.25
    det_iou_threshold: float = 0.5
    det_nms_merge: bool = False
    det_multi_label: bool = False
    image_score_topk: float = 0.01
    image_score_smoothing: int = 1
    image_score_classifier: float = 0.5
    test_time_flips: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone = Backbone(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            modalities=self.modalities,
            image_size=self.image_size,
            scales=self.scales,
            patch_size=self.patch_size,
            patch_stride=self.patch_stride,
            fusion_every=self.fusion_every,
            posemb=self.posemb,
            dropout_rate=self.dropout_rate,
            tail_blocks=self.mc_dropout_blocks,
            attention=self.attention,
            scan_blocks=self.scan_blocks,
            remat=self.remat,
            **common,
        )
        geometry = dict(
            patch_size=self.patch_size,
            patch_stride=self.patch_stride,
            token_scale=max(self.scales),
        )
        self.anomaly_decoder = AnomalyDecoder(
            channels=self.decoder_channels,
            image_channels=self.num_channels,
            dropout_rate=self.dropout_rate,
            compare_recon=self.pixel_head_recon,
            **geometry,
            **common,
        )
        self.detection_head = DetectionHead(
            channels=self.det_channels,
            num_classes=self.num_defect_classes,
            strides=self.det_strides,
            dropout_rate=self.dropout_rate,
            decoupled=self.det_decoupled,
            branch_convs=self.det_branch_convs,
            norm_groups=self.det_norm_groups,
            box_bins=self.det_box_bins,
            **geometry,
            **common,
        )
        if self.detail_channels > 0:
            self.detail_stem = DetailStem(
                channels=self.detail_channels,
                max_stride=self._detail_max_stride(),
                growth=self.detail_growth,
                **common,
            )
        self.image_head = ImageHead(
            num_defect_classes=self.num_defect_classes,
            dropout_rate=self.dropout_rate,
            **common,
        )

    @property
    def score_kwargs(self) -> dict:
        """The image-score rule of this model, as keyword arguments of `image_score`."""
        return dict(
            topk_fraction=self.image_score_topk,
            smoothing=self.image_score_smoothing,
            classifier_weight=self.image_score_classifier,
        )

    @property
    def nms_kwargs(self) -> dict:
        """The box post-processing of this model, as keyword arguments of `boxes.postprocess`."""
        return dict(
            max_detections=self.det_max_detections,
            iou_threshold=self.det_iou_threshold,
            score_threshold=self.det_score_threshold,
            merge=self.det_nms_merge,
            multi_label=self.det_multi_label,
        )

    @property
    def num_channels(self) -> int:
        return sum(MODALITY_CHANNELS[name] for name in self.modalities)

    def _grids(self, image_hw: tuple[int, int]):
        return stream_grids(*image_hw, self.patch_size, self.patch_stride, self.scales)

    def _detail_max_stride(self) -> int:
        """Coarsest detail map the heads use: the decoder's start stride or the first detection
        level, whichever is coarser (the stem doubles its stride per conv up to there)."""
        fine_scale = max(self.scales)
        start = decoder_start_stride(
            self.patch_stride, fine_scale, self.image_size, self.image_size
        )
        stride = 2
        while stride < max(start, self.det_strides[0]):
            stride *= 2
        return stride

    def trunk(self, images: jax.Array, *, train: bool = False):
        """images `[B, H, W, C]` in [0, 1] → (trunk_state, aux): the tokens `[B, N, D]`, or
        with `detail_channels` the dict of tokens and detail maps (module docstring).
        Deterministic unless `train` (the training forward passes through here too)."""
        tokens, aux = self.backbone.trunk(images, train=train)
        if self.detail_channels <= 0:
            return tokens, aux
        state = {"tokens": tokens, "detail": self.detail_stem(images)}
        if self.pixel_head_recon:
            state["images"] = images
        return state, aux

    def stochastic_tail(
        self,
        trunk_state,
        *,
        image_hw: tuple[int, int] | None = None,
        train: bool,
    ) -> tuple[dict, dict]:
        """Trunk state (tokens `[B, N, D]` or the dict of `trunk`) → (outputs, aux): the last
        `mc_dropout_blocks` blocks, the final norm and all heads. `image_hw` (static) is the
        input size, default `(image_size, image_size)`."""
        tokens, detail, images = self._unpack(trunk_state)
        image_hw = tuple(image_hw or (self.image_size, self.image_size))
        grids = self._grids(image_hw)
        lengths = tuple(rows * cols for rows, cols in grids)
        tokens, aux = self.backbone.tail(tokens, lengths, train=train)
        embedding = self._pool(tokens, lengths)
        fine_grid = self._fine_grid(tokens, grids, lengths)
        recon, pixel_logits = self.anomaly_decoder(
            fine_grid, image_hw, train=train, detail=detail, images=images
        )
        head_grid, head_detail, head_embedding = fine_grid, detail, embedding
        if self.detach_aux_heads:  # the same outputs; only the trunk's gradients change
            head_grid, head_detail, head_embedding = jax.lax.stop_gradient(
                (fine_grid, detail, embedding)
            )
        det = self.detection_head(head_grid, image_hw, train=train, detail=head_detail)
        image_logits, type_logits = self.image_head(head_embedding, train=train)
        outputs = dict(
            recon=recon,
            pixel_logits=pixel_logits,
            image_logits=image_logits,
            type_logits=type_logits,
            embedding=embedding.astype(jnp.float32),
            det=det,
        )
        aux = {**aux, "tokens": tokens, "fine_grid": fine_grid}
        return outputs, aux

    def sample_hidden(self, trunk_state, *, image_hw: tuple[int, int] | None = None) -> dict:
        """With `mc_dropout_blocks == 0`: trunk state → the deterministic part of
        `stochastic_tail` that feeds the statistics (the decoder's maps before its dropout, the
        pooled embedding, the input where the pixel head compares with it). An opaque pytree
        for `sample_outputs`; MC dropout computes it once for all T samples."""
        if self.mc_dropout_blocks:
            raise ValueError("sample_hidden needs model.mc_dropout_blocks=0 (dropout in blocks)")
        tokens, detail, images = self._unpack(trunk_state)
        image_hw = tuple(image_hw or (self.image_size, self.image_size))
        grids = self._grids(image_hw)
        lengths = tuple(rows * cols for rows, cols in grids)
        tokens, _ = self.backbone.tail(tokens, lengths, train=False)
        fine_grid = self._fine_grid(tokens, grids, lengths)
        decoder = self.anomaly_decoder(
            fine_grid, image_hw, train=False, detail=detail, part="hidden"
        )
        return dict(decoder=decoder, embedding=self._pool(tokens, lengths), images=images)

    def sample_outputs(self, hidden: dict, *, image_hw: tuple[int, int], train: bool) -> dict:
        """`sample_hidden`'s pytree → `pixel_logits`, `image_logits`, `type_logits` as
        `stochastic_tail` computes them with the same dropout key (no reconstruction: the
        statistics do not read it)."""
        _, pixel_logits = self.anomaly_decoder(
            hidden["decoder"],
            image_hw,
            train=train,
            images=hidden["images"],
            part="output",
            with_recon=False,
        )
        image_logits, type_logits = self.image_head(hidden["embedding"], train=train)
        return dict(pixel_logits=pixel_logits, image_logits=image_logits, type_logits=type_logits)

    @staticmethod
    def _unpack(trunk_state):
        """trunk state → (tokens, detail maps or None, input images or None)."""
        if isinstance(trunk_state, dict):
            return trunk_state["tokens"], trunk_state["detail"], trunk_state.get("images")
        return trunk_state, None, None

    def _fine_grid(self, tokens, grids, lengths) -> jax.Array:
        """The finest scale's tokens as a grid `[B, rows, cols, D]` (what the heads see)."""
        fine = max(range(len(self.scales)), key=lambda index: self.scales[index])
        start = sum(lengths[:fine])
        rows, cols = grids[fine]
        return tokens[:, start : start + rows * cols].reshape(-1, rows, cols, self.width)

    @staticmethod
    def _pool(tokens: jax.Array, lengths: tuple[int, ...]) -> jax.Array:
        """Mean over each stream's tokens, then over streams (each scale counts equally)."""
        means, start = [], 0
        for length in lengths:
            means.append(mean(tokens[:, start : start + length].astype(jnp.float32), 1))
            start += length
        return sum(means) / len(means)

    def __call__(
        self, images: jax.Array, *, train: bool, dropout_tail_only: bool = False
    ) -> tuple[dict, dict]:
        """images `[B, H, W, C]` in [0, 1] → (outputs, aux) per docs/interfaces.md.

        `dropout_tail_only=True` keeps the trunk deterministic while the tail uses dropout (with
        `train=True`): exactly one MC-dropout sample, as `uncertainty.mc_dropout_predict` draws
        them."""
        trunk_state, trunk_aux = self.trunk(images, train=train and not dropout_tail_only)
        outputs, tail_aux = self.stochastic_tail(
            trunk_state, image_hw=images.shape[1:3], train=train
        )
        return outputs, {**trunk_aux, **tail_aux}

    def embed(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images → pooled, final-normalised backbone embedding `[B, D]` (no heads)."""
        tokens, _ = self.backbone(images, train=train)
        grids = self._grids(images.shape[1:3])
        return self._pool(tokens, tuple(rows * cols for rows, cols in grids))

    def predict(self, images: jax.Array) -> dict[str, jax.Array]:
        """Deterministic inference → `anomaly_map [B, H, W]` (sigmoid of the pixel logits),
        `image_score [B]`, `image_prob [B]` (sigmoid(image_logits)), `type_probs [B, K+1]`,
        and post-processed boxes: `boxes_xyxy [B, M, 4]`, `box_scores [B, M]`,
        `box_classes [B, M]`, `box_valid [B, M]` (M = det_max_detections). With
        `test_time_flips` > 1 the probabilities are means over the flips (`merge_flip_views`)."""
        outputs, _ = self(flip_views(images, self.test_time_flips), train=False)
        return predictions_from_outputs(
            merge_flip_views(outputs, self.test_time_flips, self.det_strides),
            score_kwargs=self.score_kwargs,
            nms_kwargs=self.nms_kwargs,
        )


def predictions_from_outputs(
    outputs: dict,
    *,
    score_kwargs: dict,
    nms_kwargs: dict,
) -> dict[str, jax.Array]:
    """Model outputs → the prediction dict of `M2UNet.predict` (pure, jit-able); `score_kwargs`
    and `nms_kwargs` are the model's (`M2UNet.score_kwargs`, `.nms_kwargs`)."""
    detections = boxes.postprocess(outputs["det"], **nms_kwargs)
    return dict(
        anomaly_map=jax.nn.sigmoid(outputs["pixel_logits"]),
        image_score=image_score(outputs, **score_kwargs),
        image_prob=jax.nn.sigmoid(outputs["image_logits"]),
        type_probs=jax.nn.softmax(outputs["type_logits"], axis=-1),
        boxes_xyxy=detections["boxes_xyxy"],
        box_scores=detections["scores"],
        box_classes=detections["classes"],
        box_valid=detections["valid"],
    )


def views_trunk(model: M2UNet, variables, images: jax.Array):
    """`M2UNet.trunk` (deterministic) of the `test_time_flips` views of `images`: the trunk state
    of `flip_views(images, model.test_time_flips)`, whose tail outputs `merge_flip_views`
    merges (MC dropout, ensembles and the exported graph start here)."""
    views = flip_views(images, model.test_time_flips)
    return model.apply(variables, views, train=False, method=M2UNet.trunk)[0]


def predict(model: M2UNet, variables, images: jax.Array) -> dict[str, jax.Array]:
    """Jitted `M2UNet.predict`: images `[B, H, W, C]` in [0, 1] → predictions (see there).
    Thresholds come from the model's fields (set from config.model by `build_model`)."""
    return _jitted_predict(model, variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_predict(model, variables, images):
    return model.apply(variables, images, method=M2UNet.predict)


def build_model(model_config: ml_collections.ConfigDict) -> M2UNet:
    """`config.model` → M2UNet. Raises ValueError naming the key for unknown variants, dtypes,
    attention forms or position embeddings."""
    if model_config.variant not in VARIANTS:
        raise ValueError(f"model.variant={model_config.variant!r} is not one of {sorted(VARIANTS)}")
    for key in ("dtype", "param_dtype"):
        if model_config[key] not in DTYPES:
            raise ValueError(f"model.{key}={model_config[key]!r} is not one of {sorted(DTYPES)}")
    if model_config.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention={model_config.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    if model_config.posemb not in ("learn", "sincos2d"):
        raise ValueError(f"model.posemb={model_config.posemb!r}: use 'learn' or 'sincos2d'")
    modalities = split_list(model_config.modalities)
    for name in modalities:
        if name not in MODALITY_CHANNELS:
            raise ValueError(
                f"model.modalities has unknown modality {name!r}; "
                f"known: {sorted(MODALITY_CHANNELS)}"
            )
    if int(model_config.num_defect_classes) < 1:
        raise ValueError(
            f"model.num_defect_classes={model_config.num_defect_classes}: 0 ('from the data') "
            "must be resolved before the model is built (train.py does; eval and export read "
            "the run's config.json)"
        )
    if model_config.test_time_flips not in FLIP_VIEWS:
        raise ValueError(
            f"model.test_time_flips={model_config.test_time_flips!r} is not one of "
            f"{sorted(FLIP_VIEWS)}"
        )
    variant = VARIANTS[model_config.variant]
    if not 0 <= model_config.mc_dropout_blocks <= variant["depth"]:
        raise ValueError(
            f"model.mc_dropout_blocks={model_config.mc_dropout_blocks} must be in "
            f"[0, {variant['depth']}] (depth of variant {model_config.variant!r})"
        )
    return M2UNet(
        **variant,
        modalities=modalities,
        image_size=int(model_config.image_size),
        scales=tuple(float(scale) for scale in model_config.scales),
        patch_size=int(model_config.patch_size),
        patch_stride=int(model_config.patch_stride),
        fusion_every=int(model_config.fusion_every),
        posemb=model_config.posemb,
        dropout_rate=float(model_config.dropout_rate),
        mc_dropout_blocks=int(model_config.mc_dropout_blocks),
        attention=model_config.attention,
        scan_blocks=bool(model_config.scan_blocks),
        remat=bool(model_config.remat),
        decoder_channels=int(model_config.decoder_channels),
        detail_channels=int(model_config.detail_channels),
        detail_growth=int(model_config.detail_growth),
        pixel_head_recon=bool(model_config.pixel_head_recon),
        # 'auto' is resolved by the trainer (config.resolve_detach_aux_heads); anywhere else the
        # forward pass is the same either way, so unresolved means off.
        detach_aux_heads=model_config.detach_aux_heads == "always",
        det_channels=int(model_config.det_channels),
        det_decoupled=bool(model_config.det_decoupled),
        det_branch_convs=int(model_config.det_branch_convs),
        det_norm_groups=int(model_config.det_norm_groups),
        det_box_bins=int(model_config.det_box_bins),
        num_defect_classes=int(model_config.num_defect_classes),
        det_strides=tuple(int(stride) for stride in model_config.det_strides),
        det_max_detections=int(model_config.det_max_detections),
        det_score_threshold=float(model_config.det_score_threshold),
        det_iou_threshold=float(model_config.det_iou_threshold),
        det_nms_merge=bool(model_config.det_nms_merge),
        det_multi_label=bool(model_config.det_multi_label),
        image_score_topk=float(model_config.image_score_topk),
        image_score_smoothing=int(model_config.image_score_smoothing),
        image_score_classifier=float(model_config.image_score_classifier),
        test_time_flips=int(model_config.test_time_flips),
        dtype=DTYPES[model_config.dtype],
        param_dtype=DTYPES[model_config.param_dtype],
    )


def example_images(config: ml_collections.ConfigDict, batch: int = 1) -> jax.ShapeDtypeStruct:
    """The model input of `config`: `[batch, side, side, channels]` float32 (spec only)."""
    side = int(config.data.image_size)
    return jax.ShapeDtypeStruct(
        (batch, side, side, num_channels(config.data.modalities)), jnp.float32
    )


def init_params(network: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh `params` of `network` (an M2UNet or a wrapper of one taking images) at `config`'s
    input size; `rng` is split into the params and dropout keys. Works under jit/eval_shape."""
    params_rng, dropout_rng = jax.random.split(rng)
    images = jnp.zeros(example_images(config).shape, jnp.float32)
    return network.init({"params": params_rng, "dropout": dropout_rng}, images, train=False)[
        "params"
    ]
