"""Tiny dataset trees in every layout m2u_jax.data reads, written by the tests themselves.

Images are small (16-48 px) with known content, so tests can assert exact counts, masks and
boxes. The MVTec AD layout comes from `m2u_jax.data.synthetic` instead.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def write_float_tiff(path, array: np.ndarray, *, compression=None) -> None:
    """A float32 `[h, w]` or `[h, w, c]` TIFF (MVTec 3D-AD's xyz layout: samples last)."""
    import tifffile

    array = np.asarray(array, np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        tifffile.imwrite(path, array, photometric="minisblack", compression=compression)
        return
    photometric = "rgb" if array.shape[-1] == 3 else "minisblack"
    tifffile.imwrite(
        path, array, photometric=photometric, planarconfig="contig", compression=compression
    )


def save_png(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_jpeg(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)
    return path


def rgb_image(size: int, value: int, width: int | None = None) -> np.ndarray:
    """A constant RGB image (value, value // 2, 255 - value)."""
    width = width or size
    pixel = np.array([value, value // 2, 255 - value], np.uint8)
    return np.broadcast_to(pixel, (size, width, 3)).copy()


def block_mask(size: int, blocks, width: int | None = None) -> np.ndarray:
    """uint8 0/255 mask with the given (row0, row1, col0, col1) blocks set."""
    mask = np.zeros((size, width or size), np.uint8)
    for row0, row1, col0, col1 in blocks:
        mask[row0:row1, col0:col1] = 255
    return mask


def depth_map(size: int, rng: np.random.Generator) -> np.ndarray:
    """xyz `[S, S, 3]` float32: z in [400, 500] mm with the left column invalid (0)."""
    xyz = rng.uniform(-50, 50, (size, size, 3)).astype(np.float32)
    xyz[..., 2] = rng.uniform(400, 500, (size, size)).astype(np.float32)
    xyz[:, 0, :] = 0.0
    return xyz


def write_mvtec_3d(root: pathlib.Path, size: int = 24, with_xyz: bool = True) -> dict:
    """One category 'cookie': train/good x3, validation/good x2, test/good x2, test/crack x2,
    test/hole x1; the crack masks have two blocks, the hole mask one."""
    rng = np.random.default_rng(0)
    layout = {
        ("train", "good"): 3,
        ("validation", "good"): 2,
        ("test", "good"): 2,
        ("test", "crack"): 2,
        ("test", "hole"): 1,
    }
    masks = {"crack": [(2, 6, 2, 8), (12, 20, 14, 18)], "hole": [(4, 10, 4, 10)]}
    depths = {}
    for (split, defect), count in layout.items():
        folder = root / "cookie" / split / defect
        for index in range(count):
            stem = f"{index:03d}"
            save_png(folder / "rgb" / f"{stem}.png", rgb_image(size, 40 * index + 10))
            blocks = masks.get(defect, [])
            save_png(folder / "gt" / f"{stem}.png", block_mask(size, blocks))
            if with_xyz:
                (folder / "xyz").mkdir(parents=True, exist_ok=True)
                xyz = depth_map(size, rng)
                write_float_tiff(folder / "xyz" / f"{stem}.tiff", xyz)
                depths[str(folder / "rgb" / f"{stem}.png")] = xyz[..., 2]
    return depths


def write_mask_folder(root: pathlib.Path, size: int = 20) -> None:
    """Magnetic-tile-like: MT_Free x4 (with zero masks), MT_Crack x3, MT_Hole x2, as JPEG images
    with same-name PNG masks in `<class>/Imgs/`; the images are 2*size wide (not square)."""
    for class_name, count, blocks in (
        ("MT_Free", 4, []),
        ("MT_Crack", 3, [(2, 5, 3, 9), (10, 14, 20, 30)]),
        ("MT_Hole", 2, [(6, 12, 6, 12)]),
    ):
        for index in range(count):
            folder = root / class_name / "Imgs"
            stem = f"exp_{index}"
            save_jpeg(
                folder / f"{stem}.jpg", rgb_image(size, 30 * index + 20, width=2 * size)[..., 0]
            )
            save_png(folder / f"{stem}.png", block_mask(size, blocks, width=2 * size))


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJECT = """  <object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>
    <xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>
"""


def write_voc_xml(path: pathlib.Path, name: str, size: int, objects) -> None:
    body = "".join(
        VOC_OBJECT.format(name=cls, xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3])
        for cls, b in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(VOC_XML.format(name=name, width=size, height=size, objects=body))


# name -> list of (class, (xmin, ymin, xmax, ymax)) in VOC's 1-based inclusive pixels.
VOC_ANNOTATIONS = {
    "scratches_1": [("scratches", (1, 1, 10, 20))],
    "scratches_2": [("scratches", (5, 5, 8, 8)), ("scratches", (20, 20, 30, 30))],
    "scratches_3": [("scratches", (2, 3, 12, 6))],
    "inclusion_1": [("inclusion", (3, 3, 6, 6)), ("patches", (10, 10, 30, 30))],
    "inclusion_2": [("inclusion", (1, 1, 32, 32))],
    "patches_1": [("patches", (4, 4, 16, 16))],
    "patches_2": [("patches", (7, 9, 11, 30))],
    "clean_1": [],
}


def write_voc(root: pathlib.Path, size: int = 32) -> None:
    """NEU-DET-like: IMAGES/ + ANNOTATIONS/ plus a Validation_Images/ + Validation_Annotations/
    pair holding 'patches_2' and 'clean_1' (no objects: defect-free)."""
    for index, (name, objects) in enumerate(VOC_ANNOTATIONS.items()):
        validation = name in ("patches_2", "clean_1")
        image_dir = root / ("Validation_Images" if validation else "IMAGES")
        xml_dir = root / ("Validation_Annotations" if validation else "ANNOTATIONS")
        save_jpeg(image_dir / f"{name}.jpg", rgb_image(size, 20 * index + 10))
        write_voc_xml(xml_dir / f"{name}.xml", name, size, objects)


def write_defect_classes(root: pathlib.Path, names, per_class: int = 2, size: int = 16) -> None:
    """mask_folder layout with a 'good' folder and one folder per name in `names`, each holding
    `per_class` PNG images with a `<stem>_mask.png` (a 4x4 block for defects) beside them."""
    for index, name in enumerate(("good", *names)):
        for number in range(per_class + (2 if name == "good" else 0)):
            stem = f"{name}_{number}"
            save_png(root / name / f"{stem}.png", rgb_image(size, 20 * index + 5 * number))
            blocks = [] if name == "good" else [(4, 8, 4, 8)]
            save_png(root / name / f"{stem}_mask.png", block_mask(size, blocks))
