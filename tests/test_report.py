"""Tests of m2u_jax.report: every plot writes a PNG of the promised size, the report holds the
formatted metric values and links to files that exist."""

import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from m2u_jax import metrics, report


def expected_size(kind):
    width, height = report.FIGURE_SIZES[kind]
    return round(width * report.DPI), round(height * report.DPI)


def read_png(path):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def check_png(path, kind):
    pixels = read_png(path)
    width, height = expected_size(kind)
    assert pixels.shape == (height, width, 3)
    assert pixels.std() > 10  # something was drawn
    return pixels


@pytest.fixture(scope="module")
def image_data():
    rng = np.random.default_rng(0)
    labels = (rng.random(60) < 0.4).astype(int)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    return labels, scores


def test_curve_plots(tmp_path, image_data):
    labels, scores = image_data
    path = report.plot_roc(labels, scores, tmp_path / "sub" / "roc.png")
    assert path == str(tmp_path / "sub" / "roc.png")
    check_png(path, "roc")
    check_png(report.plot_pr(labels, scores, tmp_path / "pr.png"), "pr")
    check_png(
        report.plot_reliability(scores, labels, tmp_path / "rel.png", num_bins=10), "reliability"
    )
    masks = np.zeros((3, 16, 16))
    masks[0, 4:9, 4:9] = 1
    maps = np.random.default_rng(1).random(masks.shape) + 0.5 * masks
    fpr, pro = metrics.aupro_curve(masks, maps, 0.3)
    check_png(report.plot_pro_curve(fpr, pro, 0.3, tmp_path / "pro.png"), "pro")
    rows = metrics.review_budget_curve(scores, -np.abs(scores - 0.5), labels, 0.5)
    check_png(report.plot_review_curve(rows, tmp_path / "review.png"), "review")


def test_curve_plots_with_undefined_metrics(tmp_path):
    # One class only, no region: the plots still come out, saying why they are empty.
    check_png(report.plot_roc([0, 0, 0], [0.1, 0.2, 0.3], tmp_path / "roc.png"), "roc")
    check_png(report.plot_pr([0, 0, 0], [0.1, 0.2, 0.3], tmp_path / "pr.png"), "pr")
    check_png(report.plot_pro_curve([], [], 0.3, tmp_path / "pro.png"), "pro")


def test_plot_per_category(tmp_path):
    per_category = {
        "bottle": {"auroc": 0.99, "aupro": 0.9},
        "cable": {"auroc": 0.8, "aupro": math.nan, "map50": 0.4},
    }
    check_png(report.plot_per_category(per_category, tmp_path / "cat.png"), "per_category")


def lime_pixels(pixels):
    red, green, blue = (pixels[..., c].astype(int) for c in range(3))
    return int(np.sum((green > 200) & (red < 80) & (blue < 80)))


def test_plot_overlay(tmp_path):
    image = np.full((32, 40, 3), 0.5, np.float32)
    anomaly_map = np.zeros((16, 20), np.float32)  # half resolution: stretched over the image
    anomaly_map[4:8, 5:10] = 0.9
    mask = np.zeros((32, 40), np.float32)
    mask[8:16, 10:20] = 1
    with_mask = check_png(
        report.plot_overlay(
            image, anomaly_map, mask, [[10, 8, 20, 16], [0, 0, 5, 5]], [0.93, 0.31], [1, -1],
            ["crack", "hole"], "cat/test/hole/000.png score=0.93", tmp_path / "overlay.png",
        ),
        "overlay",
    )  # fmt: skip
    assert lime_pixels(with_mask) > 50  # the ground-truth contour is drawn
    # Grey input, no mask, no boxes, a map outside [0, 1].
    without_mask = check_png(
        report.plot_overlay(
            image[..., :1], anomaly_map * 5, None, np.zeros((0, 4)), [], [], None, "good",
            tmp_path / "good.png",
        ),
        "overlay",
    )  # fmt: skip
    assert lime_pixels(without_mask) == 0
    with pytest.raises(ValueError, match="must have the same length"):
        report.plot_overlay(image, anomaly_map, None, [[0, 0, 1, 1]], [], [], None, "", "x.png")
    with pytest.raises(ValueError, match="mask has shape"):
        report.plot_overlay(image, anomaly_map, mask[:4], [], [], [], None, "", "x.png")


def test_format_value():
    assert report.format_value(0.93214) == "0.9321"
    assert report.format_value(1234.567) == "1234.6"
    assert report.format_value(float("nan")) == "n/a"
    assert report.format_value(np.int64(7)) == "7"
    assert report.format_value(np.float32(0.5)) == "0.5000"
    assert report.format_value("ckpt") == "ckpt"


def test_write_report(tmp_path, image_data):
    labels, scores = image_data
    out_dir = tmp_path / "eval"
    roc = report.plot_roc(labels, scores, out_dir / "plots" / "roc.png")
    overlay_path = out_dir / "overlays" / "worst_0.png"
    report.plot_overlay(
        np.zeros((8, 8, 3)), np.zeros((8, 8)), None, [], [], [], None, "x", overlay_path
    )
    rows = metrics.review_budget_curve(scores, -np.abs(scores - 0.5), labels, 0.5, (0.1,))
    metrics_dict = {
        "image": {"auroc": 0.93214, "ap": 0.81, "accuracy": math.nan},
        "pixel": {"auroc": 0.97, "aupro": 0.912345},
        "detection": {
            "map50": 0.5,
            "map": 0.25,
            "per_class_ap50": {"crack": 1.0, "hole": -1.0},
            "per_class_ap": {"crack": 0.5, "hole": -1.0},
        },
        "uncertainty": {"ece": 0.0412, "error_auroc": 0.75, "review": rows},
        "speed": {"images_per_sec": 1234.567, "mc_images_per_sec": 321.0},
        "per_category": {"bottle": {"auroc": 0.99}, "cable": {"auroc": 0.8, "aupro": 0.7}},
        "extra": {"note": "hello"},
    }
    path = report.write_report(
        out_dir,
        metrics_dict,
        {"ROC": roc},  # absolute path: linked relative to out_dir
        [{"path": "overlays/worst_0.png", "caption": "worst false negative", "group": "Worst"}],
    )
    assert path == os.path.join(out_dir, "report.md")
    text = open(path, encoding="utf-8").read()
    assert "| AUROC | 0.9321 |" in text
    assert "| accuracy | n/a |" in text
    assert "| AUPRO (FPR ≤ 0.3) | 0.9123 |" in text
    assert "| mAP@0.5 | 0.5000 |" in text
    assert "|  | AP@0.5 | AP@[.5:.95] |" in text
    assert "| crack | 1.0000 | 0.5000 |" in text
    assert "| hole | n/a (no GT) | n/a (no GT) |" in text
    assert "| ECE | 0.0412 |" in text
    assert f"| 0.1000 | {rows[0]['num_reviewed']} | " in text
    assert "| images/s (deterministic) | 1234.6 |" in text
    assert "| images/s (MC dropout) | 321.0 |" in text
    assert "| error-detection AUROC of the uncertainty | 0.7500 |" in text
    assert "| bottle | 0.9900 | n/a |" in text
    assert "| cable | 0.8000 | 0.7000 |" in text
    assert "## extra" in text and "| note | hello |" in text
    # Sections in the documented order.
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == [
        "Image-level detection",
        "Pixel-level localisation",
        "Box detection (COCO protocol)",
        "Uncertainty and review",
        "Speed",
        "Per category",
        "extra",
        "Plots",
        "Overlays",
    ]
    links = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", text)
    assert links == [("ROC", "plots/roc.png"), ("worst false negative", "overlays/worst_0.png")]
    for _, link in links:
        assert os.path.isfile(os.path.join(out_dir, link))
    assert "### Worst" in text


def test_write_report_rejects_missing_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="plot 'plots/nope.png' does not exist"):
        report.write_report(tmp_path, {}, {"ROC": "plots/nope.png"})
    with pytest.raises(FileNotFoundError, match="overlay"):
        report.write_report(tmp_path, {}, {}, ["nope.png"])
