"""MS-ViT: multi-scale, multi-modal patch generation (MSPG) and a pre-LN transformer shared by
every scale stream, with cross-scale attention fusion.

Token layout. Every scale in `scales` is one token stream; the streams are laid end to end on
one token axis, `[B, N_1 + N_2 + ..., D]`, in the order of `scales`. All per-token work (layer
norms, projections, MLPs) runs once over that joint axis — one large matmul per layer instead of
one per stream — and only the attention core is split per stream on static slices. That equals
running the shared block on every stream (a block-diagonal mask on the joint sequence) without
the masked FLOPs: for 256 + 64 tokens it computes 256² + 64² scores instead of 320² (-32%), and
needs no mask, so cuDNN flash attention stays usable.

Layer sequence. Block `i` is followed by a cross-scale fusion (each stream cross-attends to the
others) when `(i + 1) % fusion_every == 0`; fusion `k` follows block `(k+1)*fusion_every - 1`.
With one scale, or `fusion_every == 0`, there is no fusion. The last `tail_blocks` blocks (and
the fusions after them) form the *stochastic tail* that MC dropout samples; the rest is the
*trunk*, which runs once (`Backbone.trunk` / `Backbone.tail`).

Parameters. Unrolled (`scan_blocks=False`): `block_00 … block_{depth-1}`, `fusion_00 …`.
Scanned (`scan_blocks=True`): runs of ≥ 2 consecutive complete *fusion periods* (`fusion_every`
blocks + their fusion; or single blocks when there is no fusion) inside the trunk or inside the
tail become one `nn.scan` named `scan_<first block>` whose parameters carry a leading period axis
(`block_0 … block_{F-1}`, `fusion`); the remaining layers keep their unrolled names.
`unroll_scanned_params` / `scan_params_like` convert between the two layouts exactly. The
unrolled names do not depend on `tail_blocks` (= model.mc_dropout_blocks); the scanned grouping
does, so convert through the unrolled layout when changing it for a scanned checkpoint.

Remat (`remat=True`) wraps every block and fusion in `nn.remat` with the policy
`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: the outputs of the weight matmuls
(q/k/v, output projection, MLP) are saved; the attention scores and probabilities
(`[B, heads, N, N]`, the activations that grow fastest with the token count), layer-norm, GELU
and dropout results are dropped and recomputed. The backward pass then redoes no weight matmul
— only the attention core and elementwise work — for a few percent of extra FLOPs, where
`nothing_saveable` would cost a whole second forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2u_jax.layers import (
    Dtype,
    MlpBlock,
    MultiStreamAttention,
    downsample,
    interpolation_matrix,
    resample_grid,
    sincos_2d_posemb,
)
from m2u_jax.modalities import MODALITY_CHANNELS

# Backbone sizes. S and B are the ViT-S/16 and ViT-B/16 shapes (so AugReg / big_vision
# checkpoints load); tiny is for tests and CPU demos; tiny4 is tiny at twice the depth (measured
# for real data on CPU in docs/quality.md: behind tiny at the same training minutes).
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=2, num_heads=2, mlp_dim=128),
    "tiny4": dict(width=64, depth=4, num_heads=2, mlp_dim=128),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
}

REMAT_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


# ----------------------------------------------------------------------------- geometry


def token_grid(side: int, patch_size: int, patch_stride: int, scale: float) -> int:
    """Tokens along one image side of `side` pixels at `scale` (overlapping when stride <
    size). Raises ValueError when the patches do not tile the scaled side exactly."""
    scaled = side * scale
    if scaled != int(scaled) or int(scaled) < patch_size:
        raise ValueError(
            f"a {side}px side at model.scales entry {scale} is {scaled}px: fractional or smaller "
            f"than model.patch_size={patch_size}"
        )
    if (int(scaled) - patch_size) % patch_stride:
        raise ValueError(
            f"a {int(scaled)}px side (image {side}px at scale {scale}) is not tiled exactly by "
            f"{patch_size}px patches at stride {patch_stride}"
        )
    return (int(scaled) - patch_size) // patch_stride + 1


def stream_grids(
    height: int, width: int, patch_size: int, patch_stride: int, scales: Sequence[float]
) -> tuple[tuple[int, int], ...]:
    """Token grid `(rows, cols)` of every scale stream for a `height × width` image."""
    return tuple(
        (
            token_grid(height, patch_size, patch_stride, scale),
            token_grid(width, patch_size, patch_stride, scale),
        )
        for scale in scales
    )


def token_centres(num_tokens: int, patch_size: int, patch_stride: int, scale: float):
    """Centres (input-image pixels, continuous coordinates) of the tokens along one axis."""
    return (np.arange(num_tokens) * patch_stride + patch_size / 2.0) / scale


def posemb_matrix(
    base_tokens: int,
    base_side: int,
    out_tokens: int,
    out_side: int,
    *,
    patch_size: int,
    patch_stride: int,
    scale: float,
) -> np.ndarray:
    """`[out_tokens, base_tokens]` bilinear weights that resample the scale-1 position grid of a
    `base_side` image onto the token axis of a stream at `scale` of an `out_side` image. Tokens
    are matched by their relative position in the image (centre / side), so a coarse stream
    gets the embedding of the image region it covers, and a larger input stretches the grid.
    The identity when the geometry is unchanged."""
    relative = token_centres(out_tokens, patch_size, patch_stride, scale) / out_side
    source = (relative * base_side - patch_size / 2.0) / patch_stride
    return interpolation_matrix(source, base_tokens)


# ----------------------------------------------------------------------------- layer plan


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One entry of the backbone's layer sequence.

    kind 'block' (index = block number), 'fusion' (index = fusion number) or 'scan'
    (index = first block, num_periods periods of `period_blocks` blocks + optional fusion).
    """

    kind: str
    index: int
    num_periods: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.index:02d}"


def fusion_enabled(num_scales: int, fusion_every: int) -> bool:
    return num_scales > 1 and fusion_every > 0


def backbone_plan(
    depth: int, fusion_every: int, num_scales: int, tail_blocks: int, scan: bool
) -> tuple[tuple[LayerSpec, ...], tuple[LayerSpec, ...]]:
    """(trunk layers, tail layers) of the backbone; see the module docstring."""
    if not 0 <= tail_blocks <= depth:
        raise ValueError(f"model.mc_dropout_blocks={tail_blocks} must be in [0, depth={depth}]")
    fuse = fusion_enabled(num_scales, fusion_every)
    split = depth - tail_blocks
    parts: tuple[list, list] = ([], [])
    for block in range(depth):
        part = parts[0] if block < split else parts[1]
        part.append(LayerSpec("block", block))
        if fuse and (block + 1) % fusion_every == 0:
            part.append(LayerSpec("fusion", (block + 1) // fusion_every - 1))
    if not scan:
        return tuple(parts[0]), tuple(parts[1])
    return _group_periods(parts[0], fusion_every if fuse else 1, fuse), _group_periods(
        parts[1], fusion_every if fuse else 1, fuse
    )


def _group_periods(layers: list[LayerSpec], period: int, fuse: bool) -> tuple[LayerSpec, ...]:
    """Replaces runs of ≥ 2 complete periods by one 'scan' entry."""
    blocks_in_part = {spec.index for spec in layers if spec.kind == "block"}

    def complete(first_block: int) -> bool:
        return first_block % period == 0 and all(
            first_block + j in blocks_in_part for j in range(period)
        )

    grouped: list[LayerSpec] = []
    position = 0
    while position < len(layers):
        spec = layers[position]
        if spec.kind == "block" and complete(spec.index):
            first, count = spec.index, 0
            while complete(first + count * period):
                count += 1
            if count >= 2:
                grouped.append(LayerSpec("scan", first, count))
                position += count * (period + (1 if fuse else 0))
                continue
        grouped.append(spec)
        position += 1
    return tuple(grouped)


# ----------------------------------------------------------------------------- modules


class EncoderBlock(nn.Module):
    """Pre-LN transformer block shared by every scale stream (see module docstring).

    Called positionally as `(tokens [B, N, D], stream_lengths, deterministic)` because
    `nn.remat` / `nn.scan` need the static arguments in fixed positions.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention: str = "dot_product"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, stream_lengths, deterministic):
        norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attended = nn.LayerNorm(name="norm_attn", **norm)(tokens)
        attended = MultiStreamAttention(
            num_heads=self.num_heads,
            mode="self",
            implementation=self.attention,
            name="attention",
            **norm,
        )(attended, stream_lengths)
        attended = nn.Dropout(self.dropout_rate)(attended, deterministic=deterministic)
        tokens = tokens + attended
        mixed = nn.LayerNorm(name="norm_mlp", **norm)(tokens)
        mixed = MlpBlock(self.mlp_dim, self.dropout_rate, name="mlp", **norm)(
            mixed, deterministic=deterministic
        )
        mixed = nn.Dropout(self.dropout_rate)(mixed, deterministic=deterministic)
        return tokens + mixed


class CrossScaleFusion(nn.Module):
    """Cross-scale attention fusion: every stream cross-attends (pre-LN) to all other streams;
    the result is added through a per-channel layer scale initialised at 0.1, so a fresh fusion
    perturbs a (possibly pretrained) backbone only slightly. Positional call like EncoderBlock."""

    num_heads: int
    dropout_rate: float = 0.0
    attention: str = "dot_product"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, stream_lengths, deterministic):
        norm = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fused = nn.LayerNorm(name="norm", **norm)(tokens)
        fused = MultiStreamAttention(
            num_heads=self.num_heads,
            mode="cross",
            implementation=self.attention,
            name="attention",
            **norm,
        )(fused, stream_lengths)
        fused = nn.Dropout(self.dropout_rate)(fused, deterministic=deterministic)
        layer_scale = self.param(
            "layer_scale", nn.initializers.constant(0.1), (tokens.shape[-1],), self.param_dtype
        )
        return tokens + fused * layer_scale.astype(fused.dtype)


# static_argnums count `self` as 0: (tokens=1, stream_lengths=2, deterministic=3).
RematEncoderBlock = nn.remat(EncoderBlock, static_argnums=(2, 3), policy=REMAT_POLICY)
RematCrossScaleFusion = nn.remat(CrossScaleFusion, static_argnums=(2, 3), policy=REMAT_POLICY)


def _layer_classes(remat: bool):
    return (RematEncoderBlock, RematCrossScaleFusion) if remat else (EncoderBlock, CrossScaleFusion)


class FusionPeriod(nn.Module):
    """`num_blocks` encoder blocks followed (optionally) by a fusion: the body of `nn.scan`.
    Positional call like EncoderBlock; returns `(tokens, block_features [num_blocks, B, N,
    D])`."""

    num_blocks: int
    with_fusion: bool
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention: str = "dot_product"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, stream_lengths, deterministic):
        block_cls, fusion_cls = _layer_classes(self.remat)
        shared = dict(
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        features = []
        for j in range(self.num_blocks):
            block = block_cls(mlp_dim=self.mlp_dim, **shared, name=f"block_{j}")
            tokens = block(tokens, stream_lengths, deterministic)
            features.append(tokens)
        if self.with_fusion:
            fusion = fusion_cls(**shared, name="fusion")
            tokens = fusion(tokens, stream_lengths, deterministic)
        return tokens, jnp.stack(features)


class MultiScalePatchEmbed(nn.Module):
    """MSPG: images `[B, H, W, C]` in [0, 1] → tokens `[B, N_1 + N_2 + ..., D]`.

    The image is normalised to [-1, 1] (the range of big_vision / AugReg checkpoints), then
    every scale is made by `layers.downsample` (average pooling for integer factors). Each
    modality has its own stem — a conv with kernel `patch_size` and stride `patch_stride` on
    that modality's channels — and the same stems (shared weights) tokenize every scale.

    Modality fusion is a learned per-token gate: `tokens = Σ_m softmax_m(w_m·s_m + b_m) · s_m`
    over the stem outputs `s_m`. Unlike a plain sum of stems (which is just one conv over the
    stacked channels) it lets each location weigh its modalities by content — e.g. trust depth
    where the colour image is flat. The gate starts at zero (an average of the stems). A single
    modality uses its stem directly.

    Position embeddings ('learn', a `[1, g*g, D]` table for the scale-1 grid of an
    `image_size` image, or fixed 'sincos2d') are resampled bilinearly (no antialias) onto every
    stream's grid by relative position (`posemb_matrix`); with several scales a learned
    per-scale embedding (zero-initialised) tells the shared blocks which stream a token is in.
    """

    width: int
    modalities: tuple[str, ...]
    image_size: int
    scales: tuple[float, ...]
    patch_size: int
    patch_stride: int
    posemb: str = "learn"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        channels = [MODALITY_CHANNELS[name] for name in self.modalities]
        if images.ndim != 4 or images.shape[-1] != sum(channels):
            raise ValueError(
                f"images have shape {images.shape}; expected [B, H, W, {sum(channels)}] for "
                f"model.modalities={','.join(self.modalities)}"
            )
        _, height, width, _ = images.shape
        grids = stream_grids(height, width, self.patch_size, self.patch_stride, self.scales)
        stems = [
            nn.Conv(
                self.width,
                (self.patch_size, self.patch_size),
                strides=(self.patch_stride, self.patch_stride),
                padding="VALID",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"stem_{name}",
            )
            for name in self.modalities
        ]
        if len(stems) > 1:
            gate_kernel = self.param(
                "modality_gate_kernel",
                nn.initializers.zeros,
                (len(stems), self.width),
                self.param_dtype,
            )
            gate_bias = self.param(
                "modality_gate_bias", nn.initializers.zeros, (len(stems),), self.param_dtype
            )
        base = token_grid(self.image_size, self.patch_size, self.patch_stride, 1.0)
        base_posemb = self._base_posemb(base)  # [1, base, base, D]
        if len(self.scales) > 1:
            scale_embedding = self.param(
                "scale_embedding",
                nn.initializers.zeros,
                (len(self.scales), self.width),
                self.param_dtype,
            )
        normalised = images.astype(jnp.float32) * 2.0 - 1.0
        offsets = np.cumsum([0, *channels])
        streams = []
        for scale_index, (scale, (rows, cols)) in enumerate(zip(self.scales, grids)):
            scaled = downsample(normalised, scale).astype(self.dtype)
            stem_outputs = [
                stem(scaled[..., offsets[m] : offsets[m + 1]]) for m, stem in enumerate(stems)
            ]
            if len(stems) == 1:
                tokens = stem_outputs[0]
            else:
                stacked = jnp.stack(stem_outputs, axis=3)  # [B, rows, cols, M, D]
                logits = jnp.einsum(
                    "bhwmd,md->bhwm",
                    stacked.astype(jnp.float32),
                    gate_kernel.astype(jnp.float32),
                )
                weights = jax.nn.softmax(logits + gate_bias.astype(jnp.float32), axis=-1)
                tokens = jnp.einsum("bhwm,bhwmd->bhwd", weights.astype(self.dtype), stacked)
            posemb = resample_grid(
                base_posemb,
                posemb_matrix(base, self.image_size, rows, height, **self._geometry(scale)),
                posemb_matrix(base, self.image_size, cols, width, **self._geometry(scale)),
            )
            tokens = tokens + posemb.astype(self.dtype)
            if len(self.scales) > 1:
                tokens = tokens + scale_embedding[scale_index].astype(self.dtype)
            streams.append(tokens.reshape(tokens.shape[0], rows * cols, self.width))
        return streams[0] if len(streams) == 1 else jnp.concatenate(streams, axis=1)

    def _geometry(self, scale: float) -> dict:
        return dict(patch_size=self.patch_size, patch_stride=self.patch_stride, scale=scale)

    def _base_posemb(self, base: int) -> jax.Array:
        if self.posemb == "learn":
            table = self.param(
                "pos_embedding",
                nn.initializers.normal(stddev=1.0 / np.sqrt(self.width)),
                (1, base * base, self.width),
                self.param_dtype,
            )
            return table.reshape(1, base, base, self.width)
        if self.posemb == "sincos2d":
            return jnp.asarray(sincos_2d_posemb(base, base, self.width))[None]
        raise ValueError(f"model.posemb={self.posemb!r}: use 'learn' or 'sincos2d'")


class Backbone(nn.Module):
    """MS-ViT: MSPG tokens → shared pre-LN blocks with cross-scale fusion → final LayerNorm.

    `trunk(images)` runs the deterministic-at-inference part; `tail(tokens, stream_lengths)`
    the last `tail_blocks` blocks (and their fusions) plus the final norm, the part MC dropout
    samples. `__call__ = tail ∘ trunk`. `aux` maps `block_XX` → `[B, N, D]` block outputs.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    modalities: tuple[str, ...]
    image_size: int
    scales: tuple[float, ...] = (1.0, 0.5)
    patch_size: int = 16
    patch_stride: int = 16
    fusion_every: int = 2
    posemb: str = "learn"
    dropout_rate: float = 0.0
    tail_blocks: int = 0
    attention: str = "dot_product"
    scan_blocks: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        self.embed = MultiScalePatchEmbed(
            width=self.width,
            modalities=self.modalities,
            image_size=self.image_size,
            scales=self.scales,
            patch_size=self.patch_size,
            patch_stride=self.patch_stride,
            posemb=self.posemb,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        block_kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        fusion_kwargs = {k: v for k, v in block_kwargs.items() if k != "mlp_dim"}
        block_cls, fusion_cls = _layer_classes(self.remat)
        fuse = fusion_enabled(len(self.scales), self.fusion_every)
        trunk_plan, tail_plan = backbone_plan(
            self.depth, self.fusion_every, len(self.scales), self.tail_blocks, self.scan_blocks
        )
        for spec in (*trunk_plan, *tail_plan):
            if spec.kind == "block":
                layer = block_cls(**block_kwargs)
            elif spec.kind == "fusion":
                layer = fusion_cls(**fusion_kwargs)
            else:
                layer = nn.scan(
                    FusionPeriod,
                    variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=spec.num_periods,
                )(
                    num_blocks=self.fusion_every if fuse else 1,
                    with_fusion=fuse,
                    remat=self.remat,
                    **block_kwargs,
                )
            # Explicit, zero-padded names make checkpoints readable and loader-friendly.
            setattr(self, spec.name, layer)
        self.encoder_norm = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)

    # The plans are static; recomputing them is cheap and keeps them out of the module state.
    def _plans(self):
        return backbone_plan(
            self.depth, self.fusion_every, len(self.scales), self.tail_blocks, self.scan_blocks
        )

    def stream_lengths(self, height: int, width: int) -> tuple[int, ...]:
        """Tokens per scale stream for a `height × width` input."""
        grids = stream_grids(height, width, self.patch_size, self.patch_stride, self.scales)
        return tuple(rows * cols for rows, cols in grids)

    def _run(self, plan, tokens, stream_lengths, deterministic):
        aux = {}
        fuse = fusion_enabled(len(self.scales), self.fusion_every)
        period = self.fusion_every if fuse else 1
        for spec in plan:
            layer = getattr(self, spec.name)
            if spec.kind == "block":
                tokens = layer(tokens, stream_lengths, deterministic)
                aux[spec.name] = tokens
            elif spec.kind == "fusion":
                tokens = layer(tokens, stream_lengths, deterministic)
            else:
                tokens, features = layer(tokens, stream_lengths, deterministic)
                for p in range(spec.num_periods):
                    for j in range(period):
                        aux[f"block_{spec.index + p * period + j:02d}"] = features[p, j]
        return tokens, aux

    def trunk(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        """images `[B, H, W, C]` in [0, 1] → (tokens `[B, N, D]` before the tail, aux)."""
        tokens = self.embed(images)
        lengths = self.stream_lengths(images.shape[1], images.shape[2])
        return self._run(self._plans()[0], tokens, lengths, not train)

    def tail(
        self, tokens: jax.Array, stream_lengths: tuple[int, ...], *, train: bool
    ) -> tuple[jax.Array, dict]:
        """Trunk tokens `[B, N, D]` → (final normalised tokens `[B, N, D]`, aux)."""
        tokens, aux = self._run(self._plans()[1], tokens, tuple(stream_lengths), not train)
        return self.encoder_norm(tokens), aux

    def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        tokens, aux = self.trunk(images, train=train)
        lengths = self.stream_lengths(images.shape[1], images.shape[2])
        tokens, tail_aux = self.tail(tokens, lengths, train=train)
        return tokens, {**aux, **tail_aux}


# ----------------------------------------------------------------------------- param layouts


def unroll_scanned_params(backbone_params: dict) -> dict:
    """Scanned backbone parameters → the unrolled layout (`block_XX`, `fusion_XX`).

    Works on the structure alone: `scan_<b>` holds `block_0 … block_{F-1}` (+ `fusion`) with a
    leading period axis; period `p`, block `j` is block `b + p*F + j`, and its fusion is fusion
    `(b + (p+1)*F) / F - 1`. Unrolled layouts pass through unchanged.
    """
    flat = {}
    for name, value in backbone_params.items():
        if not name.startswith("scan_"):
            flat[name] = value
            continue
        first = int(name.split("_")[1])
        period = sum(1 for key in value if key.startswith("block_"))
        num_periods = jax.tree.leaves(value)[0].shape[0]
        for p in range(num_periods):
            take = lambda tree, p=p: jax.tree.map(lambda leaf: leaf[p], tree)
            for j in range(period):
                flat[f"block_{first + p * period + j:02d}"] = take(value[f"block_{j}"])
            if "fusion" in value:
                fusion_index = (first + (p + 1) * period) // period - 1
                flat[f"fusion_{fusion_index:02d}"] = take(value["fusion"])
    return flat


def scan_params_like(flat_params: dict, template: dict) -> dict:
    """Inverse of `unroll_scanned_params`: unrolled backbone params → the layout of `template`
    (a scanned or unrolled backbone param tree, e.g. from `jax.eval_shape` of the target
    model)."""
    result = {}
    for name, value in template.items():
        if not name.startswith("scan_"):
            result[name] = flat_params[name]
            continue
        first = int(name.split("_")[1])
        period = sum(1 for key in value if key.startswith("block_"))
        num_periods = jax.tree.leaves(value)[0].shape[0]
        stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
        entry = {
            f"block_{j}": stack(
                [flat_params[f"block_{first + p * period + j:02d}"] for p in range(num_periods)]
            )
            for j in range(period)
        }
        if "fusion" in value:
            entry["fusion"] = stack(
                [
                    flat_params[f"fusion_{(first + (p + 1) * period) // period - 1:02d}"]
                    for p in range(num_periods)
                ]
            )
        result[name] = entry
    return result
