"""Image anomaly scores from anomaly maps: one home for the reductions that turn a per-pixel map
into one number per image, used by the model's `image_score` (jit, ONNX export) and by the
evaluation's comparison of reductions (numpy, on the kept test maps).

The mean filter is a product with two banded averaging matrices (rows and columns), so it jits,
exports to ONNX as two MatMuls and needs no reduce-window op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def box_filter_matrix(size: int, width: int) -> np.ndarray:
    """`[size, size]` float32 A with `A @ x` = the mean of x over a centred window of `width`
    (odd) samples, clipped at the borders (each row averages only the samples that exist)."""
    if width <= 1:
        return np.eye(size, dtype=np.float32)
    half = width // 2
    index = np.arange(size)
    band = (np.abs(index[:, None] - index[None, :]) <= half).astype(np.float32)
    return band / band.sum(axis=1, keepdims=True)


def smooth_maps(maps, width: int):
    """Mean-filters `[B, H, W]` maps with a `width`×`width` window (borders clipped); jnp in,
    jnp out (numpy in, numpy out)."""
    if width <= 1:
        return maps
    height, cols = maps.shape[-2:]
    rows_matrix = box_filter_matrix(height, width)
    cols_matrix = box_filter_matrix(cols, width)
    if isinstance(maps, np.ndarray):
        return np.einsum("hk,bkl,wl->bhw", rows_matrix, maps, cols_matrix, optimize=True)
    return jnp.einsum("hk,bkl,wl->bhw", jnp.asarray(rows_matrix), maps, jnp.asarray(cols_matrix))


def topk_mean(maps, fraction: float):
    """Mean of the largest max(1, round(fraction × H × W)) values of each `[B, H, W]` map → `[B]`
    (fraction 0 → the maximum)."""
    batch = maps.shape[0]
    flat = maps.reshape(batch, -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    if isinstance(maps, np.ndarray):
        return np.mean(-np.partition(-flat, k - 1, axis=1)[:, :k], axis=1)
    top, _ = jax.lax.top_k(flat, k)
    return jnp.mean(top, axis=-1)


def score_variants(
    anomaly_maps: np.ndarray, image_probs: np.ndarray, smoothing_widths=(1, 5, 9, 17)
) -> dict[str, np.ndarray]:
    """The image-score reductions compared by the evaluation, each `[N]`:
    `max_s{w}` (maximum of the map mean-filtered with a w×w window), `top1pct_s{w}` (mean of
    its top 1 %), `classifier` (the image head's probability), and `mix` (the model's default
    rule: ½ top-1 % + ½ classifier). Maps `[N, H, W]` in [0, 1] (numpy)."""
    variants: dict[str, np.ndarray] = {"classifier": np.asarray(image_probs, np.float32)}
    for width in smoothing_widths:
        smoothed = smooth_maps(np.asarray(anomaly_maps, np.float32), int(width))
        variants[f"max_s{width}"] = smoothed.reshape(len(smoothed), -1).max(axis=1)
        variants[f"top1pct_s{width}"] = topk_mean(smoothed, 0.01)
    variants["mix"] = 0.5 * (variants["top1pct_s1"] + variants["classifier"])
    return variants
