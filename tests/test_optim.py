"""Tests of m2u_jax.optim: schedule values, the weight-decay mask, one AdamW update by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from m2u_jax import optim


def test_learning_rate_schedule_warmup_then_cosine():
    schedule = optim.learning_rate_schedule(1.0, warmup_steps=2, total_steps=10)
    # Update `count` uses the rate at count + 1: linear warmup over 2, then cosine over 11 - 2.
    np.testing.assert_allclose(float(schedule(0)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1)), 1.0, rtol=1e-6)
    for count in range(2, 10):
        expected = 0.5 * (1 + math.cos(math.pi * (count + 1 - 2) / 9))
        np.testing.assert_allclose(float(schedule(count)), expected, rtol=1e-5, atol=1e-7)
    assert float(schedule(9)) > 0  # the last update still moves the parameters


def test_learning_rate_schedule_without_warmup_starts_near_peak():
    schedule = optim.learning_rate_schedule(2.0, warmup_steps=0, total_steps=4)
    np.testing.assert_allclose(float(schedule(0)), 2.0 * 0.5 * (1 + math.cos(math.pi / 5)), 1e-5)


def test_momentum_schedule_cosine_to_one():
    np.testing.assert_allclose(float(optim.momentum_schedule(0.99, 0, 100)), 0.99, rtol=1e-7)
    np.testing.assert_allclose(float(optim.momentum_schedule(0.99, 50, 100)), 0.995, rtol=1e-7)
    np.testing.assert_allclose(float(optim.momentum_schedule(0.99, 100, 100)), 1.0, rtol=1e-7)
    np.testing.assert_allclose(float(optim.momentum_schedule(0.9, 25, 100)), 0.9146447, rtol=1e-6)


@pytest.mark.parametrize(
    "path, expected",
    [
        (("encoder", "block_00", "mlp", "dense_0", "kernel"), True),
        (("encoder", "block_00", "mlp", "dense_0", "bias"), False),
        (("encoder", "block_00", "norm_1", "scale"), False),
        (("encoder", "LayerNorm_0", "scale"), False),
        (("backbone", "pos_embedding"), False),
        (("backbone", "posemb_fine"), False),
        (("backbone", "PositionEmbedding_0", "embedding"), False),
        (("stem_rgb", "Conv_0", "kernel"), True),
        (("backbone", "cls_token"), True),
    ],
)
def test_decays_by_name(path, expected):
    assert optim.decays(path) is expected


def test_decay_mask_structure():
    params = {
        "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "norm": {"scale": jnp.ones(3)},
        "pos_embedding": jnp.ones((1, 4, 3)),
    }
    assert optim.decay_mask(params) == {
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False},
        "pos_embedding": False,
    }


def test_make_optimizer_first_update_by_hand():
    config = tiny.get_config().train
    config.learning_rate, config.warmup_steps, config.weight_decay = 0.1, 0, 0.5
    config.grad_clip_norm = 1.0
    optimizer, schedule = optim.make_optimizer(config, total_steps=4)
    params = {"dense": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}}
    grads = {"dense": {"kernel": jnp.full((2, 2), 10.0), "bias": jnp.full((2,), -10.0)}}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    lr = float(schedule(0))
    # Clipping only rescales; Adam's first step is lr * g / |g| (bias-corrected, eps ~ 0), and
    # decoupled decay adds lr * wd * param on the kernel only.
    np.testing.assert_allclose(updates["dense"]["kernel"], -lr * (1 + 0.5 * 3.0), rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], lr, rtol=1e-5)


def _adam_second_update(grad1, grad2, lr, b1=0.9, b2=0.999, eps=1e-8):
    m1, v1 = (1 - b1) * grad1, (1 - b2) * grad1**2
    m2, v2 = b1 * m1 + (1 - b1) * grad2, b2 * v1 + (1 - b2) * grad2**2
    m_hat, v_hat = m2 / (1 - b1**2), v2 / (1 - b2**2)
    return -lr * m_hat / (np.sqrt(v_hat) + eps)


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_gradient_clipping_caps_global_norm(clip_norm):
    # Adam is scale-invariant on its first step only, so clipping shows on the second one: a
    # huge first gradient dominates the moments unless it is clipped to norm 1.
    config = tiny.get_config().train
    config.learning_rate, config.warmup_steps, config.weight_decay = 0.1, 0, 0.0
    config.grad_clip_norm = clip_norm
    optimizer, schedule = optim.make_optimizer(config, total_steps=4)
    params = {"kernel": jnp.zeros((2, 2))}
    grad1, grad2 = np.array([[30.0, 40.0], [0.0, 0.0]]), np.array([[0.3, -0.4], [0.0, 0.0]])
    opt_state = optimizer.init(params)
    _, opt_state = optimizer.update({"kernel": jnp.asarray(grad1)}, opt_state, params)
    updates, _ = optimizer.update({"kernel": jnp.asarray(grad2)}, opt_state, params)
    clipped1 = grad1 / 50.0 if clip_norm else grad1  # |grad1| = 50; |grad2| = 0.5 is kept
    expected = _adam_second_update(clipped1, grad2, float(schedule(1)))
    np.testing.assert_allclose(updates["kernel"], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("apart", [False, True])
def test_heads_clipped_apart_keep_the_trunk_update(apart):
    # The trunk's first gradient (norm 0.5) is under the clip norm 1; the head's (norm 50) is
    # far over. One global clip scales both by 1/|all| = 1/50.0025; clipped apart, the trunk's
    # gradient is kept and only the head's is scaled (by 1/50). Adam shows it on step 2.
    config = tiny.get_config().train
    config.learning_rate, config.warmup_steps, config.weight_decay = 0.1, 0, 0.0
    config.grad_clip_norm = 1.0
    optimizer, schedule = optim.make_optimizer(
        config, total_steps=4, clip_apart=("detection_head",) if apart else ()
    )
    params = {"backbone": {"kernel": jnp.zeros(2)}, "detection_head": {"kernel": jnp.zeros(2)}}
    trunk1, head1 = np.array([0.3, 0.4]), np.array([30.0, 40.0])
    trunk2, head2 = np.array([0.03, -0.04]), np.array([0.3, -0.4])

    def grads(trunk, head):
        return {"backbone": {"kernel": jnp.asarray(trunk)}, "detection_head": {"kernel": head}}

    opt_state = optimizer.init(params)
    _, opt_state = optimizer.update(grads(trunk1, jnp.asarray(head1)), opt_state, params)
    updates, _ = optimizer.update(grads(trunk2, jnp.asarray(head2)), opt_state, params)
    lr = float(schedule(1))
    total = float(np.sqrt(0.5**2 + 50.0**2))
    trunk_scale, head_scale = (1.0, 1 / 50.0) if apart else (1 / total, 1 / total)
    np.testing.assert_allclose(
        updates["backbone"]["kernel"],
        _adam_second_update(trunk1 * trunk_scale, trunk2, lr),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        updates["detection_head"]["kernel"],
        _adam_second_update(head1 * head_scale, head2, lr),
        rtol=1e-4,
    )


def test_decay_mask_on_the_tiny_model():
    from m2u_jax import model as model_lib

    config = tiny.get_config()
    model = model_lib.build_model(config.model)
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]
    # The collections the optimizer may clip apart are the model's own (a renamed head would
    # otherwise fall silently under the trunk's clip).
    assert set(model_lib.DETACHED_HEADS) <= set(params)
    mask = optim.decay_mask(params)
    flat = {
        "/".join(optim._key_name(entry) for entry in path): decay
        for path, decay in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    # Exactly the Dense/Conv kernels decay; norms, biases, embeddings and gains do not.
    assert {name for name, decay in flat.items() if decay} == {
        name for name in flat if name.endswith("/kernel")
    }
    for name in (
        "backbone/embed/pos_embedding",
        "backbone/embed/scale_embedding",
        "backbone/encoder_norm/scale",
        "backbone/block_00/norm_attn/bias",
        "backbone/block_00/mlp/fc1/bias",
        "backbone/fusion_00/layer_scale",
    ):
        assert flat[name] is False, name
    assert flat["backbone/block_00/mlp/fc1/kernel"] is True
    assert flat["detection_head/head_conv/kernel"] is True
