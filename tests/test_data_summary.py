"""Dataset summary JSON (m2u_jax.data.summary)."""

import json

from configs import default
from m2u_jax.data import summary
from tests.data_trees import write_mask_folder, write_voc


def test_voc_summary(tmp_path):
    write_voc(tmp_path / "steel")
    config = default.get_config()
    config.data.format = "voc"
    config.data.root = str(tmp_path / "steel")
    result = summary.summarize(config)
    assert result["images"] == 8 and result["good"] == 1 and result["defective"] == 7
    assert result["boxes"] == 9
    assert result["boxes_per_defect_type"] == {"inclusion": 2, "patches": 3, "scratches": 4}
    # inclusion_1's largest box is a 'patches' box, so the image counts as 'patches'.
    assert result["per_defect_type"] == {"good": 1, "inclusion": 1, "patches": 3, "scratches": 3}
    assert result["image_size"] == {
        "min": {"width": 32, "height": 32},
        "max": {"width": 32, "height": 32},
    }
    assert result["class_names"] == ["defect"]
    assert result["defect_type_names"] == ["inclusion", "patches", "scratches"]
    splits = result["splits"]
    assert sum(s["images"] for s in splits.values()) == 8
    assert sum(s["boxes"] for s in splits.values()) == 9
    assert splits["train"]["images"] == 1 and splits["train"]["defective"] == 0
    assert result["bad_files"] == 0 and result["notes"] == []
    assert result["gray_files"] == {"checked": 8, "gray": 0}  # coloured RGB JPEGs


def test_mask_folder_summary_counts_mask_components(tmp_path):
    write_mask_folder(tmp_path / "tiles")
    config = default.get_config()
    config.data.format = "mask_folder"
    config.data.root = str(tmp_path / "tiles")
    config.data.good_class = "MT_Free"
    config.data.protocol = "supervised"
    result = summary.summarize(config)
    assert (result["images"], result["good"], result["defective"]) == (9, 4, 5)
    # MT_Crack masks have two blocks each, MT_Hole masks one.
    assert result["boxes"] == 3 * 2 + 2 * 1
    assert result["boxes_per_defect_type"] == {"MT_Crack": 6, "MT_Hole": 2}
    assert result["image_size"]["max"] == {"width": 40, "height": 20}
    assert result["class_names"] == ["MT_Crack", "MT_Hole"] and result["num_classes"] == 2
    # Grayscale JPEGs, read as 'rgb': the summary points at the 1-channel modality.
    assert result["gray_files"] == {"checked": 9, "gray": 9}
    (note,) = result["notes"]
    assert note.startswith("the 9 image files checked are gray: 'rgb' reads them as three equal")
    assert "data.modalities=gray would read one" in note
    config.data.modalities = "gray"
    result = summary.summarize(config)
    assert result["num_channels"] == 1 and result["notes"] == []
    # A file whose header reads but whose pixels do not is counted as not gray, no crash.
    path = tmp_path / "tiles" / "MT_Free" / "Imgs" / "exp_0.jpg"
    path.write_bytes(path.read_bytes()[:-3])  # no end-of-image marker: the pixels fail
    config.data.modalities = "rgb"
    result = summary.summarize(config)
    assert result["gray_files"] == {"checked": 9, "gray": 8} and result["notes"] == []


def test_command_line(tmp_path, capsys):
    write_voc(tmp_path / "steel")
    argv = [
        "summary",
        "--config",
        "configs/default.py",
        "--config.data.format=voc",
        f"--config.data.root={tmp_path / 'steel'}",
    ]
    assert summary.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 8 and printed["boxes"] == 9 and printed["format"] == "voc"
    argv[-1] = f"--config.data.root={tmp_path / 'missing'}"
    assert summary.main(argv) == 2
    error = capsys.readouterr().err
    assert error.strip() == f"summary: error: {tmp_path / 'missing'}: data.root is not a directory"
    assert summary.main(["summary", "--config", "configs/default.py", "--config.data.nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_the_m2u_data_command_generates_and_summarises(tmp_path, capsys):
    import json

    from m2u_jax.cli import data as data_cli

    assert data_cli.main(["inspect"]) == 2
    assert "usage: m2u-data {summary,generate}" in capsys.readouterr().err
    root = tmp_path / "plates"
    assert data_cli.main(
        ["generate", "--out", str(root), "--categories", "fabric", "--image-size", "32",
         "--num-train", "2", "--num-test-good", "1", "--num-test-defect", "1"]
    ) == 0  # fmt: skip
    capsys.readouterr()
    assert (
        data_cli.main(["summary", "--config", "configs/tiny.py", f"--config.data.root={root}"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2 + 1 + 4 and summary["good"] == 3
