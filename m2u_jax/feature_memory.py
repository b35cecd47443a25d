"""Feature-space anomaly scoring (PatchCore-style) over the trained backbone.

A memory bank holds the patch features of defect-free training images; a test patch's anomaly
score is the Euclidean distance to its nearest neighbour in the bank. Patch features are the
fused fine-scale token grid (`aux['fine_grid']`), averaged over each 3×3 token neighbourhood
(local context, as PatchCore aggregates), so the scorer needs no extra training. The bank is a
seeded random subset of `max_size` features (PatchCore's coreset mostly buys speed; a random
subset keeps the build O(N)).

Distance maps are on the token grid; `upsample_maps` brings them to the image size (bilinear)
and `m2u_jax.scoring` reduces them to image scores like the pixel head's maps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Bank rows compared at a time: bounds the [B·N, chunk] distance block in memory.
_BANK_CHUNK = 4096


@functools.partial(jax.jit, static_argnums=0)
def patch_features(model, variables, images: jax.Array) -> jax.Array:
    """images `[B, H, W, C]` in [0, 1] → `[B, gh, gw, D]` float32 patch features (the fine
    token grid, 3×3 neighbourhood mean with clipped borders)."""
    _, aux = model.apply(variables, images, train=False)
    return neighbourhood_mean(aux["fine_grid"].astype(jnp.float32))


def neighbourhood_mean(grid: jax.Array) -> jax.Array:
    """`[B, gh, gw, D]` → the mean over each 3×3 neighbourhood (borders clipped), same shape."""
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    summed = jax.lax.reduce_window(grid, 0.0, jax.lax.add, window, strides, "SAME")
    ones = jnp.ones(grid.shape[:3] + (1,), grid.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, "SAME")
    return summed / counts


def build_bank(features: list[np.ndarray], max_size: int, seed: int) -> np.ndarray:
    """Patch features of good images (arrays `[..., D]`) → `[M, D]` float32 bank, M ≤
    `max_size` rows drawn without replacement with `seed` (all rows when there are fewer)."""
    rows = [np.asarray(f, np.float32).reshape(-1, np.shape(f)[-1]) for f in features]
    rows = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    if len(rows) == 0:
        raise ValueError("feature memory: no defect-free training image to build the bank from")
    if len(rows) > max_size:
        picked = np.random.default_rng(seed).choice(len(rows), size=max_size, replace=False)
        rows = rows[np.sort(picked)]
    return rows


@jax.jit
def nearest_distances(bank: jax.Array, features: jax.Array) -> jax.Array:
    """`[B, gh, gw, D]` features → `[B, gh, gw]` Euclidean distance to the nearest bank row."""
    shape = features.shape[:-1]
    queries = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    query_sq = jnp.sum(queries**2, axis=-1)
    pad = (-bank.shape[0]) % _BANK_CHUNK
    # Padding rows sit infinitely far away, so they never win the minimum.
    padded = jnp.concatenate([bank, jnp.zeros((pad, bank.shape[1]), bank.dtype)])
    bank_sq = jnp.concatenate([jnp.sum(bank**2, axis=-1), jnp.full((pad,), jnp.inf)])
    chunks = padded.reshape(-1, _BANK_CHUNK, bank.shape[1])
    chunk_sq = bank_sq.reshape(-1, _BANK_CHUNK)

    def best(carry, chunk):
        rows, rows_sq = chunk
        squared = query_sq[:, None] - 2.0 * queries @ rows.T + rows_sq[None, :]
        return jnp.minimum(carry, jnp.min(squared, axis=-1)), None

    init = jnp.full(query_sq.shape, jnp.inf, jnp.float32)
    squared, _ = jax.lax.scan(best, init, (chunks, chunk_sq))
    return jnp.sqrt(jnp.maximum(squared, 0.0)).reshape(shape)


def upsample_maps(maps: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Token-grid maps `[B, gh, gw]` → `[B, H, W]` (bilinear, half-pixel centres)."""
    maps = jnp.asarray(maps)
    resized = jax.image.resize(maps, (maps.shape[0], *image_hw), method="bilinear")
    return np.asarray(resized, np.float32)
