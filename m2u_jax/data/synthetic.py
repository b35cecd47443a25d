"""Synthetic industrial-inspection dataset in the MVTec AD layout: the demo's and the tests' data.

    python -m m2u_jax.data.synthetic --out data/synthetic [--categories fabric,pill]
        [--image-size 256] [--num-train 80] [--num-test-good 20] [--num-test-defect 10]
        [--seed 0] [--workers 2] [--preview docs/synthetic_samples.png]

writes, for every category, exactly the MVTec AD tree::

    <cat>/train/good/000.png ...              defect-free training images
    <cat>/test/good/000.png ...               defect-free test images (no masks)
    <cat>/test/<defect>/000.png ...           defective test images, `--num-test-defect` per kind
    <cat>/ground_truth/<defect>/000_mask.png  single-channel uint8 masks, 0 or 255, image-sized

Images are RGB uint8 PNGs. `<cat>/.synthetic.json` records the generation parameters; a category
folder that carries it is replaced on the next run, any other existing folder is left alone
(and the run stops) so real data is never overwritten.

Categories (good images are a distribution, not one picture: every image draws its own texture
phase, orientation, colour, lighting gradient, brightness and sensor noise):

- `fabric` (texture): plain-weave cloth, warp and weft yarns over/under each other, yarn twist,
  per-yarn thickness/shade irregularity, slightly wavy threads.
- `metal` (texture): brushed metal plate, fine anisotropic streaks at a small random angle,
  a broad specular band at a random place.
- `pill` (object): a cream capsule tablet with red-brown speckles and a score line on a dark
  textured background, with a soft shadow; pose jitter (rotation, shift, scale).

Defect kinds (every category has all four; `DEFECT_KINDS` is in sorted folder-name order, so a
class map built from the sorted defect folders is the same for every category):

- `crack`: a thin, dark, jagged line (random walk) with 0-2 branches.
- `hole`: a roughly round region with a ragged rim: dark backing through the cloth, a dark pit
  with a lit inner wall in metal, a chipped crumbly crater on the pill.
- `scratch`: a thin smooth curved line (quadratic Bezier), bright on cloth and metal, dark on
  the pill.
- `stain`: an irregular blob of contamination (coffee on cloth, rust on metal, dirt on the pill)
  tinting the surface while keeping some of its texture.

A defective image has one region (sometimes two of the same kind, not touching), each covering
roughly 0.2%-8% of the image; on the pill the defects lie on the tablet. The mask is computed
first and the defect is painted only where it is set, before lighting and sensor noise, so the
image differs from its clean rendering (`render_sample(...)["clean"]`) exactly inside the mask.

Every image has its own numpy Generator seeded from (seed, category, split, folder, index):
the same seed writes byte-identical files, and choosing other categories or counts does not
change any other image. Rendering is vectorised numpy (no per-pixel Python loops): about 20 ms
per 256 px image on one core, so the default set (3 categories x 140 images) takes ~10 s on one
process, about half that with the default two worker processes on an idle machine.
`--preview PATH` writes the contact sheet of docs/synthetic_samples.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from m2u_jax.data.records import GOOD

CATEGORIES = ("fabric", "metal", "pill")
TEXTURE_CATEGORIES = ("fabric", "metal")
OBJECT_CATEGORIES = ("pill",)
DEFECT_KINDS = ("crack", "hole", "scratch", "stain")
MIN_IMAGE_SIZE = 32
# Bounds on the area of one defect region, as a fraction of the image.
MIN_REGION_FRACTION = 0.002
MAX_REGION_FRACTION = 0.08
# Probability that a defective image gets a second region of the same kind.
SECOND_REGION_PROB = 0.25
MARKER_FILE = ".synthetic.json"

_SPLIT_CODES = {"train": 0, "test": 1}


# ------------------------------------------------------------------ small numpy helpers


def _stable_code(name: str) -> int:
    """A process-independent integer for a name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def _image_rngs(
    seed: int, category: str, split: str, folder: str, index: int
) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the clean scene and for the defect of one image."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(_SPLIT_CODES)}, got {split!r}")
    sequence = np.random.SeedSequence(
        [seed, _stable_code(category), _SPLIT_CODES[split], _stable_code(folder), index]
    )
    scene_seq, defect_seq = sequence.spawn(2)
    return np.random.default_rng(scene_seq), np.random.default_rng(defect_seq)


def _f32(values) -> np.ndarray:
    """float32 array: constants must not promote the float32 images to float64 (twice slower)."""
    return np.asarray(values, np.float32)


def _pixel_coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates x `[1, S]` and y `[S, 1]` (broadcast instead of a full grid)."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return centres[None, :], centres[:, None]


def _cubic_taps(out_size: int, cell: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Cubic B-spline taps sampling a knot line at `cell`-pixel spacing.

    Returns knot indices `[out_size, 4]`, weights `[out_size, 4]` and the number of knots.
    """
    num_knots = int(np.ceil(out_size / cell)) + 4
    position = (np.arange(out_size, dtype=np.float32) + 0.5) / cell + 1.0
    base = np.floor(position).astype(np.int64)
    frac = position - base
    weights = np.stack(
        [
            (1 - frac) ** 3 / 6,
            (3 * frac**3 - 6 * frac**2 + 4) / 6,
            (-3 * frac**3 + 3 * frac**2 + 3 * frac + 1) / 6,
            frac**3 / 6,
        ],
        axis=1,
    )
    return base[:, None] + np.arange(-1, 3)[None, :], weights, num_knots


def _noise_field(
    rng: np.random.Generator, height: int, width: int, cell_y: float, cell_x: float
) -> np.ndarray:
    """Smooth zero-mean, unit-std noise `[height, width]` with features about cell_y x cell_x px.

    Separable B-spline upsampling of a random knot grid (four taps per axis), so anisotropic
    noise (streaks) costs the same as isotropic noise. Gathers instead of matrix products:
    BLAS would spread these small products over threads, which is slower on a busy machine.
    """
    index_y, weights_y, knots_y = _cubic_taps(height, max(cell_y, 0.5))
    index_x, weights_x, knots_x = _cubic_taps(width, max(cell_x, 0.5))
    knots = rng.standard_normal((knots_y, knots_x)).astype(np.float32)
    rows = sum(knots[index_y[:, tap]] * weights_y[:, tap, None] for tap in range(4))
    field = sum(rows[:, index_x[:, tap]] * weights_x[None, :, tap] for tap in range(4))
    return (field - field.mean()) / (field.std() + 1e-6)


def _noise_1d(rng: np.random.Generator, coords: np.ndarray, cell: float) -> np.ndarray:
    """Piecewise-linear 1-D noise (unit std) evaluated at arbitrary coordinates (pixels)."""
    cell = max(cell, 0.5)
    low, high = float(coords.min()), float(coords.max())
    num_knots = int(np.ceil((high - low) / cell)) + 2
    knots = rng.standard_normal(num_knots).astype(np.float32)
    return np.interp((coords - low) / cell, np.arange(num_knots, dtype=np.float32), knots).astype(
        np.float32
    )


def _polyline_distance(points: np.ndarray, size: int, pad: float) -> np.ndarray:
    """Distance `[S, S]` from every pixel centre to the polyline `points` `[N, 2]` (x, y).

    Only a bounding box around the line (plus `pad`) is computed; elsewhere the result is +inf.
    """
    distance = np.full((size, size), np.inf, np.float32)
    x0 = int(np.clip(np.floor(points[:, 0].min() - pad), 0, size))
    x1 = int(np.clip(np.ceil(points[:, 0].max() + pad) + 1, 0, size))
    y0 = int(np.clip(np.floor(points[:, 1].min() - pad), 0, size))
    y1 = int(np.clip(np.ceil(points[:, 1].max() + pad) + 1, 0, size))
    if x1 <= x0 or y1 <= y0:
        return distance
    px = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :, None]
    py = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None, None]
    start, end = points[:-1].astype(np.float32), points[1:].astype(np.float32)
    seg = end - start  # [M, 2]
    seg_len2 = np.maximum((seg**2).sum(-1), 1e-6)
    rel_x, rel_y = px - start[:, 0], py - start[:, 1]  # [h, w, M]
    t = np.clip((rel_x * seg[:, 0] + rel_y * seg[:, 1]) / seg_len2, 0.0, 1.0)
    dist2 = (rel_x - t * seg[:, 0]) ** 2 + (rel_y - t * seg[:, 1]) ** 2
    distance[y0:y1, x0:x1] = np.sqrt(dist2.min(-1))
    return distance


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ clean scenes


@dataclasses.dataclass
class _Scene:
    """A clean rendering before lighting and noise; defects edit `albedo` inside a mask."""

    albedo: np.ndarray  # [S, S, 3] f32 surface colour.
    shading: np.ndarray  # [S, S, 1] f32 multiplicative lighting (shape shading, gradients).
    noise: np.ndarray  # [S, S, 3] f32 additive sensor noise.
    defect_centres: np.ndarray  # [S, S] bool, where a defect's centre may be placed.
    defect_region: np.ndarray  # [S, S] bool, the only pixels a defect may change.
    object_scale: float  # Size of the place defects go (1 = whole image, < 1 for objects).


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Global brightness times a gentle linear gradient: `[S, S]`."""
    x, y = _pixel_coords(size)
    brightness = rng.uniform(0.93, 1.06)
    grad_x, grad_y = (float(grad) for grad in rng.normal(0.0, 0.07, size=2))
    return brightness * (1.0 + grad_x * (x / size - 0.5) + grad_y * (y / size - 0.5))


def _sensor_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-pixel Gaussian noise: a luminance part shared by the channels plus a chroma part."""
    sigma = rng.uniform(0.006, 0.014)
    chroma = rng.standard_normal((size, size, 3), dtype=np.float32)
    luminance = chroma.mean(-1, keepdims=True)
    return sigma * (1.2 * luminance + 0.45 * chroma)


def _central_area(size: int) -> np.ndarray:
    """`[S, S]` bool: the image minus a 10% border (texture defects are centred in it)."""
    border = int(0.1 * size)
    area = np.zeros((size, size), bool)
    area[border : size - border, border : size - border] = True
    return area


def _render_fabric(rng: np.random.Generator, size: int) -> _Scene:
    x, y = _pixel_coords(size)
    period = max(4.0, size / rng.uniform(19.0, 23.0))  # pixels per yarn
    angle = math.radians(rng.normal(0.0, 2.0))
    cos, sin = math.cos(angle), math.sin(angle)
    # Threads wander slightly: a smooth displacement in yarn units.
    wander_a = 0.10 * _noise_field(rng, size, size, size / 2.5, size / 2.5)
    wander_b = 0.10 * _noise_field(rng, size, size, size / 2.5, size / 2.5)
    across_warp = (x * cos + y * sin) / period + rng.uniform(0, 2) + wander_a
    across_weft = (-x * sin + y * cos) / period + rng.uniform(0, 2) + wander_b
    warp_index, weft_index = np.floor(across_warp), np.floor(across_weft)
    warp_frac, weft_frac = across_warp - warp_index, across_weft - weft_index

    def yarn_profile(frac: np.ndarray, half_width: float) -> np.ndarray:
        return np.sqrt(np.clip(1.0 - ((frac - 0.5) / half_width) ** 2, 0.0, 1.0))

    # Yarn thickness differs thread by thread (slubs); cells alternate which yarn is on top.
    warp_width = _f32(rng.uniform(0.40, 0.48, 64))[warp_index.astype(np.int64) % 64]
    weft_width = _f32(rng.uniform(0.40, 0.48, 64))[weft_index.astype(np.int64) % 64]
    warp_height = yarn_profile(warp_frac, warp_width) * (0.72 + 0.28 * np.sin(np.pi * weft_frac))
    weft_height = yarn_profile(weft_frac, weft_width) * (0.72 + 0.28 * np.sin(np.pi * warp_frac))
    warp_on_top = (warp_index + weft_index) % 2 == 0
    warp_visible = np.where(
        warp_on_top, warp_height >= 0.5 * weft_height, 0.5 * warp_height > weft_height
    )
    height = np.where(warp_visible, warp_height, weft_height)

    # Twisted fibres: slanted stripes along each yarn, plus fine fibre streaks.
    twist_phase = rng.uniform(0, 2 * np.pi)
    warp_twist = np.sin(2 * np.pi * (3.0 * across_weft + 1.2 * warp_frac) + twist_phase)
    weft_twist = np.sin(2 * np.pi * (3.0 * across_warp + 1.2 * weft_frac) + twist_phase)
    twist = np.where(warp_visible, warp_twist, weft_twist)
    fibres = np.where(
        warp_visible,
        _noise_1d(rng, across_warp * 8.0, 1.0),
        _noise_1d(rng, across_weft * 8.0, 1.0),
    )
    warp_shade = _f32(rng.normal(0.0, 0.035, 64))[warp_index.astype(np.int64) % 64]
    weft_shade = _f32(rng.normal(0.0, 0.035, 64))[weft_index.astype(np.int64) % 64]
    yarn_shade = np.where(warp_visible, warp_shade, weft_shade)

    tint = _f32(rng.normal(0.0, 0.015, 3))
    warp_colour = _f32([0.47, 0.50, 0.58]) + tint
    weft_colour = _f32([0.60, 0.58, 0.52]) + tint
    colour = np.where(warp_visible[..., None], warp_colour, weft_colour)
    relief = 0.30 + 0.70 * height + 0.05 * twist * height + 0.04 * fibres + yarn_shade
    albedo = colour * relief[..., None]
    shading = _lighting(rng, size)[..., None]
    return _Scene(
        albedo.astype(np.float32),
        np.broadcast_to(shading, (size, size, 1)).astype(np.float32),
        _sensor_noise(rng, size),
        _central_area(size),
        np.ones((size, size), bool),
        1.0,
    )


def _render_metal(rng: np.random.Generator, size: int) -> _Scene:
    x, y = _pixel_coords(size)
    scale = size / 256.0
    angle = math.radians(rng.normal(0.0, 1.5))
    across = (-x * math.sin(angle) + y * math.cos(angle)) * np.ones_like(x)
    streaks = (
        0.55 * _noise_1d(rng, across, 0.7 * scale)
        + 0.35 * _noise_1d(rng, across, 2.5 * scale)
        + 0.30 * _noise_1d(rng, across, 9.0 * scale)
    )
    # Streaks fade in and out along their length; a faint cloudiness from the rolling.
    along = _noise_field(rng, size, size, max(1.0, 1.5 * scale), size / 5.0)
    cloud = _noise_field(rng, size, size, size / 3.0, size / 3.0)
    tone = rng.uniform(0.50, 0.56) + 0.030 * streaks + 0.020 * along + 0.020 * cloud
    tint = _f32([0.97, 1.0, 1.04]) + _f32(rng.normal(0.0, 0.01, 3))
    albedo = tone[..., None] * tint
    # A broad specular band from an overhead light, somewhere across the plate.
    band_angle = math.radians(rng.uniform(30.0, 150.0))
    band_pos = (x * math.cos(band_angle) + y * math.sin(band_angle)) / size
    band_centre = rng.uniform(0.2, 1.0)
    band = 0.28 * np.exp(-(((band_pos - band_centre) / rng.uniform(0.18, 0.3)) ** 2))
    shading = (_lighting(rng, size) * (1.0 + band))[..., None]
    return _Scene(
        albedo.astype(np.float32),
        shading.astype(np.float32),
        _sensor_noise(rng, size),
        _central_area(size),
        np.ones((size, size), bool),
        1.0,
    )


def _render_pill(rng: np.random.Generator, size: int) -> _Scene:
    x, y = _pixel_coords(size)
    scale = rng.uniform(0.93, 1.07) * size
    centre_x, centre_y = (size * (0.5 + float(shift)) for shift in rng.uniform(-0.04, 0.04, 2))
    angle = math.radians(rng.uniform(-12.0, 12.0))
    cos, sin = math.cos(angle), math.sin(angle)
    # Tablet frame: u along the long axis, v across, in units of the image side.
    u = ((x - centre_x) * cos + (y - centre_y) * sin) / scale
    v = (-(x - centre_x) * sin + (y - centre_y) * cos) / scale
    half_length, radius = 0.20, 0.155
    u_out = np.maximum(np.abs(u) - half_length, 0.0)
    dist = np.sqrt(u_out**2 + v**2)  # to the capsule's axis segment
    sdf_px = (dist - radius) * scale
    alpha = np.clip(0.5 - sdf_px, 0.0, 1.0)

    # Dome shading from the capsule's surface normal, light from the upper left.
    t = np.clip(dist / radius, 0.0, 0.999)
    normal_u = np.sign(u) * u_out / np.maximum(dist, 1e-6) * t
    normal_v = v / np.maximum(dist, 1e-6) * t
    normal_z = np.sqrt(1.0 - t**2)
    normal_x = normal_u * cos - normal_v * sin
    normal_y = normal_u * sin + normal_v * cos
    light = [c / math.hypot(-0.45, -0.55, 0.70) for c in (-0.45, -0.55, 0.70)]
    lambert = np.clip(normal_x * light[0] + normal_y * light[1] + normal_z * light[2], 0.0, 1.0)
    specular = np.clip(2 * lambert * normal_z - light[2], 0.0, 1.0) ** 24
    pill_shading = 0.42 + 0.58 * lambert + 0.25 * specular

    # Speckles and a score line live in the tablet frame, so they turn with it.
    speckle_cell = 0.009
    knots = rng.standard_normal((int(0.8 / speckle_cell) + 4,) * 2).astype(np.float32)
    speckle_field = ndimage.map_coordinates(
        knots,
        [
            np.broadcast_to((v + 0.4) / speckle_cell + 1, (size, size)),
            np.broadcast_to((u + 0.4) / speckle_cell + 1, (size, size)),
        ],
        order=1,
        mode="nearest",
    )
    speckles = np.clip((speckle_field - 1.6) * 2.5, 0.0, 1.0)
    groove_width = max(0.006 * scale, 0.7) / scale
    groove = np.exp(-((u / groove_width) ** 2)) * (t < 0.85)
    cream = _f32([0.93, 0.90, 0.83]) + _f32(rng.normal(0.0, 0.01, 3))
    speckle_colour = _f32([0.72, 0.33, 0.24])
    pill_albedo = cream * (1.0 - 0.25 * groove[..., None])
    pill_albedo = pill_albedo * (1 - speckles[..., None]) + speckle_colour * speckles[..., None]
    pill_albedo = pill_albedo * (1.0 + 0.02 * _noise_field(rng, size, size, 2.0, 2.0))[..., None]

    # Dark textured tray with the tablet's soft shadow towards the lower right.
    tray = (
        _f32([0.16, 0.17, 0.16])
        * (1.0 + 0.08 * _noise_field(rng, size, size, size / 6.0, size / 6.0))[..., None]
    )
    tray = tray * (1.0 + 0.06 * _noise_field(rng, size, size, 1.5, 1.5))[..., None]
    shadow_shift = int(round(0.025 * size))
    shadow = np.roll(alpha, (shadow_shift, shadow_shift), axis=(0, 1))
    shadow = ndimage.gaussian_filter(shadow, sigma=0.02 * size)
    tray_shading = 1.0 - 0.55 * shadow

    albedo = alpha[..., None] * pill_albedo + (1 - alpha[..., None]) * tray
    shading = (alpha * pill_shading + (1 - alpha) * tray_shading) * _lighting(rng, size)
    margin_px = max(2.0, 0.02 * size)
    return _Scene(
        albedo.astype(np.float32),
        shading[..., None].astype(np.float32),
        _sensor_noise(rng, size),
        sdf_px < -margin_px,
        sdf_px < -margin_px,
        0.55,
    )


_RENDERERS = {"fabric": _render_fabric, "metal": _render_metal, "pill": _render_pill}


# ------------------------------------------------------------------ defects


def _pick_centre(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(region)
    pick = rng.integers(len(rows))
    return np.array([cols[pick] + 0.5, rows[pick] + 0.5], np.float32)


def _scratch_shape(rng, size, centre, object_scale):
    length = size * object_scale * rng.uniform(0.22, 0.45)
    direction = rng.uniform(0, np.pi)
    offset = length / 2 * np.array([np.cos(direction), np.sin(direction)])
    start, end = centre - offset, centre + offset
    bend = rng.normal(0.0, 0.15) * length * np.array([-np.sin(direction), np.cos(direction)])
    t = np.linspace(0.0, 1.0, 24)[:, None]
    points = (1 - t) ** 2 * start + 2 * t * (1 - t) * (centre + bend) + t**2 * end
    half_width = max(0.8, size * rng.uniform(0.004, 0.007))
    distance = _polyline_distance(points, size, half_width + 1)
    mask = distance <= half_width
    # Deepest along the middle of the groove, still a clear change at its edge.
    strength = 1.0 - 0.4 * (np.minimum(distance, half_width) / half_width) ** 2
    return mask, strength


def _crack_shape(rng, size, centre, object_scale):
    step = size * object_scale * 0.025

    def random_walk(start, heading, num_steps):
        turns = np.cumsum(rng.normal(0.0, 0.45, num_steps)) * 0.5 + rng.normal(0, 0.6, num_steps)
        headings = heading + turns
        moves = step * np.stack([np.cos(headings), np.sin(headings)], -1)
        return np.concatenate([start[None], start + np.cumsum(moves, 0)], 0)

    heading = rng.uniform(0, 2 * np.pi)
    main = random_walk(centre, heading, int(rng.integers(9, 16)))
    main = main - (main.mean(0) - centre)  # keep the crack centred where it was placed
    distance = _polyline_distance(main, size, 3)
    for _ in range(int(rng.integers(0, 3))):
        root = main[int(rng.integers(2, len(main) - 1))]
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branch = random_walk(root, branch_heading, int(rng.integers(3, 7)))
        distance = np.minimum(distance, _polyline_distance(branch, size, 3))
    half_width = max(0.75, size * rng.uniform(0.003, 0.0055))
    mask = distance <= half_width
    return mask, np.ones((size, size), np.float32)


def _ragged_disc(rng, size, centre, mean_radius, aspect=1.0, raggedness=0.15):
    """Distance `[S, S]` normalised so the ragged outline is at 1, and the pixel angles."""
    x, y = _pixel_coords(size)
    rotation = rng.uniform(0, np.pi)
    dx, dy = x - centre[0], y - centre[1]
    along = dx * math.cos(rotation) + dy * math.sin(rotation)
    across = (-dx * math.sin(rotation) + dy * math.cos(rotation)) / aspect
    radius = np.sqrt(along**2 + across**2)
    angle = np.arctan2(dy, dx)
    harmonics = np.arange(2, 7, dtype=np.float32)
    amplitudes = _f32(rng.normal(0.0, raggedness, len(harmonics))) / np.sqrt(harmonics - 1)
    phases = _f32(rng.uniform(0, 2 * np.pi, len(harmonics)))
    outline = 1.0 + (
        amplitudes[:, None, None] * np.sin(harmonics[:, None, None] * angle + phases[:, None, None])
    ).sum(0)
    return radius / (mean_radius * np.maximum(outline, 0.4)), angle


def _hole_shape(rng, size, centre, object_scale):
    mean_radius = max(2.5, size * object_scale * rng.uniform(0.04, 0.075))
    normalised, angle = _ragged_disc(rng, size, centre, mean_radius, rng.uniform(0.75, 1.0))
    mask = normalised < 1.0
    # Used by the painter: the inner wall facing the light (upper left) is brighter.
    wall = np.clip((normalised - 0.55) / 0.45, 0.0, 1.0) * np.clip(
        -np.cos(angle + math.radians(130.0)), 0.0, 1.0
    )
    return mask, wall.astype(np.float32)


def _stain_shape(rng, size, centre, object_scale):
    mean_radius = max(3.0, size * object_scale * rng.uniform(0.05, 0.11))
    normalised, _ = _ragged_disc(
        rng, size, centre, mean_radius, rng.uniform(0.55, 1.0), raggedness=0.12
    )
    # Splotchy outline from smooth noise rather than from harmonics (which look like petals).
    blotches = _noise_field(rng, size, size, mean_radius / 2.0, mean_radius / 2.0)
    normalised = normalised + 0.22 * blotches
    mask = normalised < 1.0
    # Denser in the middle, thinning towards the rim (still clearly tinted there).
    density = 0.55 + 0.35 * np.clip(1.0 - normalised, 0.0, 1.0)
    return mask, density.astype(np.float32)


_SHAPES = {
    "crack": _crack_shape,
    "hole": _hole_shape,
    "scratch": _scratch_shape,
    "stain": _stain_shape,
}

# Target colours the defect pulls the surface towards, per category.
_SCRATCH_COLOUR = {
    "fabric": (0.90, 0.88, 0.82),
    "metal": (0.98, 0.98, 1.0),
    "pill": (0.36, 0.32, 0.28),
}
_STAIN_COLOUR = {
    "fabric": (0.30, 0.17, 0.07),
    "metal": (0.55, 0.26, 0.08),
    "pill": (0.28, 0.20, 0.12),
}
_CRACK_COLOUR = {
    "fabric": (0.05, 0.05, 0.06),
    "metal": (0.06, 0.06, 0.07),
    "pill": (0.22, 0.18, 0.14),
}


def _paint(
    rng: np.random.Generator,
    category: str,
    kind: str,
    albedo: np.ndarray,
    mask: np.ndarray,
    detail: np.ndarray,
) -> np.ndarray:
    """The albedo with the defect painted where `mask` is set (and nowhere else)."""
    size = albedo.shape[0]
    grain = _noise_field(rng, size, size, 1.5, 1.5)[..., None]
    detail = detail[..., None]
    if kind == "scratch":
        painted = albedo + (_f32(_SCRATCH_COLOUR[category]) - albedo) * 0.9 * detail
    elif kind == "crack":
        painted = albedo * 0.1 + 0.9 * _f32(_CRACK_COLOUR[category]) * (1 + 0.2 * grain)
    elif kind == "stain":
        stain = _f32(_STAIN_COLOUR[category]) * (1.0 + 0.08 * grain)
        painted = albedo * (1 - detail) + stain * detail
    elif kind == "hole":
        if category == "fabric":  # dark backing seen through the cloth, a few loose fibres
            painted = _f32([0.04, 0.04, 0.05]) * (1.0 + 0.5 * np.clip(grain, 0, None))
        elif category == "metal":  # a pit: dark floor, lit inner wall
            painted = _f32([0.10, 0.10, 0.11]) + 0.55 * detail * _f32([1.0, 1.0, 1.03])
        else:  # a chip out of the tablet: darker crumbly material
            painted = _f32([0.50, 0.45, 0.37]) * (1.0 + 0.12 * grain) * (1.0 - 0.35 * detail)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {DEFECT_KINDS}")
    painted = np.clip(painted, 0.0, 1.0).astype(np.float32)
    return np.where(mask[..., None], painted, albedo)


def _largest_component(region: np.ndarray) -> np.ndarray:
    """The biggest 8-connected piece of `region`, so each region gives one box."""
    labels, count = ndimage.label(region, structure=np.ones((3, 3)))
    if count <= 1:
        return region
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _defect_mask(
    rng: np.random.Generator, kind: str, scene: _Scene, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One or two non-touching regions of one kind inside the scene's defect region."""
    num_regions = 2 if rng.uniform() < SECOND_REGION_PROB else 1
    mask = np.zeros((size, size), bool)
    detail = np.zeros((size, size), np.float32)
    forbidden = np.zeros((size, size), bool)
    min_area, max_area = MIN_REGION_FRACTION * size * size, MAX_REGION_FRACTION * size * size
    for _ in range(num_regions):
        for _attempt in range(100):
            centre = _pick_centre(rng, scene.defect_centres & ~forbidden)
            region, region_detail = _SHAPES[kind](rng, size, centre, scene.object_scale)
            region = _largest_component(region & scene.defect_region)
            area = region.sum()
            if min_area <= area <= max_area and not (region & forbidden).any():
                break
        else:
            raise RuntimeError(f"could not place a {kind!r} defect of a sensible size")
        mask |= region
        detail = np.where(region, region_detail, detail)
        # Keep a gap so that connected components see separate regions.
        forbidden = ndimage.binary_dilation(mask, iterations=max(3, size // 32))
    return mask, detail


# ------------------------------------------------------------------ public API


def render_sample(
    category: str,
    folder: str,
    index: int,
    *,
    split: str = "test",
    image_size: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Renders one image exactly as `generate` writes it.

    Args:
      category: one of `CATEGORIES`.
      folder: 'good' or one of `DEFECT_KINDS` (the MVTec folder the image goes in).
      index: the image's number in its folder (`NNN` in the file name).
      split: 'train' (only 'good') or 'test'.
      image_size: side S in pixels.
      seed: dataset seed.

    Returns:
      `image` `[S, S, 3]` uint8, `clean` `[S, S, 3]` uint8 (the same scene without the defect;
      equal to `image` for 'good') and `mask` `[S, S]` uint8 in {0, 255} (all 0 for 'good').
    """
    if category not in _RENDERERS:
        raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
    if folder != GOOD and folder not in DEFECT_KINDS:
        raise ValueError(f"unknown folder {folder!r}; use 'good' or one of {DEFECT_KINDS}")
    if split == "train" and folder != GOOD:
        raise ValueError(f"the train split holds only 'good' images, not {folder!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is below the minimum {MIN_IMAGE_SIZE}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be non-negative integers")
    scene_rng, defect_rng = _image_rngs(seed, category, split, folder, index)
    scene = _RENDERERS[category](scene_rng, image_size)
    clean = _to_uint8(scene.albedo * scene.shading + scene.noise)
    if folder == GOOD:
        return {"image": clean, "clean": clean.copy(), "mask": np.zeros(clean.shape[:2], np.uint8)}
    mask, detail = _defect_mask(defect_rng, folder, scene, image_size)
    albedo = _paint(defect_rng, category, folder, scene.albedo, mask, detail)
    image = _to_uint8(albedo * scene.shading + scene.noise)
    return {"image": image, "clean": clean, "mask": mask.astype(np.uint8) * 255}


def _parse_categories(categories) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    if isinstance(categories, str):
        categories = [part.strip() for part in categories.split(",") if part.strip()]
    categories = tuple(categories)
    unknown = [name for name in categories if name not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"unknown or no categories {list(unknown)}; choose from {CATEGORIES}")
    return categories


def _save_png(array: np.ndarray, path: pathlib.Path) -> None:
    # Pillow's PNG writer adds no timestamps; fixed compression keeps the bytes reproducible.
    # Level 1: noisy images shrink only ~10% more at level 6, which costs 3x the time.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


@dataclasses.dataclass(frozen=True)
class _WriteTask:
    """One image (and its mask) to render and write; picklable for worker processes."""

    category: str
    split: str
    folder: str
    index: int
    image_size: int
    seed: int
    image_path: pathlib.Path
    mask_path: pathlib.Path | None


def _write_sample(task: _WriteTask) -> None:
    sample = render_sample(
        task.category,
        task.folder,
        task.index,
        split=task.split,
        image_size=task.image_size,
        seed=task.seed,
    )
    _save_png(sample["image"], task.image_path)
    if task.mask_path is not None:
        _save_png(sample["mask"], task.mask_path)


def generate(
    out_dir,
    categories=None,
    image_size: int = 256,
    num_train: int = 80,
    num_test_good: int = 20,
    num_test_defect: int = 10,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Writes the synthetic dataset in the MVTec AD layout under `out_dir`.

    Args:
      out_dir: dataset root; one folder per category is (re)created under it.
      categories: names from `CATEGORIES` (sequence or comma-separated string); None = all.
      image_size: side of the square images in pixels (>= 32).
      num_train: good training images per category.
      num_test_good: good test images per category.
      num_test_defect: defective test images per defect kind per category.
      seed: dataset seed; the same seed gives byte-identical files.
      workers: processes rendering in parallel (1 = in this process). Every image has its own
        seed, so the files do not depend on it.
      progress: called as `progress(images written, total)` after each image.

    Returns:
      A summary: `root`, `image_size`, `seed`, `categories` (name -> {'train_good',
      'test_good', 'test_defect': {kind: count}}), and totals `num_images`, `num_masks`.
    """
    categories = _parse_categories(categories)
    for name, count in (
        ("num_train", num_train),
        ("num_test_good", num_test_good),
        ("num_test_defect", num_test_defect),
    ):
        if count < 0 or count > 1000:
            raise ValueError(f"{name}={count} must be in [0, 1000] (3-digit file names)")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} is below the minimum {MIN_IMAGE_SIZE}")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    if seed < 0:
        raise ValueError(f"seed={seed} must be a non-negative integer")
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    summary = {"root": str(root), "image_size": image_size, "seed": seed, "categories": {}}
    tasks = []
    for category in categories:
        category_dir = root / category
        if category_dir.exists():
            if not (category_dir / MARKER_FILE).exists():
                raise FileExistsError(
                    f"{category_dir} exists and was not written by this generator "
                    f"(no {MARKER_FILE}); remove it or choose another --out"
                )
            shutil.rmtree(category_dir)
        category_dir.mkdir()
        record = {
            "train_good": num_train,
            "test_good": num_test_good,
            "test_defect": {kind: num_test_defect for kind in DEFECT_KINDS},
        }
        summary["categories"][category] = record
        # Written first, so that an interrupted run's folder is still recognised as ours.
        marker = {"generator": "m2u_jax.data.synthetic", "image_size": image_size, "seed": seed}
        (category_dir / MARKER_FILE).write_text(json.dumps({**marker, **record}, indent=1))
        folders = [("train", GOOD, num_train), ("test", GOOD, num_test_good)]
        folders += [("test", kind, num_test_defect) for kind in DEFECT_KINDS]
        for split, folder, count in folders:
            image_dir = category_dir / split / folder
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir = None if folder == GOOD else category_dir / "ground_truth" / folder
            if mask_dir is not None:
                mask_dir.mkdir(parents=True, exist_ok=True)
            tasks += [
                _WriteTask(
                    category,
                    split,
                    folder,
                    index,
                    image_size,
                    seed,
                    image_dir / f"{index:03d}.png",
                    None if mask_dir is None else mask_dir / f"{index:03d}_mask.png",
                )
                for index in range(count)
            ]
    with contextlib.ExitStack() as stack:
        if workers == 1:
            written = map(_write_sample, tasks)
        else:
            # 'spawn': forking a process that may hold JAX/TF threads is unsafe.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(
                concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
            )
            written = pool.map(_write_sample, tasks, chunksize=8)
        for done, _ in enumerate(written, 1):
            if progress is not None:
                progress(done, len(tasks))
    summary["num_images"] = len(tasks)
    summary["num_masks"] = sum(task.mask_path is not None for task in tasks)
    return summary


def make_preview(
    path, categories=None, image_size: int = 256, seed: int = 0, num_good: int = 2
) -> None:
    """Writes a contact sheet: per category, `num_good` good images then one image per defect
    kind, with the ground-truth mask outlined in red. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = _parse_categories(categories)
    columns = [(GOOD, i) for i in range(num_good)] + [(kind, 0) for kind in DEFECT_KINDS]
    cell = max(image_size, 160) / 100.0  # inches per panel at 100 dpi; room for the titles
    figure, axes = plt.subplots(
        len(categories),
        len(columns),
        figsize=(cell * len(columns), (cell + 0.3) * len(categories)),
        dpi=100,
        squeeze=False,
    )
    for row, category in enumerate(categories):
        for col, (folder, index) in enumerate(columns):
            sample = render_sample(category, folder, index, image_size=image_size, seed=seed)
            axis = axes[row, col]
            axis.imshow(sample["image"], interpolation="nearest")
            if sample["mask"].any():
                # Outline a slightly grown mask so the line does not hide thin defects.
                grown = ndimage.binary_dilation(sample["mask"] > 0, iterations=3)
                axis.contour(grown, levels=[0.5], colors="red", linewidths=0.7)
            axis.set_title(f"{category} / {folder}", fontsize=9)
            axis.set_axis_off()
    figure.tight_layout(pad=0.3)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    # RGB without matplotlib's alpha channel: noisy photos barely compress, so this saves ~15%.
    with Image.open(buffer) as sheet:
        sheet.convert("RGB").save(path, format="PNG", optimize=True)


class _ProgressBar:
    """`update(done, total)` drawn with tqdm on stderr (images, rate, time left)."""

    def __init__(self, tqdm):
        self._tqdm, self._bar = tqdm, None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=total, unit="img", file=sys.stderr, desc="synthetic")
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress_bar() -> _ProgressBar | None:
    try:
        from tqdm import tqdm  # optional: a plain run without a progress bar otherwise
    except ImportError:
        return None
    return _ProgressBar(tqdm)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m m2u_jax.data.synthetic",
        description="Write a synthetic defect-inspection dataset in the MVTec AD layout.",
    )
    parser.add_argument("--out", help="dataset root to write (one folder per category)")
    parser.add_argument(
        "--categories", default=",".join(CATEGORIES), help="comma-separated subset of categories"
    )
    parser.add_argument("--image-size", type=int, default=256, help="square image side (px)")
    parser.add_argument("--num-train", type=int, default=80, help="good train images/category")
    parser.add_argument("--num-test-good", type=int, default=20, help="good test images/category")
    parser.add_argument(
        "--num-test-defect", type=int, default=10, help="defective test images per kind/category"
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="rendering processes (the files do not depend on it)",
    )
    parser.add_argument("--preview", help="also write a contact sheet PNG of samples here")
    args = parser.parse_args(argv)
    if args.out is None and args.preview is None:
        parser.error("give --out DIR (and/or --preview PATH)")
    try:
        if args.out is not None:
            start = time.perf_counter()
            bar = _progress_bar()
            summary = generate(
                args.out,
                categories=args.categories,
                image_size=args.image_size,
                num_train=args.num_train,
                num_test_good=args.num_test_good,
                num_test_defect=args.num_test_defect,
                seed=args.seed,
                workers=args.workers,
                progress=bar.update if bar is not None else None,
            )
            if bar is not None:
                bar.close()
            print(
                f"synthetic: wrote {summary['num_images']} images and {summary['num_masks']} "
                f"masks ({','.join(summary['categories'])}, {args.image_size}px, "
                f"seed {args.seed}) to {args.out} in {time.perf_counter() - start:.1f}s"
            )
        if args.preview is not None:
            make_preview(
                args.preview, categories=args.categories, image_size=args.image_size, seed=args.seed
            )
            print(f"synthetic: wrote preview {args.preview}")
    except (ValueError, FileExistsError) as error:
        print(f"synthetic: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
