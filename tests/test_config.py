"""Every config has exactly the default's keys; validate() rejects bad values with the key name."""

import importlib
import json
import pathlib
import re

import ml_collections
import pytest

from configs import default
from m2u_jax import config as config_lib
from m2u_jax.modalities import num_channels, split_list

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def _keys(config, prefix=""):
    return set(config_lib._flatten(config, prefix))


def test_known_configs_are_present():
    assert {"default", "tiny", "demo"} <= set(CONFIG_NAMES)


def test_default_has_reserved_keys():
    keys = _keys(default.get_config())
    reserved = {
        "data.format", "data.root", "data.categories", "data.image_size", "data.modalities",
        "data.protocol", "data.labeled_fraction", "model.variant", "model.scales",
        "train.pretrain_steps", "train.finetune_steps", "train.batch_size",
        "eval.num_mc_samples", "seed",
    }  # fmt: skip
    assert reserved <= keys


def test_every_default_key_has_a_comment():
    lines = (CONFIG_DIR.parent / "m2u_jax" / "default_config.py").read_text().splitlines()
    assignments = [line for line in lines if line.strip().startswith(("config.", "data.",
                   "model.", "train.", "evaluation.")) and " = " in line
                   and "ConfigDict" not in line]  # fmt: skip
    assert assignments, "no assignments found"
    for line in assignments:
        assert "#" in line, f"key without a comment in m2u_jax/default_config.py: {line.strip()}"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_has_default_keys_and_validates(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert _keys(config) == _keys(default.get_config())
    config_lib.validate(config)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_are_locked(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.lock()
    with pytest.raises(AttributeError):
        config.model.varaint = "S"


def test_unknown_key_is_named():
    config = default.get_config()
    config.train.learning_rat = 0.1
    with pytest.raises(config_lib.ConfigError, match="train.learning_rat"):
        config_lib.validate(config)


def test_wrong_type_is_named():
    # ConfigDict refuses a wrong-typed assignment itself; a config built from a dict (for example
    # a loaded config.json) does not, so validate() checks types too.
    as_dict = default.get_config().to_dict()
    as_dict["data"]["image_size"] = "big"
    config = ml_collections.ConfigDict(as_dict)
    with pytest.raises(config_lib.ConfigError, match="data.image_size"):
        config_lib.validate(config)


def test_image_not_covered_by_patches():
    config = default.get_config()
    config.data.image_size = 250
    with pytest.raises(config_lib.ConfigError, match="patch"):
        config_lib.validate(config)


def test_batch_not_divisible_by_devices():
    config = default.get_config()
    config.train.batch_size = 12
    with pytest.raises(config_lib.ConfigError, match="train.batch_size=12"):
        config_lib.validate(config, num_devices=8)


def test_unknown_modality():
    config = default.get_config()
    config.data.modalities = "rgb,sonar"
    with pytest.raises(config_lib.ConfigError, match="sonar"):
        config_lib.validate(config)


def test_negative_mc_chunk_size():
    config = default.get_config()
    config.eval.mc_chunk_size = -1
    with pytest.raises(config_lib.ConfigError, match="eval.mc_chunk_size=-1"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "section, key, value, message, good",
    [
        ("data", "synthetic_coarsest_cells", 0, "is not one of (1, 2)", 1),
        ("data", "synthetic_coarsest_cells", 3, "is not one of (1, 2)", 1),
        ("data", "synthetic_coarsest_cells", 4, "is not one of (1, 2)", 1),
        ("data", "random_scale", -0.1, "must be in [0, 1) (0 = off)", 0.5),
        ("data", "random_scale", 1.0, "must be in [0, 1) (0 = off)", 0.5),
    ],
)
def test_a_data_option_out_of_its_set_is_named_in_one_line(section, key, value, message, good):
    config = default.get_config()
    config[section][key] = value
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(config)
    assert str(raised.value) == f"{section}.{key}={value} {message}"
    config[section][key] = good
    config_lib.validate(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "threshold_rule",
            "youden",
            "eval.threshold_rule='youden' is not one of ('f1', 'fpr', 'auto')",
        ),
        ("target_fpr", 0.0, "eval.target_fpr=0.0 must be in (0, 1)"),
        ("target_fpr", 1.0, "eval.target_fpr=1.0 must be in (0, 1)"),
    ],
)
def test_bad_threshold_settings_are_named(key, value, message):
    config = default.get_config()
    config.eval[key] = value
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(config)
    assert str(raised.value) == message


def test_threshold_defaults_and_allowed_rules_validate():
    config = default.get_config()
    assert (config.eval.threshold_rule, config.eval.target_fpr) == ("auto", 0.05)
    for rule in ("f1", "fpr", "auto"):
        config.eval.threshold_rule = rule
        config_lib.validate(config)


def test_negative_num_defect_classes():
    config = default.get_config()
    config.model.num_defect_classes = -1
    with pytest.raises(config_lib.ConfigError, match=r"model.num_defect_classes=-1 must be >= 0"):
        config_lib.validate(config)
    config.model.num_defect_classes = 0  # 0 = from the data
    config_lib.validate(config)


def test_det_norm_groups_must_divide_det_channels():
    config = default.get_config()
    assert (config.model.det_norm_groups, config.model.det_channels) == (0, 128)
    config.model.det_norm_groups = 48
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(config)
    assert str(raised.value) == "model.det_norm_groups=48 does not divide model.det_channels=128"
    config.model.det_norm_groups = 32
    config_lib.validate(config)


def test_zero_defect_classes_come_from_the_run_config(tmp_path):
    config = default.get_config()
    assert config_lib.with_run_num_defect_classes(config, str(tmp_path)) is config  # 4: as is
    config.model.num_defect_classes = 0
    with pytest.raises(config_lib.ConfigError, match="config.json holds no resolved class count"):
        config_lib.with_run_num_defect_classes(config, str(tmp_path))
    (tmp_path / "config.json").write_text('{"model": {"num_defect_classes": 5}}')
    resolved = config_lib.with_run_num_defect_classes(config, str(tmp_path))
    assert resolved.model.num_defect_classes == 5 and config.model.num_defect_classes == 0


def test_detach_aux_heads_auto_follows_the_protocol():
    config = default.get_config()
    assert config.model.detach_aux_heads == "auto"
    for protocol, resolved in (("unsupervised", "always"), ("supervised", "never")):
        config.data.protocol = protocol
        copy = config_lib.resolve_detach_aux_heads(config)
        assert copy.model.detach_aux_heads == resolved and config.model.detach_aux_heads == "auto"
    config.model.detach_aux_heads = "never"  # set: kept under either protocol
    assert config_lib.resolve_detach_aux_heads(config) is config
    config.model.detach_aux_heads = "yes"
    with pytest.raises(config_lib.ConfigError, match=r"model.detach_aux_heads='yes' is not one"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "key,default_value,other,message",
    [
        (
            "det_obj_target",
            "binary",
            "iou",
            r"train.det_obj_target='soft' is not one of \('binary', 'iou'\)",
        ),
        (
            "det_fallback",
            "nearest",
            "inside",
            r"train.det_fallback='soft' is not one of \('nearest', 'inside'\)",
        ),
        (
            "det_assigner",
            "center",
            "aligned",
            r"train.det_assigner='soft' is not one of \('center', 'aligned'\)",
        ),
        (
            "det_box_loss",
            "giou",
            "ciou",
            r"train.det_box_loss='soft' is not one of \('giou', 'diou', 'ciou'\)",
        ),
        (
            "det_level_size",
            "edge",
            "box",
            r"train.det_level_size='soft' is not one of \('edge', 'box'\)",
        ),
    ],
)
def test_detection_choices_are_one_of_their_values(key, default_value, other, message):
    config = default.get_config()
    assert config.train[key] == default_value
    config.train[key] = other
    config_lib.validate(config)
    config.train[key] = "soft"
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_assign_rules_from_the_config_and_their_checks():
    config = default.get_config()
    assert config_lib.assign_rules(config.train) == dict(
        fallback="nearest", level_size="edge", min_level_points=0, center_radius=2.5
    )
    config.train.det_min_level_points, config.train.det_center_radius = 2, 4.0
    config_lib.validate(config)
    assert config_lib.assign_rules(config.train)["min_level_points"] == 2
    assert config_lib.assign_rules(config.train)["center_radius"] == 4.0
    config.train.det_min_level_points = -1
    with pytest.raises(config_lib.ConfigError, match="train.det_min_level_points=-1 is negative"):
        config_lib.validate(config)
    config.train.det_min_level_points, config.train.det_center_radius = 0, 0.0
    with pytest.raises(config_lib.ConfigError, match="train.det_center_radius=0.0 is not positive"):
        config_lib.validate(config)


def test_split_list_and_channels():
    assert split_list(" bottle, cable,,") == ("bottle", "cable")
    assert split_list("") == ()
    assert num_channels("rgb,depth,thermal") == 5
    assert num_channels("gray,depth") == 2


def test_the_image_file_is_read_as_one_modality():
    config = default.get_config()
    config.data.modalities = "gray,thermal"
    config_lib.validate(config)
    config.data.modalities = "rgb,gray"
    with pytest.raises(
        config_lib.ConfigError,
        match=re.escape("data.modalities='rgb,gray' reads the image file as both rgb and gray"),
    ):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.keep_checkpoints", 0, "'train.keep_checkpoints'=0 is outside its range [1, inf)"),
        ("train.finetune_steps", -1, "'train.finetune_steps'=-1 is outside its range [0, inf)"),
        ("data.val_fraction", 1.5, "'data.val_fraction'=1.5 is outside its range [0, 1)"),
        ("eval.batch_size", -2, "'eval.batch_size'=-2 is outside its range [1, inf)"),
        ("model.dropout_rate", 1.0, "'model.dropout_rate'=1.0 is outside its range [0, 1)"),
        ("train.ema_decay", 1.0, "'train.ema_decay'=1.0 is outside its range [0, 1)"),
        ("train.learning_rate", 0.0, "'train.learning_rate'=0.0 is outside its range (0, inf)"),
        ("eval.review_budget", float("nan"), "'eval.review_budget'=nan is outside"),
        ("train.loss_weights.recon", -1.0, "'train.loss_weights.recon'=-1.0 is outside"),
        ("model.det_box_bins", -1, "'model.det_box_bins'=-1 is outside its range [0, inf)"),
        ("model.det_box_bins", 1, "model.det_box_bins=1 is one bin (a constant distance)"),
        # default: 256 px, strides (16, 32): 2 bins reach 32 px, less than 128.
        ("model.det_box_bins", 2, "model.det_box_bins=2 reaches 32px from a point at stride 32"),
        ("data.mosaic_prob", 1.5, "'data.mosaic_prob'=1.5 is outside its range [0, 1]"),
        ("data.mosaic_off_fraction", -0.1, "'data.mosaic_off_fraction'=-0.1 is outside"),
        # the default protocol is unsupervised: seams between good images would look normal
        ("data.mosaic_prob", 0.5, "data.mosaic_prob=0.5 needs data.protocol=supervised"),
    ],
)
def test_numeric_keys_out_of_range_are_one_line_errors(key, value, message):
    config = default.get_config()
    section, *rest = key.split(".")
    node = config[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.validate(config)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_every_numeric_range_key_exists_in_the_default():
    flat = config_lib._flatten(default.get_config())
    assert set(config_lib.NUMERIC_RANGES) <= set(flat)


def _write_run_config(workdir, config) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.write_run_json(config, str(workdir))


def test_load_run_config_gives_back_the_trained_config(tmp_path):
    trained = config_lib.config_from_file("configs/cpu_real.py")
    trained.data.root = "/plant/parts"
    trained.model.num_defect_classes = 3  # as train.py resolves 0 from the data
    _write_run_config(tmp_path / "run", trained)
    loaded = config_lib.load_run_config(str(tmp_path / "run"))
    assert config_lib._flatten(loaded) == config_lib._flatten(trained)
    assert loaded.model.det_strides == (8, 16)  # a tuple again, as in the config file
    loaded.data.image_size = 96  # model.image_size still follows data.image_size
    assert loaded.model.image_size == 96
    with pytest.raises(config_lib.ConfigError, match=r"config.json does not exist"):
        config_lib.load_run_config(str(tmp_path / "nothing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(config_lib.ConfigError, match=r"bad/config.json is not a run config"):
        config_lib.load_run_config(str(tmp_path / "bad"))


def test_config_flag_defaults_to_the_run_config_with_overrides(tmp_path):
    from absl import flags

    trained = config_lib.config_from_file("configs/tiny.py")
    trained.data.root = "/plant/parts"
    _write_run_config(tmp_path, trained)
    argv = ["eval.py", "--workdir", str(tmp_path), "--config.eval.num_mc_samples=3"]
    flag_values = flags.FlagValues()
    holder = config_lib.define_config_flag("eval.py", argv, flag_values)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(argv)
    assert holder.value.data.root == "/plant/parts" and holder.value.eval.num_mc_samples == 3
    # --config FILE replaces the run's config; no config.json and no --config gives None.
    argv = ["eval.py", "--workdir", str(tmp_path), "--config", "configs/demo.py"]
    flag_values = flags.FlagValues()
    holder = config_lib.define_config_flag("eval.py", argv, flag_values)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    flag_values(argv)
    assert holder.value.data.root == config_lib.config_from_file("configs/demo.py").data.root
    flag_values = flags.FlagValues()
    holder = config_lib.define_config_flag("eval.py", ["eval.py"], flag_values)
    flag_values(["eval.py"])
    assert holder.value is None


def test_an_architecture_key_that_differs_from_the_run_is_named(tmp_path):
    trained = config_lib.config_from_file("configs/tiny.py")
    _write_run_config(tmp_path, trained)
    config = config_lib.load_run_config(str(tmp_path))
    config_lib.check_same_architecture(config, str(tmp_path))  # the run's own config fits
    config.model.dropout_rate = 0.3  # not an architecture key
    config_lib.check_same_architecture(config, str(tmp_path))
    config.model.patch_size = 4
    with pytest.raises(config_lib.ConfigError, match=r"^model\.patch_size=4 but the run in "):
        config_lib.check_same_architecture(config, str(tmp_path))


def test_run_json_is_written_whole_and_a_damaged_one_is_named(tmp_path):
    config = config_lib.config_from_file("configs/tiny.py")
    config_lib.write_run_json(config, str(tmp_path))
    config_lib.write_run_json(config, str(tmp_path))  # replaces the file, leaves nothing beside
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["patch_size"] == (
        config.model.patch_size
    )
    # An empty file (what a reader of a plain open-"w"-write could see from another process of
    # the same run, which made the two-process test fail in CI) is one named error.
    (tmp_path / "config.json").write_text("")
    with pytest.raises(config_lib.ConfigError, match=r"config\.json is not a readable JSON config"):
        config_lib.check_same_architecture(config, str(tmp_path))


def test_a_resolved_class_count_that_differs_from_the_run_is_named(tmp_path):
    # What eval.py checks once model.num_defect_classes = 0 has been resolved from the data.
    trained = config_lib.config_from_file("configs/tiny.py")
    trained.model.num_defect_classes = 4
    _write_run_config(tmp_path, trained)
    config = config_lib.load_run_config(str(tmp_path))
    config.model.num_defect_classes = 0  # from the data: not compared until resolved
    config_lib.check_same_architecture(config, str(tmp_path))
    config.model.num_defect_classes = 5
    with pytest.raises(
        config_lib.ConfigError, match=r"^model\.num_defect_classes=5 but the run in .* with 4 "
    ):
        config_lib.check_same_architecture(config, str(tmp_path))


def test_config_from_args_takes_a_file_or_the_run_then_overrides(tmp_path):
    trained = config_lib.config_from_file("configs/tiny.py")
    trained.data.root = "/plant/parts"
    _write_run_config(tmp_path, trained)
    run = config_lib.config_from_args("tool", None, ["--config.eval.batch_size=4"], str(tmp_path))
    assert run.data.root == "/plant/parts" and run.eval.batch_size == 4
    demo = config_lib.config_from_args("tool", "configs/demo.py", ["--config.seed=7"], "ignored")
    assert (
        demo.seed == 7
        and demo.data.root == config_lib.config_from_file("configs/demo.py").data.root
    )
    with pytest.raises(config_lib.ConfigError, match=r"^--config.eval.bach_size=4: no such config"):
        config_lib.config_from_args("tool", None, ["--config.eval.bach_size=4"], str(tmp_path))
    with pytest.raises(config_lib.ConfigError, match=r"no config: pass --config FILE"):
        config_lib.config_from_args("tool", None, [])


def test_every_config_file_loads_outside_the_checkout(tmp_path):
    # The tools run config files by path from any folder, where no `configs` package is
    # importable (an installed m2u_jax ships none).
    import subprocess
    import sys

    code = (
        "from m2u_jax.config import config_from_file, validate\n"
        f"for name in {CONFIG_NAMES!r}:\n"
        f"    validate(config_from_file({str(CONFIG_DIR)!r} + '/' + name + '.py'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
