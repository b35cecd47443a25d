"""Heads on the fused fine-scale token grid: the anomaly decoder (reconstruction + pixel
logits), the YOLO-style anchor-free detection head, the image-level classifier, and a projection
MLP for contrastive pretraining.

The convolutional heads use SiLU (as YOLO heads do); besides being cheap, it keeps the ONNX
export clean — jax2onnx 0.17 mis-shapes a tanh-GELU between two convolutions (ONNX Runtime then
rejects the graph), while SiLU and exact GELU convert correctly.

Every head takes the token grid `[B, gh, gw, D]` of the finest scale stream plus the static
input size, and puts it on its own pixel grid with `token_alignment_matrix` (bilinear between
token centres; the identity — no op at all — when patch size == patch stride == the head's
stride). Convolutions use SAME padding; no batch norm, so heads are pure functions of their
parameters (MC dropout and ensembles need no state).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2u_jax.layers import Dtype, resample_grid, token_alignment_matrix, upsample2x_bilinear

# Prior probability of the positive class for the bias init of focal-loss logits
# (RetinaNet): the first steps are not swamped by the easy negatives.
PRIOR_PROBABILITY = 0.01


def prior_logit(prior: float = PRIOR_PROBABILITY) -> float:
    return float(-np.log((1.0 - prior) / prior))


class TokenGeometry(nn.Module):
    """Base of the convolutional heads: where the tokens of the finest stream sit in the image
    (patch size / stride, image scale of the stream), the dtypes, and `align`."""

    patch_size: int = 16
    patch_stride: int = 16
    token_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def align(self, grid: jax.Array, image_hw: tuple[int, int], out_stride: int) -> jax.Array:
        """Token grid `[B, gh, gw, C]` → `[B, H/out_stride, W/out_stride, C]`."""
        height, width = image_hw
        geometry = dict(
            patch_size=self.patch_size, patch_stride=self.patch_stride, scale=self.token_scale
        )
        rows = token_alignment_matrix(
            grid.shape[1], out_size=height // out_stride, out_stride=out_stride, **geometry
        )
        cols = token_alignment_matrix(
            grid.shape[2], out_size=width // out_stride, out_stride=out_stride, **geometry
        )
        return resample_grid(grid, rows, cols)


def decoder_start_stride(patch_stride: int, token_scale: float, height: int, width: int) -> int:
    """Largest power of two ≤ the token stride (in input pixels) dividing both image sides:
    the decoder starts there and doubles the resolution each stage."""
    token_stride = patch_stride / token_scale
    stride = 1
    while stride * 2 <= token_stride and height % (stride * 2) == 0 and width % (stride * 2) == 0:
        stride *= 2
    return stride


class DetailStem(nn.Module):
    """Full-resolution convolutional features for the heads (U-Net / FPN-style skips).

    The token grid is coarse (one token per `patch_stride` pixels), so on its own it cannot place
    a 1-2 pixel crack to the pixel. This stem keeps what the patchify step throws away: 3×3
    stride-2 convs + SiLU on the input (normalised to [-1, 1] like the backbone's input) give
    maps at strides 2, 4, …, `max_stride`, `channels` wide at stride 2 and `growth` times wider
    at each next stride (2 = a CNN backbone's doubling: each map after the first costs about the
    same FLOPs).
    The anomaly decoder's pixel-logit path and the detection head's first level concatenate the
    map of their stride; the reconstruction path never sees them, so it still cannot copy a
    defect from the input. It is deterministic and runs in the trunk (once per image under MC
    dropout).

    Returns {stride: `[B, H/stride, W/stride, channels · growth^(log2(stride) − 1)]`} for
    strides 2, 4, …, `max_stride`.
    """

    channels: int = 16
    max_stride: int = 8
    growth: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[int, jax.Array]:
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = (images.astype(jnp.float32) * 2.0 - 1.0).astype(self.dtype)
        if self.growth < 1:
            raise ValueError(f"model.detail_growth must be >= 1, got {self.growth}")
        maps, stride, width = {}, 1, self.channels
        while stride < self.max_stride:
            if stride > 1:
                width *= self.growth
            stride *= 2
            features = nn.silu(
                nn.Conv(width, (3, 3), strides=(2, 2), name=f"conv_s{stride}", **conv)(features)
            )
            maps[stride] = features
        return maps


class AnomalyDecoder(TokenGeometry):
    """Light upsampling decoder → (recon `[B, H, W, C]` in [0, 1], pixel_logits `[B, H, W]`).

    1×1 projection to `channels` at the start stride (`decoder_start_stride`), then per ×2
    stage: bilinear ×2 upsampling and a 3×3 conv + SiLU, channels halving down to 16, until
    stride 2. Dropout, then a 1×1 conv gives C + 1 maps (image channels + anomaly logit) at
    stride 2 and a last bilinear ×2 brings them to full size: the 1×1 conv and the bilinear
    upsampling are both linear with weights summing to one, so this equals convolving at full
    size at a quarter of the cost. No skip connection from the input, so the reconstruction
    cannot copy defects.

    Dropout sits only before the output convs (last-layer dropout): under MC dropout
    everything before it does not depend on the dropout key, so it runs once (`part='hidden'`)
    and T samples repeat only the 1×1 convs and the upsampling (`part='output'`, without the
    reconstruction).
    """

    channels: int = 64
    image_channels: int = 3
    dropout_rate: float = 0.0
    compare_recon: bool = False

    @nn.compact
    def __call__(
        self,
        inputs,
        image_hw: tuple[int, int],
        *,
        train: bool,
        detail: dict[int, jax.Array] | None = None,
        images: jax.Array | None = None,
        part: str = "all",
        with_recon: bool = True,
    ):
        """The token grid `inputs` `[B, h, w, D]` → (recon, pixel_logits).

        `detail` ({stride: map} from `DetailStem`) adds the pixel-logit path below.

        With `compare_recon` (needs `detail` and the input `images` [B, H, W, C] in [0, 1]) the
        pixel path also sees the input next to its own reconstruction, DRAEM-style: a stride-2
        conv over [input, recon, |input - recon|] joins the last stage of the pixel path, so
        the logits can flag where the image departs from what the decoder expects there.

        `part` splits the call at the dropout, for MC dropout: 'hidden' returns the maps right
        before it (`{'features', 'pixel_path'}`, deterministic: `train` is unused); 'output'
        takes that dict as `inputs` and runs dropout and the output layers; 'all' is both.
        `with_recon=False` (MC dropout's statistics) skips the reconstruction where the pixel
        logits do not read it and returns None for it; the pixel logits are the same."""
        if part not in ("all", "hidden", "output"):
            raise ValueError(f"AnomalyDecoder part={part!r}: expected 'all', 'hidden' or 'output'")
        hidden = inputs if part == "output" else self._hidden(inputs, image_hw, detail)
        if part == "hidden":
            return hidden
        return self._output(hidden, image_hw, train=train, images=images, with_recon=with_recon)

    def _hidden(self, grid, image_hw, detail) -> dict:
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        height, width = image_hw
        stride = decoder_start_stride(self.patch_stride, self.token_scale, height, width)
        features = nn.Conv(self.channels, (1, 1), name="proj", **conv)(grid)
        features = nn.silu(self.align(features, image_hw, stride))
        channels, stage = self.channels, 0
        floor = min(16, self.channels)
        # With detail maps, the pixel logits get their own path: at every stage whose stride the
        # stem has, [decoder features, pixel path so far (upsampled), detail] → 3×3 conv + SiLU.
        pixel_path = None

        def merge_detail(pixel_path, features, stride, stage_name):
            if not detail or stride not in detail:
                return pixel_path
            parts = [features, detail[stride].astype(features.dtype)]
            if pixel_path is not None:
                parts.append(upsample2x_bilinear(pixel_path))
            merged = nn.Conv(features.shape[-1], (3, 3), name=f"pixel_{stage_name}", **conv)(
                jnp.concatenate(parts, axis=-1)
            )
            return nn.silu(merged)

        pixel_path = merge_detail(pixel_path, features, stride, "start")
        while stride > 2:
            channels = max(channels // 2, floor)
            features = upsample2x_bilinear(features)
            features = nn.silu(nn.Conv(channels, (3, 3), name=f"up_{stage}", **conv)(features))
            stride, stage = stride // 2, stage + 1
            pixel_path = merge_detail(pixel_path, features, stride, str(stage - 1))
        return dict(features=features, pixel_path=pixel_path)

    def _output(
        self, hidden: dict, image_hw, *, train: bool, images, with_recon: bool = True
    ) -> tuple[jax.Array | None, jax.Array]:
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features, pixel_path = hidden["features"], hidden["pixel_path"]
        stride = image_hw[0] // features.shape[1]
        dropout = nn.Dropout(self.dropout_rate)  # one module, an independent mask per call
        if pixel_path is None:
            features = dropout(features, deterministic=not train)
            maps = nn.Conv(self.image_channels + 1, (1, 1), name="out", **conv)(features)
        else:
            if with_recon or self.compare_recon:
                features = dropout(features, deterministic=not train)
                recon_maps = nn.Conv(self.image_channels, (1, 1), name="out", **conv)(features)
            else:
                # Without the reconstruction, only draw this mask's key (an empty mask), so
                # the pixel path's mask below is the one a full call draws with the same key.
                dropout(features[..., :0], deterministic=not train)
                recon_maps = None
            if self.compare_recon:
                pixel_path = self._compare(pixel_path, recon_maps, images, stride)
            pixel_path = dropout(pixel_path, deterministic=not train)
            logit_map = nn.Conv(1, (1, 1), name="pixel_out", **conv)(pixel_path)
            parts = [logit_map] if recon_maps is None else [recon_maps, logit_map]
            maps = jnp.concatenate(parts, axis=-1)
        while stride > 1:
            maps = upsample2x_bilinear(maps)
            stride //= 2
        maps = maps.astype(jnp.float32)
        pixel_logits = maps[..., -1]
        if maps.shape[-1] == 1:  # the logit map only
            return None, pixel_logits
        return jax.nn.sigmoid(maps[..., : self.image_channels]), pixel_logits

    def _compare(
        self, pixel_path: jax.Array, recon_maps: jax.Array, images: jax.Array, stride: int
    ) -> jax.Array:
        """Pixel path `[B, H/s, W/s, c]` (s = `stride`, 2) joined with a conv over the input and
        the reconstruction (full size, upsampled from the stride-s recon logits)."""
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if images is None or stride != 2:
            raise ValueError("compare_recon needs the input images and a stride-2 pixel path")
        recon = recon_maps
        for _ in range(stride // 2):
            recon = upsample2x_bilinear(recon)
        recon = jax.nn.sigmoid(recon.astype(jnp.float32))
        images = images.astype(jnp.float32)
        pair = jnp.concatenate([images, recon, jnp.abs(images - recon)], axis=-1) * 2.0 - 1.0
        width = pixel_path.shape[-1]
        compared = nn.silu(
            nn.Conv(width, (3, 3), strides=(2, 2), name="compare_in", **conv)(
                pair.astype(self.dtype)
            )
        )
        merged = jnp.concatenate([pixel_path, compared.astype(pixel_path.dtype)], axis=-1)
        return nn.silu(nn.Conv(width, (3, 3), name="compare_merge", **conv)(merged))


# The detection outputs with a leading batch axis; `points` and `strides` are per anchor.
PER_IMAGE_DET_KEYS = ("obj_logits", "cls_logits", "box_ltrb")


class DetectionHead(TokenGeometry):
    """YOLO-style anchor-free head at `strides` (≥ 1 level; pixels).

    Level features: a 1×1 projection of the token grid to `channels`, put on the first level's
    grid by `align`; each next level is a stride-2 3×3 conv of the previous one when its stride
    is exactly twice as coarse, else the projection re-aligned to its grid. Each level gets its
    own 3×3 conv ('neck_l'), then a head shared by all levels (3×3 conv + SiLU, then one 1×1
    conv for objectness, K class logits and 4 box distances; FCOS-style sharing, since distances
    are in units of the level stride). Box distances = softplus(raw) × stride (non-negative pixels).
    With `decoupled`, the shared head has two branches, as YOLOX's: the class logits come from a
    3×3 conv + SiLU of their own, objectness and box distances from the other. `branch_convs`
    stacks that many 3×3 conv + SiLU layers in each branch (YOLOX has 2; 1 = the layout above).
    `norm_groups` > 0 puts a GroupNorm of that many groups between every 3×3 conv of the head
    (neck, down and branch convs) and its SiLU, as FCOS does (shared by the levels like the
    convs); 0 = no normalisation. `box_bins` = R ≥ 2 predicts each box side as a distribution
    over the R distances 0, 1, …, R−1 strides (GFL / YOLOv8): the distance is its expectation
    × stride, at most (R−1)·stride, and the logits `box_bins [B, A, 4, R]` are returned too
    for the distribution focal loss; 0 = the softplus distances above.

    Returns `det` per docs/interfaces.md: `obj_logits [B, A]`, `cls_logits [B, A, K]`,
    `box_ltrb [B, A, 4]`, `points [A, 2]` (cell centres x, y), `strides [A]`, all float32; the
    anchors run level by level, row-major within a level.
    """

    channels: int = 128
    num_classes: int = 4
    strides: tuple[int, ...] = (16, 32)
    dropout_rate: float = 0.0
    decoupled: bool = False
    branch_convs: int = 1
    norm_groups: int = 0
    box_bins: int = 0

    @nn.compact
    def __call__(
        self,
        grid: jax.Array,
        image_hw: tuple[int, int],
        *,
        train: bool,
        detail: dict[int, jax.Array] | None = None,
    ) -> dict[str, jax.Array]:
        """`detail` ({stride: map} from `DetailStem`): the first level concatenates the map of
        its stride before its neck conv (later levels inherit it through `down_l`)."""
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        height, width = image_hw
        for stride in self.strides:
            if height % stride or width % stride:
                raise ValueError(
                    f"model.det_strides entry {stride} does not divide the {height}x{width} input"
                )
        if self.branch_convs < 1:
            raise ValueError(f"model.det_branch_convs must be >= 1, got {self.branch_convs}")
        if self.box_bins < 0 or self.box_bins == 1:
            raise ValueError(f"model.det_box_bins must be 0 or >= 2, got {self.box_bins}")
        if self.norm_groups < 0 or (self.norm_groups and self.channels % self.norm_groups):
            raise ValueError(
                f"model.det_norm_groups={self.norm_groups} must be 0 or divide "
                f"model.det_channels={self.channels}"
            )

        def norm(name: str):
            # None without normalisation (`_stack` then goes straight from conv to SiLU).
            if not self.norm_groups:
                return None
            return nn.GroupNorm(num_groups=self.norm_groups, name=f"{name}_norm", **conv)

        projected = nn.silu(nn.Conv(self.channels, (1, 1), name="proj", **conv)(grid))
        # Layer 0 keeps the names of the one-layer head, so its checkpoints restore unchanged.
        head_names = ["head_conv" + (f"_{i}" if i else "") for i in range(self.branch_convs)]
        head_convs = [nn.Conv(self.channels, (3, 3), name=name, **conv) for name in head_names]
        head_norms = [norm(name) for name in head_names]
        # One 1x1 conv predicts [objectness, K class logits, 4 box distances] (decoupled: [obj,
        # 4 box distances] here, the K class logits from their own branch): one matmul instead
        # of three; focal-loss logits start at the prior, box logits at zero.
        num_logits = 1 + self.num_classes
        head_logits = 1 if self.decoupled else num_logits
        # Box outputs per anchor: 4 softplus distances, or 4 × R bin logits (zero: each side's
        # distribution starts uniform).
        box_outputs = 4 * (self.box_bins or 1)
        predict = nn.Conv(
            head_logits + box_outputs,
            (1, 1),
            bias_init=lambda key, shape, dtype: jnp.concatenate(
                [jnp.full((head_logits,), prior_logit(), dtype), jnp.zeros((box_outputs,), dtype)]
            ),
            name="predict",
            **conv,
        )
        if self.decoupled:
            cls_names = ["cls_conv" + (f"_{i}" if i else "") for i in range(self.branch_convs)]
            cls_convs = [nn.Conv(self.channels, (3, 3), name=name, **conv) for name in cls_names]
            cls_norms = [norm(name) for name in cls_names]
            cls_predict = nn.Conv(
                self.num_classes,
                (1, 1),
                bias_init=nn.initializers.constant(prior_logit()),
                name="cls_predict",
                **conv,
            )
        predictions, bin_logits = [], []
        previous, previous_stride = None, None
        for level, stride in enumerate(self.strides):
            if previous is not None and stride == 2 * previous_stride:
                down = nn.Conv(self.channels, (3, 3), strides=(2, 2), name=f"down_{level}", **conv)
                features = _stack([down], [norm(f"down_{level}")], previous)
            else:
                features = self.align(projected, image_hw, stride)
                if detail and stride in detail:
                    features = jnp.concatenate(
                        [features, detail[stride].astype(features.dtype)], axis=-1
                    )
            previous, previous_stride = features, stride
            neck = nn.Conv(self.channels, (3, 3), name=f"neck_{level}", **conv)
            features = _stack([neck], [norm(f"neck_{level}")], features)
            # Dropout before the last 1x1 conv only, as in the decoder (cheap MC samples).
            branch = _stack(head_convs, head_norms, features)
            branch = nn.Dropout(self.dropout_rate)(branch, deterministic=not train)
            level_predictions = _flatten_cells(predict(branch))
            if self.decoupled:
                cls_branch = _stack(cls_convs, cls_norms, features)
                cls_branch = nn.Dropout(self.dropout_rate)(cls_branch, deterministic=not train)
                level_predictions = jnp.concatenate(
                    [
                        level_predictions[..., :1],
                        _flatten_cells(cls_predict(cls_branch)),
                        level_predictions[..., 1:],
                    ],
                    axis=-1,
                )
            box_logits = level_predictions[..., num_logits:]
            if self.box_bins:
                box_logits = box_logits.reshape(*box_logits.shape[:-1], 4, self.box_bins)
                bin_logits.append(box_logits)
                distances = expected_bin(box_logits) * stride
            else:
                distances = jax.nn.softplus(box_logits) * stride
            predictions.append(
                jnp.concatenate([level_predictions[..., :num_logits], distances], axis=-1)
            )
        predictions = jnp.concatenate(predictions, axis=1)  # [B, A, 1 + K + 4]
        points, strides = anchor_points(image_hw, self.strides)
        det = dict(
            obj_logits=predictions[..., 0],
            cls_logits=predictions[..., 1:num_logits],
            box_ltrb=predictions[..., num_logits:],
            points=jnp.asarray(points),
            strides=jnp.asarray(strides),
        )
        if bin_logits:
            det["box_bins"] = jnp.concatenate(bin_logits, axis=1)  # [B, A, 4, R]
        return det


def expected_bin(bin_logits: jax.Array) -> jax.Array:
    """`[..., R]` logits over the bins 0, 1, …, R−1 → `[...]` the expected bin (float32)."""
    bins = jnp.arange(bin_logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(bin_logits.astype(jnp.float32), axis=-1) @ bins


def _stack(convs: list[nn.Conv], norms: list, features: jax.Array) -> jax.Array:
    """conv (+ its norm, where not None) + SiLU, layer after layer."""
    for layer, norm in zip(convs, norms, strict=True):
        features = layer(features)
        if norm is not None:
            features = norm(features)
        features = nn.silu(features)
    return features


def _flatten_cells(values: jax.Array) -> jax.Array:
    """`[B, rows, cols, F]` → `[B, rows*cols, F]` float32 (row-major cells)."""
    batch, rows, cols, features = values.shape
    return values.reshape(batch, rows * cols, features).astype(jnp.float32)


def anchor_points(
    image_hw: tuple[int, int], strides: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The `(points [A, 2], strides [A])` the detection head emits for an input size (numpy),
    for target assignment outside the model."""
    points, point_strides = [], []
    for stride in strides:
        ys, xs = np.mgrid[: image_hw[0] // stride, : image_hw[1] // stride]
        points.append((np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1) + 0.5) * stride)
        point_strides.append(np.full((xs.size,), stride))
    return (
        np.concatenate(points).astype(np.float32),
        np.concatenate(point_strides).astype(np.float32),
    )


class ImageHead(nn.Module):
    """Pooled embedding `[B, D]` → (image_logits `[B]` "defective", type_logits `[B, K+1]`
    with 0 = good). Dropout first, so MC dropout samples the classifier too."""

    num_defect_classes: int = 4
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embedding: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        features = nn.Dropout(self.dropout_rate)(embedding, deterministic=not train)
        image_logits = nn.Dense(1, name="image", **dense)(features)[:, 0]
        type_logits = nn.Dense(self.num_defect_classes + 1, name="type", **dense)(features)
        return image_logits.astype(jnp.float32), type_logits.astype(jnp.float32)
