"""Float32 TIFF reading / writing without tifffile (m2u_jax.data.float_tiff)."""

import numpy as np
import pytest
from PIL import Image

from m2u_jax.data import float_tiff


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("deflate", [False, True])
def test_round_trip(tmp_path, channels, deflate):
    values = np.random.default_rng(channels).normal(size=(5, 7, channels)).astype(np.float32)
    path = tmp_path / "x.tiff"
    float_tiff.write_float_tiff(path, values, deflate=deflate)
    assert float_tiff.tiff_shape(path) == (5, 7, channels)
    np.testing.assert_array_equal(float_tiff.read_float_tiff(path), values)


def test_single_channel_file_matches_pillow(tmp_path):
    # Pillow reads one-channel float TIFFs: an independent check of the writer's layout.
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    path = tmp_path / "x.tiff"
    float_tiff.write_float_tiff(path, values)
    with Image.open(path) as image:
        assert image.mode == "F"
        np.testing.assert_array_equal(np.asarray(image), values)


def test_bad_files_name_the_file(tmp_path):
    path = tmp_path / "x.tiff"
    float_tiff.write_float_tiff(path, np.ones((4, 4, 3), np.float32))
    data = path.read_bytes()
    # Directory at the end: cutting pixel data keeps a readable header but truncates the strip.
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(data[:8] + data[8 + 100 :])
    with pytest.raises(float_tiff.TiffError, match=f"{truncated}: truncated"):
        float_tiff.read_float_tiff(truncated)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(png)
    with pytest.raises(float_tiff.TiffError, match="not a TIFF file"):
        float_tiff.read_float_tiff(png)
    eight_bit = tmp_path / "u8.tiff"
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(eight_bit)
    with pytest.raises(float_tiff.TiffError, match="expected float32 samples"):
        float_tiff.read_float_tiff(eight_bit)


def test_unsupported_compression_says_what_to_install(tmp_path):
    path = tmp_path / "lzw.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path, compression="tiff_lzw")
    try:
        import tifffile  # noqa: F401
    except ImportError:
        with pytest.raises(float_tiff.TiffError, match="compression 5 .*install tifffile"):
            float_tiff.read_float_tiff(path)
    else:  # With tifffile installed the file is simply read.
        np.testing.assert_array_equal(float_tiff.read_float_tiff(path), np.ones((4, 4, 1)))
