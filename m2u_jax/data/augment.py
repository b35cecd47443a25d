"""Training augmentation as TensorFlow ops: synthetic anomalies and contrastive views.

Randomness is split in two so the pipeline is deterministic and fast:

- `sample_anomaly_params` / `sample_view_params` run per example (inside a tf.data map) and draw
  every random number with stateless ops from a per-example key, itself folded from
  (config.seed, stage, epoch, example index). The result does not depend on thread scheduling,
  batch composition or the number of hosts.
- `apply_anomalies` / `make_views` run on whole batches (a tf.data map after `batch`, with
  `num_parallel_calls`): all pixel work is vectorised over the batch, and the costly parts
  (the warp of an anomaly, the blur of a view) run only on the images that drew them.

Synthetic anomalies (applied only to defect-free images, each with probability
`data.synthetic_anomaly_prob`), half of them of each kind:

- CutPaste: a rectangle (2-15 % of the image, aspect 0.3-3.3) is cut from one place of the
  image, rotated by up to +-45 degrees, given a new brightness and contrast, and pasted at another
  place. Its mask is the rotated rectangle, exactly.
- Noise-shaped foreign texture (DRAEM-like): a smooth two-octave noise field (bicubic upsampling
  of 4x4 and 8x8 random grids, a cheap Perlin stand-in) is thresholded into blobs; inside them
  the image is blended (opacity 0.4-1) with a foreign texture, the image itself under a random
  rotation, scale and shift with new per-channel gains (sometimes inverted).

The result: `masks` = the anomaly's mask, `labels` = 1 and one box with `box_classes` = -1 (the
type is unknown: objectness and box losses only). `defect_types` is 1 (the class-agnostic
'defect') under the unsupervised protocol and -1 (unknown; the type loss must skip it) under the
supervised one, where no defect type is right. The box is the
bounding box of the whole mask, computed with reductions (any over rows and columns), so the
blobs of one noise anomaly share one box. `clean_images` keeps the image before the anomaly
(the reconstruction target). A noise threshold that leaves no pixel set leaves the image
unchanged and good.

Contrastive views (SimCLR / MoCo v3 recipe, per view): random resized crop (scale 0.2-1, aspect
3/4-4/3), horizontal and vertical flips (inspection images have no canonical orientation),
colour jitter with probability 0.8 (brightness, contrast on every channel; saturation and hue
on the RGB channels only), grayscale with probability 0.2 (RGB), Gaussian blur with probability
0.5 (sigma 0.1-2.0 pixels at 224 px, scaled with the image side).
"""

from __future__ import annotations

import math

import tensorflow as tf

_NOISE_GRIDS = (4, 8)
_NOISE_WEIGHTS = (0.67, 0.33)
_NUM_ANOMALY_UNIFORMS = 20
_NUM_VIEW_UNIFORMS = 16


def fold_key(key: tf.Tensor, *values) -> tf.Tensor:
    """Derives a stateless seed (shape [2] int64) from `key` and integers."""
    for value in values:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def sample_anomaly_params(
    key: tf.Tensor, label: tf.Tensor, prob: float, num_channels: int
) -> dict[str, tf.Tensor]:
    """Random parameters of one example's synthetic anomaly (per-example, stateless).

    Args:
      key: `[2]` int64 stateless seed of the example.
      label: scalar int, 0 for a defect-free image (only those get anomalies).
      prob: probability of an anomaly on a defect-free image.
      num_channels: C of the image.

    Returns:
      dict of scalars / small tensors; batched, they feed `apply_anomalies`.
    """
    uniforms = tf.random.stateless_uniform([_NUM_ANOMALY_UNIFORMS], fold_key(key, 0))
    noise_grids = {
        f"noise_{size}": tf.random.stateless_uniform([size, size, 1], fold_key(key, 1, size))
        for size in _NOISE_GRIDS
    }
    gains = tf.random.stateless_uniform([num_channels], fold_key(key, 2), 0.5, 1.5)
    return {
        "apply": tf.logical_and(uniforms[0] < prob, tf.equal(label, 0)),
        "use_noise": uniforms[1] < 0.5,
        "uniforms": uniforms,
        "gains": gains,
        **noise_grids,
    }


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


def _warp(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    size = tf.shape(images)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=size,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def flip_example(
    example: dict[str, tf.Tensor], horizontal: tf.Tensor, vertical: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Mirrors one fine-tuning example, keeping image, mask and boxes consistent.

    Args:
      example: `images [S, S, C]`, `masks [S, S]`, `boxes [G, 4]` xyxy pixels (x2 / y2 one past
        the last column / row, as `mask_bounding_boxes` writes them), `box_valid [G]`, and any
        other keys (passed through).
      horizontal, vertical: scalar bools, mirror left-right / top-bottom.

    A box [x1, x2) becomes [W - x2, W - x1): the same pixels as the mirrored mask. Padding boxes
    (`box_valid` 0) stay all-zero. Labels and types do not change: a mirrored defect is the same
    defect, and inspection surfaces have no canonical orientation (see the contrastive views).
    """
    out = dict(example)
    images, masks, boxes = example["images"], example["masks"], example["boxes"]
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


def sample_flips(key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(horizontal, vertical) scalar bools, each true with probability 1/2 (stateless)."""
    uniforms = tf.random.stateless_uniform([2], fold_key(key, 3))
    return uniforms[0] < 0.5, uniforms[1] < 0.5


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


def _synthesize(images: tf.Tensor, params: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Both anomaly kinds in one pass: `images [n,S,S,C]` -> (`images`, `masks [n,S,S]` bool).

    One projective warp per image serves both kinds (the CutPaste source patch, or the texture),
    and one affine colour change per image and channel (CutPaste contrast/brightness, texture
    gains/inversion), so the cost is one warp and a few elementwise passes.
    """
    size = images.shape[1]
    side = float(size)
    uniforms = params["uniforms"]
    use_noise = params["use_noise"]
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
    # Texture geometry: the whole image rotated, scaled and shifted.
    center = tf.fill(tf.shape(angle), (side - 1) / 2)
    texture_transform = _similarity_transform(
        center,
        center,
        center + (uniforms[:, 12] - 0.5) * side,
        center + (uniforms[:, 13] - 0.5) * side,
        uniforms[:, 14] * 2 * math.pi,
        0.5 + uniforms[:, 15],
    )
    warped = _warp(images, tf.where(use_noise[:, None], texture_transform, cut_transform))

    # Masks: the rotated rectangle (offset from the target centre, rotated into the patch frame)
    # or the thresholded smooth noise.
    x, y = _pixel_grid(size)
    dx, dy = x - target_x[:, None, None], y - target_y[:, None, None]
    cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
    rectangles = (tf.abs(cos * dx - sin * dy) <= patch_w[:, None, None] / 2) & (
        tf.abs(sin * dx + cos * dy) <= patch_h[:, None, None] / 2
    )
    field = 0.0
    for grid, weight in zip(_NOISE_GRIDS, _NOISE_WEIGHTS):
        field += weight * tf.image.resize(params[f"noise_{grid}"], [size, size], method="bicubic")
    field = field[..., 0]
    low = tf.reduce_min(field, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(field, axis=[1, 2], keepdims=True)
    field = (field - low) / tf.maximum(high - low, 1e-6)
    blobs = field > (0.6 + 0.25 * uniforms[:, 11])[:, None, None]
    masks = tf.where(use_noise[:, None, None], blobs, rectangles)

    # Colour, as scale * warped + offset per image and channel.
    channels = images.shape[3]
    contrast = 0.6 + 0.8 * uniforms[:, 10]
    brightness = (uniforms[:, 9] - 0.5) * 0.4
    mean = tf.reduce_mean(warped, axis=[1, 2, 3])
    cut_scale = tf.tile(contrast[:, None], [1, channels])
    cut_offset = tf.tile(((1.0 - contrast) * mean + brightness)[:, None], [1, channels])
    invert = (uniforms[:, 16] < 0.3)[:, None]
    texture_scale = tf.where(invert, -params["gains"], params["gains"])
    texture_offset = tf.where(invert, tf.ones_like(texture_scale), tf.zeros_like(texture_scale))
    scale = tf.where(use_noise[:, None], texture_scale, cut_scale)[:, None, None, :]
    offset = tf.where(use_noise[:, None], texture_offset, cut_offset)[:, None, None, :]
    patch = tf.clip_by_value(warped * scale + offset, 0.0, 1.0)
    opacity = tf.where(use_noise, 0.4 + 0.6 * uniforms[:, 17], tf.ones_like(uniforms[:, 17]))
    weight = tf.cast(masks, tf.float32)[..., None] * opacity[:, None, None, None]
    return images + (patch - images) * weight, masks


def apply_anomalies(
    batch: dict[str, tf.Tensor], params: dict[str, tf.Tensor], synthetic_type: int = -1
) -> dict:
    """Pastes synthetic anomalies into a batch (where `params['apply']`).

    Only the selected images are processed (gathered, then scattered back), so the cost scales
    with `data.synthetic_anomaly_prob`.

    Args:
      batch: `images [B,S,S,C]` f32 in [0, 1] and the other contract keys (`masks`, `labels`,
        `defect_types`, `boxes [B,G,4]`, `box_classes`, `box_valid`, ...).
      params: batched `sample_anomaly_params` output.
      synthetic_type: `defect_types` of an anomaly: -1 (unknown type) or, when the class map
        is the single class-agnostic 'defect' (unsupervised protocol), its id 1.

    Returns:
      The batch with `images`, `masks`, `labels`, `defect_types`, `boxes`, `box_classes`,
      `box_valid` updated and `clean_images` = the input images.
    """
    images = batch["images"]
    selected = tf.where(params["apply"])[:, 0]
    chosen = tf.nest.map_structure(lambda value: tf.gather(value, selected), params)
    new_images, new_masks = _synthesize(tf.gather(images, selected), chosen)
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
