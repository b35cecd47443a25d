"""m2u_jax.predictor: tiling, stitching, box merging and decisions, with a hand-made forward."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from m2u_jax import predictor as predictor_lib
from m2u_jax.data import records

THRESHOLDS = dict(score_threshold=0.5, uncertainty_threshold=0.1)


def _spot_detector(images: np.ndarray) -> dict:
    """A stand-in model: anomaly = a pixel darker than 0.2 (the images are mid-grey), image
    score = the map's maximum, one box per dark component, class 1 'hole'."""
    count, size = images.shape[:2]
    maps = (images.min(axis=-1) < 0.2).astype(np.float32)
    boxes = np.zeros((count, 4, 4), np.float32)
    scores = np.zeros((count, 4), np.float32)
    num = np.zeros((count,), np.int32)
    for index, values in enumerate(maps):
        labels, found = ndimage.label(values > 0.5)
        for k, (rows, cols) in enumerate(ndimage.find_objects(labels)[:4]):
            boxes[index, k] = (cols.start, rows.start, cols.stop, rows.stop)
            scores[index, k] = 0.9
        num[index] = min(found, 4)
    return dict(
        anomaly_map=maps,
        image_score=maps.reshape(count, -1).max(axis=1),
        uncertainty=np.zeros((count,), np.float32),
        boxes=boxes,
        box_scores=scores,
        box_classes=np.ones((count, 4), np.int32),
        num_boxes=num,
    )


def _predictor(size: int = 64) -> predictor_lib.Predictor:
    return predictor_lib.Predictor(
        _spot_detector,
        image_size=size,
        modalities=("rgb",),
        thresholds=THRESHOLDS,
        class_names=("crack", "hole"),
    )


def test_tile_origins_cover_the_side_with_the_overlap():
    assert predictor_lib.tile_origins(64, 64, 0.25) == [0]
    # stride 48: ceil((100 - 64) / 48) + 1 = 2 tiles, the last one ending at 100.
    assert predictor_lib.tile_origins(100, 64, 0.25) == [0, 36]
    origins = predictor_lib.tile_origins(1024, 64, 0.25)
    # (1024 - 64) / 48 = 20 strides: 21 tiles, exactly 48 apart.
    assert origins == list(range(0, 961, 48))
    assert max(np.diff(origins)) <= 48  # neighbours share at least a quarter tile


def test_stitch_is_a_weighted_mean_that_keeps_constants():
    origins = [(0, 0), (0, 36), (36, 0), (36, 36)]
    flat = predictor_lib.stitch([np.full((64, 64), 0.3)] * 4, origins, 100, 100, 0.25)
    np.testing.assert_allclose(flat, 0.3, atol=1e-6)
    # Two tiles over a 64 x 100 strip: where only one tile covers a pixel, its value; in the
    # overlap (columns 36-63) a blend that moves from the left tile's 0 to the right tile's 1.
    strip = predictor_lib.stitch(
        [np.zeros((64, 64)), np.ones((64, 64))], [(0, 0), (0, 36)], 64, 100, 0.25
    )
    np.testing.assert_allclose(strip[:, :36], 0.0, atol=1e-6)
    np.testing.assert_allclose(strip[:, 64:], 1.0, atol=1e-6)
    row = strip[10, 36:64]
    assert np.all(np.diff(row) >= -1e-6) and 0.0 < row[14] < 1.0


def test_merge_boxes_drops_cross_tile_duplicates_of_one_class():
    boxes = np.array(
        [[10, 10, 20, 20], [11, 10, 21, 20], [11, 10, 21, 20], [50, 50, 60, 60]], float
    )
    scores = np.array([0.8, 0.9, 0.7, 0.5])
    classes = np.array([0, 0, 1, 0])
    assert predictor_lib.merge_boxes(boxes, scores, classes, 0.5) == [1, 2, 3]


def test_tiling_finds_a_small_defect_that_a_resize_loses(tmp_path):
    image = np.full((1024, 1024, 3), 128, np.uint8)
    image[700:703, 300:303] = 0  # a 3 x 3 px hole, 1/16 px after a resize to 64
    path = tmp_path / "plate.png"
    Image.fromarray(image).save(path)
    predictor = _predictor()
    resized, tiled = (predictor.predict([str(path)], tiling=mode)[0] for mode in ("off", "auto"))
    assert resized.tiles == 1 and resized.decision == "accept" and resized.boxes == []
    assert tiled.tiles == 21 * 21 and tiled.decision == "reject" and tiled.image_score == 1.0
    assert tiled.anomaly_map.shape == (1024, 1024)
    assert tiled.anomaly_map[701, 301] > 0.99 and tiled.anomaly_map[100, 100] == 0.0
    # Several tiles see the hole; the merged result is one box at its place in the plate.
    assert len(tiled.boxes) == 1
    assert tiled.boxes[0]["box"] == [300.0, 700.0, 303.0, 703.0]
    assert tiled.boxes[0]["class_name"] == "hole" and tiled.boxes[0]["class_id"] == 1


def test_resized_results_come_back_in_the_image_pixels():
    image = np.full((128, 256, 3), 0.5, np.float32)
    image[32:96, 64:128] = 0.0  # a large dark block survives the resize to 64 x 64
    result = _predictor().predict([image], tiling="off")[0]
    assert result.path is None and result.decision == "reject"
    assert result.anomaly_map.shape == (128, 256)
    x0, y0, x1, y1 = result.boxes[0]["box"]  # 64 x 64 model pixels x (4, 2) back to the image
    assert (x0, y0, x1, y1) == pytest.approx((64, 32, 128, 96), abs=4)


def test_a_gray_model_sees_the_luma_of_a_colour_file(tmp_path):
    image = np.full((64, 64, 3), 128, np.uint8)
    image[10:20, 30:40] = (60, 0, 0)  # dark red: luma 0.299 * 60 = 17.9 -> 18 of 255
    path = tmp_path / "part.png"
    Image.fromarray(image).save(path)
    seen = []

    def forward(images):
        seen.append(images)
        return _spot_detector(images)

    predictor = predictor_lib.Predictor(
        forward, image_size=64, modalities=("gray",), thresholds=THRESHOLDS, class_names=("d",)
    )
    result = predictor.predict([str(path)], tiling="off")[0]
    (images,) = seen
    assert images.shape == (1, 64, 64, 1)
    assert images[0, 15, 35, 0] == pytest.approx(18 / 255, abs=1e-4)
    assert images[0, 0, 0, 0] == pytest.approx(128 / 255, abs=1e-4)
    assert result.decision == "reject" and result.boxes[0]["box"] == [30.0, 10.0, 40.0, 20.0]


def test_review_decision_follows_the_uncertainty_threshold():
    def uncertain(images):
        outputs = _spot_detector(images)
        outputs["uncertainty"] = np.full((len(images),), 0.5, np.float32)
        return outputs

    predictor = predictor_lib.Predictor(
        uncertain, image_size=32, modalities=("rgb",), thresholds=THRESHOLDS, class_names=("d",)
    )
    result = predictor.predict([np.full((32, 32, 3), 0.5, np.float32)])[0]
    assert result.decision == "review" and result.uncertainty == 0.5


def test_bad_inputs_are_one_line_errors(tmp_path):
    nan = tmp_path / "nan.npy"
    values = np.full((16, 16, 3), 0.5, np.float32)
    values[3, 3, 0] = np.nan
    np.save(nan, values)
    predictor = _predictor(16)
    with pytest.raises(records.DataError, match=r"nan.npy: the array holds NaN or Inf"):
        predictor.predict([str(nan)])
    with pytest.raises(records.DataError, match=r"values in \[0, 255\]; expected \[0, 1\]"):
        predictor.predict([np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3)])
    with pytest.raises(ValueError, match="tiling='sometimes'"):
        predictor.predict([values], tiling="sometimes")
    with pytest.raises(FileNotFoundError, match="evaluate the run first"):
        predictor_lib.load_thresholds(str(tmp_path / "eval" / "thresholds.json"))


def test_overlay_draws_contour_boxes_and_decision():
    image = np.full((64, 64, 3), 0.5, np.float32)
    image[20:30, 20:30] = 0.0
    result = _predictor().predict([image])[0]
    picture = np.asarray(predictor_lib.overlay(image, result, min_side=64))
    assert picture.shape == (64, 64, 3)
    assert tuple(picture[20, 25]) in ((255, 0, 0), (255, 220, 0))  # contour or box edge
    assert tuple(picture[40, 50]) == (127, 127, 127)  # untouched background
    # A small image is enlarged by a whole factor (64 -> 256): the same pixels, 4 x 4 each.
    large = np.asarray(predictor_lib.overlay(image, result))
    assert large.shape == (256, 256, 3)
    assert tuple(large[160:164, 200:204].reshape(-1, 3)[0]) == (127, 127, 127)
    assert tuple(large[80, 100]) in ((255, 0, 0), (255, 220, 0))


def test_inputs_from_folders_globs_and_files_each_once(tmp_path):
    from m2u_jax.cli import predict

    for folder in ("line1", "line2"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / folder / "part.png")
    (tmp_path / "line2" / "notes.txt").write_text("not an image")
    (tmp_path / "link.png").symlink_to(tmp_path / "line1" / "part.png")
    found = predict.list_inputs(
        [str(tmp_path / "line1"), str(tmp_path / "*" / "*.png"), str(tmp_path / "link.png")]
    )
    assert found == [str(tmp_path / "line1" / "part.png"), str(tmp_path / "line2" / "part.png")]
    with pytest.raises(FileNotFoundError, match=r"nothing\*: no image or .npy file there"):
        predict.list_inputs([str(tmp_path / "nothing*")])
    # Same-name images in different folders keep different overlays.
    first, second = (predict.overlay_path("out", path, str(tmp_path)) for path in found)
    assert first == "out/overlays/line1/part.png" and second == "out/overlays/line2/part.png"
