"""Building blocks shared by the backbone and the heads: the one attention function, resampling
that exports to ONNX/TensorRT, position embeddings, and the transformer sub-layers.

Resampling never calls `jax.image.resize`: jax2onnx fails on it with a symbolic batch, and
TensorRT rejects antialiased resizes. Bilinear resampling is written instead as two einsums with
constant interpolation matrices (explicit letters, no `...`), which reproduce
`jax.image.resize(method='linear', antialias=False)` exactly, and 2x upsampling as slices and
weighted sums, which is cheaper still.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype | type

ATTENTION_IMPLEMENTATIONS = ("dot_product", "einsum", "matmul", "cudnn")


# ----------------------------------------------------------------------------- attention


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    implementation: str = "dot_product",
    mask: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention, the only attention kernel of the model.

    Args:
      query: `[B, Q, heads, head_dim]`.
      key, value: `[B, K, heads, head_dim]`.
      implementation: 'dot_product' → `jax.nn.dot_product_attention` (XLA kernel);
        'cudnn' → the same function forced onto cuDNN flash attention (GPU, 16-bit dtypes);
        'einsum' → explicit-letter einsums (`bqhd,bkhd->bhqk`), the form TensorRT's ONNX parser
        accepts (it rejects `...` in Einsum); 'matmul' → heads moved next to the batch and two
        batched `jnp.matmul`s, which export as ONNX `MatMul` + `Transpose` (faster than `Einsum`
        in ONNX Runtime's CPU provider; the default of tools/convert_to_onnx).
      mask: optional boolean `[B or 1, heads or 1, Q, K]`, True = attend.

    Returns:
      `[B, Q, heads, head_dim]` in the dtype of `query`. Logits and softmax are float32 in every
      form, so bf16 inputs lose precision only in the two matmuls.
    """
    if implementation in ("dot_product", "cudnn"):
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            implementation="cudnn" if implementation == "cudnn" else None,
        )
    if implementation not in ("einsum", "matmul"):
        raise ValueError(
            f"model.attention={implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    scale = 1.0 / np.sqrt(query.shape[-1])
    if implementation == "einsum":
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    else:
        heads_first = (0, 2, 1, 3)  # [B, T, heads, head_dim] -> [B, heads, T, head_dim]
        logits = jnp.matmul(
            jnp.transpose(query, heads_first),
            jnp.transpose(key, (0, 2, 3, 1)),  # [B, heads, head_dim, K]
            preferred_element_type=jnp.float32,
        )
    logits = logits * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    if implementation == "einsum":
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    attended = jnp.matmul(probs, jnp.transpose(value, heads_first))  # [B, heads, Q, head_dim]
    return jnp.transpose(attended, heads_first)


# ----------------------------------------------------------------------------- reductions


def mean(values: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
    """`jnp.mean` written as sum / count. jax2onnx 0.17 turns a single-axis `jnp.mean` into a
    ReduceMean with an `axes` input, which is invalid below opset 18 (TensorRT needs ≤ 17);
    ReduceSum takes `axes` as an input from opset 13 on."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    count = int(np.prod([values.shape[a] for a in axes]))
    return jnp.sum(values, axis=axes) / count


# ----------------------------------------------------------------------------- resampling


def interpolation_matrix(source_coords: np.ndarray, in_size: int) -> np.ndarray:
    """Linear-interpolation weights `[out, in]` (numpy float32): output sample `o` reads the
    input at the fractional index `source_coords[o]`, clamped to `[0, in_size - 1]` (edge
    replication, which is what `jax.image.resize` does for bilinear without antialias)."""
    coords = np.clip(np.asarray(source_coords, np.float64), 0.0, in_size - 1)
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    upper_weight = coords - lower
    matrix = np.zeros((coords.shape[0], in_size), np.float64)
    rows = np.arange(coords.shape[0])
    np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
    np.add.at(matrix, (rows, upper), upper_weight)
    return matrix.astype(np.float32)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out_size, in_size]` weights of half-pixel bilinear resizing (no antialias)."""
    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    return interpolation_matrix(source, in_size)


def token_alignment_matrix(
    num_tokens: int,
    *,
    patch_size: int,
    patch_stride: int,
    scale: float,
    out_size: int,
    out_stride: int,
) -> np.ndarray:
    """`[out_size, num_tokens]` weights that resample a token axis onto a grid of cells.

    Token `i` of a stream at image scale `scale` covers pixels `[i*stride, i*stride + size)` of
    the scaled image, so its centre lies at `(i*stride + size/2) / scale` in input pixels; cell
    `o` of a stride-`out_stride` grid is centred at `(o + 0.5) * out_stride`. Bilinear
    interpolation between token centres keeps overlapping patches (stride < size) and coarse
    scales geometrically aligned with the image. Identity when size == stride == out_stride.
    """
    cell_centres = (np.arange(out_size) + 0.5) * out_stride
    source = (cell_centres * scale - patch_size / 2.0) / patch_stride
    return interpolation_matrix(source, num_tokens)


def resample_grid(grid: jax.Array, rows_matrix: np.ndarray, cols_matrix: np.ndarray) -> jax.Array:
    """Applies separable interpolation to a feature map.

    Args:
      grid: `[B, h, w, C]`.
      rows_matrix: `[H, h]`; cols_matrix: `[W, w]` (numpy constants).

    Returns:
      `[B, H, W, C]`. An axis whose matrix is the identity is left untouched, so the common
      non-resampling case adds nothing to the graph.
    """
    if not _is_identity(rows_matrix):
        grid = jnp.einsum("Hh,bhwc->bHwc", jnp.asarray(rows_matrix, grid.dtype), grid)
    if not _is_identity(cols_matrix):
        grid = jnp.einsum("Ww,bhwc->bhWc", jnp.asarray(cols_matrix, grid.dtype), grid)
    return grid


def _is_identity(matrix: np.ndarray) -> bool:
    return matrix.shape[0] == matrix.shape[1] and np.array_equal(
        matrix, np.eye(matrix.shape[0], dtype=matrix.dtype)
    )


def resize_bilinear(images: jax.Array, out_height: int, out_width: int) -> jax.Array:
    """`[B, h, w, C]` → `[B, out_height, out_width, C]`; equals
    `jax.image.resize(images, ..., 'linear', antialias=False)` but exports with a symbolic
    batch (two einsums with constant matrices)."""
    _, height, width, _ = images.shape
    return resample_grid(images, resize_matrix(height, out_height), resize_matrix(width, out_width))


def downsample(images: jax.Array, scale: float) -> jax.Array:
    """Downsamples `[B, H, W, C]` by `scale` ∈ (0, 1].

    An integer factor k = 1/scale uses k×k average pooling (a reshape and a mean: an exact box
    filter, cheap, exportable; for k = 2 it equals bilinear resizing without antialias); other
    scales use bilinear resizing without antialias. Raises ValueError when `H*scale` or
    `W*scale` is fractional.
    """
    if scale == 1.0:
        return images
    batch, height, width, channels = images.shape
    out_height, out_width = height * scale, width * scale
    if out_height != int(out_height) or out_width != int(out_width) or not 0 < scale < 1:
        raise ValueError(
            f"model.scales entry {scale} does not map a {height}x{width} image to whole pixels"
        )
    factor = 1.0 / scale
    if factor == int(factor):
        factor = int(factor)
        pooled = images.reshape(batch, height // factor, factor, width // factor, factor, channels)
        return mean(pooled, (2, 4))
    return resize_bilinear(images, int(out_height), int(out_width))


def upsample2x_bilinear(features: jax.Array) -> jax.Array:
    """`[B, h, w, C]` → `[B, 2h, 2w, C]`, identical to half-pixel bilinear resizing (no
    antialias): output `2i` = ¾·x[i] + ¼·x[i-1], `2i+1` = ¾·x[i] + ¼·x[i+1], edges replicated.
    Slices and weighted sums cost O(1) per pixel, against O(h) for a resize matrix."""

    def along(values: jax.Array, axis: int) -> jax.Array:
        size = values.shape[axis]
        first = jax.lax.slice_in_dim(values, 0, 1, axis=axis)
        last = jax.lax.slice_in_dim(values, size - 1, size, axis=axis)
        previous = jnp.concatenate(
            [first, jax.lax.slice_in_dim(values, 0, size - 1, axis=axis)], axis=axis
        )
        following = jnp.concatenate(
            [jax.lax.slice_in_dim(values, 1, size, axis=axis), last], axis=axis
        )
        even = 0.75 * values + 0.25 * previous
        odd = 0.75 * values + 0.25 * following
        interleaved = jnp.stack([even, odd], axis=axis + 1)
        shape = list(values.shape)
        shape[axis] = 2 * size
        return interleaved.reshape(shape)

    return along(along(features, 1), 2)


# ----------------------------------------------------------------------------- embeddings


def sincos_2d_posemb(height: int, width: int, dim: int, temperature: float = 10_000.0):
    """Fixed 2-D sin-cos position embedding (MoCo v3 layout) → numpy `[height, width, dim]`.
    `dim` must be a multiple of 4 (sin/cos of x and y)."""
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.mgrid[:height, :width]
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    x = cols.reshape(-1, 1) * omega[None]
    y = rows.reshape(-1, 1) * omega[None]
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return table.reshape(height, width, dim).astype(np.float32)


# ----------------------------------------------------------------------------- transformer parts


class MultiStreamAttention(nn.Module):
    """Multi-head attention over several token streams laid end to end on one token axis.

    The q/k/v projection is one matmul over every token of every stream (one fused `[D, 3, H,
    hd]` kernel); only the attention core is done per stream on static slices, which equals a
    block-diagonal (mode 'self') or block-off-diagonal (mode 'cross') mask on the joint sequence
    without spending FLOPs on the masked blocks and without a mask, so flash kernels apply.

    mode 'self': each stream attends to itself (the shared backbone block).
    mode 'cross': each stream attends to the concatenation of all other streams (cross-scale
    fusion); with a single stream the output is zero (nothing to fuse).
    """

    num_heads: int
    mode: str = "self"
    implementation: str = "dot_product"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, stream_lengths: Sequence[int]) -> jax.Array:
        """tokens `[B, N, D]` with N = sum(stream_lengths) → `[B, N, D]`."""
        width = tokens.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        if sum(stream_lengths) != tokens.shape[1]:
            raise ValueError(f"stream lengths {stream_lengths} do not sum to {tokens.shape[1]}")
        head_dim = width // self.num_heads
        qkv = nn.DenseGeneral(
            features=(3, self.num_heads, head_dim),
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(tokens)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        bounds = np.cumsum((0, *stream_lengths))
        spans = [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(stream_lengths))]
        outputs = []
        for index, (start, stop) in enumerate(spans):
            if self.mode == "self":
                key_spans = [(start, stop)]
            elif self.mode == "cross":
                key_spans = [span for other, span in enumerate(spans) if other != index]
            else:
                raise ValueError(f"MultiStreamAttention mode {self.mode!r}: use 'self' or 'cross'")
            if not key_spans:
                outputs.append(jnp.zeros_like(query[:, start:stop]))
                continue
            stream_keys = jnp.concatenate([key[:, a:b] for a, b in key_spans], axis=1)
            stream_values = jnp.concatenate([value[:, a:b] for a, b in key_spans], axis=1)
            outputs.append(
                attention(
                    query[:, start:stop],
                    stream_keys,
                    stream_values,
                    implementation=self.implementation,
                )
            )
        attended = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
        return nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(attended)


class MlpBlock(nn.Module):
    """Transformer feed-forward: Dense → GELU (tanh form, as in ViT checkpoints) → dropout →
    Dense. `[..., D]` → `[..., D]`."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool) -> jax.Array:
        dense = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        hidden = nn.Dense(self.mlp_dim, name="fc1", **dense)(tokens)
        hidden = nn.gelu(hidden)
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return nn.Dense(tokens.shape[-1], name="fc2", **dense)(hidden)
