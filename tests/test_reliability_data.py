"""Reliability under bad data: every broken file gives a DataError naming the file and the
problem (or, with data.skip_bad_files, a counted warning); odd-but-valid files decode exactly.

All trees are written here (MVTec AD layout, 16 px), so counts and values are known.
"""

import logging
import os
import struct
import zlib

import numpy as np
import pytest
from data_trees import block_mask, rgb_image, save_png
from PIL import Image

from configs import tiny
from m2u_jax.data import decode, pipeline, sources
from m2u_jax.data.records import DataError, apply_skip_policy
from m2u_jax.data.records import logger as records_logger

SIZE = 16


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_huge_header_png(path, width=20000, height=20000) -> None:
    """A valid-looking PNG whose IHDR claims width x height RGB but holds one tiny IDAT
    (a few hundred bytes on disk): decoding it would need 1.2 GB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _good_tree(root):
    """fabric: train/good x2, test/good x1, test/cut x1 with a 2-block mask."""
    category = root / "fabric"
    for index in range(2):
        save_png(category / "train" / "good" / f"{index:03d}.png", rgb_image(SIZE, 40 * index))
    save_png(category / "test" / "good" / "000.png", rgb_image(SIZE, 90))
    save_png(category / "test" / "cut" / "000.png", rgb_image(SIZE, 120))
    save_png(
        category / "ground_truth" / "cut" / "000_mask.png",
        block_mask(SIZE, [(0, 4, 0, 4), (8, 12, 8, 16)]),
    )
    return category


def _problem_for(discovery, path) -> str:
    messages = [str(problem) for problem in discovery.problems if str(path) in str(problem)]
    assert len(messages) == 1, [str(p) for p in discovery.problems]
    return messages[0]


def test_corrupt_files_are_named_with_their_problem(tmp_path):
    category = _good_tree(tmp_path)
    good_dir = category / "train" / "good"
    full = (good_dir / "000.png").read_bytes()
    truncated = good_dir / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    zero = good_dir / "zero.png"
    zero.write_bytes(b"")
    text = good_dir / "notes.png"
    text.write_text("this is not an image\n")
    huge = good_dir / "huge.png"
    write_huge_header_png(huge)
    assert huge.stat().st_size < 200

    discovery = sources.discover_mvtec_ad(str(tmp_path))
    # The 4 good files of the tree survive; zero-byte, text and huge fail at discovery (header).
    assert sorted(os.path.basename(r.path) for r in discovery.records) == [
        "000.png",
        "000.png",
        "000.png",
        "001.png",
        "truncated.png",
    ]
    assert "not a readable image" in _problem_for(discovery, zero)
    assert "not a readable image" in _problem_for(discovery, text)
    assert "too large" in _problem_for(discovery, huge)
    assert len(discovery.problems) == 3
    # The truncated file has a sound header: full decoding (checksums) catches it.
    with pytest.raises(DataError, match=rf"^{truncated}: truncated or corrupt image"):
        decode.read_modality(str(truncated), "rgb")

    # Strict (default): one error naming the first bad file and the count of the others.
    with pytest.raises(DataError, match=r"\(and 2 more bad file\(s\)\); set data.skip_bad"):
        apply_skip_policy(discovery, skip_bad_files=False)


def test_pixel_limit_rejects_a_header_before_decoding(tmp_path):
    # Below Pillow's own bomb limit (2 x 89 MP) but above ours: still rejected from the header.
    path = tmp_path / "big.png"
    write_huge_header_png(path, width=9000, height=9000)
    assert 9000 * 9000 > decode.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=rf"^{path}: image is 9000x9000 pixels, more than"):
        decode.probe_image(path)
    with pytest.raises(DataError, match="9000x9000"):
        decode.read_modality(str(path), "rgb")


def test_skip_bad_files_counts_and_warns(tmp_path, caplog):
    category = _good_tree(tmp_path)
    (category / "train" / "good" / "zero.png").write_bytes(b"")
    (category / "train" / "good" / "text.png").write_text("hello")
    discovery = sources.discover_mvtec_ad(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=records_logger.name):
        records = apply_skip_policy(discovery, skip_bad_files=True)
    assert len(records) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 bad file(s)" in warnings[0], warnings


def test_palette_16bit_and_grayscale_images_decode_to_the_right_values(tmp_path):
    rgb = rgb_image(SIZE, 200)  # (200, 100, 55) everywhere
    palette_path = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(palette_path)
    assert Image.open(palette_path).mode == "P"
    array, kind = decode.read_modality(str(palette_path), "rgb")
    assert kind == "uint8" and array.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(array, rgb)  # palette -> its RGB colours

    ramp = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 250 + 1000
    sixteen_path = tmp_path / "sixteen.png"
    Image.fromarray(ramp).save(sixteen_path)
    array, kind = decode.read_modality(str(sixteen_path), "rgb")
    assert kind == "uint16" and array.shape == (SIZE, SIZE, 3)  # grayscale: replicated
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], ramp)
    # Scaled by 1/65535 (not 1/255): at the native size the uint16 output is the file's value.
    resized = decode.resize_to_uint16(array, kind, SIZE)
    np.testing.assert_array_equal(resized[..., 0], ramp)
    np.testing.assert_allclose(resized[0, 1, 0] / 65535.0, 1250 / 65535.0)

    gray = np.full((SIZE, SIZE), 77, np.uint8)
    gray_path = save_png(tmp_path / "gray.png", gray)
    array, kind = decode.read_modality(str(gray_path), "rgb")
    assert kind == "uint8" and array.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(array, np.full((SIZE, SIZE, 3), 77))
    # 8-bit values map to the same [0, 1] value as the 16-bit path: 77/255 == 77*257/65535.
    assert int(decode.resize_to_uint16(array, kind, SIZE)[3, 3, 1]) == 77 * 257

    rgba_path = tmp_path / "alpha.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 4), np.uint8), "RGBA").save(rgba_path)
    with pytest.raises(DataError, match=rf"^{rgba_path}: has 4 channels \(mode RGBA\)"):
        decode.read_modality(str(rgba_path), "rgb")


def test_mask_problems_are_errors_or_documented_binarisation(tmp_path):
    category = _good_tree(tmp_path)
    cut = category / "test" / "cut"
    masks = category / "ground_truth" / "cut"
    # Mask of another size.
    save_png(cut / "001.png", rgb_image(SIZE, 10))
    save_png(masks / "001_mask.png", block_mask(SIZE + 4, [(0, 2, 0, 2)]))
    # Defect image without a mask.
    save_png(cut / "002.png", rgb_image(SIZE, 20))
    # Mask with grey levels: >= 128 is defective (decode's documented binarisation).
    save_png(cut / "003.png", rgb_image(SIZE, 30))
    grey = np.zeros((SIZE, SIZE), np.uint8)
    grey[:, 0:4], grey[:, 4:8], grey[:, 8:12], grey[:, 12:] = 0, 100, 127, 200
    save_png(masks / "003_mask.png", grey)
    # A {0, 1} mask: 1 is defective (not "everything below 128 is background").
    save_png(cut / "004.png", rgb_image(SIZE, 40))
    save_png(masks / "004_mask.png", (block_mask(SIZE, [(2, 5, 2, 5)]) > 0).astype(np.uint8))

    discovery = sources.discover_mvtec_ad(str(tmp_path))
    assert "mask is 20x20 but its image" in _problem_for(discovery, masks / "001_mask.png")
    message = _problem_for(discovery, cut / "002.png")
    assert message.startswith(f"{cut / '002.png'}: defective image has no mask (expected ")
    assert len(discovery.problems) == 2

    expected_grey = np.zeros((SIZE, SIZE), bool)
    expected_grey[:, 12:] = True
    np.testing.assert_array_equal(decode.read_mask(str(masks / "003_mask.png")), expected_grey)
    expected_binary = np.zeros((SIZE, SIZE), bool)
    expected_binary[2:5, 2:5] = True
    np.testing.assert_array_equal(decode.read_mask(str(masks / "004_mask.png")), expected_binary)

    # A mask that changes size after discovery is still caught when decoding the record.
    record = next(r for r in discovery.records if r.path.endswith("cut/000.png"))
    save_png(masks / "000_mask.png", block_mask(SIZE * 2, []))
    with pytest.raises(DataError, match=r"mask is 32x32 but its image .*cut/000.png is 16x16"):
        decode.decode_record(
            record, image_size=SIZE, modalities=("rgb",), max_boxes=4, box_class_of={"cut": 0}
        )


def test_empty_category_and_missing_root_are_named(tmp_path):
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    _good_tree(tmp_path)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'empty'}: category has no images"):
        sources.discover_mvtec_ad(str(tmp_path))
    assert len(sources.discover_mvtec_ad(str(tmp_path), categories=("fabric",)).records) == 4
    with pytest.raises(DataError, match="data.root is not a directory"):
        sources.discover_mvtec_ad(str(tmp_path / "nowhere"))


def test_symlink_loops_do_not_hang_discovery(tmp_path):
    category = _good_tree(tmp_path)
    good_dir = category / "train" / "good"
    os.symlink("loop.png", good_dir / "loop.png")  # a file link to itself (ELOOP)
    os.symlink("..", category / "test" / "up")  # a folder link to its parent
    (tmp_path / "voc").mkdir()
    save_png(tmp_path / "voc" / "a.png", rgb_image(SIZE, 5))
    os.symlink(".", tmp_path / "voc" / "self")  # recursive walks must not follow it
    discovery = sources.discover_mvtec_ad(str(tmp_path), categories=("fabric",))
    # The looping link is not a file and is ignored; the folder link holds no images.
    assert len(discovery.records) == 4 and not discovery.problems
    voc = sources.discover_voc(str(tmp_path / "voc"))
    assert [os.path.basename(p) for p in (str(p).split(": ")[0] for p in voc.problems)] == ["a.png"]
    assert "no VOC annotation a.xml" in str(voc.problems[0])


def test_non_utf8_file_names_load_and_are_reported(tmp_path):
    category = _good_tree(tmp_path)
    good_dir = os.fsencode(category / "train" / "good")
    odd_good = os.path.join(good_dir, b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8
    with open(odd_good, "wb") as handle:
        handle.write((category / "train" / "good" / "000.png").read_bytes())
    with open(os.path.join(good_dir, b"bad\xfe.png"), "wb") as handle:
        handle.write(b"not a png")
    discovery = sources.discover_mvtec_ad(str(tmp_path))
    odd = [r for r in discovery.records if "caf" in r.path]
    assert len(odd) == 1 and os.fsencode(odd[0].path) == odd_good
    array, _ = decode.read_modality(odd[0].path, "rgb")
    np.testing.assert_array_equal(array, rgb_image(SIZE, 0))
    (problem,) = discovery.problems
    assert "not a readable image" in str(problem)
    # The message can be printed and logged: undecodable bytes are escaped, not a crash.
    assert "bad\\udcfe.png" in str(problem).encode("utf-8", "backslashreplace").decode()


def test_iterate_eval_strict_and_skipping(tmp_path, caplog):
    category = _good_tree(tmp_path)
    test_good = category / "test" / "good"
    full = (test_good / "000.png").read_bytes()
    (test_good / "001.png").write_bytes(full[: len(full) // 2])  # header fine, data truncated
    config = tiny.get_config()
    config.data.root = str(tmp_path)
    config.data.image_size = SIZE
    config.eval.batch_size = 4
    splits = ("train", "validation", "test")  # which split holds 001.png is the splitter's

    def all_rows():
        rows = {}
        for split in splits:
            for batch in pipeline.iterate_eval(config, split):
                for row, path in enumerate(batch["paths"]):
                    if path:
                        rows[os.path.relpath(path, category)] = (batch, row)
        return rows

    with pytest.raises(DataError, match=r"test/good/001.png: truncated or corrupt image"):
        all_rows()

    config.data.skip_bad_files = True
    with caplog.at_level(logging.WARNING):
        rows = all_rows()
    assert sorted(rows) == [
        "test/cut/000.png",
        "test/good/000.png",
        "test/good/001.png",
        "train/good/000.png",
        "train/good/001.png",
    ]
    valid = {path: bool(batch["valid"][row]) for path, (batch, row) in rows.items()}
    assert valid.pop("test/good/001.png") is False and all(valid.values()), valid
    batch, row = rows["test/cut/000.png"]
    assert batch["images"].shape == (4, SIZE, SIZE, 3)
    assert int(batch["masks"][row].sum()) == 16 + 32  # the two blocks, exact
    skipped = [r.getMessage() for r in caplog.records if "skipping bad file" in r.getMessage()]
    assert len(skipped) == 1 and "(1 so far" in skipped[0] and "001.png" in skipped[0], skipped
