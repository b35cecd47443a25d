"""Tests of tools/limited_data_study.py, tools/baseline_table.py and tools/quality_study.py.

Helpers on hand-made numbers, then both tools for real on a tiny synthetic dataset with the
tiny config (a couple of steps per run): the limited-data study at two fractions and the whole
baseline table (full model, autoencoder, detection head, frozen encoder + linear SVM).

Runs share the test run's persistent XLA compilation cache (tests/conftest.py) with
tests/test_evaluate.py (same tiny programs).
"""

import copy
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from tests.runs import tiny_run_config
from tools import (
    assignment_table,
    baseline_table,
    box_fit_table,
    defect_type_table,
    limited_data_study,
    quality_study,
    study_setup,
)

pytestmark = pytest.mark.slow  # trains the study tools' runs

# ----------------------------------------------------------------------------- helpers


def test_parse_fractions():
    assert limited_data_study.parse_fractions("1.0, 0.5,0.05") == (1.0, 0.5, 0.05)
    with pytest.raises(ValueError, match="not in"):
        limited_data_study.parse_fractions("1.0,1.5")
    with pytest.raises(ValueError, match="comma-separated numbers"):
        limited_data_study.parse_fractions("1.0,half")
    with pytest.raises(ValueError, match="empty"):
        limited_data_study.parse_fractions(" , ")


def test_parse_methods():
    assert baseline_table.parse_methods("svm, full") == ("svm", "full")
    with pytest.raises(ValueError, match="subset of"):
        baseline_table.parse_methods("full,yolo")


def test_method_configs_keep_only_their_losses():
    config = tiny.get_config()
    autoencoder = baseline_table.method_config(config, "autoencoder")
    weights = dict(autoencoder.train.loss_weights)
    assert weights["recon"] == config.train.loss_weights.recon
    assert all(value == 0.0 for name, value in weights.items() if name != "recon")
    assert autoencoder.train.pretrain_steps == 0
    detection = baseline_table.method_config(config, "detection")
    weights = dict(detection.train.loss_weights)
    assert {name for name, value in weights.items() if value > 0} == {
        "det_obj",
        "det_cls",
        "det_box",
        "det_dfl",
    }
    assert detection.train.loss_weights.det_box == config.train.loss_weights.det_box
    assert detection.train.pretrain_steps == 0
    svm = baseline_table.method_config(config, "svm")
    assert svm.train.finetune_steps == 0 and svm.train.pretrain_steps == 4
    full = baseline_table.method_config(config, "full")
    assert not full.eval.after_training  # the table evaluates every method itself
    full.eval.after_training = config.eval.after_training
    assert full.to_dict() == config.to_dict()
    assert config.train.loss_weights.seg_dice == 1.0  # the input config is left alone
    config.train.pretrain_steps = 0
    with pytest.raises(ValueError, match="pretrain_steps must be > 0"):
        baseline_table.method_config(config, "svm")


def test_best_pixel_threshold_and_component_boxes():
    maps = np.zeros((2, 8, 8), np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:4] = True
    maps[0, 1:3, 1:4] = 0.9
    maps[0, 6, 6] = 0.5  # a weaker speck outside the mask
    maps[1] = 0.1
    threshold = baseline_table.best_pixel_threshold(masks, maps)
    # Only cuts in (0.5, 0.9] separate the defect from everything else (pixel F1 = 1).
    assert 0.5 < threshold <= 0.9
    boxes = baseline_table.component_boxes(maps, 0.3, max_boxes=3)
    # Image 0: the defect (peak 0.9) first, then the speck (0.5); image 1 has no component.
    np.testing.assert_array_equal(boxes["box_valid"], [[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(boxes["boxes_xyxy"][0, :2], [[1, 1, 4, 3], [6, 6, 7, 7]])
    np.testing.assert_allclose(boxes["box_scores"][0, :2], [0.9, 0.5])
    assert boxes["box_classes"].shape == (2, 3) and not boxes["box_classes"].any()


def test_tables_format_undefined_values_and_label_the_paper():
    rows = [
        {
            "fraction": 0.5,
            "train_defects": 8,
            "train_images": 16,
            **{column: 0.25 for column, *_ in limited_data_study.STUDY_METRICS},
        }
    ]
    rows[0]["map"] = math.nan
    table = limited_data_study.markdown_table(rows).splitlines()
    assert table[2] == "| 0.5 | 8 | 0.2500 | 0.2500 | 0.2500 | 0.2500 | 0.2500 | 0.2500 | n/a |"
    paper_rows = [
        {
            "method": "svm",
            "name": baseline_table.METHOD_NAMES["svm"],
            "accuracy": 0.875,
            "auroc": math.nan,
            "map50": math.nan,
            "images_per_sec": 1234.56,
            "notes": "",
            "paper_method": "ResNet-50 + SVM",
            "paper_accuracy_percent": 88.3,
            "paper_map50_percent": 70.2,
            "paper_fps_jetson_xavier_nx": 32,
        }
    ]
    lines = baseline_table.markdown_table(paper_rows).splitlines()
    assert lines[2] == (
        "| Frozen self-supervised encoder + linear SVM | 87.5 | n/a | 1234.6 | n/a | "
        "ResNet-50 + SVM | 88.3 | 70.2 | 32 |"
    )
    assert "paper: FPS (Jetson Xavier NX)" in lines[0]
    assert "not measured by this harness" in "\n".join(lines)


@pytest.mark.parametrize(
    "tool, flag, message",
    [
        ("limited_data_study.py", "--fractions=1.0,1.5", "--fractions entry 1.5 is not in (0, 1]"),
        ("baseline_table.py", "--methods=full,yolo", "use a comma-separated subset of"),
        # Checked per run (the base config is unsupervised, neu_sup supervised): one run's
        # protocol rejects the key before any run trains.
        (
            "quality_study.py",
            "--runs=neu_sup,mt_unsup --config.data.mosaic_prob=0.5",
            "run mt_unsup: data.mosaic_prob=0.5 needs data.protocol=supervised",
        ),
        ("quality_study.py", "--runs=", "--runs names no run"),
    ],
)
def test_command_line_rejects_bad_flags_before_any_work(tool, flag, message, tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    # Run from elsewhere: the tool finds the package on its own.
    result = subprocess.run(
        [sys.executable, str(repo / "tools" / tool), "--config", str(repo / "configs" / "tiny.py"),
         "--workdir", str(tmp_path / "run"), *flag.split()],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_supervised_studies_validate_under_the_protocol_they_train_with():
    from m2u_jax import config as config_lib

    config = tiny.get_config()  # unsupervised
    config.data.mosaic_prob = 0.5  # a supervised-only key
    with pytest.raises(config_lib.ConfigError, match="needs data.protocol=supervised"):
        config_lib.validate(config)
    study = study_setup.with_supervised_protocol(config)
    config_lib.validate(study)
    assert study.data.protocol == "supervised" and config.data.protocol == "unsupervised"
    assert study.data.mosaic_prob == 0.5


def test_svm_is_skipped_without_defect_free_training_images(tmp_path):
    # A Pascal-VOC set in which every image has a box (like NEU-DET): nothing is trained.
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for name in ("crack", "stain"):
        for index in range(3):
            image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / f"{name}_{index}.png")
            (tmp_path / "data" / f"{name}_{index}.xml").write_text(
                "<annotation><size><width>32</width><height>32</height><depth>3</depth></size>"
                f"<object><name>{name}</name><bndbox><xmin>8</xmin><ymin>8</ymin><xmax>16</xmax>"
                "<ymax>16</ymax></bndbox></object></annotation>"
            )
    config = tiny.get_config()
    config.data.format = "voc"
    config.data.root = str(tmp_path / "data")
    workdir = tmp_path / "table"
    (row,) = baseline_table.run_table(config, str(workdir), methods=("svm",))
    assert math.isnan(row["accuracy"]) and math.isnan(row["images_per_sec"])
    assert "no defect-free image" in row["notes"]
    assert not (workdir / "svm").exists()
    note = baseline_table.table_note(baseline_table.supervised_config(config))
    table = baseline_table.markdown_table([row], note)
    assert "| Frozen self-supervised encoder + linear SVM | n/a | n/a | n/a | n/a |" in table
    assert "the test split has 0 defect-free and 2 defective images" in table


def test_defect_type_table_by_hand():
    paths = np.array(["p0", "p1", "p2", "p3", "p4"])
    predictions = {
        "test/paths": paths,
        "test/labels": np.array([0, 0, 1, 1, 1]),
        "test/defect_names": np.array(["good", "good", "crack", "crack", "hole"]),
        "test/image_score": np.array([0.1, 0.5, 0.4, 0.9, 0.2]),
    }
    masks = {
        "p2": [[1, 0], [0, 0]], "p3": [[0, 0], [0, 1]], "p4": [[1, 1], [0, 0]],
        "p0": [[0, 0], [0, 0]], "p1": [[0, 0], [0, 0]],
    }  # fmt: skip
    maps = {
        "p2": [[0.9, 0.1], [0.2, 0.3]], "p3": [[0.5, 0.4], [0.3, 0.2]],
        "p4": [[0.8, 0.6], [0.7, 0.1]], "p0": [[0.0, 0.0], [0.0, 0.0]],
        "p1": [[0.0, 0.0], [0.0, 0.0]],
    }  # fmt: skip
    order = paths[::-1]  # the pixel archive in another order: matched by path
    pixel_maps = {
        "paths": order,
        "masks": np.array([masks[p] for p in order], np.float32),
        "anomaly_map": np.array([maps[p] for p in order], np.float32),
    }
    rows = defect_type_table.per_type_rows(predictions, pixel_maps)
    # crack: scores {0.4, 0.9} against good {0.1, 0.5}: 3 of 4 pairs. Pixels: positives 0.9 and
    # 0.2 against 0.1 0.2 0.3 0.5 0.4 0.3: 6 + 1 + a tie = 7.5 of 12. hole: 1 of 2; 3 of 4.
    assert rows == [
        dict(defect="crack", images=2, image_auroc=0.75, pixel_auroc=0.625, mask_area=0.25),
        dict(defect="hole", images=1, image_auroc=0.5, pixel_auroc=0.75, mask_area=0.5),
    ]
    table = defect_type_table.markdown(rows)
    assert "| crack | 2 | 0.750 | 0.625 | 25.0 % |" in table


def test_box_fit_table_by_hand():
    # Two test images (class a: a box found at IoU 0.2; class b: at IoU 0.625) and a
    # validation image the table must not read.
    def padded(rows, width=2):
        return np.array(rows + [[0, 0, 0, 0]] * (width - len(rows)), np.float32)

    predictions = {
        "test/labels": np.array([1, 1]),
        "test/gt_boxes": np.stack([padded([[0, 0, 10, 10]]), padded([[0, 0, 10, 10]])]),
        "test/gt_box_classes": np.array([[0, 0], [1, 0]]),
        "test/gt_box_valid": np.array([[1, 0], [1, 0]], np.float32),
        "test/boxes_xyxy": np.stack([padded([[0, 0, 10, 2]]), padded([[0, 0, 10, 6.25]])]),
        "test/box_scores": np.array([[0.9, 0.0], [0.8, 0.0]], np.float32),
        "test/box_classes": np.array([[0, 0], [1, 0]]),
        "test/box_valid": np.array([[True, False], [True, False]]),
        "validation/labels": np.array([1]),
    }
    result = box_fit_table.box_fit(predictions, ["a", "b"], (0.1, 0.5))
    assert result["ap"]["a"] == pytest.approx([1.0, 0.0])
    assert result["ap"]["b"] == pytest.approx([1.0, 1.0])
    assert result["map"] == pytest.approx([1.0, 0.5])
    table = box_fit_table.markdown(result)
    assert "| class | AP@0.1 | AP@0.5 | recall@0.1 | recall@0.5 |" in table
    assert "| a | 1.000 | 0.000 | 1.000 | 0.000 |" in table
    assert "| **mean** | **1.000** | **0.500** | | |" in table


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """5 test images per defect kind: supervised split 3 train / 1 validation / 1 test."""
    from m2u_jax.data import synthetic

    root = tmp_path_factory.mktemp("study_data")
    synthetic.generate(
        root, categories="fabric", image_size=32, num_train=8, num_test_good=4, num_test_defect=5
    )
    return str(root)


def test_limited_data_study_on_tiny(study_data, tmp_path):
    workdir = str(tmp_path / "study")
    rows = limited_data_study.run_study(tiny_run_config(study_data), workdir, (1.0, 0.5))
    # 4 defect kinds x 3 labelled training defects; half of 3 rounds to 2 per kind.
    assert [row["train_defects"] for row in rows] == [12, 8]
    assert [row["train_images"] for row in rows] == [20, 16]
    for row, fraction in zip(rows, (1.0, 0.5)):
        run_dir = limited_data_study.fraction_dir(workdir, fraction)
        run_config = json.load(open(os.path.join(run_dir, "config.json")))
        assert run_config["data"]["labeled_fraction"] == fraction
        assert run_config["data"]["protocol"] == "supervised"
        assert run_config["model"]["num_defect_classes"] == 4
        saved = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
        for column, section, key, _ in limited_data_study.STUDY_METRICS:
            expected = saved[section][key]
            if expected is None:  # NaN in the table is null in metrics.json
                assert math.isnan(row[column])
            else:
                assert row[column] == pytest.approx(expected)
        # Supervised: per-class AP over the four defect kinds.
        assert sorted(saved["detection"]["per_class_ap50"]) == ["crack", "hole", "scratch", "stain"]
    paths = limited_data_study.write_outputs(workdir, rows, "tiny")
    table = open(paths["markdown"]).read()
    assert "| 1 | 12 |" in table and "| 0.5 | 8 |" in table
    saved_rows = json.load(open(paths["json"]))["rows"]
    assert [row["fraction"] for row in saved_rows] == [1.0, 0.5]
    with Image.open(paths["plot"]) as image:
        assert image.size == (1600, 640)
        assert np.asarray(image.convert("L")).std() > 10


def test_baseline_table_on_tiny(study_data, tmp_path):
    workdir = str(tmp_path / "baselines")
    rows = baseline_table.run_table(tiny_run_config(study_data, pretrain_steps=2), workdir)
    assert [row["method"] for row in rows] == list(baseline_table.METHODS)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["images_per_sec"] > 0
        paper = baseline_table.PAPER_TABLE[row["method"]]
        assert (row["paper_accuracy_percent"], row["paper_map50_percent"]) == paper[1:3]
    assert math.isnan(by_method["svm"]["map50"])  # the SVM gives no boxes
    for method in ("full", "autoencoder", "detection"):
        assert 0.0 <= by_method[method]["map50"] <= 1.0
    full = json.load(open(os.path.join(workdir, "full", "eval", "metrics.json")))
    assert by_method["full"]["accuracy"] == pytest.approx(full["image"]["accuracy"])
    assert by_method["full"]["map50"] == pytest.approx(full["detection"]["map50"])
    assert by_method["full"]["images_per_sec"] == pytest.approx(full["speed"]["images_per_sec"])
    trained = {
        method: json.load(open(os.path.join(workdir, method, "config.json")))
        for method in baseline_table.METHODS
    }
    assert trained["autoencoder"]["train"]["loss_weights"]["seg_dice"] == 0.0
    assert trained["detection"]["train"]["loss_weights"]["recon"] == 0.0
    assert trained["svm"]["train"]["finetune_steps"] == 0
    steps = [name for name in os.listdir(os.path.join(workdir, "svm", "checkpoints"))]
    assert [name for name in steps if name.isdigit()] == ["2"]  # pretraining only
    paths = baseline_table.write_outputs(workdir, rows, "tiny run")
    table = open(paths["markdown"]).read()
    assert "| M2U-InspectNet (full model, ours) |" in table and "| 94.8 | 91.7 | 52 |" in table
    assert json.load(open(paths["json"]))["rows"][3]["map50"] is None


def test_quality_study_run_specs():
    run = quality_study.parse_run("mt_sup@0.1", "/data")
    assert run == dict(
        name="mt_sup@0.1",
        format="mask_folder",
        root="/data/magnetic_tile",
        protocol="supervised",
        good_class="MT_Free",
        fraction=0.1,
    )
    run = quality_study.parse_run("parts=voc:/x/parts:supervised:ok", "/data")
    assert (run["name"], run["format"], run["root"], run["good_class"]) == (
        "parts",
        "voc",
        "/x/parts",
        "ok",
    )
    for spec, message in (
        ("mt_unsup@0.5", "needs the supervised protocol"),
        ("mt_sup@1.5", r"not in \(0, 1\]"),
        ("nope", "unknown"),
        ("x=voc:/r", "expected name=FORMAT"),
    ):
        with pytest.raises(ValueError, match=message):
            quality_study.parse_run(spec, "/data")
    # An undefined metric (null in metrics.json, e.g. image AUROC on all-defective data).
    assert quality_study._cell(None) == "n/a" and quality_study._cell(0.12345) == "0.123"
    config = quality_study.run_config(tiny.get_config(), run, curve_points=3)
    # 8 fine-tuning steps in 3 curve points: a checkpoint every 3 steps (3, 6, 8), all kept.
    assert config.train.checkpoint_every == 3
    assert config.train.keep_checkpoints >= 5
    assert config.data.root == "/x/parts" and config.eval.after_training is False


def test_quality_study_curve_on_tiny(study_data, tmp_path):
    config = tiny_run_config(study_data, finetune_steps=4)
    config.eval.feature_memory_size = 64
    spec = f"tiny=mvtec_ad:{study_data}:unsupervised"
    runs = [quality_study.parse_run(spec, "")]
    workdir = str(tmp_path / "quality")
    results = quality_study.run_matrix(config, workdir, runs, curve_points=2)
    curve = results[0]["curve"]
    assert [row["finetune_step"] for row in curve] == [2, 4]
    # Training time grows along the run; each checkpoint's numbers are its own metrics.json.
    assert 0 < curve[0]["train_minutes"] < curve[1]["train_minutes"]
    curve_dir = pathlib.Path(workdir) / "tiny" / "curve"
    for row in curve:
        (path,) = curve_dir.glob(f"step_{row['step']}-*.json")
        saved = json.load(open(path))
        assert row["image_auroc"] == pytest.approx(saved["metrics"]["image"]["auroc"])
        assert saved["metrics"]["feature_knn"]["bank_size"] == 64
        assert set(row["score_variants"]) >= {"mix", "max_s9", "classifier"}
    text = quality_study.markdown(results, "note")
    summary = quality_study.summary_table(results)
    cells = [cell.strip() for cell in summary[2].split("|")[1:-1]]
    last = curve[-1]
    assert cells == [
        "tiny",
        f"`{study_data}` (mvtec_ad)",
        "unsupervised",
        "1",
        f"{last['train_minutes']:.1f}",
        *(quality_study._cell(last[column]) for column, *_ in quality_study.COLUMNS),
    ]
    assert cells[5] == f"{last['image_auroc']:.3f}"
    assert "\n".join(summary) in text
    assert "### tiny: quality against CPU minutes" in text
    assert "Image AUROC of each score reduction (last checkpoint): " in text
    s9 = last["pixel_smoothing"]["s9"]
    assert f"s9 {quality_study._cell(s9['auroc'])} / {quality_study._cell(s9['aupro'])}" in text
    # A set without good test images (NEU-DET) has no image AUROC: no line of n/a's.
    without_good = copy.deepcopy(results)
    without_good[0]["curve"][-1]["score_variants"] = dict.fromkeys(last["score_variants"])
    assert "score reduction" not in quality_study.markdown(without_good, "note")
    assert text.count("\n| 2 |") == 1 and text.count("\n| 4 |") == 1
    # A second call only re-reads the cached evaluations.
    again = quality_study.run_matrix(config, workdir, runs, curve_points=2)
    assert again[0]["curve"] == curve
    assert len(list(curve_dir.glob("step_*.json"))) == 2
    # Other evaluation settings are evaluated afresh, not read from the cache: with the image
    # score set to the 9x9-smoothed map maximum, the AUROC is that score variant's.
    config.model.image_score_smoothing = 9
    config.model.image_score_topk = 0.0
    config.model.image_score_classifier = 0.0
    rescored = quality_study.run_matrix(config, workdir, runs, curve_points=2)
    assert len(list(curve_dir.glob("step_*.json"))) == 4
    for row in rescored[0]["curve"]:
        assert row["image_auroc"] == pytest.approx(row["score_variants"]["max_s9"], abs=1e-6)


def test_quality_report_replaces_only_the_generated_block(tmp_path):
    path = tmp_path / "quality.md"
    quality_study.write_report(str(path), "table one\n")
    assert path.read_text() == (
        f"{quality_study.BEGIN_MARK}\ntable one\n{quality_study.END_MARK}\n"
    )
    path.write_text("# Analysis\n\n" + path.read_text() + "\nWhat limits it.\n")
    quality_study.write_report(str(path), "table two\n")
    assert path.read_text() == (
        f"# Analysis\n\n{quality_study.BEGIN_MARK}\ntable two\n{quality_study.END_MARK}\n"
        "What limits it.\n"
    )
    # The README's block is replaced the same way; a file without the marks is left alone.
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    with pytest.raises(ValueError, match="README.md has no .* block to replace"):
        quality_study.write_report(str(readme), "summary\n", require_marks=True)
    assert readme.read_text() == "# Project\n"


def test_assignment_table_counts_positives_per_box_under_each_fallback():
    # 64 px, strides 8 and 16 (tests/test_boxes.py works the same boxes out by hand): the thin
    # box gets one positive with 'nearest' and its row of four with 'inside'; the small box
    # keeps its four stride-8 points either way.
    images = [
        (["scratch", "spot"], np.array([[2, 10, 62, 14], [0, 0, 16, 16]], np.float32)),
        (["spot"], np.array([[0, 0, 16, 16]], np.float32)),
    ]
    rows = assignment_table.class_rows(images, 64, (8, 16))
    columns = ("defect", "boxes", "median_nearest", "single_nearest", "median_inside")
    columns += ("single_inside", "gains_inside", "level_shares")
    assert [tuple(row[c] for c in columns) for row in rows] == [
        ("scratch", 1, 1.0, 1.0, 4.0, 0.0, 1.0, {8: 1.0, 16: 0.0}),
        ("spot", 2, 4.0, 0.0, 4.0, 0.0, 0.0, {8: 1.0, 16: 0.0}),
    ]
    assert all(set(row) == set(columns) for row in rows)
    table = assignment_table.markdown(rows)
    assert "| scratch | 1 | 1 | 100.0% | 4 | 0.0% | 100.0% | 100% / 0% |" in table
    assert "positives on stride 8 / 16 ('inside')" in table
    # A 56-px box. Edge rule: the one stride-8 point within 32 px of all its edges, (28, 28),
    # and the stride-16 points inside it, x, y in {8, 24, 40}, but (24, 24), whose farthest
    # edge is 32, not above: 1 + 8 positives. Box rule (sqrt(56 * 56) / 2 = 28 <= 32): only
    # the stride-8 points within 20 px of its centre: x, y in {12, 20, 28, 36, 44}, 25.
    big = [(["blob"], np.array([[0, 0, 56, 56]], np.float32))]
    by_edge = assignment_table.class_rows(big, 64, (8, 16))[0]
    by_box = assignment_table.class_rows(big, 64, (8, 16), {"level_size": "box"})[0]
    assert by_edge["level_shares"] == pytest.approx({8: 1 / 9, 16: 8 / 9})
    assert by_edge["median_inside"] == 9
    assert by_box["level_shares"] == {8: 1.0, 16: 0.0} and by_box["median_inside"] == 25
    # tests/test_boxes.py's 10 x 100 scratch at 128 px on strides 8, 16, 32: two stride-16
    # positives under the plain rule, four when a level must hold one of its points.
    scratch = [(["scratch"], np.array([[52, 14, 62, 114]], np.float32))]
    plain = assignment_table.class_rows(scratch, 128, (8, 16, 32))[0]
    held = assignment_table.class_rows(scratch, 128, (8, 16, 32), {"min_level_points": 1})[0]
    assert plain["level_shares"] == held["level_shares"] == {8: 0.0, 16: 1.0, 32: 0.0}
    assert (plain["median_inside"], held["median_inside"]) == (2, 4)
