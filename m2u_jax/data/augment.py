"""Training augmentation as TensorFlow ops: synthetic anomalies and contrastive views.

Randomness is split in two so the pipeline is deterministic and fast:

- `sample_anomaly_params` / `sample_view_params` run per example (inside a tf.data map) and draw
  every random number with stateless ops from a per-example key, itself folded from
  (config.seed, stage, epoch, example index). The parameters do not depend on thread
  scheduling, batch composition or the number of hosts (an anomaly's one input from outside its
  example is the other image a texture may come from, fixed by the deterministic batch order).
- `apply_anomalies` / `make_views` run on whole batches (a tf.data map after `batch`, with
  `num_parallel_calls`): all pixel work is vectorised over the batch, and the costly parts
  (the warp of an anomaly, the blur of a view) run only on the images that drew them.

Synthetic anomalies (DRAEM-class, applied only to defect-free images, each with probability
`data.synthetic_anomaly_prob`; the rest stay clean). Images are f32 in [0, 1] before and after:
synthesis, the model's own normalisation and the reconstruction target share one value range.
One kind per anomaly:

- CutPaste (25 %): a rectangle (2-15 % of the image, aspect 0.3-3.3) is cut from one place of
  the image, rotated by up to +-45 degrees, given a new brightness and contrast, and pasted,
  opaque, at another place. Its mask is the rotated rectangle, exactly.
- Noise-shaped foreign texture (75 %). The mask: smooth value noise (Perlin's quintic fade
  between random lattice values) with 2^k cells per axis, k drawn per axis from 1..5 (0..5 with
  `data.synthetic_coarsest_cells=1`, DRAEM's range: regions up to half the image) and capped
  so that cells are at least 4 pixels, plus an octave at twice the frequency and half the
  weight; rotated by a random angle, standardised per image and thresholded at a random level
  (0.4-2.4 standard deviations), so blobs of many sizes and counts occur. Inside it the image
  is blended with a texture, `beta * image + (1 - beta) * texture` with beta ~ U(0, 0.8)
  (`data.synthetic_max_beta`).
  The texture source, per anomaly:
  - the image itself, rotated, scaled (0.5-1.5) and shifted (20 % of all anomalies);
  - another good image of the batch, the next one in batch order (cyclic), warped the same
    way; the image itself when the batch has no other good image (20 %);
  - a procedural pattern: stripes, a checkerboard or smooth noise, with a period of 4 px to
    half the image, a random angle and two random colours (20 %);
  - a flat random colour (15 %).
  Each texture gets 3 of 8 photometric ops: per-channel gain, inversion, contrast, brightness,
  desaturation, gamma, posterize, solarize.
- Bands (`data.synthetic_band` of the noise-shaped textures, 0 by default): the mask is the
  part of the image beyond a line at a random angle, 10-50 % of the image, its edge made wavy
  by smooth noise (up to 4 % of the side): a region that ends in a long, nearly straight
  boundary, as a coating, a ground band or a worn strip does, where the noise blobs have
  none. The texture, its ops and the opacity are the kind's.
- Seamless (`data.synthetic_seamless` of the noise-shaped textures, 0 by default; after NSA's
  Poisson blending, approximated): the pasted content keeps only its detail, the content minus
  its Gaussian low-pass (sigma = 1/32 of the side), on the image's own low-pass, so the anomaly
  changes texture and structure but no local brightness: no step at the mask's edge gives it
  away. A flat colour so becomes a local blur of the image. The mask, opacity and draws are the
  kind's.
- Shading (`data.synthetic_shading` of the anomalies, 0 by default): the image's gain changes
  by 4-25 %, darker or brighter, under a large noise region (2 or 4 cells per axis, threshold
  0-1.5 standard deviations) with a soft edge: a stain, a coating or an uneven surface, which
  the opaque-edged textures do not teach. The change fades in from the mask's edge, so it
  stays inside the mask, which is the whole changed region.

The result: `masks` = the anomaly's mask, `labels` = 1 and one box with `box_classes` = -1 (the
type is unknown: objectness and box losses only). `defect_types` is 1 (the class-agnostic
'defect') under the unsupervised protocol and -1 (unknown; the type loss must skip it) under the
supervised one, where no defect type is right. The box is the
bounding box of the whole mask, computed with reductions (any over rows and columns), so the
blobs of one noise anomaly share one box. `clean_images` keeps the image before the anomaly
(the reconstruction target). A noise threshold that leaves no pixel set (a few % of the noise
masks) leaves the image unchanged and good.

Contrastive views (SimCLR / MoCo v3 recipe, per view): random resized crop (scale 0.2-1, aspect
3/4-4/3), horizontal and vertical flips (no up or left on a surface; flips keep the directions
of its marks), colour jitter with probability 0.8 (brightness, contrast on every channel;
saturation and hue on the RGB channels only), grayscale with probability 0.2 (RGB), Gaussian
blur with probability 0.5 (sigma 0.1-2.0 pixels at 224 px, scaled with the image side).

Fine-tuning geometry (before the anomalies, each keeping image, mask, boxes and labels
consistent): a random crop (`crop_example`), YOLO's mosaic of four examples
(`mosaic_example`, supervised only), a zoom (`zoom_example`) and flips (`flip_example`).
"""

from __future__ import annotations

import math

import tensorflow as tf

from m2u_jax.config import COARSEST_CELLS
from m2u_jax.data.decode import GRAY_TOLERANCE

# Anomaly kinds and their probabilities (CutPaste, then the noise-shaped textures by source);
# KIND_SHADING takes `data.synthetic_shading` of the anomalies and the others share the rest.
KIND_CUTPASTE, KIND_SELF, KIND_OTHER, KIND_PATTERN, KIND_FLAT, KIND_SHADING = range(6)
_KIND_PROBS = (0.25, 0.2, 0.2, 0.2, 0.15)
# Shading: 2 or 4 mask-noise cells per axis (no fine octave), a threshold of 0-1.5 standard
# deviations (large regions), an edge that fades in over the lower half of the field's rise, a
# gain change of 4-25 %.
_SHADING_THRESHOLD_RANGE = (0.0, 1.5)
_SHADING_EDGE = 0.5
_SHADING_GAIN_RANGE = (0.04, 0.25)
# Bands: 10-50 % of the image beyond a line; the edge moves by up to 4 % of the side along it,
# following smooth noise of 4 cells.
_BAND_AREA_RANGE = (0.1, 0.5)
_BAND_WAVE = 0.04
_BAND_WAVE_CELLS = 4.0
# Mask noise: 2^k cells per axis, k in log2(data.synthetic_coarsest_cells).._MAX_NOISE_EXPONENT,
# cells of >= _MIN_CELL_PIXELS.
_MAX_NOISE_EXPONENT = 5
_MIN_CELL_PIXELS = 4
_FINE_OCTAVE_WEIGHT = 0.5
_THRESHOLD_RANGE = (0.4, 2.4)  # standard deviations of the mask noise
MAX_BETA = 0.8  # DRAEM's largest image weight inside a mask (data.synthetic_max_beta)
_PATTERN_LATTICE = 17  # smooth-noise patterns: up to 16 cells
# Photometric ops of a texture (3 of them per texture); the linear ones (gain, invert, contrast,
# brightness, desaturate) apply first, as one affine map, then gamma, posterize, solarize.
_OPS = ("gain", "invert", "contrast", "brightness", "gamma", "posterize", "solarize", "desaturate")
_NUM_TEXTURE_OPS = 3
# Layout of `uniforms`: 0 apply, 1 kind, 2-8 CutPaste rectangle (area, aspect, source x/y, target
# x/y, angle), 9-10 CutPaste brightness/contrast, 11 mask threshold, 12-15 texture warp (shift
# x/y, angle, scale), 16 beta, 17-18 mask cells (y, x), 19 mask angle, 20-24 pattern (type,
# period, angle, phase 1/2), 25-30 op strengths (contrast, brightness, gamma, posterize levels,
# solarize threshold, desaturation).
_NUM_ANOMALY_UNIFORMS = 31
_NUM_VIEW_UNIFORMS = 16


def fold_key(key: tf.Tensor, *values) -> tf.Tensor:
    """Derives a stateless seed (shape [2] int64) from `key` and integers."""
    for value in values:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def _lattice_sizes() -> tuple[int, int]:
    """Lattice points per axis of the coarse and the fine mask octave at the largest scale."""
    cells = 2**_MAX_NOISE_EXPONENT
    return cells + 1, 2 * cells + 1


def sample_anomaly_params(
    key: tf.Tensor,
    label: tf.Tensor,
    prob: float,
    num_channels: int,
    max_beta: float = MAX_BETA,
    shading: float = 0.0,
    coarsest_cells: int = 2,
    band: float = 0.0,
    seamless: float = 0.0,
) -> dict[str, tf.Tensor]:
    """Random parameters of one example's synthetic anomaly (per-example, stateless).

    Args:
      key: `[2]` int64 stateless seed of the example.
      label: scalar int, 0 for a defect-free image (only those get anomalies).
      prob: probability of an anomaly on a defect-free image.
      num_channels: C of the image.
      max_beta: beta ~ U(0, max_beta); the closer to 1, the subtler the faintest anomalies.
      shading: the fraction of anomalies that are `KIND_SHADING` (0: none, and the draws of
        every other kind are exactly those without the option).
      coarsest_cells: the fewest mask-noise cells per axis, 1 or 2 (`COARSEST_CELLS`); the
        draws are the same either way, only their mapping to scales changes.
      band: the fraction of noise-shaped texture anomalies whose mask is a band (0: none, and
        every draw is exactly that without the option).
      seamless: the fraction of noise-shaped texture anomalies pasted seamlessly (0: none,
        and every draw is exactly that without the option).

    Returns:
      dict of scalars / small tensors; batched, they feed `apply_anomalies`: `apply` (bool),
      `kind` (int32, `KIND_*`), `beta` (the image's weight inside the mask; 0 for CutPaste),
      `ops` (`[8]` bool, the texture's photometric ops), `uniforms` (`[31]`, see the layout
      above), `min_exponent` (log2 of `coarsest_cells`, f32), `gains` `[C]`, `colours`
      `[2, C]`, and the noise lattices `noise_coarse`, `noise_fine`, `noise_pattern` (square,
      values in [0, 1)); with `band` > 0 also `band` (bool) and `band_uniforms` `[3]` (angle,
      area, edge amplitude); with `seamless` > 0 also `seamless` (bool).
    """
    if coarsest_cells not in COARSEST_CELLS:
        raise ValueError(f"coarsest_cells={coarsest_cells} is not one of {COARSEST_CELLS}")
    uniforms = tf.random.stateless_uniform([_NUM_ANOMALY_UNIFORMS], fold_key(key, 0))
    coarse, fine = _lattice_sizes()
    lattices = {
        name: tf.random.stateless_uniform([points, points], fold_key(key, 1, index))
        for index, (name, points) in enumerate(
            [("noise_coarse", coarse), ("noise_fine", fine), ("noise_pattern", _PATTERN_LATTICE)]
        )
    }
    gains = tf.random.stateless_uniform([num_channels], fold_key(key, 2), 0.5, 1.5)
    # Fold 3 is `sample_flips`' stream.
    colours = tf.random.stateless_uniform([2, num_channels], fold_key(key, 4))
    op_draws = tf.random.stateless_uniform([len(_OPS)], fold_key(key, 5))
    ops = op_draws <= tf.sort(op_draws)[_NUM_TEXTURE_OPS - 1]  # the 3 smallest draws
    probs = [(1.0 - shading) * p for p in _KIND_PROBS] if shading > 0 else list(_KIND_PROBS)
    cumulative = [sum(probs[: i + 1]) for i in range(len(probs))]
    # The last texture kind ends at 1 - shading; without shading there is no boundary there.
    boundaries = tf.constant(cumulative if shading > 0 else cumulative[:-1])
    kind = tf.reduce_sum(tf.cast(uniforms[1] >= boundaries, tf.int32))
    opaque = tf.logical_or(tf.equal(kind, KIND_CUTPASTE), tf.equal(kind, KIND_SHADING))
    beta = tf.where(opaque, 0.0, max_beta * uniforms[16])
    params = {
        "apply": tf.logical_and(uniforms[0] < prob, tf.equal(label, 0)),
        "kind": kind,
        "beta": beta,
        "ops": ops,
        "uniforms": uniforms,
        "min_exponent": tf.constant(math.log2(coarsest_cells), tf.float32),
        "gains": gains,
        "colours": colours,
        **lattices,
    }
    if band > 0:
        # A stream of its own (fold 6), so the other draws do not depend on the option.
        band_draws = tf.random.stateless_uniform([4], fold_key(key, 6))
        params["band"] = tf.logical_and(band_draws[0] < band, ~opaque)
        params["band_uniforms"] = band_draws[1:]
    if seamless > 0:
        # A stream of its own (fold 7), as the band's.
        seamless_draw = tf.random.stateless_uniform([], fold_key(key, 7))
        params["seamless"] = tf.logical_and(seamless_draw < seamless, ~opaque)
    return params


def _pixel_grid(size: int) -> tuple[tf.Tensor, tf.Tensor]:
    coords = tf.range(size, dtype=tf.float32)
    return coords[None, None, :], coords[None, :, None]  # x [1,1,S], y [1,S,1]


def _similarity_transform(center_x, center_y, source_x, source_y, angle, scale):
    """Rows of ImageProjectiveTransform mapping output (x, y) to input
    source + scale * R(angle) (p - center), all `[B]`."""
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    zeros = tf.zeros_like(cos)
    return tf.stack(
        [
            cos,
            -sin,
            source_x - cos * center_x + sin * center_y,
            sin,
            cos,
            source_y - sin * center_x - cos * center_y,
            zeros,
            zeros,
        ],
        axis=1,
    )


def _warp(images: tf.Tensor, transforms: tf.Tensor, interpolation: str = "BILINEAR") -> tf.Tensor:
    size = tf.shape(images)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=size,
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode="REFLECT",
    )


def flip_example(
    example: dict[str, tf.Tensor],
    horizontal: tf.Tensor,
    vertical: tf.Tensor,
    transpose: tf.Tensor | bool = False,
) -> dict[str, tf.Tensor]:
    """Mirrors one fine-tuning example, keeping image, mask and boxes consistent.

    Args:
      example: `images [S, S, C]`, `masks [S, S]`, `boxes [G, 4]` xyxy pixels (x2 / y2 one past
        the last column / row, as `mask_bounding_boxes` writes them), `box_valid [G]`, and any
        other keys (passed through).
      horizontal, vertical: scalar bools, mirror left-right / top-bottom.
      transpose: scalar bool, swap rows and columns first (mirror about the main diagonal; the
        example must be square). With both flips this reaches all 8 rotations and mirrors.

    A box [x1, x2) becomes [W - x2, W - x1): the same pixels as the mirrored mask; transposed,
    [x1, y1, x2, y2] becomes [y1, x1, y2, x2]. Padding boxes (`box_valid` 0) stay all-zero.
    Labels and types do not change: a mirrored defect is the same defect. A flip keeps the
    directions of row- and column-aligned textures (rolling or grinding marks); a transposition
    swaps them, which cost NEU-DET 0.047 mAP@0.5 (docs/quality.md), so it is a separate choice.
    """
    out = dict(example)
    images, masks, boxes = example["images"], example["masks"], example["boxes"]
    if transpose is not False:
        images = tf.where(transpose, tf.transpose(images, [1, 0, 2]), images)
        masks = tf.where(transpose, tf.transpose(masks), masks)
        boxes = tf.where(transpose, tf.gather(boxes, [1, 0, 3, 2], axis=-1), boxes)
    height = tf.cast(tf.shape(images)[0], boxes.dtype)
    width = tf.cast(tf.shape(images)[1], boxes.dtype)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    x1, x2 = tf.where(horizontal, width - x2, x1), tf.where(horizontal, width - x1, x2)
    y1, y2 = tf.where(vertical, height - y2, y1), tf.where(vertical, height - y1, y2)
    valid = tf.cast(example["box_valid"] > 0, boxes.dtype)[:, None]
    out["boxes"] = tf.stack([x1, y1, x2, y2], axis=-1) * valid
    out["images"] = tf.where(horizontal, tf.reverse(images, [1]), images)
    out["images"] = tf.where(vertical, tf.reverse(out["images"], [0]), out["images"])
    out["masks"] = tf.where(horizontal, tf.reverse(masks, [1]), masks)
    out["masks"] = tf.where(vertical, tf.reverse(out["masks"], [0]), out["masks"])
    return out


def sample_crop_origin(key: tf.Tensor, size: int, crop: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(x0, y0) int32 top-left corner of a `crop`-pixel square inside a `size`-pixel image,
    uniform over the valid positions (stateless)."""
    uniforms = tf.random.stateless_uniform([2], fold_key(key, 17))
    span = float(size - crop + 1)
    origin = tf.minimum(tf.cast(tf.floor(uniforms * span), tf.int32), size - crop)
    return origin[0], origin[1]


def crop_example(
    example: dict[str, tf.Tensor], x0: tf.Tensor, y0: tf.Tensor, crop: int
) -> dict[str, tf.Tensor]:
    """Cuts the `crop`×`crop` window at (x0, y0) out of one example, keeping image, mask, boxes
    and labels consistent (training at the images' own scale on large inputs).

    Boxes are shifted and clipped to the window; a box left without area becomes padding. A
    defective image whose defect lies outside the window becomes a good example (label 0,
    type 0) when its defect is localised (a mask or a box); an image labelled defective with
    neither keeps its label, since where its defect lies is unknown. Other keys pass through.
    """
    out = dict(example)
    channels = example["images"].shape[-1]
    out["images"] = tf.ensure_shape(
        example["images"][y0 : y0 + crop, x0 : x0 + crop], [crop, crop, channels]
    )
    out["masks"] = tf.ensure_shape(example["masks"][y0 : y0 + crop, x0 : x0 + crop], [crop, crop])
    boxes = example["boxes"]
    shift = tf.cast(tf.stack([x0, y0, x0, y0]), boxes.dtype)
    return _fit_boxes_and_labels(example, out, boxes - shift, crop)


def sample_zoom(key: tf.Tensor, max_change: float) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(zoom, x0, y0) scalars for `zoom_example` (stateless): zoom ~ U(1 - c, 1 + c) for
    `max_change` c, and the window's top-left corner (normalised) uniform over the positions
    where the window stays inside the image (zoom > 1) or holds the whole image (zoom < 1)."""
    uniforms = tf.random.stateless_uniform([3], fold_key(key, 18))
    zoom = 1.0 - max_change + 2.0 * max_change * uniforms[0]
    slack = 1.0 - 1.0 / zoom  # > 0: room inside the image; < 0: margin around it
    low, high = tf.minimum(slack, 0.0), tf.maximum(slack, 0.0)
    origin = low + (high - low) * uniforms[1:]
    return zoom, origin[0], origin[1]


def zoom_example(
    example: dict[str, tf.Tensor], zoom: tf.Tensor, x0: tf.Tensor, y0: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Rescales one example by `zoom` about the window at (x0, y0) (normalised, side 1 / zoom),
    keeping image, mask, boxes and labels consistent: scale augmentation for fine-tuning.

    Output pixel j samples input pixel x0 * (S - 1) + j / zoom (bilinear), so zoom > 1 enlarges
    a part of the image and zoom < 1 shrinks the whole image into a border of its own mean
    colour (no mirrored content that could hold an unlabelled copy of a defect). Masks are
    resampled and thresholded at 0.5; boxes move with the same map and are clipped to the image,
    with the box and label rules of `crop_example`. Other keys pass through.
    """
    out = dict(example)
    images, masks = example["images"], example["masks"]
    size = images.shape[0]
    side = 1.0 / zoom
    window = tf.stack([y0, x0, y0 + side, x0 + side])[None]
    mean = tf.reduce_mean(images, axis=(0, 1))

    def resample(values):
        return tf.image.crop_and_resize(values[None], window, [0], [size, size])[0]

    out["images"] = resample(images - mean) + mean  # outside the image: 0 + mean
    out["masks"] = tf.cast(resample(masks[..., None])[..., 0] > 0.5, masks.dtype)
    # Box edges (x1 = first column, x2 = last + 1) through the pixel-centre map above.
    boxes = example["boxes"]
    origin = tf.cast(tf.stack([x0, y0, x0, y0]), boxes.dtype) * (size - 1)
    moved = (boxes - 0.5 - origin) * tf.cast(zoom, boxes.dtype) + 0.5
    return _fit_boxes_and_labels(example, out, moved, size)


def _fit_boxes_and_labels(example, out, boxes, size):
    """Clips the moved `boxes` to the `size`-pixel result `out`; a box left without area
    becomes padding, and a localised defect that left the image makes the example good."""
    clipped = tf.clip_by_value(boxes, 0.0, float(size))
    kept = (
        (example["box_valid"] > 0)
        & (clipped[:, 2] - clipped[:, 0] >= 1.0)
        & (clipped[:, 3] - clipped[:, 1] >= 1.0)
    )
    kept_float = tf.cast(kept, boxes.dtype)
    out["boxes"] = clipped * kept_float[:, None]
    out["box_valid"] = tf.cast(kept, example["box_valid"].dtype)
    out["box_classes"] = example["box_classes"] * tf.cast(kept, example["box_classes"].dtype)
    localised = tf.reduce_any(example["masks"] > 0.5) | tf.reduce_any(example["box_valid"] > 0)
    inside = tf.reduce_any(out["masks"] > 0.5) | tf.reduce_any(kept)
    defective = example["labels"] > 0
    still = tf.where(localised, defective & inside, defective)
    out["labels"] = tf.cast(still, example["labels"].dtype)
    out["defect_types"] = tf.where(
        still, example["defect_types"], tf.zeros_like(example["defect_types"])
    )
    return out


MOSAIC_PARTS = 4  # a 2x2 canvas: the example itself top-left, three partners after it


def sample_mosaic(
    key: tf.Tensor, num_examples: int, size: int, side: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(draw, partners, x0, y0) for `mosaic_example` (stateless): `draw` ~ U(0, 1) (the caller
    compares it with the mosaic probability), `partners` three int64 example indices uniform
    over `num_examples`, and the window's int32 top-left corner uniform over the positions
    where a `side`-pixel window holds the canvas centre (`size - side` .. `size`), so every
    window shows part of all four images when `side` = `size`."""
    draw = tf.random.stateless_uniform([], fold_key(key, 19))
    partners = tf.random.stateless_uniform(
        [MOSAIC_PARTS - 1], fold_key(key, 20), maxval=num_examples, dtype=tf.int64
    )
    uniforms = tf.random.stateless_uniform([2], fold_key(key, 21))
    origin = size - side + tf.minimum(tf.cast(tf.floor(uniforms * (side + 1)), tf.int32), side)
    return draw, partners, origin[0], origin[1]


def mosaic_example(
    parts: list[dict[str, tf.Tensor]], x0: tf.Tensor, y0: tf.Tensor, side: int
) -> dict[str, tf.Tensor]:
    """Cuts the `side`-pixel window at (x0, y0) out of a 2x2 canvas of four examples (YOLO's
    mosaic), keeping image, mask, boxes and labels consistent.

    `parts` (each as `crop_example` takes it, all of one size S) fill the canvas top-left,
    top-right, bottom-left, bottom-right; objects keep their scale. Each part's boxes move with
    it and are clipped to the window (the rules of `crop_example`); the kept boxes, largest
    first, fill the first part's `G` box slots, so a mosaic with more than `G` kept boxes drops
    its smallest. Label: defective when any part stays defective by `crop_example`'s rule
    (a part with a defect but no mask or box counts when the window shows any of it); its
    `defect_types` is that of the defective part with the most defect pixels in the window.
    Keys other than the contract's come from the first part.
    """
    size = parts[0]["images"].shape[0]
    num_boxes = parts[0]["boxes"].shape[0]

    def window(key):
        top = tf.concat([parts[0][key], parts[1][key]], axis=1)
        bottom = tf.concat([parts[2][key], parts[3][key]], axis=1)
        cut = tf.concat([top, bottom], axis=0)[y0 : y0 + side, x0 : x0 + side]
        return tf.ensure_shape(cut, [side, side, *parts[0][key].shape[2:]])

    out = dict(parts[0])
    out["images"], out["masks"] = window("images"), window("masks")
    boxes, valid, classes = [], [], []
    still, scores = [], []
    for k, part in enumerate(parts):
        dx, dy = size * (k % 2), size * (k // 2)
        # The part's pixels inside the window (possibly none).
        col0, col1 = tf.clip_by_value(x0 - dx, 0, size), tf.clip_by_value(x0 + side - dx, 0, size)
        row0, row1 = tf.clip_by_value(y0 - dy, 0, size), tf.clip_by_value(y0 + side - dy, 0, size)
        shown = part["masks"][row0:row1, col0:col1]
        # The part's boxes and label as a crop of it to the window would leave them; a defect
        # of unknown place counts only when the window shows the part at all.
        shift = tf.cast(tf.stack([x0 - dx, y0 - dy, x0 - dx, y0 - dy]), part["boxes"].dtype)
        fitted = _fit_boxes_and_labels(part, {"masks": shown}, part["boxes"] - shift, side)
        boxes.append(fitted["boxes"])
        valid.append(fitted["box_valid"] > 0)
        classes.append(fitted["box_classes"])
        stays = (fitted["labels"] > 0) & (col1 > col0) & (row1 > row0)
        still.append(stays)
        # A defective part outranks the clean ones; among them, the most defect pixels.
        defect_pixels = tf.reduce_sum(tf.cast(shown > 0.5, tf.float32))
        scores.append(tf.where(stays, defect_pixels + 1.0, -1.0))
    boxes, valid = tf.concat(boxes, axis=0), tf.concat(valid, axis=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = tf.argsort(tf.where(valid, area, -1.0), direction="DESCENDING", stable=True)
    order = order[:num_boxes]
    # Boxes the crop rule dropped are all-zero padding already (class 0), and sort last.
    out["boxes"] = tf.gather(boxes, order)
    out["box_valid"] = tf.cast(tf.gather(valid, order), parts[0]["box_valid"].dtype)
    out["box_classes"] = tf.gather(tf.concat(classes, axis=0), order)
    defective = tf.reduce_any(tf.stack(still))
    types = tf.stack([part["defect_types"] for part in parts])
    main = tf.argmax(tf.stack(scores))
    out["labels"] = tf.cast(defective, parts[0]["labels"].dtype)
    out["defect_types"] = tf.where(defective, types[main], tf.zeros_like(types[main]))
    return out


def sample_paste(key: tf.Tensor, num_donors: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(draw, donor) for `paste_defect` (stateless): `draw` ~ U(0, 1) (the caller compares it
    with `data.real_paste_prob`) and `donor`, an int64 position uniform over `num_donors`."""
    draw = tf.random.stateless_uniform([], fold_key(key, 23))
    donor = tf.random.stateless_uniform([], fold_key(key, 24), maxval=num_donors, dtype=tf.int64)
    return draw, donor


def sample_paste_flips(key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`sample_flips` for a pasted defect (`data.real_paste_flips`), on a stream apart from the
    example's own flips."""
    return sample_flips(key, stream=25)


def paste_defect(
    example: dict[str, tf.Tensor], donor: dict[str, tf.Tensor], use: tf.Tensor | bool = True
) -> dict[str, tf.Tensor]:
    """`example` (a good image, float as `crop_example` takes it) with the `donor`'s defect
    pixels pasted in where the donor's mask is set, at the same place (copy-paste of a real
    defect; both of one size). The result is the donor's defect on the example's background:
    the donor's mask, boxes, label and defect type; the example's other keys. A donor without
    mask pixels, or `use` false (a scalar bool: the draw), leaves the example as it was."""
    mask = tf.cast(donor["masks"] > 0.5, example["images"].dtype)
    has_defect = tf.logical_and(tf.reduce_any(mask > 0), use)
    inside = mask[..., None]
    pasted = dict(example)
    pasted["images"] = example["images"] * (1.0 - inside) + donor["images"] * inside
    for name in ("masks", "boxes", "box_classes", "box_valid", "labels", "defect_types"):
        pasted[name] = tf.cast(donor[name], example[name].dtype)
    return {name: tf.where(has_defect, pasted[name], example[name]) for name in example}


def sample_flips(key: tf.Tensor, stream: int = 3) -> tuple[tf.Tensor, tf.Tensor]:
    """(horizontal, vertical) scalar bools, each true with probability 1/2 (stateless; `stream`
    folded into `key`: 3 for the example's flips, `sample_paste_flips` its own)."""
    uniforms = tf.random.stateless_uniform([2], fold_key(key, stream))
    return uniforms[0] < 0.5, uniforms[1] < 0.5


def sample_transpose(key: tf.Tensor) -> tf.Tensor:
    """A scalar bool, true with probability 1/2 (stateless; its own stream, so turning it on
    leaves the flips and every other draw of the example unchanged)."""
    return tf.random.stateless_uniform([], fold_key(key, 22)) < 0.5


def mask_bounding_boxes(masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Bounding box of all set pixels of each mask.

    Args:
      masks: `[B, H, W]` bool.

    Returns:
      `boxes [B, 4]` f32 xyxy (x2 / y2 = last column / row + 1), `valid [B]` bool (mask not empty).
    """
    height, width = tf.shape(masks)[1], tf.shape(masks)[2]
    rows = tf.cast(tf.reduce_any(masks, axis=2), tf.int32)  # [B, H]
    cols = tf.cast(tf.reduce_any(masks, axis=1), tf.int32)  # [B, W]
    y1 = tf.argmax(rows, axis=1, output_type=tf.int32)
    y2 = height - tf.argmax(tf.reverse(rows, [1]), axis=1, output_type=tf.int32)
    x1 = tf.argmax(cols, axis=1, output_type=tf.int32)
    x2 = width - tf.argmax(tf.reverse(cols, [1]), axis=1, output_type=tf.int32)
    valid = tf.reduce_any(masks, axis=[1, 2])
    boxes = tf.cast(tf.stack([x1, y1, x2, y2], axis=1), tf.float32)
    return boxes * tf.cast(valid, tf.float32)[:, None], valid


def _interpolation_matrix(cells: tf.Tensor, size: int, points: int) -> tf.Tensor:
    """`[n, size, points]`: the weights of `points` lattice values at `size` pixel centres that
    span `cells [n]` lattice cells, with Perlin's quintic fade (smooth at the lattice points)."""
    position = (tf.range(size, dtype=tf.float32)[None, :] + 0.5) * (cells[:, None] / size)
    below = tf.floor(position)
    t = position - below
    fade = (t * t * t * (t * (6.0 * t - 15.0) + 10.0))[..., None]
    below = tf.cast(below, tf.int32)
    return tf.one_hot(below, points) * (1.0 - fade) + tf.one_hot(below + 1, points) * fade


def _smooth_noise(lattice: tf.Tensor, cells_y: tf.Tensor, cells_x: tf.Tensor, size: int):
    """Value noise `[n, size, size]` from `lattice [n, L, L]` over `cells_y x cells_x` cells
    (`[n]` f32, at most L - 1): separable, so two small batched matrix products."""
    points = lattice.shape[1]
    rows = _interpolation_matrix(cells_y, size, points)
    cols = _interpolation_matrix(cells_x, size, points)
    return tf.matmul(tf.matmul(rows, lattice), cols, transpose_b=True)


def _noise_exponent_limit(size: int) -> int:
    """Largest k with 2^k mask-noise cells of at least `_MIN_CELL_PIXELS` pixels (1..5)."""
    limit = int(math.floor(math.log2(max(size / _MIN_CELL_PIXELS, 2.0))))
    return min(_MAX_NOISE_EXPONENT, limit)


def _noise_cells(uniforms: tf.Tensor, size: int, min_exponent=1.0) -> tf.Tensor:
    """Mask-noise cells per axis, `[n, 2]` (y, x): 2^k, k uniform in
    `min_exponent` (0 or 1; scalar or `[n]`) .. `_noise_exponent_limit`."""
    min_exponent = tf.reshape(tf.cast(min_exponent, tf.float32), [-1, 1])
    scales = _noise_exponent_limit(size) + 1.0 - min_exponent
    exponents = min_exponent + tf.floor(tf.minimum(uniforms[:, 17:19], 0.999999) * scales)
    return tf.pow(2.0, exponents)


def _noise_masks(params: dict[str, tf.Tensor], size: int, shading: bool = False):
    """Thresholded, rotated two-octave smooth noise: `[n, size, size]` bool. With `shading`,
    (masks, weights): the `KIND_SHADING` images' noise is coarse and their threshold low, and
    `weights [n, size, size]` rise smoothly from 0 on a mask's edge to 1 in its interior (0
    outside); the other images' masks are the same either way."""
    uniforms = params["uniforms"]
    cells = _noise_cells(uniforms, size, params.get("min_exponent", 1.0))
    if shading:
        is_shading = tf.equal(params["kind"], KIND_SHADING)
        coarse_cells = tf.pow(2.0, 1.0 + tf.floor(tf.minimum(uniforms[:, 17:19], 0.999999) * 2))
        cells = tf.where(is_shading[:, None], coarse_cells, cells)
    max_exponent = _noise_exponent_limit(size)
    coarse_points, fine_points = 2**max_exponent + 1, 2 ** (max_exponent + 1) + 1
    coarse = params["noise_coarse"][:, :coarse_points, :coarse_points]
    fine = params["noise_fine"][:, :fine_points, :fine_points]
    field = _smooth_noise(coarse, cells[:, 0], cells[:, 1], size)
    fine_weight = _FINE_OCTAVE_WEIGHT
    if shading:  # a smooth region: no fine octave
        fine_weight = tf.where(is_shading, 0.0, _FINE_OCTAVE_WEIGHT)[:, None, None]
    field += fine_weight * _smooth_noise(fine, 2 * cells[:, 0], 2 * cells[:, 1], size)
    center = tf.fill(tf.shape(uniforms)[:1], (size - 1) / 2)
    angle = (uniforms[:, 19] - 0.5) * math.pi
    rotation = _similarity_transform(center, center, center, center, angle, 1.0)
    # Nearest sampling: the field is smooth, and it is about twice as fast as bilinear.
    field = _warp(field[..., None], rotation, "NEAREST")[..., 0]
    mean, variance = tf.nn.moments(field, axes=[1, 2])
    low, high = _THRESHOLD_RANGE
    threshold = mean + (low + (high - low) * uniforms[:, 11]) * tf.sqrt(variance)
    if not shading:
        return field > threshold[:, None, None]
    low, high = _SHADING_THRESHOLD_RANGE
    shading_threshold = mean + (low + (high - low) * uniforms[:, 11]) * tf.sqrt(variance)
    threshold = tf.where(is_shading, shading_threshold, threshold)
    masks = field > threshold[:, None, None]
    # The field's height above the threshold as a fraction of its peak, through a smoothstep:
    # 0 on the mask's edge (and outside), 1 from `_SHADING_EDGE` of the peak height up, so
    # every region reaches its full change and fades out over the lower part of its slope.
    height = field - threshold[:, None, None]
    peak = tf.reduce_max(height, axis=[1, 2], keepdims=True)
    t = tf.clip_by_value(height / tf.maximum(_SHADING_EDGE * peak, 1e-6), 0.0, 1.0)
    return masks, t * t * (3.0 - 2.0 * t)


def _band_masks(params: dict[str, tf.Tensor], size: int) -> tf.Tensor:
    """`[n, size, size]` bool: the pixels beyond a line at a random angle, exactly a drawn
    fraction of the image (10-50 %), the line displaced along its normal by smooth noise."""
    band_uniforms = params["band_uniforms"]
    angle = band_uniforms[:, 0] * 2 * math.pi
    x, y = _pixel_grid(size)
    center = (size - 1) / 2
    distance = (x - center) * tf.cos(angle)[:, None, None] + (y - center) * tf.sin(angle)[
        :, None, None
    ]
    cells = tf.fill(tf.shape(angle), _BAND_WAVE_CELLS)
    points = int(_BAND_WAVE_CELLS) + 1
    # The wave reuses a corner of the pattern lattice (no draw of its own); a smooth-noise
    # pattern pasted into the same band reads those values at its own scale, which is harmless.
    wave = _smooth_noise(params["noise_pattern"][:, :points, :points], cells, cells, size)
    amplitude = _BAND_WAVE * size * band_uniforms[:, 2]
    distance += (2.0 * wave - 1.0) * amplitude[:, None, None]
    # The threshold is the quantile of the distances that leaves the drawn area beyond it.
    low, high = _BAND_AREA_RANGE
    area = low + (high - low) * band_uniforms[:, 1]
    flat = tf.sort(tf.reshape(distance, [-1, size * size]), axis=1)
    below = tf.cast(tf.round((1.0 - area) * (size * size)), tf.int32)
    threshold = tf.gather(flat, tf.minimum(below, size * size - 1), batch_dims=1)
    return distance >= threshold[:, None, None]


def _waves(frequency, angle, phase, size: int) -> tf.Tensor:
    """`sin(frequency * (x cos(angle) + y sin(angle)) + phase)` `[n, size, size]` (args `[n]`),
    as sin(a + b) = sin a cos b + cos a sin b of per-row and per-column vectors: the image-sized
    work is two products and a sum."""
    x, y = _pixel_grid(size)  # [1, 1, S], [1, S, 1]
    along_x = (frequency * tf.cos(angle))[:, None, None] * x + phase[:, None, None]
    along_y = (frequency * tf.sin(angle))[:, None, None] * y
    return tf.sin(along_x) * tf.cos(along_y) + tf.cos(along_x) * tf.sin(along_y)


def _patterns(params: dict[str, tf.Tensor], size: int) -> tf.Tensor:
    """Procedural patterns `[n, size, size]` in [0, 1]: stripes, a checkerboard or smooth noise
    (one third each) with a period of 4 px to half the image, at a random angle."""
    uniforms = params["uniforms"]
    period = 4.0 * tf.exp(uniforms[:, 21] * math.log(max(size / 8.0, 1.0)))
    frequency = 2 * math.pi / period
    angle = uniforms[:, 22] * math.pi
    wave = _waves(frequency, angle, 2 * math.pi * uniforms[:, 23], size)
    across = _waves(frequency, angle + math.pi / 2, 2 * math.pi * uniforms[:, 24], size)
    stripes = 0.5 + 0.5 * wave
    checker = tf.cast(wave * across > 0, tf.float32)
    cells = tf.clip_by_value(size / period, 1.0, _PATTERN_LATTICE - 1.0)
    noise = _smooth_noise(params["noise_pattern"], cells, cells, size)
    low = tf.reduce_min(noise, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(noise, axis=[1, 2], keepdims=True)
    noise = (noise - low) / tf.maximum(high - low, 1e-6)
    # One-hot weights instead of a broadcast select: elementwise products are cheaper on CPU.
    choice = tf.one_hot(tf.cast(tf.minimum(uniforms[:, 20], 0.999999) * 3, tf.int32), 3)
    choice = choice[:, :, None, None]
    return choice[:, 0] * stripes + choice[:, 1] * checker + choice[:, 2] * noise


def _pasted_content(
    warped: tf.Tensor, patterns: tf.Tensor, params: dict[str, tf.Tensor]
) -> tf.Tensor:
    """What is pasted, `[n, S, S, C]` in [0, 1]: the CutPaste patch or the coloured texture.

    Args:
      warped: `[n, S, S, C]`, the CutPaste source patch or the warped image texture.
      patterns: `[n, S, S]` in [0, 1] (`_patterns`), coloured for `KIND_PATTERN` with two
        colours, and unused by the other kinds (`KIND_FLAT` is a pattern in one colour).
      params: the batched anomaly parameters.

    CutPaste patches get a new contrast and brightness (one for all channels). Textures get the
    ops flagged in `params['ops']`. The kind's choice of base (warped or drawn), the colouring of
    the pattern and the linear ops (gain per channel, inversion, contrast about the channel
    mean, brightness, desaturation) make one affine map per image,
    `warped @ A + pattern * p + bias` (`A [C, C]`, `p`, `bias [C]`): two small matrix products
    and one add per pixel (broadcasts along the channel axis are slow on CPU). Then gamma,
    posterize and solarize, with identity parameters for an image whose op is off.
    """
    uniforms = params["uniforms"]
    kind = params["kind"]
    n = tf.shape(kind)[0]
    channels = warped.shape[3]
    cutpaste = tf.equal(kind, KIND_CUTPASTE)
    flat = tf.equal(kind, KIND_FLAT)
    drawn = tf.logical_or(flat, tf.equal(kind, KIND_PATTERN))
    ops = tf.logical_and(params["ops"], tf.logical_not(cutpaste)[:, None])
    on = dict(zip(_OPS, tf.unstack(tf.cast(ops, tf.float32), axis=1)))  # [n] each, 0 or 1

    # The base v = keep * warped + first + step * pattern, per channel.
    keep = 1.0 - tf.cast(drawn, tf.float32)[:, None]  # [n, 1]
    first = params["colours"][:, 0] * (1.0 - keep)  # [n, C]
    second = tf.where(flat[:, None], params["colours"][:, 0], params["colours"][:, 1])
    step = (second - params["colours"][:, 0]) * (1.0 - keep)
    warped_mean = tf.reduce_mean(warped, axis=[1, 2])
    mean = keep * warped_mean + first + step * tf.reduce_mean(patterns, axis=[1, 2])[:, None]
    # Textures: v -> c (s g v + o - m) + m + b per channel, m = s g mean + o the mean after
    # gain g and inversion (s = -1, o = 1); i.e. v -> scale v + offset.
    gain = 1.0 + on["gain"][:, None] * (params["gains"] - 1.0)
    sign = (1.0 - 2.0 * on["invert"])[:, None]
    contrast = (1.0 + on["contrast"] * (uniforms[:, 25] - 0.5))[:, None]  # 0.5-1.5
    brightness = (on["brightness"] * (uniforms[:, 26] - 0.5) * 0.6)[:, None]  # +-0.3
    scale = contrast * sign * gain
    offset = on["invert"][:, None] + (1.0 - contrast) * sign * gain * mean + brightness
    # CutPaste: v -> c (v - mean) + mean + b, the mean over all pixels and channels.
    cut_contrast = (0.6 + 0.8 * uniforms[:, 10])[:, None]
    cut_offset = (1.0 - cut_contrast) * tf.reduce_mean(warped_mean, axis=1, keepdims=True)
    cut_offset += ((uniforms[:, 9] - 0.5) * 0.4)[:, None]
    scale = tf.where(cutpaste[:, None], cut_contrast * tf.ones_like(scale), scale)
    offset = tf.where(cutpaste[:, None], cut_offset * tf.ones_like(offset), offset)
    # Desaturation, last of the linear ops: u -> u @ D, D = (1 - a) I + a / C (all ones).
    amount = (on["desaturate"] * (0.5 + 0.5 * uniforms[:, 30]))[:, None, None]
    desaturate = (1.0 - amount) * tf.eye(channels) + amount / channels
    # (v * scale + offset) @ D with v = keep * warped + first + step * pattern.
    matrix = (keep * scale)[:, :, None] * desaturate  # diag(keep * scale) @ D
    pattern_row = tf.linalg.matvec(desaturate, step * scale, transpose_a=True)
    bias = tf.linalg.matvec(desaturate, first * scale + offset, transpose_a=True)
    out = tf.matmul(tf.reshape(warped, [n, -1, channels]), matrix)
    out += tf.matmul(tf.reshape(patterns, [n, -1, 1]), pattern_row[:, None, :])
    out = tf.reshape(out + bias[:, None, :], tf.shape(warped))
    out = tf.clip_by_value(out, 0.0, 1.0)

    def per_image(values):
        return values[:, None, None, None]

    # Gamma 0.5-2 as exp(gamma log v) (pow is several times slower on CPU); log 0 = -inf -> 0.
    gamma = tf.exp(on["gamma"] * (uniforms[:, 27] - 0.5) * 2 * math.log(2.0))
    out = tf.exp(per_image(gamma) * tf.math.log(out))
    levels = 2.0 + tf.floor(uniforms[:, 28] * 7.0)  # 2-8 levels: v -> floor(v L) / (L - 1)
    posterized = tf.floor(out * per_image(levels - 1e-3)) * per_image(1.0 / (levels - 1.0))
    out += per_image(on["posterize"]) * (posterized - out)
    solarize = ops[:, _OPS.index("solarize")]
    threshold = per_image(tf.where(solarize, 0.5 + 0.5 * uniforms[:, 29], 2.0))
    out += tf.cast(out >= threshold, tf.float32) * (1.0 - 2.0 * out)  # solarize: v -> 1 - v
    return tf.clip_by_value(out, 0.0, 1.0)


def _synthesize(
    images: tf.Tensor,
    sources: tf.Tensor,
    params: dict[str, tf.Tensor],
    shading: bool = False,
    match_gray: bool = False,
    band: bool = False,
    seamless: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """All anomaly kinds in one pass: `images [n,S,S,C]` -> (`images`, `masks [n,S,S]` bool).

    `sources [n,S,S,C]`: what the warp samples, the image itself or (`KIND_OTHER`) another
    image. One projective warp per image serves the CutPaste source patch and the warped
    textures, one affine map per image their colour, and the rest are elementwise passes and
    small matrix products, so the cost stays a small multiple of one warp. Per-image choices
    are 0/1 weights rather than broadcast selects, which are slow on CPU.
    """
    size = images.shape[1]
    side = float(size)
    uniforms = params["uniforms"]
    kind = params["kind"]
    cutpaste = tf.equal(kind, KIND_CUTPASTE)
    # CutPaste geometry: a rectangle from `source` rotated about `target`.
    area = (0.02 + 0.13 * uniforms[:, 2]) * side * side
    log_low, log_high = math.log(0.3), math.log(3.3)
    aspect = tf.exp(log_low + (log_high - log_low) * uniforms[:, 3])
    patch_w = tf.clip_by_value(tf.sqrt(area / aspect), 2.0, 0.8 * side)
    patch_h = tf.clip_by_value(tf.sqrt(area * aspect), 2.0, 0.8 * side)
    source_x = patch_w / 2 + uniforms[:, 4] * (side - patch_w)
    source_y = patch_h / 2 + uniforms[:, 5] * (side - patch_h)
    target_x = patch_w / 2 + uniforms[:, 6] * (side - patch_w)
    target_y = patch_h / 2 + uniforms[:, 7] * (side - patch_h)
    angle = (uniforms[:, 8] - 0.5) * (math.pi / 2)
    cut_transform = _similarity_transform(target_x, target_y, source_x, source_y, angle, 1.0)
    # Texture geometry: the whole image (this one or another) rotated, scaled and shifted.
    center = tf.fill(tf.shape(angle), (side - 1) / 2)
    texture_transform = _similarity_transform(
        center,
        center,
        center + (uniforms[:, 12] - 0.5) * side,
        center + (uniforms[:, 13] - 0.5) * side,
        uniforms[:, 14] * 2 * math.pi,
        0.5 + uniforms[:, 15],
    )
    warped = _warp(sources, tf.where(cutpaste[:, None], cut_transform, texture_transform))

    # Masks: the rotated rectangle (offset from the target centre, rotated into the patch frame)
    # or the thresholded smooth noise.
    x, y = _pixel_grid(size)
    dx, dy = x - target_x[:, None, None], y - target_y[:, None, None]
    cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
    rectangles = (tf.abs(cos * dx - sin * dy) <= patch_w[:, None, None] / 2) & (
        tf.abs(sin * dx + cos * dy) <= patch_h[:, None, None] / 2
    )
    is_cut = cutpaste[:, None, None]
    if shading:
        noise_masks, soft = _noise_masks(params, size, shading=True)
    else:
        noise_masks = _noise_masks(params, size)
    masks = (is_cut & rectangles) | (~is_cut & noise_masks)
    if band:
        masks = tf.where(params["band"][:, None, None], _band_masks(params, size), masks)

    patch = _pasted_content(warped, _patterns(params, size), params)
    if match_gray and images.shape[-1] > 1:
        # A gray image (a grayscale file replicated to RGB) gets a gray anomaly: a coloured one
        # would be found by its colour alone, a cue that no real defect on such an image has.
        spread = tf.reduce_max(images, axis=-1) - tf.reduce_min(images, axis=-1)
        gray = tf.reduce_max(spread, axis=[1, 2]) <= GRAY_TOLERANCE
        weight = tf.cast(gray, tf.float32)[:, None, None, None]
        patch += weight * (tf.reduce_mean(patch, axis=-1, keepdims=True) - patch)
    if seamless:
        patch = _seamless_content(patch, images, params["seamless"])
    # beta * image + (1 - beta) * patch inside the mask (beta = 0 for CutPaste: opaque).
    weight = tf.cast(masks, tf.float32)[..., None] * (1.0 - params["beta"])[:, None, None, None]
    out = tf.clip_by_value(images + (patch - images) * weight, 0.0, 1.0)
    if not shading:
        return out, masks
    # Shading: the image's gain changes by +-(4-25 %) under a soft-edged large region, as a
    # stain, a coating or an uneven surface does (CutPaste's unused draws 2-3 set the change).
    low, high = _SHADING_GAIN_RANGE
    change = (low + (high - low) * uniforms[:, 2]) * tf.sign(uniforms[:, 3] - 0.5)
    shaded = tf.clip_by_value(images * (1.0 + change[:, None, None, None] * soft[..., None]), 0, 1)
    is_shading = tf.cast(tf.equal(kind, KIND_SHADING), tf.float32)[:, None, None, None]
    return out + is_shading * (shaded - out), masks


def seamless_sigma(size: int) -> float:
    """Gaussian sigma (pixels) of the low-pass that seamless anomalies exchange."""
    return max(1.0, size / 32.0)


def _seamless_content(patch: tf.Tensor, images: tf.Tensor, chosen: tf.Tensor) -> tf.Tensor:
    """`patch [n,S,S,C]` with, where `chosen [n]`, its low-pass replaced by the image's.

    A cheap stand-in for NSA's Poisson blending: where Poisson keeps the source's gradients and
    takes its level from the target's boundary, this keeps the source's detail above the
    low-pass and takes the level from the target around each pixel, with no linear solve.
    With the option on, every anomaly's content is blurred and `chosen` picks the result: a
    gather of the chosen ones would save part of a blur for an option that is off by default.
    """
    n = tf.shape(patch)[0]
    patch = tf.ensure_shape(patch, images.shape)  # static sides for the blur (lost in reshapes)
    sigma = seamless_sigma(images.shape[1])
    lows = _gaussian_blur(tf.concat([patch, images], axis=0), tf.fill([2 * n], sigma), sigma)
    matched = tf.clip_by_value(patch - lows[:n] + lows[n:], 0.0, 1.0)
    weight = tf.cast(chosen, tf.float32)[:, None, None, None]
    return patch + weight * (matched - patch)


def _other_good_images(labels: tf.Tensor) -> tf.Tensor:
    """`[B]` int: for each image, the next defect-free image in batch order (cyclic), other
    than itself; itself when there is none."""
    batch_size = tf.shape(labels)[0]
    index = tf.range(batch_size)
    candidates = (index[:, None] + index[None, :] + 1) % batch_size  # [B, B]; last = itself
    good = tf.gather(tf.equal(labels, 0), candidates)
    good = tf.concat([good[:, :-1], tf.ones_like(good[:, -1:])], axis=1)
    first = tf.argmax(tf.cast(good, tf.int32), axis=1, output_type=tf.int32)
    return tf.gather(candidates, first, batch_dims=1)


def apply_anomalies(
    batch: dict[str, tf.Tensor],
    params: dict[str, tf.Tensor],
    synthetic_type: int = -1,
    shading: bool = False,
    match_gray: bool = False,
    band: bool = False,
    seamless: bool = False,
) -> dict:
    """Pastes synthetic anomalies into a batch (where `params['apply']`).

    Only the selected images are processed (gathered, then scattered back), so the cost scales
    with `data.synthetic_anomaly_prob`.

    Args:
      batch: `images [B,S,S,C]` f32 in [0, 1] and the other contract keys (`masks`, `labels`,
        `defect_types`, `boxes [B,G,4]`, `box_classes`, `box_valid`, ...). `labels` also picks
        the 'other image' textures: the next defect-free image of the batch.
      params: batched `sample_anomaly_params` output.
      synthetic_type: `defect_types` of an anomaly: -1 (unknown type) or, when the class map
        is the single class-agnostic 'defect' (unsupervised protocol), its id 1.
      shading: whether `params` may hold `KIND_SHADING` anomalies (`data.synthetic_shading` >
        0); without, their ops are not built.
      match_gray: on a gray image (every pixel's channels within `GRAY_TOLERANCE`) the pasted
        content is made gray too, its channels replaced by their mean
        (`data.synthetic_match_gray`); the draws, masks and opacity are unchanged.
      band: whether `params` holds band draws (`data.synthetic_band` > 0); where `band` is set
        the mask is `_band_masks`'.
      seamless: whether `params` holds seamless draws (`data.synthetic_seamless` > 0); where
        `seamless` is set the content is `_seamless_content`'s.

    Returns:
      The batch with `images`, `masks`, `labels`, `defect_types`, `boxes`, `box_classes`,
      `box_valid` updated and `clean_images` = the input images.
    """
    images = batch["images"]
    selected = tf.where(params["apply"])[:, 0]
    chosen = tf.nest.map_structure(lambda value: tf.gather(value, selected), params)
    # The warp's input: the image itself, or another good image of the batch.
    others = tf.gather(tf.cast(_other_good_images(batch["labels"]), selected.dtype), selected)
    sources = tf.where(tf.equal(chosen["kind"], KIND_OTHER), others, selected)
    new_images, new_masks = _synthesize(
        tf.gather(images, selected),
        tf.gather(images, sources),
        chosen,
        shading,
        match_gray,
        band,
        seamless,
    )
    boxes, nonempty = mask_bounding_boxes(new_masks)
    # A noise threshold above the whole field leaves an image unchanged: it stays good.
    keep = tf.boolean_mask(selected, nonempty)[:, None]
    new_images = tf.boolean_mask(new_images, nonempty)
    new_masks = tf.cast(tf.boolean_mask(new_masks, nonempty), tf.float32)
    boxes = tf.boolean_mask(boxes, nonempty)
    num_kept = tf.shape(keep)[0]
    max_boxes = batch["boxes"].shape[1]
    first_box = tf.one_hot(tf.zeros([num_kept], tf.int32), max_boxes)  # [n, G]
    out = dict(batch)
    out["clean_images"] = images
    out["images"] = tf.tensor_scatter_nd_update(images, keep, new_images)
    out["masks"] = tf.tensor_scatter_nd_update(batch["masks"], keep, new_masks)
    out["labels"] = tf.tensor_scatter_nd_update(
        batch["labels"], keep, tf.ones([num_kept], batch["labels"].dtype)
    )
    out["defect_types"] = tf.tensor_scatter_nd_update(
        batch["defect_types"], keep, tf.fill([num_kept], tf.constant(synthetic_type, tf.int32))
    )
    out["boxes"] = tf.tensor_scatter_nd_update(
        batch["boxes"], keep, first_box[..., None] * boxes[:, None, :]
    )
    out["box_classes"] = tf.tensor_scatter_nd_update(
        batch["box_classes"], keep, -tf.cast(first_box, batch["box_classes"].dtype)
    )
    out["box_valid"] = tf.tensor_scatter_nd_update(batch["box_valid"], keep, first_box)
    return out


def sample_view_params(key: tf.Tensor) -> tf.Tensor:
    """`[16]` uniforms in [0, 1) that fix one contrastive view of one example."""
    return tf.random.stateless_uniform([_NUM_VIEW_UNIFORMS], key)


def _gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """Per-example separable Gaussian blur: `images [n,S,S,C]`, `sigma [n]` (pixels); n may be 0."""
    radius = max(1, int(math.ceil(3.0 * max_sigma)))
    size, channels = images.shape[1], images.shape[3]

    def blur():
        taps = tf.range(-radius, radius + 1, dtype=tf.float32)
        kernels = tf.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
        kernels = kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)  # [n, K]
        # Every (example, channel) becomes a depthwise channel with its example's kernel.
        stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, size, size, -1])
        per_channel = tf.transpose(tf.repeat(kernels, channels, axis=0))  # [K, n*C]
        padding = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
        padded = tf.pad(stacked, padding, mode="SYMMETRIC")
        blurred = tf.nn.depthwise_conv2d(
            padded, per_channel[:, None, :, None], [1, 1, 1, 1], "VALID"
        )
        blurred = tf.nn.depthwise_conv2d(
            blurred, per_channel[None, :, :, None], [1, 1, 1, 1], "VALID"
        )
        return tf.transpose(tf.reshape(blurred, [size, size, -1, channels]), [2, 0, 1, 3])

    # Convolutions reject empty filters, so an empty selection skips the work.
    return tf.cond(tf.shape(images)[0] > 0, blur, lambda: images)


_LUMA = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _rgb_colour_matrix(uniforms: tf.Tensor, jitter: tf.Tensor) -> tf.Tensor:
    """`[B, 3, 3]`: saturation, then hue rotation (if jitter), then grayscale (if drawn)."""
    batch_size = tf.shape(uniforms)[0]
    luma = tf.constant(_LUMA)
    identity = tf.eye(3, batch_shape=[batch_size])
    to_gray = tf.tile(tf.tile(luma[None, :], [3, 1])[None], [batch_size, 1, 1])
    saturation = (0.6 + 0.8 * uniforms[:, 9])[:, None, None]
    saturate = saturation * identity + (1.0 - saturation) * to_gray
    # Hue: rotate the chroma plane of YIQ.
    hue_angle = (uniforms[:, 10] - 0.5) * 0.2 * 2 * math.pi
    cos, sin = tf.cos(hue_angle), tf.sin(hue_angle)
    ones, zeros = tf.ones_like(cos), tf.zeros_like(cos)
    rotation = tf.reshape(
        tf.stack([ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos], axis=1), [-1, 3, 3]
    )
    to_yiq = tf.constant(_TO_YIQ)
    hue = tf.linalg.inv(to_yiq)[None] @ rotation @ to_yiq[None]
    matrix = tf.where(jitter[:, None, None], hue @ saturate, identity)
    gray = (uniforms[:, 11] < 0.2)[:, None, None]
    return tf.where(gray, to_gray, identity) @ matrix


def make_views(images: tf.Tensor, uniforms: tf.Tensor, rgb_offset: int | None) -> tf.Tensor:
    """One augmented view of every image.

    Flips are folded into the crop boxes (reversed corners), and brightness, contrast,
    saturation, hue and grayscale into one affine colour map per image (`[C, C]` matrix and
    bias), so a view costs one crop-resize, one matrix product and one blur.

    Args:
      images: `[B, S, S, C]` f32 in [0, 1].
      uniforms: `[B, 16]` from `sample_view_params`.
      rgb_offset: index of the first RGB channel, or None when there is no RGB modality.

    Returns:
      `[B, S, S, C]` f32 in [0, 1].
    """
    batch_size = tf.shape(images)[0]
    size, channels = images.shape[1], images.shape[3]
    # Random resized crop (normalised coordinates); swapped corners flip the crop.
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniforms[:, 1]
    scale = 0.2 + 0.8 * uniforms[:, 0]
    crop_w = tf.minimum(tf.sqrt(scale * tf.exp(log_ratio)), 1.0)
    crop_h = tf.minimum(tf.sqrt(scale / tf.exp(log_ratio)), 1.0)
    top = uniforms[:, 2] * (1.0 - crop_h)
    left = uniforms[:, 3] * (1.0 - crop_w)
    flip_x, flip_y = uniforms[:, 4] < 0.5, uniforms[:, 5] < 0.5
    x1, x2 = tf.where(flip_x, left + crop_w, left), tf.where(flip_x, left, left + crop_w)
    y1, y2 = tf.where(flip_y, top + crop_h, top), tf.where(flip_y, top, top + crop_h)
    boxes = tf.stack([y1, x1, y2, x2], axis=1)
    views = tf.image.crop_and_resize(images, boxes, tf.range(batch_size), [size, size])
    # Colour jitter (probability 0.8): v -> b * (c * (v - mean) + mean) on every channel, then
    # the RGB colour matrix M on the RGB channels; as one map A v + bias.
    jitter = uniforms[:, 6] < 0.8
    brightness = tf.where(jitter, 0.6 + 0.8 * uniforms[:, 7], 1.0)
    contrast = tf.where(jitter, 0.6 + 0.8 * uniforms[:, 8], 1.0)
    gain = (brightness * contrast)[:, None, None]
    mean = tf.reduce_mean(views, axis=[1, 2])  # [B, C]
    bias = (brightness * (1.0 - contrast))[:, None] * mean
    matrix = gain * tf.eye(channels, batch_shape=[batch_size])
    if rgb_offset is not None:
        # Select the RGB channels: P [3, C]; A += P^T (M g - g I) P, bias += P^T (M - I) P bias.
        select = tf.one_hot(tf.range(rgb_offset, rgb_offset + 3), channels)
        rgb = _rgb_colour_matrix(uniforms, jitter)
        eye3 = tf.eye(3, batch_shape=[batch_size])
        matrix += tf.transpose(select) @ ((rgb - eye3) * gain) @ select
        rgb_bias = tf.linalg.matvec(rgb - eye3, tf.linalg.matvec(select, bias))
        bias += tf.linalg.matvec(tf.transpose(select), rgb_bias)
    flat = tf.reshape(views, [batch_size, size * size, channels])
    views = tf.reshape(flat @ tf.transpose(matrix, [0, 2, 1]), tf.shape(images))
    views = tf.clip_by_value(views + bias[:, None, None, :], 0.0, 1.0)
    # Gaussian blur (probability 0.5), computed for the blurred images only.
    max_sigma = 2.0 * size / 224.0
    blurred = tf.where(uniforms[:, 12] < 0.5)
    sigma = tf.gather((0.05 + 0.95 * uniforms[:, 13]) * max_sigma, blurred[:, 0])
    views = tf.tensor_scatter_nd_update(
        views, blurred, _gaussian_blur(tf.gather_nd(views, blurred), sigma, max_sigma)
    )
    return tf.clip_by_value(views, 0.0, 1.0)
