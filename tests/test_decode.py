"""Image / mask reading, validation errors, boxes from masks (m2u_jax.data.decode)."""

import re

import numpy as np
import pytest
from PIL import Image

from m2u_jax.data import decode
from m2u_jax.data.records import DataError, SampleRecord
from tests.data_trees import block_mask, rgb_image, save_png, write_float_tiff


def _record(path, mask_path=None, defect="crack", extra=None, boxes=None, names=None):
    modality_paths = {"rgb": str(path), **(extra or {})}
    return SampleRecord(
        path=str(path),
        category="c",
        defect_name=defect,
        source_split="test",
        modality_paths=modality_paths,
        mask_path=None if mask_path is None else str(mask_path),
        width=0,
        height=0,
        boxes=boxes,
        box_names=names,
    )


def test_boxes_from_mask_eight_connected_largest_first():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 1:3] = True  # 4 pixels
    mask[3, 3] = True  # touches the block diagonally: same component (8-connectivity)
    mask[5:9, 6:11] = True  # 20 pixels
    mask[0, 11] = True  # single pixel
    boxes = decode.boxes_from_mask(mask)
    np.testing.assert_array_equal(boxes, [[6, 5, 11, 9], [1, 1, 4, 4], [11, 0, 12, 1]])
    assert boxes.dtype == np.float32
    assert decode.boxes_from_mask(np.zeros((4, 4))).shape == (0, 4)


def test_boxes_from_mask_threshold_min_pixels_and_shape_check():
    mask = np.zeros((6, 8), np.float32)
    mask[1:3, 2:5] = 1  # rows 1-2, columns 2-4
    mask[4, 0] = mask[5, 1] = 1  # diagonal neighbours: one component
    mask[5, 7] = 1  # a single pixel
    expected = [[2, 1, 5, 3], [0, 4, 2, 6], [7, 5, 8, 6]]  # 6, 2 and 1 pixels
    boxes = decode.boxes_from_mask(mask)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    np.testing.assert_array_equal(boxes, expected)
    np.testing.assert_array_equal(decode.boxes_from_mask(mask, min_pixels=2), expected[:2])
    np.testing.assert_array_equal(decode.boxes_from_mask(mask * 255), expected)
    soft = mask * 0.3
    soft[1:3, 2:5] = 0.9
    np.testing.assert_array_equal(decode.boxes_from_mask(soft), expected[:1])
    assert decode.boxes_from_mask(np.zeros((4, 4))).shape == (0, 4)
    with pytest.raises(ValueError, match=r"mask must be \[H, W\]"):
        decode.boxes_from_mask(np.zeros((1, 4, 4)))


def test_pad_boxes_keeps_largest_and_pads():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 2, 3], [5, 5, 7, 7]], np.float32)
    padded, classes, valid = decode.pad_boxes(boxes, [0, 1, 2, 3], max_boxes=3)
    np.testing.assert_array_equal(padded, [[0, 0, 4, 4], [0, 0, 2, 3], [5, 5, 7, 7]])
    np.testing.assert_array_equal(classes, [1, 2, 3])
    padded, classes, valid = decode.pad_boxes(boxes[:1], [2], max_boxes=3)
    np.testing.assert_array_equal(padded, [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(classes, [2, 0, 0])
    np.testing.assert_array_equal(valid, [1, 0, 0])


def test_mask_from_boxes_pixel_centres():
    mask = decode.mask_from_boxes(np.array([[1.0, 2.0, 3.0, 5.0], [6.2, 6.2, 6.4, 6.4]]), 8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:5, 1:3] = True
    expected[6, 6] = True  # a sub-pixel box still marks one pixel
    np.testing.assert_array_equal(mask, expected)


def test_grayscale_is_replicated_for_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = save_png(tmp_path / "g.png", gray)
    array, kind = decode.read_modality(str(path), "rgb")
    assert kind == "uint8" and array.shape == (3, 4, 3)
    np.testing.assert_array_equal(array[..., 2], gray)


def test_gray_reads_grayscale_as_is_and_rgb_as_luma(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    array, kind = decode.read_modality(str(save_png(tmp_path / "g.png", gray)), "gray")
    assert kind == "uint8" and array.shape == (3, 4, 1)
    np.testing.assert_array_equal(array[..., 0], gray)
    # ITU-R 601-2 luma, rounded: 0.299 R + 0.587 G + 0.114 B.
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 50, 155]]], np.uint8)
    array, kind = decode.read_modality(str(save_png(tmp_path / "c.png", pixels)), "gray")
    assert kind == "uint8" and array.shape == (1, 4, 1)
    np.testing.assert_array_equal(array[0, :, 0], [76, 150, 29, 77])
    # A palette file is its RGB colours, then luma.
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.png")
    array, _ = decode.read_modality(str(tmp_path / "p.png"), "gray")
    np.testing.assert_array_equal(array[0, :, 0], [76, 150, 29, 77])
    values = np.full((2, 2), 40000, np.uint16)
    Image.fromarray(values).save(tmp_path / "w.png")
    array, kind = decode.read_modality(str(tmp_path / "w.png"), "gray")
    assert kind == "uint16" and array.shape == (2, 2, 1) and int(array.max()) == 40000


def test_is_gray_allows_a_grey_level_of_spread_between_channels():
    gray = np.repeat(np.arange(6, dtype=np.uint8).reshape(2, 3, 1) * 40, 3, axis=-1)
    assert decode.is_gray(gray, "uint8") and decode.is_gray(gray[..., :1], "uint8")
    gray[1, 2] = (200, 202, 201)  # JPEG's rounding: within 2/255
    assert decode.is_gray(gray, "uint8")
    gray[1, 2] = (200, 203, 201)  # one pixel 3/255 apart: a colour picture
    assert not decode.is_gray(gray, "uint8")
    wide = np.full((2, 2, 3), 30000, np.uint16)
    wide[0, 0, 1] += 500  # just under 2/255 of the 16-bit range (514)
    assert decode.is_gray(wide, "uint16")
    wide[0, 0, 1] += 300
    assert not decode.is_gray(wide, "uint16")


def test_sixteen_bit_thermal_and_resize_is_exact(tmp_path):
    values = np.full((4, 4), 1000, np.uint16)
    path = tmp_path / "t.png"
    Image.fromarray(values).save(path)
    array, kind = decode.read_modality(str(path), "thermal")
    assert kind == "uint16" and array.shape == (4, 4, 1)
    resized = decode.resize_to_uint16(array, kind, 2)
    np.testing.assert_array_equal(resized, np.full((2, 2, 1), 1000, np.uint16))
    # 8-bit: k / 255 is stored as 257 k (exact).
    resized = decode.resize_to_uint16(np.full((4, 4, 3), 51, np.uint8), "uint8", 8)
    np.testing.assert_array_equal(resized, np.full((8, 8, 3), 51 * 257, np.uint16))


@pytest.mark.parametrize(
    "array, modality, message",
    [
        (np.zeros((4, 4, 4), np.uint8), "rgb", "has 4 channels (mode RGBA)"),
        (np.zeros((4, 4, 3), np.uint8), "thermal", "has 3 channels (mode RGB); 'thermal' needs"),
        (
            np.zeros((4, 4, 4), np.uint8),
            "gray",
            "has 4 channels (mode RGBA); 'gray' needs 3 (RGB, converted to luma) or 1 (grayscale)",
        ),
    ],
)
def test_wrong_channel_count_names_file(tmp_path, array, modality, message):
    path = save_png(tmp_path / "bad.png", array)
    with pytest.raises(DataError, match=re.escape(message)) as error:
        decode.read_modality(str(path), modality)
    assert str(error.value).startswith(str(path))


def test_truncated_and_unreadable_files(tmp_path):
    good = save_png(
        tmp_path / "x.png", rgb_image(32, 100) + np.arange(32, dtype=np.uint8)[:, None, None]
    )
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated|corrupt") as error:
        decode.read_modality(str(truncated), "rgb")
    assert str(truncated) in str(error.value)
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(rgb_image(32, 100)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{re.escape(str(jpeg))}: truncated or corrupt"):
        decode.read_modality(str(jpeg), "rgb")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        decode.read_modality(str(text), "rgb")
    with pytest.raises(DataError, match="file not found"):
        decode.read_modality(str(tmp_path / "missing.png"), "rgb")


def test_mask_binarisation(tmp_path):
    values = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    path = save_png(tmp_path / "m.png", values)
    np.testing.assert_array_equal(decode.read_mask(str(path)), [[0, 0, 0, 1, 1, 1]])
    labels = save_png(tmp_path / "labels.png", np.array([[0, 1, 1, 0]], np.uint8))
    np.testing.assert_array_equal(decode.read_mask(str(labels)), [[0, 1, 1, 0]])
    colour = save_png(tmp_path / "colour.png", rgb_image(4, 50))
    with pytest.raises(DataError, match="colour image"):
        decode.read_mask(str(colour))


def test_masks_are_read_by_value_not_by_palette_index_or_bit_depth(tmp_path):
    truth = np.zeros((4, 6), bool)
    truth[1:3, 2:5] = True
    # A palette mask whose index 0 is white (what Image.quantize(2) writes).
    palette = Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).quantize(2)
    assert palette.getpalette()[:3] == [255, 255, 255]  # index 0 is the defect colour here
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(decode.read_mask(str(tmp_path / "palette.png")), truth)
    # Two-valued masks: the higher value is the defect, whatever the range.
    for name, values in (
        ("hundred.png", np.where(truth, 100, 0).astype(np.uint8)),
        ("sixteen.png", np.where(truth, 255, 0).astype(np.uint16)),
    ):
        Image.fromarray(values).save(tmp_path / name)
        np.testing.assert_array_equal(decode.read_mask(str(tmp_path / name)), truth, err_msg=name)


def test_mask_problem_names_empty_and_mostly_set_masks():
    empty = np.zeros((4, 4), bool)
    assert decode.mask_problem(empty, defective=True) == "the mask of a defective image is empty"
    assert decode.mask_problem(empty, defective=False) is None
    inverted = np.ones((4, 4), bool)
    inverted[0, 0] = False
    assert decode.mask_problem(inverted, defective=True) == "94% of the mask is set (inverted?)"
    small = np.zeros((4, 4), bool)
    small[1, 1] = True
    assert decode.mask_problem(small, defective=True) is None


def test_depth_from_xyz_normalised_over_valid_pixels(tmp_path):
    xyz = np.zeros((2, 3, 3), np.float32)
    xyz[..., 2] = [[0.0, 400.0, 450.0], [500.0, np.nan, 425.0]]
    path = tmp_path / "xyz.tiff"
    write_float_tiff(path, xyz)
    assert decode.probe_image(path) == decode.ImageHeader(3, 2, 3, "F")
    depth, kind = decode.read_modality(str(path), "depth")
    assert kind == "float"
    np.testing.assert_allclose(depth[..., 0], [[0.0, 0.0, 0.5], [1.0, 0.0, 0.25]])
    with pytest.raises(DataError, match="cannot feed 'thermal'"):
        decode.read_modality(str(path), "thermal")


def test_decode_record_stacks_modalities_and_boxes(tmp_path):
    image = save_png(tmp_path / "000.png", rgb_image(8, 60))
    thermal = save_png(tmp_path / "000.thermal.png", np.full((8, 8), 255, np.uint8))
    mask = save_png(tmp_path / "000_mask.png", block_mask(8, [(0, 4, 0, 4), (6, 8, 6, 8)]))
    record = _record(image, mask, extra={"thermal": str(thermal)})
    sample = decode.decode_record(
        record,
        image_size=4,
        modalities=("thermal", "rgb"),
        max_boxes=3,
        box_class_of={"crack": 2},
    )
    assert sample.image.shape == (4, 4, 4) and sample.image.dtype == np.uint16
    np.testing.assert_array_equal(sample.image[0, 0], [65535, 60 * 257, 30 * 257, 195 * 257])
    expected_mask = np.zeros((4, 4), np.uint8)
    expected_mask[:2, :2] = 1
    expected_mask[3, 3] = 1
    np.testing.assert_array_equal(sample.mask, expected_mask)
    np.testing.assert_array_equal(sample.boxes, [[0, 0, 2, 2], [3, 3, 4, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(sample.box_classes, [2, 2, 0])
    np.testing.assert_array_equal(sample.box_valid, [1, 1, 0])


def test_decode_record_errors_name_the_file(tmp_path):
    image = save_png(tmp_path / "000.png", rgb_image(8, 60))
    small_mask = save_png(tmp_path / "000_mask.png", block_mask(6, [(0, 2, 0, 2)]))
    with pytest.raises(DataError, match=f"{small_mask}: mask is 6x6 but its image .* is 8x8"):
        decode.decode_record(
            _record(image, small_mask),
            image_size=4,
            modalities=("rgb",),
            max_boxes=2,
            box_class_of={"crack": 0},
        )
    thermal = save_png(tmp_path / "000.thermal.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(DataError, match="thermal image is 8x5 but .* is 8x8"):
        decode.decode_record(
            _record(image, None, defect="good", extra={"thermal": str(thermal)}),
            image_size=4,
            modalities=("rgb", "thermal"),
            max_boxes=2,
            box_class_of={},
        )


def test_decode_record_voc_boxes_scale_and_fill_mask(tmp_path):
    image = save_png(tmp_path / "a.png", rgb_image(10, 60, width=20))
    record = _record(
        image,
        boxes=((0.0, 0.0, 5.0, 10.0), (10.0, 2.0, 20.0, 4.0)),
        names=("patches", "inclusion"),
    )
    sample = decode.decode_record(
        record,
        image_size=10,
        modalities=("rgb",),
        max_boxes=2,
        box_class_of={"inclusion": 0, "patches": 1},
    )
    # x scales by 10 / 20, y by 10 / 10; the larger box comes first.
    np.testing.assert_allclose(sample.boxes, [[0, 0, 2.5, 10], [5, 2, 10, 4]])
    np.testing.assert_array_equal(sample.box_classes, [1, 0])
    expected = np.zeros((10, 10), np.uint8)
    expected[:, 0:2] = 1  # pixel centres 0.5 and 1.5 lie in [0, 2.5)
    expected[2:4, 5:10] = 1
    np.testing.assert_array_equal(sample.mask, expected)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_float_tiffs_read_at_their_values_with_samples_last(tmp_path, channels, compression):
    values = np.random.default_rng(channels).random((5, 7, channels), dtype=np.float32)
    path = tmp_path / "x.tiff"
    write_float_tiff(path, values, compression=compression)
    assert decode.probe_image(path) == decode.ImageHeader(7, 5, channels, "F")
    np.testing.assert_array_equal(decode._read_float_tiff(str(path)), values)


def test_a_one_channel_float_image_is_normalised_then_replicated_for_rgb(tmp_path):
    values = np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)
    path = tmp_path / "f.tiff"
    write_float_tiff(path, values)
    expected = (values - 2.0) / 8.0  # min-max over the finite values
    array, kind = decode.read_modality(str(path), "rgb")
    assert kind == "float" and array.shape == (2, 2, 3)
    for channel in range(3):
        np.testing.assert_allclose(array[..., channel], expected, rtol=1e-6)
    array, _ = decode.read_modality(str(path), "gray")
    assert array.shape == (2, 2, 1)
    np.testing.assert_allclose(array[..., 0], expected, rtol=1e-6)


def test_bad_float_tiffs_name_the_file(tmp_path):
    path = tmp_path / "x.tiff"
    write_float_tiff(path, np.ones((16, 16, 3), np.float32))
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(path.read_bytes()[:64])
    with pytest.raises(DataError, match=f"{truncated}: "):
        decode.read_modality(str(truncated), "depth")
    eight_bit = tmp_path / "u8.tiff"
    import tifffile

    tifffile.imwrite(eight_bit, np.zeros((2, 2, 3), np.uint16), photometric="rgb")
    with pytest.raises(DataError, match=r"u8.tiff: TIFF of uint16 .* expected float32 samples"):
        decode._read_float_tiff(str(eight_bit))
