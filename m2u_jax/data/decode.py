"""Reading images, extra modalities and masks with validation, and boxes from masks (no TF).

Every problem with a file raises `DataError` whose message starts with the file's path and says
what is wrong (unreadable, truncated, wrong channel count, size mismatch, ...), so bad input is
diagnosed here, in Python, and never as a crash deep inside TensorFlow.

Value conventions (the sample contract in docs/interfaces.md):

- 8-bit sources scale by 1/255, 16-bit sources by 1/65535.
- `rgb` accepts RGB, palette and grayscale files; grayscale is replicated to 3 channels (e.g.
  the Magnetic-tile set). Alpha or CMYK channels are an error.
- `gray` accepts the same files as one channel: grayscale as it is, RGB and palette converted
  to luma by Pillow's ITU-R 601-2 rule (L = 0.299 R + 0.587 G + 0.114 B, rounded).
- `thermal` / `xray` / `depth` need single-channel files; float files are min-max normalised per
  image over their finite values.
- `depth` is always normalised per image to [0, 1] over its *valid* pixels (finite and non-zero,
  the MVTec 3D-AD convention for missing points); invalid pixels become 0. A 3-channel float
  TIFF is an organised point cloud (MVTec 3D-AD `xyz`): its z channel is the depth. Depth is
  resized with nearest-neighbour sampling so invalid zeros never blend into valid depths.
- Images are resized to S x S (aspect ratio not kept; boxes scale per axis) with Pillow's
  bilinear filter (antialiased when shrinking); decoded images are returned as uint16 scaled by
  65535, exact for 8- and 16-bit sources and half the memory of float32 in the cache.
- Masks are resized with nearest-neighbour sampling, then binarised: values >= half the file's
  range (128 for 8-bit, 32768 for 16-bit) are defective, except for masks whose values are all
  0/1, where 1 is defective.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from m2u_jax.modalities import IMAGE_FILE_MODALITIES, MODALITY_CHANNELS
from m2u_jax.data.records import DataError, SampleRecord

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Largest channel spread, in [0, 1], of an image that counts as gray: JPEG stores a gray picture
# saved as RGB with channels a grey level or so apart (data.synthetic_match_gray, the summary).
GRAY_TOLERANCE = 2.0 / 255.0
# Pillow modes -> channels as stored in the file.
_MODE_CHANNELS = {
    "1": 1,
    "L": 1,
    "P": 3,
    "I": 1,
    "I;16": 1,
    "I;16B": 1,
    "I;16L": 1,
    "F": 1,
    "RGB": 3,
    "LA": 2,
    "PA": 4,
    "RGBA": 4,
    "CMYK": 4,
    "YCbCr": 3,
}
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")
# Largest image (pixels) decoded: 64 MP, 8x the biggest industrial sets; a header claiming more
# is rejected before decoding, so a corrupt or hostile file cannot exhaust memory.
logger = logging.getLogger(__name__)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What a file's header says: size in pixels and channels as stored."""

    width: int
    height: int
    channels: int
    mode: str


def _is_float_tiff(path: str) -> bool:
    return path.lower().endswith((".tif", ".tiff"))


def _open(path: str, data: bytes | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError as error:  # not an OSError: would escape as a crash
        raise DataError(f"{path}: image too large to decode ({error})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read file (permission denied)") from None
    except OSError as error:
        raise DataError(f"{path}: truncated or corrupt image ({error})") from None
    # The header alone says the size: reject a pixel bomb before any pixel is decoded.
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(
            f"{path}: image is {image.width}x{image.height} pixels, more than the "
            f"{MAX_IMAGE_PIXELS} pixels decode.MAX_IMAGE_PIXELS allows (corrupt header?)"
        )
    return image


def probe_image(path: str | pathlib.Path) -> ImageHeader:
    """Reads only the header: size and stored channels (cheap; used at discovery time)."""
    path = str(path)
    try:
        with _open(path, None) as image:
            return ImageHeader(
                image.width, image.height, _MODE_CHANNELS.get(image.mode, 0), image.mode
            )
    except DataError:
        if not _is_float_tiff(path):
            raise
    # Pillow cannot open multi-channel float TIFFs (MVTec 3D-AD xyz): tifffile reads the header.
    height, width, channels = _float_tiff_layout(path)[1:]
    return ImageHeader(width, height, channels, "F")


def check_modality_header(path: str, header: ImageHeader, modality: str) -> None:
    """Raises DataError when the file's channels cannot feed `modality`."""
    if modality in IMAGE_FILE_MODALITIES:
        if header.channels not in (1, 3) or header.mode == "YCbCr":
            how = "grayscale, replicated" if modality == "rgb" else "grayscale"
            into = "(RGB)" if modality == "rgb" else "(RGB, converted to luma)"
            raise DataError(
                f"{path}: has {header.channels} channels (mode {header.mode}); '{modality}' needs "
                f"3 {into} or 1 ({how}): drop the alpha channel or convert to RGB"
            )
    elif modality == "depth":
        if header.channels not in (1, 3) or (header.channels == 3 and header.mode != "F"):
            raise DataError(
                f"{path}: has {header.channels} channels (mode {header.mode}); 'depth' needs a "
                "single-channel image or a 3-channel float xyz TIFF"
            )
    elif header.channels != 1:
        raise DataError(
            f"{path}: has {header.channels} channels (mode {header.mode}); "
            f"'{modality}' needs a single-channel image"
        )


_MASK_MODES = ("1", "L", "P", "RGB") + _SIXTEEN_BIT_MODES


def check_mask_header(path: str, header: ImageHeader) -> None:
    """Raises DataError when the file cannot be a mask (masks are single-channel or gray RGB)."""
    if header.mode not in _MASK_MODES:
        raise DataError(
            f"{path}: mask has {header.channels} channels (mode {header.mode}); masks must be "
            "single-channel 8/16-bit images"
        )


def _load_pillow(path: str, data: bytes | None) -> Image.Image:
    """Opens, verifies (checksums) and fully decodes an image: catches truncated files."""
    image = _open(path, data)
    try:
        image.verify()
    except Exception as error:  # Pillow raises several types for corrupt data.
        raise DataError(f"{path}: truncated or corrupt image ({error})") from None
    image = _open(path, data)  # verify() leaves the object unusable; reopen to decode.
    try:
        image.load()
    except OSError as error:
        raise DataError(f"{path}: truncated or corrupt image ({error})") from None
    return image


def _normalise_finite(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Min-max scales `values` to [0, 1] over `valid`; everything else becomes 0."""
    output = np.zeros(values.shape, np.float32)
    if valid.any():
        low, high = values[valid].min(), values[valid].max()
        if high > low:
            output[valid] = (values[valid] - low) / (high - low)
    return output


def read_modality(path: str, modality: str, *, data: bytes | None = None) -> tuple[np.ndarray, str]:
    """Reads one modality file at its native size.

    Args:
      path: the file (also the name used in errors when `data` holds its bytes).
      modality: a key of `MODALITY_CHANNELS` ('rgb', 'gray', 'thermal', 'xray', 'depth').
      data: the encoded file, when it does not come from the file system (TFDS).

    Returns:
      `(array, kind)`: `[h, w, c]` with c = the modality's channels, where kind 'uint8' and
      'uint16' hold raw integers and kind 'float' holds float32 already in [0, 1].
    """
    if modality not in MODALITY_CHANNELS:
        raise DataError(f"{path}: unknown modality {modality!r}; known {sorted(MODALITY_CHANNELS)}")
    if _is_float_tiff(path) and data is None:
        header = probe_image(path)
        if header.mode == "F" and header.channels > 1:  # Pillow cannot decode these.
            return _read_float_tiff_modality(path, modality), "float"
    image = _load_pillow(path, data)
    header = ImageHeader(image.width, image.height, _MODE_CHANNELS.get(image.mode, 0), image.mode)
    check_modality_header(path, header, modality)
    if image.mode == "P":
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    if modality == "gray" and image.mode == "RGB":
        image = image.convert("L")
    if image.mode in ("L", "RGB"):
        array = np.asarray(image, np.uint8)
        kind = "uint8"
    elif image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.int64)
        if array.min() < 0 or array.max() > 65535:
            raise DataError(f"{path}: integer image values outside the 16-bit range [0, 65535]")
        array = array.astype(np.uint16)
        kind = "uint16"
    else:  # 'F'
        array = np.asarray(image, np.float32)
        kind = "float"
    if array.ndim == 2:
        array = array[..., None]
    if modality == "depth":
        depth = array[..., 0].astype(np.float32)
        valid = np.isfinite(depth) & (depth != 0)
        return _normalise_finite(depth, valid)[..., None], "float"
    if kind == "float":
        values = array[..., 0]
        array = _normalise_finite(values, np.isfinite(values))[..., None]
    if modality == "rgb" and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array, kind


def is_gray(array: np.ndarray, kind: str) -> bool:
    """Whether `read_modality`'s `(array, kind)` is a gray picture: one channel, or channels
    within `GRAY_TOLERANCE` of each other at every pixel."""
    if array.shape[-1] == 1:
        return True
    scale = {"uint8": 255.0, "uint16": 65535.0}.get(kind, 1.0)
    spread = array.max(axis=-1).astype(np.float32) - array.min(axis=-1).astype(np.float32)
    return float(spread.max()) / scale <= GRAY_TOLERANCE


def _float_tiff_layout(path: str) -> tuple[str, int, int, int]:
    """(axes, height, width, channels) of a float32 TIFF's first image; DataError naming the
    file for anything else."""
    import tifffile  # only MVTec 3D-AD-style point maps need it

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            axes, shape, dtype = series.axes, series.shape, series.dtype
    except Exception as error:  # tifffile raises many types for broken files
        raise DataError(f"{path}: not a readable image ({error})") from None
    if dtype != np.float32 or not {"Y", "X"} <= set(axes) or len(shape) > 3:
        raise DataError(
            f"{path}: TIFF of {dtype} with axes {axes}; expected float32 samples [h, w(, c)]"
        )
    size = dict(zip(axes, shape))
    channels = next((size[a] for a in axes if a not in "YX"), 1)
    return axes, size["Y"], size["X"], channels


def _read_float_tiff(path: str) -> np.ndarray:
    """`[h, w, c]` float32 of a float TIFF (tifffile), samples last whatever the planar layout."""
    import tifffile

    axes = _float_tiff_layout(path)[0]
    try:
        values = tifffile.imread(path)
    except Exception as error:  # truncated strips, bad compression data, ...
        raise DataError(f"{path}: truncated or corrupt TIFF ({error})") from None
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a not in "YX"]
    values = np.transpose(values, order)
    return values[..., None] if values.ndim == 2 else values


def _read_float_tiff_modality(path: str, modality: str) -> np.ndarray:
    values = _read_float_tiff(path)
    channels = values.shape[-1]
    if modality == "depth":
        if channels not in (1, 3):
            raise DataError(
                f"{path}: float TIFF has {channels} channels; 'depth' needs 1 (depth) or 3 "
                "(x, y, z point map)"
            )
        depth = values[..., -1]  # z of an xyz point map, or the only channel.
        valid = np.isfinite(depth) & (depth != 0)
        return _normalise_finite(depth, valid)[..., None]
    if modality == "rgb" or channels != 1:
        raise DataError(
            f"{path}: float TIFF with {channels} channels cannot feed '{modality}' "
            f"(needs {MODALITY_CHANNELS[modality]} 8/16-bit or 1 float channel)"
        )
    return _normalise_finite(values[..., 0], np.isfinite(values[..., 0]))[..., None]


def read_mask(path: str, *, data: bytes | None = None) -> np.ndarray:
    """Reads a mask file at its native size: `[h, w]` bool (True = defective pixel).

    Masks are read by their gray *values*, never by palette index: a palette image is seen
    through its palette. A mask holding exactly two values marks the higher one (0/1, 0/100,
    0/255 in a 16-bit file, ...); any other mask marks the values at or above half its bit
    depth's range (128 of 255, 32768 of 65535). `mask_problem` names masks that still look
    wrong."""
    image = _load_pillow(path, data)
    header = ImageHeader(image.width, image.height, _MODE_CHANNELS.get(image.mode, 0), image.mode)
    check_mask_header(path, header)
    if image.mode == "1":
        return np.asarray(image, bool)
    if image.mode == "P":  # the palette's colours, not the indices (index 0 may be white)
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3:
        if not (
            np.array_equal(array[..., 0], array[..., 1])
            and np.array_equal(array[..., 0], array[..., 2])
        ):
            raise DataError(f"{path}: mask is a colour image (channels differ); masks must be gray")
        array = array[..., 0]
    return _binarise(array, image.mode)


def _binarise(array: np.ndarray, mode: str) -> np.ndarray:
    values = np.unique(array)
    if values.size == 2:
        return array == values[1]
    threshold = 32768 if mode in _SIXTEEN_BIT_MODES else 128
    return array >= threshold


def mask_problem(mask: np.ndarray, defective: bool) -> str | None:
    """Why a decoded mask looks wrong for its image, or None: empty on a defective image, or
    more than half set (an inverted mask?)."""
    if defective and not mask.any():
        return "the mask of a defective image is empty"
    if mask.mean() > 0.5:
        return f"{mask.mean():.0%} of the mask is set (inverted?)"
    return None


def resize_to_uint16(
    array: np.ndarray, kind: str, size: int, *, nearest: bool = False
) -> np.ndarray:
    """Resizes a `read_modality` result to `[size, size, c]` uint16 (value = round(x * 65535))."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if kind == "uint8":
        mode = "RGB" if array.shape[-1] == 3 else "L"
        image = Image.fromarray(array if mode == "RGB" else array[..., 0], mode)
        if image.size != (size, size):
            image = image.resize((size, size), resample)
        resized = np.asarray(image, np.uint16).reshape(size, size, -1)
        return resized * np.uint16(257)  # k/255 == 257k/65535 exactly.
    scale = 1.0 / 65535.0 if kind == "uint16" else 1.0
    channels = []
    for channel in range(array.shape[-1]):
        plane = Image.fromarray(array[..., channel].astype(np.float32) * np.float32(scale), "F")
        if plane.size != (size, size):
            plane = plane.resize((size, size), resample)
        channels.append(np.asarray(plane, np.float32))
    stacked = np.clip(np.stack(channels, axis=-1), 0.0, 1.0)
    return np.round(stacked * 65535.0).astype(np.uint16)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """`[h, w]` bool -> `[size, size]` bool with nearest-neighbour sampling."""
    if mask.shape == (size, size):
        return mask.copy()
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((size, size), Image.NEAREST)
    return np.asarray(image) >= 128


def boxes_from_mask(mask: np.ndarray, threshold: float = 0.5, min_pixels: int = 1) -> np.ndarray:
    """Boxes of the 8-connected components of `mask > threshold`, largest component first.

    Args:
      mask: `[H, W]` (bool, {0, 1}, {0, 255} or a soft map with a matching `threshold`).
      threshold: foreground cut (0.5 suits {0, 1} masks and nearest or bilinear resizes).
      min_pixels: components with fewer pixels are dropped (specks).
    Returns:
      `[N, 4]` float32 xyxy in pixels: x1/y1 = first column/row of the component, x2/y2 = last
      column/row + 1 (so a single pixel at (r, c) is (c, r, c + 1, r + 1)). Ordered by pixel
      count (descending), ties by (y1, x1) so the order is deterministic.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    # scipy only here: the deploy path (image reading for the ONNX predictor) runs without it.
    from scipy import ndimage

    labels, count = ndimage.label(mask > threshold, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros((0, 4), np.float32)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)
    boxes = np.array(
        [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.float32
    )
    keep = areas >= min_pixels
    boxes, areas = boxes[keep], areas[keep]
    order = np.lexsort((boxes[:, 0], boxes[:, 1], -areas))
    return boxes[order]


def scale_boxes(boxes, width: int, height: int, image_size: int) -> np.ndarray:
    """xyxy boxes in a `width` x `height` image → `[G, 4]` float32 in the S x S input frame
    (per axis: the image is resized without keeping its aspect ratio)."""
    scale = np.array([image_size / width, image_size / height] * 2, np.float32)
    return np.asarray(boxes, np.float32).reshape(-1, 4) * scale


def mask_from_boxes(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fills boxes into a `[height, width]` bool mask: pixels whose centre lies in a box, and at
    least one pixel per box (VOC data has no pixel masks; this is the documented stand-in)."""
    mask = np.zeros((height, width), bool)
    for x1, y1, x2, y2 in np.asarray(boxes_xyxy, np.float64).reshape(-1, 4):
        col0 = min(int(np.ceil(x1 - 0.5)), width - 1)
        row0 = min(int(np.ceil(y1 - 0.5)), height - 1)
        col1 = max(int(np.ceil(x2 - 0.5)), col0 + 1)
        row1 = max(int(np.ceil(y2 - 0.5)), row0 + 1)
        mask[max(row0, 0) : row1, max(col0, 0) : col1] = True
    return mask


def pad_boxes(
    boxes_xyxy: np.ndarray, classes: np.ndarray, max_boxes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeps the `max_boxes` largest boxes (by area, stable) and zero-pads.

    Returns `boxes [G, 4]` f32, `classes [G]` i32 (0 in padding), `valid [G]` f32.
    """
    boxes_xyxy = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int32).reshape(-1)
    areas = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    order = np.argsort(-areas, kind="stable")[:max_boxes]
    count = len(order)
    padded = np.zeros((max_boxes, 4), np.float32)
    padded_classes = np.zeros((max_boxes,), np.int32)
    valid = np.zeros((max_boxes,), np.float32)
    padded[:count] = boxes_xyxy[order]
    padded_classes[:count] = classes[order]
    valid[:count] = 1.0
    return padded, padded_classes, valid


@dataclasses.dataclass(frozen=True)
class DecodedSample:
    """One decoded, resized sample (numpy).

    image `[S, S, C]` uint16 (x65535), mask `[S, S]` uint8 {0, 1}, boxes `[G, 4]` f32 xyxy in
    the S x S frame, box_classes `[G]` i32, box_valid `[G]` f32.
    """

    image: np.ndarray
    mask: np.ndarray
    boxes: np.ndarray
    box_classes: np.ndarray
    box_valid: np.ndarray


def decode_record(
    record: SampleRecord,
    *,
    image_size: int,
    modalities: Sequence[str],
    max_boxes: int,
    box_class_of: Mapping[str, int],
    file_bytes: Mapping[str, bytes] | None = None,
) -> DecodedSample:
    """Reads, validates and resizes every modality, the mask and the boxes of one record.

    Args:
      record: a `records.SampleRecord`.
      image_size: side S of the square output.
      modalities: stacked in this order (channels as in `MODALITY_CHANNELS`).
      max_boxes: G; the largest boxes are kept.
      box_class_of: defect name -> box class (type - 1, or 0 for class-agnostic detection).
      file_bytes: path -> encoded bytes for files that are not on disk (TFDS examples).

    Raises:
      DataError: naming the file, for unreadable, truncated or inconsistent files.
    """
    file_bytes = file_bytes or {}
    planes = []
    native_size = None
    for modality in modalities:
        path = record.modality_paths[modality]
        array, kind = read_modality(path, modality, data=file_bytes.get(path))
        size = (array.shape[1], array.shape[0])
        if native_size is None:
            native_size, first_path = size, path
        elif size != native_size:
            raise DataError(
                f"{path}: {modality} image is {size[0]}x{size[1]} but {first_path} is "
                f"{native_size[0]}x{native_size[1]}; modalities must have the same size"
            )
        planes.append(resize_to_uint16(array, kind, image_size, nearest=modality == "depth"))
    image = np.concatenate(planes, axis=-1)
    width, height = native_size
    if record.boxes is not None:  # Annotated boxes (VOC): scale to the S x S frame.
        boxes = scale_boxes(record.boxes, width, height, image_size)
        classes = np.array([box_class_of[name] for name in record.box_names], np.int32)
        mask = mask_from_boxes(boxes, image_size, image_size)
    else:
        if record.mask_path is not None:
            native_mask = read_mask(record.mask_path, data=file_bytes.get(record.mask_path))
            if native_mask.shape != (height, width):
                raise DataError(
                    f"{record.mask_path}: mask is {native_mask.shape[1]}x{native_mask.shape[0]} "
                    f"but its image {record.path} is {width}x{height}"
                )
            problem = mask_problem(native_mask, record.label == 1)
            if problem:
                logger.warning("%s: %s", record.mask_path, problem)
            mask = resize_mask(native_mask, image_size)
        else:
            mask = np.zeros((image_size, image_size), bool)
        boxes = boxes_from_mask(mask)
        if record.defect_name in box_class_of:
            box_class = box_class_of[record.defect_name]
        else:
            box_class = 0
        classes = np.full((len(boxes),), box_class, np.int32)
    padded, padded_classes, valid = pad_boxes(boxes, classes, max_boxes)
    return DecodedSample(image, mask.astype(np.uint8), padded, padded_classes, valid)
