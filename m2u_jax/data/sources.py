"""File discovery: every dataset layout becomes one list of `SampleRecord`s (no TF).

Layouts (`config.data.format`):

- `mvtec_ad`: `<root>/<cat>/train/good/*.png`, `<root>/<cat>/test/<defect>/*.png`, masks in
  `<root>/<cat>/ground_truth/<defect>/<stem>_mask.png` (required for every defective image).
  Here and in `mvtec_3d`, a folder named good in any letter case ('Good') is defect-free.
- `mvtec_3d`: `<root>/<cat>/{train,validation,test}/<defect>/rgb/<stem>.png` with the mask in
  `gt/<stem>.png` (required for defects; not read for good images) and the organised point cloud
  in `xyz/<stem>.tiff` (3-channel float32; its z channel is the `depth` modality). `xyz` folders
  may be absent unless `depth` is among `data.modalities`.
- `mask_folder`: one folder per class under root (class = top-level folder name, e.g.
  `MT_Blowhole`); images anywhere below it, each with a same-name `.png` mask beside it
  (`<stem>.png` next to a non-PNG image, or `<stem>_mask.png`). `data.good_class` names the
  folder of defect-free images (`MT_Free` for Magnetic-tile), whose masks are optional and not
  read (a defect-free image's mask is all zero by definition).
- `voc`: images with Pascal-VOC XML boxes, found anywhere under root and paired by file stem
  (`IMAGES/x.jpg` + `ANNOTATIONS/x.xml`, `JPEGImages/` + `Annotations/`, or side by side). The
  class map comes from the object names; an image without objects is defect-free. Folder names
  are not interpreted as splits. VOC has no pixel masks: masks are the filled boxes.

For `mask_folder` and `voc` the category is the root folder's name, and `data.categories` must
be empty. Extra modalities sit beside the base image as `<stem>.<modality>.<ext>` (e.g.
`000.png` + `000.thermal.png`, `000.xray.png`, `000.depth.png` / `000.depth.tiff`); they are
stacked in the order of `data.modalities`. Base images are found by extension
(.png .jpg .jpeg .bmp .tif .tiff); such side files and masks are never taken as base images.

Discovery reads every file's header (cheap) to check channel counts and that masks and extra
modalities have the image's size; full decoding (truncation, checksums) happens in `decode`.
The entry point that picks the layout from `config.data` (including the 'tfds' format, which
this module never imports) is `splits.discover_config` / `splits.discover`; `SampleRecord`,
`Discovery` and `DataError` live in `records`.
"""

from __future__ import annotations

import collections
import pathlib
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping, Sequence

from m2u_jax.data import decode
from m2u_jax.data.records import GOOD, DataError, Discovery, SampleRecord, defect_name_of
from m2u_jax.modalities import IMAGE_FILE_MODALITIES

SIDECAR_MODALITIES = ("thermal", "xray", "depth")
_MASK_SUFFIXES = ("_mask", ".mask")


# ------------------------------------------------------------------ file naming


def _is_image_file(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() in decode.IMAGE_EXTENSIONS


def _side_file_tag(path: pathlib.Path) -> str | None:
    """'thermal' for `x.thermal.png`, 'mask' for `x_mask.png` / `x.mask.png`, else None."""
    parts = path.name.split(".")
    if len(parts) >= 3 and parts[-2].lower() in SIDECAR_MODALITIES + ("mask",):
        return parts[-2].lower()
    if path.stem.endswith("_mask"):
        return "mask"
    return None


def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _base_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """Image files directly in `folder` that are neither side files nor masks."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and _is_image_file(p) and _side_file_tag(p) is None
    )


def sidecar_path(image_path: pathlib.Path, modality: str) -> pathlib.Path:
    """The `<stem>.<modality>.<ext>` file beside `image_path`; DataError when there is none."""
    for extension in decode.IMAGE_EXTENSIONS:
        candidate = image_path.with_name(f"{image_path.stem}.{modality}{extension}")
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{image_path}: no '{modality}' image beside it (expected "
        f"{image_path.stem}.{modality}.png or another image extension)"
    )


def _modality_paths(
    image_path: pathlib.Path,
    modalities: Sequence[str],
    special: Mapping[str, pathlib.Path] | None = None,
) -> dict[str, str]:
    paths = {}
    for modality in modalities:
        if modality in IMAGE_FILE_MODALITIES:
            paths[modality] = str(image_path)
        elif special and modality in special:
            paths[modality] = str(special[modality])
        else:
            paths[modality] = str(sidecar_path(image_path, modality))
    return paths


def _checked_record(
    image_path: pathlib.Path,
    modality_paths: Mapping[str, str],
    mask_path: pathlib.Path | None,
    **fields,
) -> SampleRecord:
    """Builds a record after checking every file's header (channels, sizes)."""
    header = decode.probe_image(image_path)
    as_read = next((m for m in modality_paths if m in IMAGE_FILE_MODALITIES), "rgb")
    decode.check_modality_header(str(image_path), header, as_read)
    for modality, path in modality_paths.items():
        if path == str(image_path) and modality in IMAGE_FILE_MODALITIES:
            continue
        side = decode.probe_image(path)
        decode.check_modality_header(path, side, modality)
        if (side.width, side.height) != (header.width, header.height):
            raise DataError(
                f"{path}: {modality} image is {side.width}x{side.height} but {image_path} is "
                f"{header.width}x{header.height}"
            )
    if mask_path is not None:
        mask = decode.probe_image(mask_path)
        decode.check_mask_header(str(mask_path), mask)
        if (mask.width, mask.height) != (header.width, header.height):
            raise DataError(
                f"{mask_path}: mask is {mask.width}x{mask.height} but its image {image_path} is "
                f"{header.width}x{header.height}"
            )
    return SampleRecord(
        path=str(image_path),
        modality_paths=dict(modality_paths),
        mask_path=None if mask_path is None else str(mask_path),
        width=header.width,
        height=header.height,
        **fields,
    )


def _collect(
    records: list[SampleRecord],
    problems: list[DataError],
    build: Callable[..., SampleRecord],
    *args,
) -> None:
    """Appends `build(*args)` to records, or its DataError to problems."""
    try:
        records.append(build(*args))
    except DataError as error:
        problems.append(error)


def _require_root(root: str) -> pathlib.Path:
    path = pathlib.Path(root)
    if not path.is_dir():
        raise DataError(f"{root}: data.root is not a directory")
    return path


def _pick_categories(
    root: pathlib.Path, found: Sequence[str], wanted: Sequence[str], layout_hint: str
) -> list[str]:
    if not found:
        raise DataError(f"{root}: no categories found (expected {layout_hint})")
    if not wanted:
        return list(found)
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(
            f"{root}: data.categories names {missing}, not found; available: {list(found)}"
        )
    return list(wanted)


# ------------------------------------------------------------------ layouts


def _mvtec_ad_record(
    base: pathlib.Path,
    category: str,
    split: str,
    defect: str,
    image_path: pathlib.Path,
    modalities: Sequence[str],
) -> SampleRecord:
    mask_path = None
    if defect != GOOD:
        mask_path = base / category / "ground_truth" / defect / f"{image_path.stem}_mask.png"
        if not mask_path.is_file():
            raise DataError(f"{image_path}: defective image has no mask (expected {mask_path})")
    return _checked_record(
        image_path,
        _modality_paths(image_path, modalities),
        mask_path,
        category=category,
        defect_name=defect,
        source_split=split,
    )


def discover_mvtec_ad(
    root: str, categories: Sequence[str] = (), modalities: Sequence[str] = ("rgb",)
) -> Discovery:
    """MVTec AD layout; see the module docstring."""
    base = _require_root(root)
    found = [d.name for d in _visible_dirs(base) if (d / "train").is_dir() or (d / "test").is_dir()]
    hint = "<root>/<category>/train/good/*.png"
    if not found and ((base / "train").is_dir() or (base / "test").is_dir()):
        hint += f"; {root} looks like a single category: use its parent as data.root"
    records, problems = [], []
    for category in _pick_categories(base, found, categories, hint):
        before = len(records) + len(problems)
        for split in ("train", "test"):
            split_dir = base / category / split
            if not split_dir.is_dir():
                continue
            for defect_dir in _visible_dirs(split_dir):
                for image_path in _base_images(defect_dir):
                    _collect(
                        records,
                        problems,
                        _mvtec_ad_record,
                        base,
                        category,
                        split,
                        defect_name_of(defect_dir.name),
                        image_path,
                        modalities,
                    )
        if len(records) + len(problems) == before:
            raise DataError(f"{base / category}: category has no images (expected {hint})")
    return Discovery(records, problems)


def _mvtec_3d_record(
    category: str,
    split: str,
    defect_dir: pathlib.Path,
    image_path: pathlib.Path,
    modalities: Sequence[str],
) -> SampleRecord:
    defect = defect_name_of(defect_dir.name)
    mask_path = None
    if defect != GOOD:  # Good images' masks are all zero by definition: not read.
        mask_path = defect_dir / "gt" / f"{image_path.stem}.png"
        if not mask_path.is_file():
            raise DataError(f"{image_path}: defective image has no mask (expected {mask_path})")
    special = {}
    if "depth" in modalities:
        candidates = [defect_dir / "xyz" / f"{image_path.stem}{ext}" for ext in (".tiff", ".tif")]
        existing = [path for path in candidates if path.is_file()]
        if not existing:
            raise DataError(
                f"{image_path}: data.modalities asks for 'depth' but its point map "
                f"{candidates[0]} is missing"
            )
        special["depth"] = existing[0]
    return _checked_record(
        image_path,
        _modality_paths(image_path, modalities, special),
        mask_path,
        category=category,
        defect_name=defect,
        source_split=split,
    )


def discover_mvtec_3d(
    root: str, categories: Sequence[str] = (), modalities: Sequence[str] = ("rgb",)
) -> Discovery:
    """MVTec 3D-AD layout; see the module docstring."""
    base = _require_root(root)
    splits = ("train", "validation", "test")
    found = [d.name for d in _visible_dirs(base) if any((d / s).is_dir() for s in splits)]
    hint = "<root>/<category>/{train,validation,test}/<defect>/rgb/*.png"
    records, problems = [], []
    for category in _pick_categories(base, found, categories, hint):
        before = len(records) + len(problems)
        for split in splits:
            split_dir = base / category / split
            if not split_dir.is_dir():
                continue
            for defect_dir in _visible_dirs(split_dir):
                for image_path in _base_images(defect_dir / "rgb"):
                    _collect(
                        records,
                        problems,
                        _mvtec_3d_record,
                        category,
                        split,
                        defect_dir,
                        image_path,
                        modalities,
                    )
        if len(records) + len(problems) == before:
            raise DataError(f"{base / category}: category has no images (expected {hint})")
    return Discovery(records, problems)


def _mask_beside(image_path: pathlib.Path) -> pathlib.Path | None:
    candidates = [
        image_path.with_name(image_path.stem + suffix + ".png") for suffix in _MASK_SUFFIXES
    ]
    if image_path.suffix.lower() != ".png":
        candidates.insert(0, image_path.with_suffix(".png"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _mask_folder_record(
    category: str, defect: str, image_path: pathlib.Path, modalities: Sequence[str]
) -> SampleRecord:
    # Masks of defect-free images are all zero by definition (Magnetic-tile ships them): not read.
    mask_path = None if defect == GOOD else _mask_beside(image_path)
    if mask_path is None and defect != GOOD:
        raise DataError(
            f"{image_path}: defective image has no mask (expected "
            f"{image_path.with_suffix('.png')} or {image_path.stem}_mask.png beside it)"
        )
    return _checked_record(
        image_path,
        _modality_paths(image_path, modalities),
        mask_path,
        category=category,
        defect_name=defect,
        source_split=None,
    )


def discover_mask_folder(
    root: str, good_class: str = GOOD, modalities: Sequence[str] = ("rgb",)
) -> Discovery:
    """One folder per class with images and same-name masks; see the module docstring."""
    base = _require_root(root)
    class_dirs = _visible_dirs(base)
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected <root>/<class>/**/<image> + mask)")
    names = [d.name for d in class_dirs]
    if good_class not in names:
        raise DataError(
            f"{root}: data.good_class={good_class!r} names no class folder (classes: {names}); "
            "set --config.data.good_class to the folder of defect-free images"
        )
    category = base.resolve().name
    records, problems = [], []
    for class_dir in class_dirs:
        defect = GOOD if class_dir.name == good_class else class_dir.name
        images = []
        for folder in [class_dir, *sorted(p for p in class_dir.rglob("*") if p.is_dir())]:
            files = _base_images(folder)
            stems_of_other_images = {p.stem for p in files if p.suffix.lower() != ".png"}
            # A PNG next to a same-stem non-PNG image is that image's mask.
            images += [
                p
                for p in files
                if not (p.suffix.lower() == ".png" and p.stem in stems_of_other_images)
            ]
        if not images:
            raise DataError(f"{class_dir}: class folder has no images")
        for image_path in images:
            _collect(
                records, problems, _mask_folder_record, category, defect, image_path, modalities
            )
    return Discovery(records, problems)


def _parse_voc(xml_path: pathlib.Path, width: int, height: int) -> tuple[list, list]:
    """Boxes (xyxy, 0-based continuous pixels) and names from a VOC file.

    VOC coordinates are 1-based inclusive pixel indices, so `xmin..xmax` covers the continuous
    interval [xmin - 1, xmax]; boxes are clipped to the image.
    """
    try:
        tree = ElementTree.parse(xml_path)
    except (ElementTree.ParseError, OSError) as error:
        raise DataError(f"{xml_path}: unreadable VOC annotation ({error})") from None
    size = tree.find("size")
    if size is not None and size.findtext("width") and size.findtext("height"):
        xml_size = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
        if xml_size != (width, height) and xml_size != (0, 0):
            raise DataError(
                f"{xml_path}: annotation says the image is {xml_size[0]}x{xml_size[1]} but the "
                f"image is {width}x{height}"
            )
    boxes, names = [], []
    for number, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise DataError(f"{xml_path}: object {number} lacks a <name> or <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (
                float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")
            )
        except (TypeError, ValueError):
            raise DataError(f"{xml_path}: object {number} has a non-numeric <bndbox>") from None
        x1, y1 = max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0)
        x2, y2 = min(xmax, float(width)), min(ymax, float(height))
        if x2 <= x1 or y2 <= y1:
            raise DataError(
                f"{xml_path}: object {number} ({name}) has an empty box "
                f"({xmin}, {ymin}, {xmax}, {ymax}) in a {width}x{height} image"
            )
        boxes.append((x1, y1, x2, y2))
        names.append(name)
    return boxes, names


def _voc_record(
    root: str,
    category: str,
    image_paths: list[pathlib.Path],
    xml_paths: list[pathlib.Path],
    modalities: Sequence[str],
) -> SampleRecord:
    image_path = image_paths[0]
    if len(image_paths) > 1:
        raise DataError(
            f"{image_paths[1]}: same file stem as {image_path}; stems pair images with their "
            ".xml, so they must be unique"
        )
    if not xml_paths:
        raise DataError(f"{image_path}: no VOC annotation {image_path.stem}.xml under {root}")
    if len(xml_paths) > 1:
        raise DataError(f"{xml_paths[1]}: second annotation for {image_path} ({xml_paths[0]})")
    header = decode.probe_image(image_path)
    boxes, names = _parse_voc(xml_paths[0], header.width, header.height)
    areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes]
    # The image's defect type is the class of its largest box.
    defect = names[max(range(len(areas)), key=areas.__getitem__)] if boxes else GOOD
    return _checked_record(
        image_path,
        _modality_paths(image_path, modalities),
        None,
        category=category,
        defect_name=defect,
        source_split=None,
        boxes=tuple(boxes),
        box_names=tuple(names),
    )


def discover_voc(root: str, modalities: Sequence[str] = ("rgb",)) -> Discovery:
    """Images with Pascal-VOC XML boxes, paired by stem; see the module docstring."""
    base = _require_root(root)
    images_by_stem, xml_by_stem = collections.defaultdict(list), collections.defaultdict(list)
    for path in sorted(base.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(base).parts):
            continue
        if path.suffix.lower() == ".xml" and path.is_file():
            xml_by_stem[path.stem].append(path)
        elif _is_image_file(path) and _side_file_tag(path) is None:
            images_by_stem[path.stem].append(path)
    if not images_by_stem:
        raise DataError(f"{root}: no images found (expected images with VOC .xml files)")
    category = base.resolve().name
    records, problems = [], []
    for stem in sorted(set(xml_by_stem) - set(images_by_stem)):
        problems.append(DataError(f"{xml_by_stem[stem][0]}: annotation without an image {stem}.*"))
    for stem, image_paths in sorted(images_by_stem.items()):
        _collect(
            records,
            problems,
            _voc_record,
            root,
            category,
            image_paths,
            xml_by_stem.get(stem, []),
            modalities,
        )
    return Discovery(records, problems)
