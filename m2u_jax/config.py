"""Config checks shared by every entry point: same keys as the default, right types, sane sizes.

Errors are raised as `ConfigError` with one line that names the key, so the command-line tools
can print it and exit non-zero before any heavy work.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from m2u_jax import default_config
from m2u_jax.modalities import IMAGE_FILE_MODALITIES, MODALITY_CHANNELS, split_list

DATA_FORMATS = ("mvtec_ad", "mvtec_3d", "mask_folder", "voc", "tfds")
# `eval.threshold_rule`: how the image decision threshold is chosen on validation (evaluate.py).
THRESHOLD_RULES = ("f1", "fpr", "auto")
DETACH_AUX_HEADS = ("auto", "always", "never")  # `model.detach_aux_heads`
DET_OBJ_TARGETS = ("binary", "iou")  # `train.det_obj_target`
ASSIGN_FALLBACKS = ("nearest", "inside")  # `train.det_fallback` (boxes.assign_targets)
LEVEL_SIZES = ("edge", "box")  # `train.det_level_size` (boxes.assign_targets)
DET_ASSIGNERS = ("center", "aligned")  # `train.det_assigner`
DET_BOX_LOSSES = ("giou", "diou", "ciou")  # `train.det_box_loss` (losses.iou_loss)
# `data.synthetic_coarsest_cells`: fewest mask-noise cells per axis (1 = DRAEM's range).
COARSEST_CELLS = (1, 2)
STAGES = ("pretrain", "finetune")  # the training schedule, in order
# Validation metrics that `train.best_metric` may keep the best checkpoint by (higher is better).
BEST_METRICS = ("image_auroc", "pixel_auroc", "aupro", "map50")


def assign_rules(train: ml_collections.ConfigDict) -> dict:
    """The keyword arguments of `boxes.assign_targets` that `train.*` sets: the one place the
    config's centre-assignment rules are read (the loss and tools/assignment_table.py use it)."""
    return {
        "fallback": train.det_fallback,
        "level_size": train.det_level_size,
        "min_level_points": int(train.det_min_level_points),
        "center_radius": float(train.det_center_radius),
    }


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def config_from_file(path: str, setting: str = "") -> ml_collections.ConfigDict:
    """Runs the `get_config(setting)` (or `get_config()`) of a config file outside `configs/`'s
    package import, as the tools do for `--config PATH[:SETTING]`. Not validated here.

    Raises ConfigError, one line naming the file, when it is missing, does not compile, raises
    while it loads or in `get_config` (e.g. ml_collections' TypeError for a value of the wrong
    type, or an unknown setting), has no `get_config`, takes no setting but is given one, or
    returns something other than a ConfigDict.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_m2u_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(
            f"config file {path}: syntax error on line {error.lineno}: {error.msg}"
        ) from None
    except Exception as error:  # whatever the file's own code raises
        raise ConfigError(f"config file {path}: loading it raised {_one_line(error)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path} has no get_config()")
    call = f"get_config({setting!r})" if setting else "get_config()"
    if setting:
        try:
            inspect.signature(get_config).bind(setting)
        except TypeError:
            raise ConfigError(
                f"config file {path}: get_config() takes no setting (got {path}:{setting})"
            ) from None
        except ValueError:  # no signature to inspect: let the call decide
            pass
    try:
        config = get_config(setting) if setting else get_config()
    except Exception as error:  # whatever the file's own code raises
        raise ConfigError(f"config file {path}: {call} raised {_one_line(error)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {path}: {call} returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict"
        )
    return config


def _one_line(error: BaseException) -> str:
    """`Type: first line of the message` of an exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# Allowed range of every numeric key: (low, high, low included, high included); None = open.
# A value outside is one line naming the key (e.g. keep_checkpoints=0 would let orbax delete
# every checkpoint; a negative step count would name a checkpoint -1).
_AT_LEAST_1 = (1, None, True, False)
_AT_LEAST_0 = (0, None, True, False)
_POSITIVE = (0, None, False, False)
_UNIT = (0, 1, True, True)
_UNIT_OPEN_TOP = (0, 1, True, False)
NUMERIC_RANGES = {
    "seed": _AT_LEAST_0,
    "data.image_size": _AT_LEAST_1,
    "data.val_fraction": _UNIT_OPEN_TOP,
    "data.test_fraction": _UNIT_OPEN_TOP,
    "data.max_boxes": _AT_LEAST_1,
    "data.synthetic_anomaly_prob": _UNIT,
    "data.defect_share": _UNIT_OPEN_TOP,
    "data.synthetic_max_beta": _UNIT_OPEN_TOP,
    "data.synthetic_shading": _UNIT,
    "data.synthetic_band": _UNIT,
    "data.synthetic_seamless": _UNIT,
    "data.mosaic_prob": _UNIT,
    "data.real_paste_prob": _UNIT,
    "data.mosaic_off_fraction": _UNIT,
    "data.num_parallel_calls": (-1, None, True, False),
    "data.prefetch": _AT_LEAST_1,
    "model.patch_size": _AT_LEAST_1,
    "model.fusion_every": _AT_LEAST_1,
    "model.dropout_rate": _UNIT_OPEN_TOP,
    "model.mc_dropout_blocks": _AT_LEAST_0,
    "model.decoder_channels": _AT_LEAST_1,
    "model.detail_channels": _AT_LEAST_0,
    "model.detail_growth": _AT_LEAST_1,
    "model.det_channels": _AT_LEAST_1,
    "model.det_branch_convs": _AT_LEAST_1,
    "model.det_norm_groups": _AT_LEAST_0,
    "model.det_box_bins": _AT_LEAST_0,
    "model.det_max_detections": _AT_LEAST_1,
    "model.det_score_threshold": _UNIT,
    "model.det_iou_threshold": (0, 1, False, True),
    "model.projection_dim": _AT_LEAST_1,
    "train.pretrain_steps": _AT_LEAST_0,
    "train.finetune_steps": _AT_LEAST_0,
    "train.learning_rate": _POSITIVE,
    "train.seg_focal_alpha": _UNIT,
    "train.ema_decay": _UNIT_OPEN_TOP,
    "train.warmup_steps": _AT_LEAST_0,
    "train.weight_decay": _AT_LEAST_0,
    "train.grad_clip_norm": _AT_LEAST_0,
    "train.grad_accum_steps": _AT_LEAST_1,
    "train.temperature": _POSITIVE,
    "train.moco_momentum": _UNIT,
    "train.mesh_fsdp": _AT_LEAST_1,
    "train.mesh_devices": _AT_LEAST_0,
    "train.checkpoint_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.peak_flops": _AT_LEAST_0,
    "train.validate_every": _AT_LEAST_0,
    "eval.batch_size": _AT_LEAST_1,
    "eval.num_mc_samples": _AT_LEAST_1,
    "eval.review_budget": (0, 1, False, False),
    "eval.num_overlays": _AT_LEAST_0,
}


def _check_range(key: str, value, bounds) -> None:
    low, high, low_in, high_in = bounds
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high or value != value:  # value != value: NaN
        left = "[" if low_in else "("
        right = "]" if high_in else ")"
        interval = (
            f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        )
        raise ConfigError(f"config key '{key}'={value!r} is outside its range {interval}")


def _check_image_side(size_key: str, size: int, model) -> None:
    """The patches tile `size` exactly at every scale and the detection strides divide it."""
    for scale in model.scales:
        side = size * scale
        if side != int(side) or int(side) < model.patch_size:
            raise ConfigError(
                f"{size_key}={size} at model.scales entry {scale} gives a "
                f"{side}px side, too small or fractional for model.patch_size={model.patch_size}"
            )
        if (int(side) - model.patch_size) % model.patch_stride:
            raise ConfigError(
                f"{size_key}={size} at scale {scale} is not covered exactly by "
                f"patches of {model.patch_size}px at stride {model.patch_stride}"
            )
    for stride in model.det_strides:
        if size % stride:
            raise ConfigError(
                f"{size_key}={size} is not divisible by model.det_strides entry {stride}"
            )
    # Binned box sides reach at most (R - 1) strides of the coarsest level from a point: a box
    # filling the image needs half its side.
    reach = (model.det_box_bins - 1) * max(model.det_strides)
    if model.det_box_bins >= 2 and 2 * reach < size:
        raise ConfigError(
            f"model.det_box_bins={model.det_box_bins} reaches {reach}px from a point at stride "
            f"{max(model.det_strides)}, less than half of {size_key}={size}; use more bins"
        )


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError when `config` differs from m2u_jax/default_config.py in keys or types,
    or asks for sizes that cannot work (image not divisible by the patch stride, batch not
    divisible by the device count, unknown modality or data format)."""
    reference = _flatten(default_config.get_config())
    actual = _flatten(config)
    unknown = sorted(set(actual) - set(reference))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}: not in m2u_jax/default_config.py")
    missing = sorted(set(reference) - set(actual))
    if missing:
        raise ConfigError(f"config lacks key(s) {missing} that m2u_jax/default_config.py sets")
    for key, ref_value in reference.items():
        value = actual[key]
        ref_type = type(ref_value)
        if ref_type is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if ref_type in (tuple, list) and isinstance(value, (tuple, list)):
            continue
        if not isinstance(value, ref_type):
            raise ConfigError(
                f"config key '{key}' is {type(value).__name__} {value!r}, "
                f"expected {ref_type.__name__} like {ref_value!r}"
            )
    for key, bounds in NUMERIC_RANGES.items():
        _check_range(key, actual[key], bounds)
    for key, value in actual.items():
        if key.startswith("train.loss_weights."):
            _check_range(key, value, _AT_LEAST_0)
    data, model, train = config.data, config.model, config.train
    if data.format not in DATA_FORMATS:
        raise ConfigError(f"data.format={data.format!r} is not one of {DATA_FORMATS}")
    for modality in split_list(data.modalities):
        if modality not in MODALITY_CHANNELS:
            raise ConfigError(
                f"data.modalities has unknown modality {modality!r}; "
                f"known: {sorted(MODALITY_CHANNELS)}"
            )
    if not split_list(data.modalities):
        raise ConfigError("data.modalities is empty")
    from_image_file = [m for m in split_list(data.modalities) if m in IMAGE_FILE_MODALITIES]
    if len(from_image_file) > 1:
        raise ConfigError(
            f"data.modalities={data.modalities!r} reads the image file as both "
            f"{' and '.join(from_image_file)}; choose one"
        )
    if data.protocol not in ("unsupervised", "supervised"):
        raise ConfigError(f"data.protocol={data.protocol!r}: use 'unsupervised' or 'supervised'")
    if not 0.0 < data.labeled_fraction <= 1.0:
        raise ConfigError(f"data.labeled_fraction={data.labeled_fraction} must be in (0, 1]")
    if model.patch_stride <= 0 or model.patch_size < model.patch_stride:
        raise ConfigError(
            f"model.patch_stride={model.patch_stride} must be in [1, model.patch_size="
            f"{model.patch_size}]"
        )
    if not 0.0 <= data.random_scale < 1.0:
        raise ConfigError(f"data.random_scale={data.random_scale} must be in [0, 1) (0 = off)")
    if data.mosaic_prob > 0 and data.protocol == "unsupervised":
        # The seams between good images would be trained as normal texture.
        raise ConfigError(
            f"data.mosaic_prob={data.mosaic_prob} needs data.protocol=supervised: under the "
            "unsupervised protocol the seams between good images would be learnt as normal"
        )
    if data.train_crop < 0 or data.train_crop > data.image_size:
        raise ConfigError(
            f"data.train_crop={data.train_crop} must be 0 (off) or in [1, data.image_size="
            f"{data.image_size}]"
        )
    sizes = [("data.image_size", data.image_size)]
    if data.train_crop:
        sizes.append(("data.train_crop", data.train_crop))
    for size_key, size in sizes:
        _check_image_side(size_key, size, model)
    if model.num_defect_classes < 0:
        raise ConfigError(
            f"model.num_defect_classes={model.num_defect_classes} must be >= 0 (0 = from the data)"
        )
    if config.eval.threshold_rule not in THRESHOLD_RULES:
        raise ConfigError(
            f"eval.threshold_rule={config.eval.threshold_rule!r} is not one of {THRESHOLD_RULES}"
        )
    if not 0.0 < config.eval.target_fpr < 1.0:
        raise ConfigError(f"eval.target_fpr={config.eval.target_fpr} must be in (0, 1)")
    if data.synthetic_coarsest_cells not in COARSEST_CELLS:
        raise ConfigError(
            f"data.synthetic_coarsest_cells={data.synthetic_coarsest_cells} "
            f"is not one of {COARSEST_CELLS}"
        )
    if model.detach_aux_heads not in DETACH_AUX_HEADS:
        raise ConfigError(
            f"model.detach_aux_heads={model.detach_aux_heads!r} is not one of {DETACH_AUX_HEADS}"
        )
    if config.train.det_obj_target not in DET_OBJ_TARGETS:
        raise ConfigError(
            f"train.det_obj_target={config.train.det_obj_target!r} is not one of {DET_OBJ_TARGETS}"
        )
    if config.train.det_assigner not in DET_ASSIGNERS:
        raise ConfigError(
            f"train.det_assigner={config.train.det_assigner!r} is not one of {DET_ASSIGNERS}"
        )
    if config.train.det_box_loss not in DET_BOX_LOSSES:
        raise ConfigError(
            f"train.det_box_loss={config.train.det_box_loss!r} is not one of {DET_BOX_LOSSES}"
        )
    if config.train.det_fallback not in ASSIGN_FALLBACKS:
        raise ConfigError(
            f"train.det_fallback={config.train.det_fallback!r} is not one of {ASSIGN_FALLBACKS}"
        )
    if config.train.det_level_size not in LEVEL_SIZES:
        raise ConfigError(
            f"train.det_level_size={config.train.det_level_size!r} is not one of {LEVEL_SIZES}"
        )
    if config.train.det_center_radius <= 0:
        raise ConfigError(
            f"train.det_center_radius={config.train.det_center_radius} is not positive"
        )
    if config.train.det_min_level_points < 0:
        raise ConfigError(
            f"train.det_min_level_points={config.train.det_min_level_points} is negative"
        )
    if model.pixel_head_recon and model.detail_channels <= 0:
        raise ConfigError("model.pixel_head_recon=True needs model.detail_channels > 0")
    if model.det_box_bins == 1:
        raise ConfigError("model.det_box_bins=1 is one bin (a constant distance); use 0 or >= 2")
    if model.det_norm_groups and model.det_channels % model.det_norm_groups:
        raise ConfigError(
            f"model.det_norm_groups={model.det_norm_groups} does not divide "
            f"model.det_channels={model.det_channels}"
        )
    if not 0.0 <= model.image_score_topk <= 1.0:
        raise ConfigError(f"model.image_score_topk={model.image_score_topk} must be in [0, 1]")
    if model.image_score_smoothing < 1 or model.image_score_smoothing % 2 == 0:
        raise ConfigError(
            f"model.image_score_smoothing={model.image_score_smoothing} must be an odd width >= 1"
        )
    if not 0.0 <= model.image_score_classifier <= 1.0:
        raise ConfigError(
            f"model.image_score_classifier={model.image_score_classifier} must be in [0, 1]"
        )
    if config.eval.feature_memory_size < 0:
        raise ConfigError(
            f"eval.feature_memory_size={config.eval.feature_memory_size} must be >= 0 (0 = off)"
        )
    if train.best_metric and train.best_metric not in BEST_METRICS:
        raise ConfigError(
            f"train.best_metric={train.best_metric!r} is not one of {BEST_METRICS} (or '' = off)"
        )
    if train.best_metric and train.validate_every <= 0:
        raise ConfigError(
            f"train.best_metric={train.best_metric!r} needs train.validate_every > 0 "
            "(the fine-tuning steps between validation passes)"
        )
    if config.eval.mc_chunk_size < 0:
        raise ConfigError(
            f"eval.mc_chunk_size={config.eval.mc_chunk_size} must be >= 0 (0 = all samples at once)"
        )
    if train.batch_size <= 0 or train.batch_size % train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={train.batch_size} must be positive and divisible by "
            f"train.grad_accum_steps={train.grad_accum_steps}"
        )
    if num_devices is not None:
        # `num_devices`: the devices jax sees; the mesh spans `train.mesh_devices` of them (0: all).
        requested = int(train.mesh_devices)
        if requested > num_devices:
            raise ConfigError(
                f"train.mesh_devices={requested}: only {num_devices} devices are available"
            )
        num_devices = requested or num_devices
        for key in ("train.batch_size", "eval.batch_size"):
            batch = actual[key]
            if batch % num_devices:
                raise ConfigError(
                    f"{key}={batch} is not divisible by the {num_devices} devices; "
                    f"pick a multiple of {num_devices}"
                )


def resolve_detach_aux_heads(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with `model.detach_aux_heads='auto'` made 'always' under the unsupervised
    protocol (the detection and image heads' targets are then synthetic anomalies, and their
    gradients cost the anomaly map quality: docs/quality.md) and 'never' otherwise."""
    if config.model.detach_aux_heads != "auto":
        return config
    copy = config.copy_and_resolve_references()
    unsupervised = config.data.protocol == "unsupervised"
    copy.model.detach_aux_heads = "always" if unsupervised else "never"
    return copy


def with_run_num_defect_classes(
    config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
    """`config` itself when `model.num_defect_classes` is set; when it is 0 (from the data), a
    copy holding the number the run in WORKDIR resolved and wrote to WORKDIR/config.json (as
    train.py does), so a tool rebuilds the trained model without reading the data. Raises
    ConfigError naming the file when it is missing or holds no such number."""
    if int(config.model.num_defect_classes) != 0:
        return config
    path = os.path.join(workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            resolved = json.load(file)["model"]["num_defect_classes"]
    except (OSError, ValueError, KeyError, TypeError):
        resolved = None
    if not isinstance(resolved, int) or resolved <= 0:
        raise ConfigError(
            f"model.num_defect_classes=0 (from the data) but {path} holds no resolved class "
            "count; set model.num_defect_classes to the trained model's class count"
        )
    copy = config.copy_and_resolve_references()
    copy.model.num_defect_classes = resolved
    return copy


# Keys that decide the shapes of a run's parameters: a run resumed, evaluated or exported
# under other values would not match its checkpoints.
ARCHITECTURE_KEYS = (
    "data.image_size",
    "data.modalities",
    "model.variant",
    "model.scales",
    "model.patch_size",
    "model.patch_stride",
    "model.fusion_every",
    "model.posemb",
    "model.scan_blocks",
    "model.param_dtype",
    "model.decoder_channels",
    "model.detail_channels",
    "model.detail_growth",
    "model.pixel_head_recon",
    "model.det_channels",
    "model.det_decoupled",
    "model.det_branch_convs",
    "model.det_norm_groups",
    "model.det_box_bins",
    "model.num_defect_classes",
    "model.det_strides",
    "model.projection_dim",
    # Not the model, but the checkpoint layout: with a decay > 0 each fine-tuning checkpoint also
    # holds the params' EMA, which resuming and evaluation read.
    "train.ema_decay",
)


def uses_params_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether evaluation, validation, export and prediction take the fine-tuning params' EMA:
    the run keeps one (`train.ema_decay` > 0) and `eval.use_ema` asks for it."""
    return float(config.train.ema_decay) > 0 and bool(config.eval.use_ema)


def _read_run_json(path: str) -> dict:
    """The dict in a run's config.json; ConfigError naming the file when it is unreadable, not
    JSON (e.g. left empty by a crash), or has no 'model' section."""
    try:
        with open(path, encoding="utf-8") as file:
            written = json.load(file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a readable JSON config: {error}") from None
    if not isinstance(written, dict) or not isinstance(written.get("model"), dict):
        raise ConfigError(f"{path} is not a run config (no 'model' section)")
    return written


def write_run_json(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `config` to WORKDIR/config.json atomically (a temporary file renamed over it), so
    another process of the same run, or a crash mid-write, never leaves a partial file."""
    path = os.path.join(workdir, "config.json")
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(config.to_json_best_effort(indent=2, sort_keys=True))
        file.write("\n")
    os.replace(temporary, path)


def check_same_architecture(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError naming the first `ARCHITECTURE_KEYS` key whose value differs from the
    run's WORKDIR/config.json (when there is one); `num_defect_classes=0` (from the data) is
    compared only when resolved."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    written = _flatten(ml_collections.ConfigDict(_read_run_json(path)))
    wanted = _flatten(config)
    for key in ARCHITECTURE_KEYS:
        old, new = written.get(key), wanted.get(key)
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = list(old), list(new)
        if key == "model.num_defect_classes" and 0 in (old, new):
            continue
        if old is not None and old != new:
            raise ConfigError(
                f"{key}={new!r} but the run in {workdir} was trained with {old!r} ({path}); "
                "use a new --workdir, or the run's value"
            )


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (WORKDIR/config.json, written by train.py),
    laid over `m2u_jax/default_config.py`: keys added since the run keep their defaults, keys the
    defaults no longer have are dropped, JSON lists become tuples where the default is one.
    Raises ConfigError naming the file when it is missing or not a run config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(
            f"{path} does not exist: not a run directory of train.py (or pass --config FILE)"
        )
    written = _read_run_json(path)
    config = default_config.get_config()
    defaults = _flatten(config)
    for key, value in _flatten(ml_collections.ConfigDict(written)).items():
        if key not in defaults:
            continue
        if isinstance(defaults[key], tuple) and isinstance(value, list):
            value = tuple(value)
        section, _, name = key.rpartition(".")
        target = config
        for part in section.split(".") if section else ():
            target = target[part]
        target[name] = value
    return config


def define_config_flag(program: str, argv: Sequence[str], flag_values=None):
    """The `--config` flag of a tool that works on a run directory (`--workdir DIR`): without
    `--config`, the run's own config (`load_run_config`) with `--config.a.b=value` overrides,
    as train.py takes them; with `--config FILE`, that file. Call at import time with sys.argv;
    `.value` is None when neither exists (the tool then says so in one line). `flag_values`:
    absl's global FLAGS by default."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    given = any(arg == "--config" or arg.startswith("--config=") for arg in argv)
    workdir = None
    for index, arg in enumerate(argv):
        if arg == "--workdir" and index + 1 < len(argv):
            workdir = argv[index + 1]
        elif arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
    help_text = f"{program}: config file; default: the run's WORKDIR/config.json"
    if given or not workdir or not os.path.isfile(os.path.join(workdir, "config.json")):
        return config_flags.DEFINE_config_file(
            "config", None, help_text, flag_values, sys_argv=list(argv)
        )
    try:
        return config_flags.DEFINE_config_dict(
            "config", load_run_config(workdir), help_text, flag_values, sys_argv=list(argv)
        )
    except ConfigError as error:
        print(f"{program}: {error}", file=sys.stderr)
        sys.exit(2)


def config_from_args(
    program: str, config_file: str | None, overrides: Sequence[str], workdir: str | None = None
) -> ml_collections.ConfigDict:
    """The config of a tool with its own argument parser, through the same ml_collections
    `config_flags` mechanism as train.py: `config_file` (`path.py[:arg]`), or else the run's
    WORKDIR/config.json, then the `--config.a.b=value` `overrides`. Raises ConfigError naming
    the file or the override."""
    if not config_file and not workdir:
        raise ConfigError("no config: pass --config FILE, or --workdir DIR of a run")
    if config_file and not os.path.isfile(config_file.partition(":")[0]):
        raise ConfigError(f"--config {config_file}: no such config file")
    if config_file:  # a ConfigError from here names the file and the problem
        path, _, setting = config_file.partition(":")
        base = config_from_file(path, setting)
    else:
        base = load_run_config(workdir)
    argv = [program, *overrides]
    flag_values = flags.FlagValues()
    try:  # config_flags reads the overrides already when the flag is defined
        holder = config_flags.DEFINE_config_dict("config", base, "", flag_values, sys_argv=argv)
        flag_values(argv)
    except (AttributeError, KeyError) as error:  # a key the config does not have
        text = str(error.args[0]) if error.args else str(error)
        found = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
        key = found.group(0) if found else text
        hint = re.search(r"Did you mean \"?([A-Za-z0-9_]+)", text)
        bad = [item for item in overrides if item.split("=")[0].endswith(f".{key}")]
        raise ConfigError(
            f"{bad[0] if bad else key}: no such config key"
            + (
                f" (did you mean {hint.group(1)!r}?)"
                if hint
                else " (see m2u_jax/default_config.py)"
            )
        ) from None
    except (flags.Error, TypeError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ConfigError(" ".join(lines[:2])) from None
    return holder.value


def flags_parser_for(program: str):
    """An absl `app.run(..., flags_parser=...)` that turns a `--config.<key>=...` override of a
    key the config lacks (ml_collections raises AttributeError mid-parse, i.e. a traceback)
    into one line on stderr and exit status 2, like every other bad flag. A `--config FILE`
    is loaded once beforehand by `config_from_file`, so a file that is missing, does not
    compile, raises or has no `get_config` is one line too (ml_collections would print a
    traceback, or defer a missing file's error to the first use of the config)."""
    from absl import app

    def parse(argv):
        spec = _config_file_argument(argv[1:])
        if spec:
            path, _, setting = spec.partition(":")
            try:
                config_from_file(path, setting)
            except ConfigError as error:
                print(f"{program}: bad config: {error}", file=sys.stderr)
                sys.exit(2)
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as error:
            found = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", str(error))
            detail = found.group(1) if found else str(error)
            overrides = [arg for arg in argv[1:] if detail and detail in arg.split("=")[0]]
            where = f" in {overrides[0]}" if overrides else ""
            print(
                f"{program}: bad config override{where}: no config key {detail!r} "
                "(every key is in m2u_jax/default_config.py)",
                file=sys.stderr,
            )
            sys.exit(2)

    return parse


def _config_file_argument(args: Sequence[str]) -> str | None:
    """The value of `--config FILE` / `--config=FILE` in `args` (the last one), or None."""
    value = None
    for index, arg in enumerate(args):
        if arg in ("--config", "-config") and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
    return value
