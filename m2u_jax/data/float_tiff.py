"""Float32 multi-channel TIFF reading and writing (MVTec 3D-AD `xyz` point maps).

Pillow reads float TIFFs only with one channel (mode 'F'), and MVTec 3D-AD stores its organised
point clouds as 3-channel float32 TIFFs, so a small built-in reader handles the baseline layouts
such files use: classic (not Big) TIFF, either byte order, float32 samples, strips or tiles,
chunky or planar, uncompressed or deflate (zlib) without a predictor. Other layouts (LZW,
predictors, BigTIFF) are read with `tifffile` when it is installed, and otherwise raise
`TiffError` naming the file and the unsupported feature.

`write_float_tiff` writes the simplest such file (one strip, chunky, optionally deflated); the
tests and synthetic multi-modal trees use it.
"""

from __future__ import annotations

import pathlib
import struct
import zlib

import numpy as np

# TIFF tag numbers (TIFF 6.0 specification).
_IMAGE_WIDTH = 256
_IMAGE_LENGTH = 257
_BITS_PER_SAMPLE = 258
_COMPRESSION = 259
_PHOTOMETRIC = 262
_STRIP_OFFSETS = 273
_SAMPLES_PER_PIXEL = 277
_ROWS_PER_STRIP = 278
_STRIP_BYTE_COUNTS = 279
_PLANAR_CONFIG = 284
_PREDICTOR = 317
_TILE_WIDTH = 322
_TILE_LENGTH = 323
_TILE_OFFSETS = 324
_TILE_BYTE_COUNTS = 325
_SAMPLE_FORMAT = 339

# Field type -> (struct code, byte size). 16 (LONG8) appears only in BigTIFF.
_FIELD_TYPES = {1: ("B", 1), 2: ("c", 1), 3: ("H", 2), 4: ("I", 4), 5: ("II", 8), 11: ("f", 4)}
_NO_COMPRESSION = 1
_DEFLATE_CODES = (8, 32946)
_IEEE_FLOAT = 3


class TiffError(ValueError):
    """A TIFF file that cannot be read; the message names the file and the problem."""


def _read_tags(data: bytes, path: str, inline_only: bool = False) -> tuple[str, dict[int, tuple]]:
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        raise TiffError(f"{path}: not a TIFF file (bad byte-order mark)")
    order = "<" if data[:2] == b"II" else ">"
    (magic,) = struct.unpack(order + "H", data[2:4])
    if magic == 43:
        raise TiffError(
            f"{path}: BigTIFF is not supported by the built-in reader; install tifffile"
        )
    if magic != 42:
        raise TiffError(f"{path}: not a TIFF file (magic number {magic})")
    (ifd_offset,) = struct.unpack(order + "I", data[4:8])
    if ifd_offset + 2 > len(data):
        raise TiffError(f"{path}: truncated TIFF (first directory at {ifd_offset} is past the end)")
    (num_entries,) = struct.unpack(order + "H", data[ifd_offset : ifd_offset + 2])
    tags = {}
    for entry in range(num_entries):
        start = ifd_offset + 2 + 12 * entry
        if start + 12 > len(data):
            raise TiffError(f"{path}: truncated TIFF directory")
        tag, field_type, count = struct.unpack(order + "HHI", data[start : start + 8])
        if field_type not in _FIELD_TYPES:
            continue  # Unknown field types hold nothing this reader needs.
        code, size = _FIELD_TYPES[field_type]
        nbytes = size * count
        if nbytes <= 4:
            raw = data[start + 8 : start + 8 + nbytes]
        elif inline_only:
            continue  # Header-only parsing: out-of-line values are not in `data`.
        else:
            (offset,) = struct.unpack(order + "I", data[start + 8 : start + 12])
            if offset + nbytes > len(data):
                raise TiffError(f"{path}: truncated TIFF (tag {tag} points past the end)")
            raw = data[offset : offset + nbytes]
        if field_type == 2:
            tags[tag] = (raw,)
        else:
            tags[tag] = struct.unpack(order + code * count, raw)
    return order, tags


def _tag(tags: dict, tag: int, path: str, default=None) -> tuple:
    if tag in tags:
        return tags[tag]
    if default is None:
        raise TiffError(f"{path}: TIFF lacks required tag {tag}")
    return default


def tiff_shape(path: str | pathlib.Path) -> tuple[int, int, int]:
    """(height, width, channels) from the first directory, without reading the pixel data."""
    path = str(path)
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            raise TiffError(f"{path}: not a TIFF file (bad byte-order mark)")
        order = "<" if head[:2] == b"II" else ">"
        (ifd_offset,) = struct.unpack(order + "I", head[4:8])
        file.seek(ifd_offset)
        count_bytes = file.read(2)
        if len(count_bytes) < 2:
            raise TiffError(f"{path}: truncated TIFF (no directory at {ifd_offset})")
        (num_entries,) = struct.unpack(order + "H", count_bytes)
        directory = file.read(12 * num_entries)
    # Parse the header and directory as a small standalone TIFF; the tags needed are inline.
    fake = head[:4] + struct.pack(order + "I", 8) + count_bytes + directory
    _, tags = _read_tags(fake, path, inline_only=True)
    height = _tag(tags, _IMAGE_LENGTH, path)[0]
    width = _tag(tags, _IMAGE_WIDTH, path)[0]
    channels = _tag(tags, _SAMPLES_PER_PIXEL, path, (1,))[0]
    return int(height), int(width), int(channels)


def _decode_builtin(data: bytes, path: str) -> np.ndarray:
    order, tags = _read_tags(data, path)
    height = int(_tag(tags, _IMAGE_LENGTH, path)[0])
    width = int(_tag(tags, _IMAGE_WIDTH, path)[0])
    channels = int(_tag(tags, _SAMPLES_PER_PIXEL, path, (1,))[0])
    bits = set(_tag(tags, _BITS_PER_SAMPLE, path, (1,)))
    sample_format = set(_tag(tags, _SAMPLE_FORMAT, path, (1,)))
    if bits != {32} or sample_format != {_IEEE_FLOAT}:
        raise TiffError(
            f"{path}: expected float32 samples, found BitsPerSample={sorted(bits)} "
            f"SampleFormat={sorted(sample_format)}"
        )
    compression = int(_tag(tags, _COMPRESSION, path, (1,))[0])
    if compression != _NO_COMPRESSION and compression not in _DEFLATE_CODES:
        raise TiffError(
            f"{path}: TIFF compression {compression} is not supported by the built-in reader "
            "(only none and deflate); install tifffile"
        )
    if int(_tag(tags, _PREDICTOR, path, (1,))[0]) != 1:
        raise TiffError(
            f"{path}: TIFF predictors are not supported by the built-in reader; install tifffile"
        )
    planar = int(_tag(tags, _PLANAR_CONFIG, path, (1,))[0]) == 2
    dtype = np.dtype(order + "f4")

    def chunk(offset: int, count: int) -> bytes:
        if offset + count > len(data):
            raise TiffError(f"{path}: truncated TIFF (image data ends early)")
        raw = data[offset : offset + count]
        if compression in _DEFLATE_CODES:
            try:
                return zlib.decompress(raw)
            except zlib.error as error:
                raise TiffError(f"{path}: corrupt deflate data ({error})") from None
        return raw

    planes = channels if planar else 1
    samples = 1 if planar else channels
    output = np.zeros((planes, height, width, samples), np.float32)
    if _TILE_OFFSETS in tags:
        tile_w = int(_tag(tags, _TILE_WIDTH, path)[0])
        tile_h = int(_tag(tags, _TILE_LENGTH, path)[0])
        offsets = _tag(tags, _TILE_OFFSETS, path)
        counts = _tag(tags, _TILE_BYTE_COUNTS, path)
        tiles_x = -(-width // tile_w)
        tiles_y = -(-height // tile_h)
        if len(offsets) != planes * tiles_x * tiles_y:
            raise TiffError(f"{path}: {len(offsets)} tiles, expected {planes * tiles_x * tiles_y}")
        for number, (offset, count) in enumerate(zip(offsets, counts)):
            plane, rest = divmod(number, tiles_x * tiles_y)
            row, col = divmod(rest, tiles_x)
            tile = np.frombuffer(chunk(offset, count), dtype, tile_h * tile_w * samples)
            tile = tile.reshape(tile_h, tile_w, samples)
            y0, x0 = row * tile_h, col * tile_w
            h, w = min(tile_h, height - y0), min(tile_w, width - x0)
            output[plane, y0 : y0 + h, x0 : x0 + w] = tile[:h, :w]
    else:
        rows_per_strip = int(_tag(tags, _ROWS_PER_STRIP, path, (height,))[0])
        rows_per_strip = min(rows_per_strip, height)
        offsets = _tag(tags, _STRIP_OFFSETS, path)
        counts = _tag(tags, _STRIP_BYTE_COUNTS, path)
        strips_per_plane = -(-height // rows_per_strip)
        if len(offsets) != planes * strips_per_plane or len(counts) != len(offsets):
            raise TiffError(f"{path}: {len(offsets)} strips, expected {planes * strips_per_plane}")
        for number, (offset, count) in enumerate(zip(offsets, counts)):
            plane, strip = divmod(number, strips_per_plane)
            y0 = strip * rows_per_strip
            rows = min(rows_per_strip, height - y0)
            raw = chunk(offset, count)
            if len(raw) < rows * width * samples * 4:
                raise TiffError(f"{path}: truncated TIFF strip {number}")
            values = np.frombuffer(raw, dtype, rows * width * samples)
            output[plane, y0 : y0 + rows] = values.reshape(rows, width, samples)
    if planar:
        return np.moveaxis(output[..., 0], 0, -1)
    return output[0]


def _read_with_tifffile(path: str, reason: TiffError) -> np.ndarray:
    try:
        import tifffile
    except ImportError:
        raise reason from None
    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            array, axes = np.asarray(series.asarray(), np.float32), series.axes
    except Exception as error:  # tifffile raises many types; report them uniformly.
        raise TiffError(f"{path}: cannot read TIFF ({error})") from None
    if axes.startswith("S"):  # Planar files come back channels-first.
        array = np.moveaxis(array, 0, -1)
    return array[..., None] if array.ndim == 2 else array


def read_float_tiff(path: str | pathlib.Path) -> np.ndarray:
    """Reads a float TIFF as `[H, W, C]` float32 (C = samples per pixel, >= 1).

    The built-in reader runs first; layouts it lacks go to tifffile when that is installed.

    Raises:
      TiffError: the file is missing, truncated, not a float32 TIFF or uses a layout the
        built-in reader lacks (when tifffile is not installed).
    """
    path = str(path)
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as error:
        raise TiffError(f"{path}: cannot read file ({error.strerror})") from None
    try:
        return _decode_builtin(data, path)
    except TiffError as error:
        if "install tifffile" not in str(error):
            raise
        return _read_with_tifffile(path, error)


def write_float_tiff(path: str | pathlib.Path, array: np.ndarray, *, deflate: bool = False) -> None:
    """Writes `[H, W]` or `[H, W, C]` values as a little-endian float32 TIFF (one strip)."""
    values = np.asarray(array, "<f4")
    if values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3:
        raise ValueError(f"write_float_tiff expects [H, W] or [H, W, C], got shape {values.shape}")
    height, width, channels = values.shape
    pixels = values.tobytes()
    if deflate:
        pixels = zlib.compress(pixels)
    # Layout: header, pixel data, per-sample arrays, directory.
    extra = b""
    header_size = 8
    pixel_offset = header_size
    extra_offset = pixel_offset + len(pixels)

    def per_sample(value: int) -> tuple[int, int, int]:
        nonlocal extra
        if channels <= 2:  # Fits in the 4-byte value field.
            packed = struct.pack("<" + "H" * channels, *([value] * channels))
            return 3, channels, struct.unpack("<I", packed.ljust(4, b"\0"))[0]
        offset = extra_offset + len(extra)
        extra += struct.pack("<" + "H" * channels, *([value] * channels))
        return 3, channels, offset

    entries = [
        (_IMAGE_WIDTH, 4, 1, width),
        (_IMAGE_LENGTH, 4, 1, height),
        (_BITS_PER_SAMPLE, *per_sample(32)),
        (_COMPRESSION, 3, 1, 8 if deflate else _NO_COMPRESSION),
        (_PHOTOMETRIC, 3, 1, 2 if channels == 3 else 1),
        (_STRIP_OFFSETS, 4, 1, pixel_offset),
        (_SAMPLES_PER_PIXEL, 3, 1, channels),
        (_ROWS_PER_STRIP, 4, 1, height),
        (_STRIP_BYTE_COUNTS, 4, 1, len(pixels)),
        (_PLANAR_CONFIG, 3, 1, 1),
        (_SAMPLE_FORMAT, *per_sample(_IEEE_FLOAT)),
    ]
    if len(extra) % 2:
        extra += b"\0"
    ifd_offset = extra_offset + len(extra)
    if ifd_offset % 2:  # Directories start on a word boundary.
        extra += b"\0"
        ifd_offset += 1
    directory = struct.pack("<H", len(entries))
    for tag, field_type, count, value in sorted(entries):
        if field_type == 3 and count == 1:
            directory += struct.pack("<HHIHH", tag, field_type, count, value, 0)
        else:
            directory += struct.pack("<HHII", tag, field_type, count, value)
    directory += struct.pack("<I", 0)
    header = b"II" + struct.pack("<HI", 42, ifd_offset)
    pathlib.Path(path).write_bytes(header + pixels + extra + directory)
