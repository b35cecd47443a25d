"""Tests of m2u_jax.trainer.

Step machinery on a stand-in model (gradient accumulation, EMA, NaN flag, 8 vs 1 devices), then
the real schedule on the tiny config: each stage's loss goes down on a fixed batch, whole runs
leave checkpoints / TensorBoard events / config.json, and a resumed run reproduces an
uninterrupted one.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from m2u_jax import config as config_lib
from m2u_jax import optim, run_checkpoint, sharding, trainer
from m2u_jax.train_state import TrainState
from tests.commands import fake_devices_env
from tests.runs import tiny_run_config

pytestmark = pytest.mark.slow  # trains the tiny config in subprocesses (train.py)


class _Regressor(nn.Module):
    @nn.compact
    def __call__(self, inputs):
        hidden = nn.tanh(nn.Dense(16, name="hidden")(inputs))
        return nn.Dense(1, name="output")(hidden)[:, 0]


def _regression_batch(batch_size=16, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(batch_size, 8)).astype(np.float32)
    targets = (inputs @ rng.normal(size=8)).astype(np.float32)
    return {"inputs": inputs, "targets": targets}


def _mse_loss_fn(params, ema_params, batch, rng):
    del ema_params, rng
    predictions = _Regressor().apply({"params": params}, batch["inputs"])
    errors = (predictions - batch["targets"]) ** 2
    return jnp.mean(errors), {"max_error": jnp.max(errors)}


def _regression_setup(mesh, grad_accum_steps=1, ema_momentum=None, loss_fn=_mse_loss_fn):
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    metric_names = ("loss", "max_error", "grad_norm")

    def init_fn(rng):
        params = _Regressor().init(rng, jnp.zeros((1, 8)))["params"]
        ema = {"hidden": params["hidden"]} if ema_momentum is not None else None
        return TrainState.create(params, optimizer, rng, metric_names, ema_params=ema)

    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = sharding.state_shardings(abstract, mesh, min_size=1)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = trainer.make_train_step(
        loss_fn, optimizer, mesh=mesh, grad_accum_steps=grad_accum_steps, ema_momentum=ema_momentum
    )
    return state, trainer.jit_train_step(step, shardings, mesh)


def _run_steps(mesh, num_steps, **kwargs):
    state, step = _regression_setup(mesh, **kwargs)
    for index in range(num_steps):
        batch = sharding.host_batch_to_global(_regression_batch(seed=index), mesh)
        state = step(state, batch)
    return jax.device_get(state)


def _assert_trees_close(tree_a, tree_b, rtol, atol):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), tree_a, tree_b
    )


def test_gradient_accumulation_matches_one_big_batch():
    mesh = sharding.make_mesh(2)
    once = _run_steps(mesh, 3, grad_accum_steps=1)
    accumulated = _run_steps(mesh, 3, grad_accum_steps=2)
    _assert_trees_close(once.params, accumulated.params, rtol=1e-5, atol=1e-6)
    # grad_norm of the averaged gradient matches too; the logged loss is the micro-batch mean.
    np.testing.assert_allclose(
        once.metric_sums["grad_norm"], accumulated.metric_sums["grad_norm"], rtol=1e-5
    )
    np.testing.assert_allclose(once.metric_sums["loss"], accumulated.metric_sums["loss"], 1e-5)
    assert int(once.metric_count) == 3 and int(once.step) == 3


def test_eight_devices_match_one_device():
    one = _run_steps(sharding.make_mesh(1, devices=jax.devices()[:1]), 3)
    eight = _run_steps(sharding.make_mesh(2), 3)
    _assert_trees_close(one.params, eight.params, rtol=1e-5, atol=1e-6)
    _assert_trees_close(one.opt_state, eight.opt_state, rtol=1e-5, atol=1e-6)


def test_ema_update_after_one_step():
    mesh = sharding.make_mesh(1)
    state, step = _regression_setup(mesh, ema_momentum=lambda step: 0.9 + 0.05 * step)
    initial = jax.device_get(state.params)
    batch = sharding.host_batch_to_global(_regression_batch(), mesh)
    state = jax.device_get(step(state, batch))
    # The EMA tracks only the 'hidden' subtree, with the momentum of step 0 (0.9).
    assert set(state.ema_params) == {"hidden"}
    expected = jax.tree.map(
        lambda ema, online: 0.9 * ema + 0.1 * online, initial["hidden"], state.params["hidden"]
    )
    _assert_trees_close(state.ema_params["hidden"], expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(state.params["hidden"]["kernel"], initial["hidden"]["kernel"])


def test_nonfinite_flag_names_first_bad_step_and_term():
    def loss_fn(params, ema_params, batch, rng):
        loss, terms = _mse_loss_fn(params, ema_params, batch, rng)
        # max_error goes to inf on the second batch only; the loss itself stays finite.
        return loss, {"max_error": terms["max_error"] / batch["scale"][0]}

    mesh = sharding.make_mesh(1)
    state, step = _regression_setup(mesh, loss_fn=loss_fn)
    for index, scale in enumerate([1.0, 0.0, 1.0]):
        batch = dict(_regression_batch(seed=index), scale=np.full(16, scale, np.float32))
        state = step(state, sharding.host_batch_to_global(batch, mesh))
    assert int(state.nonfinite_step) == 2
    assert jax.device_get(state.nonfinite_terms) == {"loss": 0, "max_error": 1, "grad_norm": 0}
    assert np.isfinite(float(state.metric_sums["loss"]))


def test_checkpoint_roundtrip_keeps_values_and_shardings(tmp_path):
    mesh = sharding.make_mesh(2)
    state, step = _regression_setup(mesh, ema_momentum=lambda step: 0.9)
    state = step(state, sharding.host_batch_to_global(_regression_batch(), mesh))
    manager = run_checkpoint.make_manager(str(tmp_path), keep=2)
    for global_step in (1, 2, 3):
        run_checkpoint.save(manager, global_step, state, {"stage": "pretrain", "stage_step": 1})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]  # keeps the newest 2
    meta = run_checkpoint.latest_meta(manager)
    assert meta == {"stage": "pretrain", "stage_step": 1, "global_step": 3}
    abstract = run_checkpoint.abstract_like(state, jax.tree.map(lambda a: a.sharding, state))
    restored = run_checkpoint.restore_state(manager, 3, abstract)
    manager.close()
    assert isinstance(restored, TrainState)
    _assert_trees_close(jax.device_get(restored), jax.device_get(state), rtol=0, atol=0)
    assert restored.params["hidden"]["kernel"].sharding == state.params["hidden"]["kernel"].sharding


@pytest.mark.parametrize(
    "device_kind, peak_flops, expected",
    [
        ("NVIDIA H100 80GB HBM3", 0.0, 989e12),
        ("TPU v5 lite", 0.0, 197e12),
        ("cpu", 0.0, None),
        ("cpu", 5e9, 5e9),
    ],
)
def test_peak_flops_lookup(device_kind, peak_flops, expected):
    class _Device:
        pass

    device = _Device()
    device.device_kind = device_kind
    config = tiny.get_config()
    config.train.peak_flops = peak_flops
    assert trainer.peak_flops_per_device(config, device) == expected


def test_overlay_params_replaces_only_pretrained_leaves():
    base = {"encoder": {"a": jnp.zeros(2), "b": jnp.zeros(3)}, "head": {"c": jnp.zeros(1)}}
    merged = trainer.overlay_params(base, {"encoder": {"a": jnp.ones(2)}})
    np.testing.assert_array_equal(merged["encoder"]["a"], [1, 1])
    np.testing.assert_array_equal(merged["encoder"]["b"], [0, 0, 0])
    assert merged["head"] is base["head"]
    with pytest.raises(ValueError, match="params/encoder/a"):
        trainer.overlay_params(base, {"encoder": {"a": jnp.ones(5)}})
    with pytest.raises(ValueError, match="params/extra"):
        trainer.overlay_params(base, {"extra": jnp.ones(1)})


def test_metric_log_without_clu_falls_back_to_log_lines(tmp_path, monkeypatch):
    for name in ("clu", "clu.metric_writers", "clu.periodic_actions"):
        monkeypatch.setitem(sys.modules, name, None)  # `import clu...` now raises ImportError
    log = trainer.MetricLog(str(tmp_path), total_steps=10, log_every=2)
    assert isinstance(log.writer, trainer._LoggingWriter) and log.report_progress is None
    log.step(2)
    log.write(2, {"finetune/loss": 1.5, "finetune/mfu": None, "finetune/recon": float("nan")})
    log.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    records = _read_metrics(tmp_path)
    assert records == [
        {"step": 2, "finetune/loss": 1.5, "finetune/mfu": None, "finetune/recon": None}
    ]


def test_npz_overlay_maps_only_the_loaded_backbone_leaves(tmp_path):
    from m2u_jax import model as model_lib

    config = tiny.get_config()
    model = model_lib.build_model(config.model)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]
    scale = np.linspace(0.5, 1.5, 64).astype(np.float32)
    kernel = np.full((64, 128), 0.25, np.float32)
    path = tmp_path / "vit.npz"
    np.savez(
        path,
        **{
            "Transformer/encoder_norm/scale": scale,
            "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel": kernel,
        },
    )
    overlay = trainer.npz_overlay(str(path), abstract)
    assert jax.tree.map(np.shape, overlay) == {
        "backbone": {
            "encoder_norm": {"scale": (64,)},
            "block_01": {"mlp": {"fc1": {"kernel": (64, 128)}}},
        }
    }
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
    merged = trainer.overlay_params(params, overlay)
    np.testing.assert_array_equal(merged["backbone"]["encoder_norm"]["scale"], scale)
    np.testing.assert_array_equal(merged["backbone"]["block_01"]["mlp"]["fc1"]["kernel"], kernel)
    np.testing.assert_array_equal(merged["backbone"]["block_00"]["mlp"]["fc1"]["kernel"], 0)
    assert merged["detection_head"] is params["detection_head"]


# ------------------------------------------------------------------ the real model, tiny config

_FIXED_BATCH_STEPS = 12
# Unoptimised XLA backend code: these programs run a few tiny steps, and compiling them is most of
# the test time (roughly halved by these options).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _tiny_config(**train_overrides):
    config = tiny.get_config()
    config.train.pretrain_steps = _FIXED_BATCH_STEPS  # the schedules span the whole test run
    config.train.finetune_steps = _FIXED_BATCH_STEPS
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def _build_stage(config, mesh, name, **kwargs):
    from m2u_jax import model as model_lib

    build = trainer.build_pretrain_stage if name == "pretrain" else trainer.build_finetune_stage
    return build(
        config,
        model_lib.build_model(config.model),
        mesh,
        jax.random.PRNGKey(0),
        compiler_options=_FAST_COMPILE,
        **kwargs,
    )


def _finetune_batch(batch_size=8, side=32, seed=0):
    """A hand-built fine-tuning batch (docs/interfaces.md): half the images carry a bright
    square defect with its mask and box; the other half are clean."""
    rng = np.random.default_rng(seed)
    clean = rng.uniform(size=(batch_size, side, side, 3)).astype(np.float32)
    images, masks = clean.copy(), np.zeros((batch_size, side, side), np.float32)
    boxes = np.zeros((batch_size, 4, 4), np.float32)
    box_classes = np.full((batch_size, 4), -1, np.int32)
    box_valid = np.zeros((batch_size, 4), np.float32)
    labels, defect_types = np.zeros(batch_size, np.int32), np.zeros(batch_size, np.int32)
    for index in range(0, batch_size, 2):
        x0, y0 = rng.integers(0, side - 10, size=2)
        images[index, y0 : y0 + 10, x0 : x0 + 10] = 1.0
        masks[index, y0 : y0 + 10, x0 : x0 + 10] = 1.0
        boxes[index, 0] = [x0, y0, x0 + 10, y0 + 10]
        box_classes[index, 0], box_valid[index, 0] = index % 4, 1.0
        labels[index], defect_types[index] = 1, index % 4 + 1
    return {
        "images": images,
        "clean_images": clean,
        "recon_valid": 1.0 - labels.astype(np.float32),
        "masks": masks,
        "labels": labels,
        "defect_types": defect_types,
        "boxes": boxes,
        "box_classes": box_classes,
        "box_valid": box_valid,
    }


def _contrastive_batch(batch_size=8, side=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch_size, side, side, 3)).astype(np.float32)
    noisy = np.clip(images + 0.05 * rng.normal(size=images.shape), 0, 1).astype(np.float32)
    return {"views1": images, "views2": np.ascontiguousarray(noisy[:, :, ::-1])}  # noise + flip


def _losses_on_fixed_batch(stage, state, batch, num_steps):
    losses = []
    for _ in range(num_steps):
        state = stage.train_step(state, batch)
        losses.append(float(state.metric_sums["loss"]))
        state = trainer._reset_metrics(state)
    return state, np.array(losses)


def _assert_decreasing(losses):
    assert np.all(np.isfinite(losses)), losses
    # Robust to step-to-step noise (dropout): the last three steps sit well below the first two
    # (measured ratios: SimCLR 0.08, MoCo v3 0.4, fine-tuning 0.74, whose reconstruction and
    # dice terms fall slowly).
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:2]), losses


@pytest.fixture(scope="module")
def simclr_eight_devices():
    config = _tiny_config(pretrain_method="simclr")
    mesh = sharding.make_mesh(1)  # 8-way data parallel: NT-Xent over the global batch
    return config, mesh, _build_stage(config, mesh, "pretrain")


def test_simclr_loss_decreases_on_a_fixed_batch(simclr_eight_devices):
    _, mesh, stage = simclr_eight_devices
    state = stage.init_state()
    assert set(state.params) == {"encoder", "projector"}
    assert set(state.params["encoder"]) == {"backbone"}  # embed() creates no task heads
    assert state.ema_params is None
    batch = sharding.host_batch_to_global(_contrastive_batch(), mesh)
    state, losses = _losses_on_fixed_batch(stage, state, batch, _FIXED_BATCH_STEPS)
    _assert_decreasing(losses)
    assert int(state.step) == _FIXED_BATCH_STEPS


def test_simclr_step_on_eight_devices_matches_one_device(simclr_eight_devices):
    config, mesh_8, stage_8 = simclr_eight_devices
    mesh_1 = sharding.make_mesh(1, devices=jax.devices()[:1])
    stage_1 = _build_stage(config, mesh_1, "pretrain")
    state_8, state_1 = stage_8.init_state(), stage_1.init_state()
    _assert_trees_close(jax.device_get(state_8.params), jax.device_get(state_1.params), 0, 0)
    batch = _contrastive_batch()
    state_8 = jax.device_get(
        stage_8.train_step(state_8, sharding.host_batch_to_global(batch, mesh_8))
    )
    state_1 = jax.device_get(
        stage_1.train_step(state_1, sharding.host_batch_to_global(batch, mesh_1))
    )
    # Same global batch and dropout keys; only the order of the cross-device sums differs.
    _assert_trees_close(state_8.metric_sums, state_1.metric_sums, rtol=1e-5, atol=1e-6)
    grads_8 = optax.tree_utils.tree_get(
        state_8.opt_state, "mu"
    )  # Adam's first moment = 0.1 x clipped grads
    grads_1 = optax.tree_utils.tree_get(state_1.opt_state, "mu")
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(grads_1))
    _assert_trees_close(grads_8, grads_1, rtol=1e-4, atol=1e-6 * scale)

    # Adam maps a gradient at float-noise level to a +-lr step whose sign is noise (e.g. the
    # attention key bias, whose exact gradient is zero), so parameters are compared wherever
    # the gradient is well above that level.
    def compare(param_8, param_1, grad):
        informative = np.abs(grad) > 1e-4 * scale
        np.testing.assert_allclose(param_8[informative], param_1[informative], rtol=1e-5, atol=1e-7)
        return int(informative.sum())

    counts = jax.tree.map(compare, state_8.params, state_1.params, grads_1)
    assert sum(jax.tree.leaves(counts)) > 0.9 * sum(a.size for a in jax.tree.leaves(grads_1))


def test_mocov3_loss_decreases_and_the_momentum_encoder_lags():
    config = _tiny_config(pretrain_method="mocov3")
    mesh = sharding.make_mesh(1)
    stage = _build_stage(config, mesh, "pretrain")
    state = stage.init_state()
    assert set(state.params) == {"encoder", "projector", "predictor"}
    assert set(state.ema_params) == {"encoder", "projector"}
    initial = jax.device_get(state.ema_params["projector"]["output"]["kernel"])
    batch = sharding.host_batch_to_global(_contrastive_batch(), mesh)
    state, losses = _losses_on_fixed_batch(stage, state, batch, _FIXED_BATCH_STEPS)
    _assert_decreasing(losses)
    ema = jax.device_get(state.ema_params["projector"]["output"]["kernel"])
    online = jax.device_get(state.params["projector"]["output"]["kernel"])
    # The momentum encoder moved towards the online one but lags behind it.
    assert 0 < np.linalg.norm(ema - initial) < np.linalg.norm(online - initial)


@pytest.fixture(scope="module")
def finetune_eight_devices(simclr_eight_devices):
    """Fine-tuning on a (data 4, fsdp 2) mesh whose arrays from 4096 elements up are sharded
    (the tiny model has none above the default threshold), its backbone taken from a (fresh)
    SimCLR encoder as after pretraining."""
    config = _tiny_config(mesh_fsdp=2)
    mesh = sharding.make_mesh(2)
    pretrained = simclr_eight_devices[2].init_state().params["encoder"]
    stage = _build_stage(
        config, mesh, "finetune", pretrained_encoder=pretrained, fsdp_min_size=4096
    )
    return config, mesh, stage, jax.device_get(pretrained)


def test_finetune_loss_decreases_on_a_fixed_batch(finetune_eight_devices):
    _, mesh, stage, pretrained = finetune_eight_devices
    state = stage.init_state()
    assert set(state.params) == {"backbone", "anomaly_decoder", "detection_head", "image_head"}
    _assert_trees_close(
        jax.device_get(state.params["backbone"]), pretrained["backbone"], rtol=0, atol=0
    )
    kernel = state.params["backbone"]["block_00"]["mlp"]["fc1"]["kernel"]  # [64, 128]
    assert kernel.sharding.spec == P(None, "fsdp")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(64, 64)}
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["backbone"]["block_00"]["mlp"]
    assert mu["fc1"]["kernel"].sharding.spec == P(None, "fsdp")  # Adam moments follow
    assert state.params["backbone"]["encoder_norm"]["scale"].sharding.spec == P()
    batch = sharding.host_batch_to_global(_finetune_batch(), mesh)
    state, losses = _losses_on_fixed_batch(stage, state, batch, _FIXED_BATCH_STEPS)
    _assert_decreasing(losses)
    assert set(jax.device_get(state.nonfinite_terms)) == {
        "loss",
        "recon",
        "seg_focal",
        "seg_dice",
        "cls",
        "det_obj",
        "det_cls",
        "det_box",
        "det_dfl",
        "grad_norm",
    }
    assert int(state.nonfinite_step) == -1


def test_ema_momentum_warms_up_to_the_decay():
    steps = jnp.array([0, 10, 90, 10_000])
    # min(decay, (1 + t) / (10 + t)): 1/10, 11/20, 91/100, then the decay itself.
    np.testing.assert_allclose(optim.ema_momentum(0.99, steps), [0.1, 0.55, 0.91, 0.99], rtol=1e-6)


def test_params_ema_follows_the_training_without_changing_it(finetune_eight_devices, tmp_path):
    config, mesh, stage, pretrained = finetune_eight_devices
    ema_config = config.copy_and_resolve_references()
    ema_config.train.ema_decay = 0.5
    ema_stage = _build_stage(
        ema_config, mesh, "finetune", pretrained_encoder=pretrained, fsdp_min_size=4096
    )
    batch = sharding.host_batch_to_global(_finetune_batch(), mesh)
    plain, with_ema = stage.init_state(), ema_stage.init_state()
    assert plain.ema_params is None
    _assert_trees_close(jax.device_get(with_ema.ema_params), jax.device_get(plain.params), 0, 0)
    expected = jax.device_get(plain.params)
    for step in range(3):
        plain, with_ema = stage.train_step(plain, batch), ema_stage.train_step(with_ema, batch)
        # The EMA is a bystander: the trained params are bit-identical to a run without it.
        _assert_trees_close(jax.device_get(with_ema.params), jax.device_get(plain.params), 0, 0)
        momentum = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18.., 0.25
        expected = jax.tree.map(
            lambda ema, online, m=momentum: m * ema + (1 - m) * online,
            expected,
            jax.device_get(plain.params),
        )
    _assert_trees_close(jax.device_get(with_ema.ema_params), expected, rtol=1e-5, atol=1e-6)
    assert trainer.deployed_params(ema_config, with_ema) is with_ema.ema_params
    ema_config.eval.use_ema = False
    assert trainer.deployed_params(ema_config, with_ema) is with_ema.params
    assert trainer.deployed_params(config, plain) is plain.params
    # The one params-only restore reads the EMA from a fine-tuning checkpoint, unless told not to.
    manager = run_checkpoint.make_manager(str(tmp_path), keep=1)
    run_checkpoint.save(manager, 3, with_ema, {"stage": "finetune", "stage_step": 3})
    manager.wait_until_finished()
    manager.close()
    ema_config.eval.use_ema = True
    restored, step = run_checkpoint.restore_params(ema_config, str(tmp_path))
    assert step == 3
    _assert_trees_close(restored, jax.device_get(with_ema.ema_params), 0, 0)
    ema_config.eval.use_ema = False
    restored, _ = run_checkpoint.restore_params(ema_config, str(tmp_path))
    _assert_trees_close(restored, jax.device_get(with_ema.params), 0, 0)
    assert any(  # and the two differ, so the restores above are not vacuous
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(jax.device_get(with_ema.params)),
            jax.tree.leaves(jax.device_get(with_ema.ema_params)),
            strict=True,
        )
    )


def test_nan_loss_stops_with_the_step_and_the_term(finetune_eight_devices, tmp_path):
    config, mesh, stage, _ = finetune_eight_devices
    batch = _finetune_batch()
    batch["clean_images"][3] = np.nan  # only the reconstruction target is broken
    state = stage.train_step(stage.init_state(), sharding.host_batch_to_global(batch, mesh))
    manager = run_checkpoint.make_manager(str(tmp_path), keep=1)
    run = trainer._Run(config, str(tmp_path), mesh, manager, None, total_steps=30)
    run.last_checkpoint = 7
    with pytest.raises(trainer.NonFiniteLossError) as error:
        trainer._check_finite(run, stage, state, offset=15)
    manager.close()
    message = str(error.value)
    assert "recon" in message and "finetune step 1 (global step 16)" in message, message
    assert "seg_dice" not in message and "det_box" not in message, message
    assert "checkpoint 7" in message, message


# ---------------------------------------------------------------------- whole runs (train.py)

_REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------- model.num_defect_classes from the data

_FIVE_KINDS = ("crack", "hole", "pit", "scratch", "stain")


def _five_kind_run_config(root, protocol, num_defect_classes):
    """tiny on a generated mask_folder tree with five defect kinds; no step runs (0 + 0 steps),
    so train only checks the classes, writes config.json and builds the model."""
    from tests.data_trees import write_defect_classes

    if not root.exists():
        write_defect_classes(root, _FIVE_KINDS)
    config = tiny_run_config(root, finetune_steps=0)
    config.data.format = "mask_folder"
    config.data.protocol = protocol
    config.model.num_defect_classes = num_defect_classes
    return config


def _written_num_classes(workdir):
    return json.loads((workdir / "config.json").read_text())["model"]["num_defect_classes"]


def test_zero_defect_classes_resolve_from_the_data_into_config_json(tmp_path):
    root = tmp_path / "plates"
    config = _five_kind_run_config(root, "supervised", 0)
    trainer.train(config, str(tmp_path / "supervised"))
    assert _written_num_classes(tmp_path / "supervised") == 5
    assert config.model.num_defect_classes == 0  # the caller's config is left as it was
    # Unsupervised: the single class-agnostic 'defect'.
    config = _five_kind_run_config(root, "unsupervised", 0)
    trainer.train(config, str(tmp_path / "unsupervised"))
    assert _written_num_classes(tmp_path / "unsupervised") == 1


def test_too_few_defect_classes_stop_before_training(tmp_path):
    config = _five_kind_run_config(tmp_path / "plates", "supervised", 4)
    workdir = tmp_path / "run"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^model\.num_defect_classes=4 but the data in .* has 5 defect classes \(crack, "
        r"hole, pit, scratch, stain\) under the supervised protocol: set "
        r"--config\.model\.num_defect_classes=5 or 0 \(from the data\)$",
    ):
        trainer.train(config, str(workdir))
    assert not workdir.exists()  # stopped before anything was written


def test_matching_defect_classes_pass(tmp_path):
    config = _five_kind_run_config(tmp_path / "plates", "supervised", 5)
    trainer.train(config, str(tmp_path / "run"))
    assert _written_num_classes(tmp_path / "run") == 5


def test_micro_batches_must_divide_over_the_mesh_devices(tmp_path):
    config = _five_kind_run_config(tmp_path / "plates", "supervised", 0)
    config.train.grad_accum_steps = 2  # micro-batches of 4
    config.train.mesh_devices = 8
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^train\.batch_size=8 must split into train\.grad_accum_steps=2 micro-batches "
        r"that each divide over the 8 devices$",
    ):
        trainer.train(config, str(tmp_path / "eight"))
    assert not (tmp_path / "eight").exists()
    config.train.mesh_devices = 4  # 4 per micro-batch on 4 devices: it runs
    trainer.train(config, str(tmp_path / "four"))
    assert _written_num_classes(tmp_path / "four") == 5


def test_a_changed_architecture_key_stops_before_config_json_is_rewritten(tmp_path):
    config = _five_kind_run_config(tmp_path / "plates", "supervised", 5)
    workdir = tmp_path / "run"
    trainer.train(config, str(workdir))
    written = (workdir / "config.json").read_text()
    config.model.detail_channels = 8  # changes the parameter shapes
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^model\.detail_channels=8 but the run in .* was trained with 0 \(.*config\.json\)",
    ):
        trainer.train(config, str(workdir))
    assert (workdir / "config.json").read_text() == written
    config.model.detail_channels = 0
    config.model.det_score_threshold = 0.5  # inference-time keys may change on a resume
    config.train.finetune_steps = 0
    trainer.train(config, str(workdir))
    assert json.loads((workdir / "config.json").read_text())["model"]["det_score_threshold"] == 0.5


# train.py on 2 fake devices: a sharded run (batch split, sharded checkpoints, resume onto the
# mesh) that compiles and saves faster than on 8; the 8-device steps are tested in-process above.
_TRAIN_DEVICES = 2
_TRAIN_ENV = fake_devices_env(_TRAIN_DEVICES)


def _train(workdir, data_root, *overrides):
    command = [
        sys.executable,
        str(_REPO / "train.py"),
        "--config",
        str(_REPO / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.root={data_root}",
        *overrides,
    ]
    result = subprocess.run(
        command, cwd=_REPO, env=_TRAIN_ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _read_metrics(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _checkpoint_steps(workdir):
    return sorted(
        int(path.name)
        for path in (pathlib.Path(workdir) / "checkpoints").iterdir()
        if path.name.isdigit()
    )


def _restore_numpy(workdir, step):
    import orbax.checkpoint as ocp

    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    with warnings.catch_warnings():  # no target given: orbax reads the saved shardings
        warnings.simplefilter("ignore", UserWarning)
        return jax.device_get(ocp.PyTreeCheckpointer().restore(path))


# MoCo v3 (so the checkpoints carry EMA params) for 4 steps, then fine-tuning for 4; a checkpoint
# every 2 steps, all kept, so the resume test can restart from an early one; a profiler trace of
# global step 6.
_RUN_OVERRIDES = (
    "--config.train.pretrain_method=mocov3",
    "--config.train.finetune_steps=4",
    "--config.train.profile_steps=(6, 7)",
    "--config.eval.after_training=false",  # evaluation has its own tests
    "--config.train.peak_flops=1e12",  # a made-up peak, to see the MFU computed
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=10",
)


@pytest.fixture(scope="module")
def tiny_run(tiny_synthetic_root, tmp_path_factory):
    """An uninterrupted train.py run of the tiny config: (workdir, its CompletedProcess)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    result = _train(workdir, tiny_synthetic_root, *_RUN_OVERRIDES)
    return workdir, result


def test_run_leaves_checkpoints_events_config_and_metrics(tiny_run, tiny_synthetic_root):
    workdir, result = tiny_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["pretrain_method"] == "mocov3"
    assert config["data"]["root"] == tiny_synthetic_root
    assert config["model"]["variant"] == "tiny"
    assert _checkpoint_steps(workdir) == [2, 4, 6, 8]
    assert list(workdir.glob("profile/plugins/profile/*/*.xplane.pb"))
    events = list(workdir.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    records = _read_metrics(workdir)
    assert [record["step"] for record in records] == [2, 4, 6, 8]
    flops_per_step = {
        stage: float(
            re.search(
                rf"{stage}: compiled the step in [0-9.]+s; ([0-9.e+-]+) GFLOP", result.stderr
            ).group(1)
        )
        * 1e9
        for stage in ("pretrain", "finetune")
    }
    assert flops_per_step["pretrain"] > 1e6 and flops_per_step["finetune"] > 1e6
    for record in records:
        stage = "pretrain" if record["step"] <= 4 else "finetune"
        assert np.isfinite(record[f"{stage}/loss"]), record
        throughput = record[f"{stage}/images_per_sec_per_device"]
        per_device = record[f"{stage}/steps_per_sec"] * 8 / _TRAIN_DEVICES  # batch 8
        np.testing.assert_allclose(throughput, per_device)
        # MFU = FLOPs/step (XLA cost analysis) x steps/s / the 1e12 FLOP/s given as the peak.
        expected = record[f"{stage}/steps_per_sec"] * flops_per_step[stage] / 1e12
        np.testing.assert_allclose(record[f"{stage}/mfu"], expected, rtol=1e-3)  # 4 digits
    assert 0.99 < records[0]["pretrain/moco_momentum"] < records[1]["pretrain/moco_momentum"] < 1
    assert "finetune step 4/4 (global 8/8)" in result.stderr
    assert "ETA" in result.stderr and "summary" in result.stderr
    final = _restore_numpy(workdir, 8)
    assert int(final["step"]) == 4 and final["ema_params"] is None
    pretrained = _restore_numpy(workdir, 4)
    assert set(pretrained["ema_params"]) == {"encoder", "projector"}


def test_tensorboard_events_hold_the_losses(tiny_run):
    import tensorflow as tf

    workdir, _ = tiny_run
    tags = set()
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"pretrain/loss", "finetune/loss", "finetune/det_box", "steps_per_sec"} <= tags


def test_resume_reproduces_the_uninterrupted_run(tiny_run, tiny_synthetic_root, tmp_path):
    workdir, _ = tiny_run
    # An interrupted run: the same directory as it was right after the checkpoint of step 2
    # (mid-pretraining), i.e. later checkpoints and log lines never written.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    for step in _checkpoint_steps(resumed):
        if step > 2:
            shutil.rmtree(resumed / "checkpoints" / str(step))
    records = _read_metrics(workdir)
    (resumed / "metrics.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in records if record["step"] <= 2)
    )
    result = _train(resumed, tiny_synthetic_root, *_RUN_OVERRIDES)
    assert "resuming from checkpoint 2" in result.stderr
    assert _checkpoint_steps(resumed) == [2, 4, 6, 8]

    def losses(records):
        return {
            (record["step"], name): value
            for record in records
            for name, value in record.items()
            if name.split("/")[-1] in ("loss", "grad_norm", "recon", "det_box", "moco_momentum")
        }

    expected, actual = losses(records), losses(_read_metrics(resumed))
    assert expected.keys() == actual.keys() and len(expected) > 10
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-5, err_msg=str(key))
    final, final_resumed = _restore_numpy(workdir, 8), _restore_numpy(resumed, 8)
    _assert_trees_close(final_resumed["params"], final["params"], rtol=1e-5, atol=1e-6)
    _assert_trees_close(final_resumed["opt_state"], final["opt_state"], rtol=1e-5, atol=1e-6)


def test_restore_params_reads_only_the_params_of_either_stage(tiny_run):
    workdir, _ = tiny_run
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.train.learning_rate = 123.0  # optimizer keys do not matter: no optimizer is built
    params, step = run_checkpoint.restore_params(config, str(workdir))
    assert step == 8  # the newest fine-tuned checkpoint
    _assert_trees_close(params, _restore_numpy(workdir, 8)["params"], rtol=0, atol=0)
    encoder, step = run_checkpoint.restore_params(config, str(workdir), stage="pretrain")
    assert step == 4 and set(encoder) <= set(params)  # the backbone subtree of the M2UNet
    _assert_trees_close(encoder, _restore_numpy(workdir, 4)["params"]["encoder"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint 6 .* is from the finetune stage"):
        run_checkpoint.restore_params(config, str(workdir), 6, stage="pretrain")
    config.model.variant = "S"
    with pytest.raises(ValueError, match="does not match config.model"):
        run_checkpoint.restore_params(config, str(workdir))


def test_restore_params_names_an_unreadable_checkpoint_and_the_intact_ones(tiny_run, tmp_path):
    workdir, _ = tiny_run
    damaged = tmp_path / "damaged"
    shutil.copytree(workdir, damaged)
    for path in (damaged / "checkpoints" / "8" / "state" / "d").iterdir():
        path.write_bytes(path.read_bytes()[:100])  # a crash mid-write
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    with pytest.raises(
        ValueError, match=r"checkpoint 8 in .* is unreadable \(corrupt or incomplete: .*\[6\]"
    ):
        run_checkpoint.restore_params(config, str(damaged))
    _, step = run_checkpoint.restore_params(config, str(damaged), 6)  # the intact one restores
    assert step == 6
    # A damaged meta (a crash while writing the JSON): named when asked for, left out otherwise.
    (damaged / "checkpoints" / "6" / "meta" / "metadata").write_text('{"stage": "fine')
    with pytest.raises(
        ValueError, match=r"checkpoint 6 in .* is unreadable \(corrupt .*\[2, 4, 8\]"
    ):
        run_checkpoint.restore_params(config, str(damaged), 6)
    _, step = run_checkpoint.restore_params(config, str(damaged), 4, stage="pretrain")
    assert step == 4
