"""Tests for m2u_jax.layers: attention forms, ONNX-friendly resampling, position embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2u_jax import layers


def _qkv(batch=2, queries=5, keys=7, heads=3, head_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, queries, heads, head_dim)).astype(np.float32)
    key = rng.normal(size=(batch, keys, heads, head_dim)).astype(np.float32)
    value = rng.normal(size=(batch, keys, heads, head_dim)).astype(np.float32)
    return query, key, value


def _reference_attention(query, key, value, mask=None):
    logits = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, value)


def test_attention_forms_agree_with_numpy_reference():
    query, key, value = _qkv()
    expected = _reference_attention(query, key, value)
    for form in ("dot_product", "einsum", "matmul"):
        result = layers.attention(query, key, value, implementation=form)
        assert result.shape == (2, 5, 3, 4)
        np.testing.assert_allclose(result, expected, atol=1e-5, rtol=1e-5)


def test_attention_forms_agree_with_mask_and_bf16():
    query, key, value = _qkv(seed=1)
    mask = np.random.default_rng(2).random((2, 1, 5, 7)) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    expected = _reference_attention(query, key, value, mask)
    for form in ("dot_product", "einsum", "matmul"):
        masked = layers.attention(query, key, value, implementation=form, mask=mask)
        np.testing.assert_allclose(masked, expected, atol=1e-5, err_msg=form)
    as_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (query, key, value)]
    dot16 = layers.attention(*as_bf16, implementation="dot_product")
    for form in ("einsum", "matmul"):
        other16 = layers.attention(*as_bf16, implementation=form)
        assert dot16.dtype == other16.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(dot16, np.float32), np.asarray(other16, np.float32), atol=2e-2
        )


def test_einsum_attention_lowers_without_ellipsis():
    query, key, value = _qkv()
    jaxpr = jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, implementation="einsum"))(
        query, key, value
    )
    dot_generals = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert len(dot_generals) == 2


def test_matmul_attention_uses_batched_matmuls_without_einsum_letters():
    # Heads next to the batch: both products are dot_generals batched over (B, heads) that
    # contract one axis, which jax2onnx exports as MatMul (no Einsum node).
    query, key, value = _qkv()
    jaxpr = jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, implementation="matmul"))(
        query, key, value
    )
    dot_generals = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert len(dot_generals) == 2
    for eqn in dot_generals:
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
        assert lhs_batch == rhs_batch == (0, 1)
        assert lhs_contract == (3,) and rhs_contract == (2,)


def test_unknown_attention_form_is_rejected():
    with pytest.raises(ValueError, match="model.attention='flash'"):
        layers.attention(*_qkv(), implementation="flash")


@pytest.mark.parametrize("in_size,out_size", [(8, 16), (16, 8), (7, 12), (12, 5), (6, 6)])
def test_resize_bilinear_matches_jax_image_resize(in_size, out_size):
    images = np.random.default_rng(0).random((2, in_size, in_size + 1, 3)).astype(np.float32)
    ours = layers.resize_bilinear(images, out_size, out_size + 2)
    reference = jax.image.resize(
        images, (2, out_size, out_size + 2, 3), method="linear", antialias=False
    )
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_resize_matrix_rows_sum_to_one_and_identity():
    np.testing.assert_allclose(layers.resize_matrix(9, 4).sum(axis=1), np.ones(4), atol=1e-6)
    np.testing.assert_array_equal(layers.resize_matrix(5, 5), np.eye(5, dtype=np.float32))


def test_upsample2x_matches_bilinear_resize():
    features = np.random.default_rng(1).normal(size=(2, 3, 5, 4)).astype(np.float32)
    reference = jax.image.resize(features, (2, 6, 10, 4), method="linear", antialias=False)
    np.testing.assert_allclose(layers.upsample2x_bilinear(features), reference, atol=1e-6)
    # Hand case, one row: [0, 4] -> [0, 1, 3, 4].
    row = jnp.asarray([0.0, 4.0]).reshape(1, 1, 2, 1)
    np.testing.assert_allclose(
        layers.upsample2x_bilinear(row)[0, 0, :, 0], [0.0, 1.0, 3.0, 4.0], atol=1e-6
    )


def test_downsample_average_pools_integer_factors():
    images = np.arange(2 * 8 * 8 * 2, dtype=np.float32).reshape(2, 8, 8, 2)
    half = layers.downsample(images, 0.5)
    expected = images.reshape(2, 4, 2, 4, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(half, expected)
    # At 0.5 average pooling equals bilinear without antialias.
    np.testing.assert_allclose(
        half,
        jax.image.resize(images, (2, 4, 4, 2), method="linear", antialias=False),
        atol=1e-4,
    )
    quarter = layers.downsample(images, 0.25)
    np.testing.assert_allclose(quarter, images.reshape(2, 2, 4, 2, 4, 2).mean(axis=(2, 4)))
    assert layers.downsample(images, 1.0) is images
    np.testing.assert_allclose(
        layers.downsample(images, 0.75),
        jax.image.resize(images, (2, 6, 6, 2), method="linear", antialias=False),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="whole pixels"):
        layers.downsample(images, 0.3)


def test_token_alignment_matrix_geometry():
    # Non-overlapping patches on their own stride: identity.
    identity = layers.token_alignment_matrix(
        4, patch_size=8, patch_stride=8, scale=1.0, out_size=4, out_stride=8
    )
    np.testing.assert_array_equal(identity, np.eye(4, dtype=np.float32))
    # Overlapping 8px patches at stride 4 on a 16px side: 3 tokens centred at 4, 8, 12 px.
    # Cells of stride 4 are centred at 2, 6, 10, 14 px -> token indices -0.5, 0.5, 1.5, 2.5.
    matrix = layers.token_alignment_matrix(
        3, patch_size=8, patch_stride=4, scale=1.0, out_size=4, out_stride=4
    )
    expected = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 1]], dtype=np.float32)
    np.testing.assert_allclose(matrix, expected)
    # A half-scale stream: token i covers input pixels [16i, 16i + 16) -> cells of stride 8
    # at 4, 12, 20, 28 px read token positions -0.25, 0.25, 0.75, 1.25.
    coarse = layers.token_alignment_matrix(
        2, patch_size=8, patch_stride=8, scale=0.5, out_size=4, out_stride=8
    )
    np.testing.assert_allclose(coarse, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


def test_resample_grid_skips_identity_axes():
    grid = jnp.ones((1, 3, 4, 2))
    jaxpr = jax.make_jaxpr(
        lambda g: layers.resample_grid(g, np.eye(3, dtype=np.float32), layers.resize_matrix(4, 8))
    )(grid)
    assert sum(eqn.primitive.name == "dot_general" for eqn in jaxpr.eqns) == 1
    np.testing.assert_allclose(
        layers.resample_grid(grid, np.eye(3, dtype=np.float32), layers.resize_matrix(4, 8)),
        np.ones((1, 3, 8, 2)),
        atol=1e-6,
    )


def test_sincos_posemb_values():
    table = layers.sincos_2d_posemb(3, 5, 8)
    assert table.shape == (3, 5, 8)
    # Position (row 0, col 0): sin(0)=0, cos(0)=1 in each quarter.
    np.testing.assert_allclose(table[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # omega = [1, 1e-4] for quarter 2: col 2 -> sin(2), sin(2e-4).
    np.testing.assert_allclose(table[1, 2, :2], [np.sin(2.0), np.sin(2e-4)], rtol=1e-6)
    np.testing.assert_allclose(table[1, 2, 4:6], [np.sin(1.0), np.sin(1e-4)], rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        layers.sincos_2d_posemb(2, 2, 6)


def _block_mask(lengths, mode):
    ids = np.repeat(np.arange(len(lengths)), lengths)
    same = ids[:, None] == ids[None, :]
    return (same if mode == "self" else ~same)[None, None]


@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("form", ["dot_product", "einsum", "matmul"])
def test_multistream_attention_equals_masked_joint_attention(mode, form):
    lengths = (6, 3, 2)
    tokens = jax.random.normal(jax.random.key(0), (2, sum(lengths), 16))
    module = layers.MultiStreamAttention(num_heads=2, mode=mode, implementation=form)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(1), tokens, lengths))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) / 4, shapes)
    assert params["qkv"]["kernel"].shape == (16, 3, 2, 8)
    assert params["out"]["kernel"].shape == (2, 8, 16)
    result = jax.jit(lambda p: module.apply({"params": p}, tokens, lengths))(params)
    qkv = np.einsum("bnd,dthe->bnthe", tokens, params["qkv"]["kernel"]) + params["qkv"]["bias"]
    attended = _reference_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], _block_mask(lengths, mode)
    )
    expected = np.einsum("bnhe,hed->bnd", attended, params["out"]["kernel"]) + params["out"]["bias"]
    np.testing.assert_allclose(result, expected, atol=1e-4)


def test_cross_attention_with_single_stream_adds_only_bias():
    tokens = jax.random.normal(jax.random.key(0), (1, 4, 8))
    module = layers.MultiStreamAttention(num_heads=2, mode="cross")
    variables = module.init(jax.random.key(1), tokens, (4,))
    result = module.apply(variables, tokens, (4,))
    np.testing.assert_allclose(
        result, np.broadcast_to(variables["params"]["out"]["bias"], (1, 4, 8)), atol=1e-6
    )


def test_mlp_block_shapes_and_dropout():
    tokens = jnp.ones((2, 3, 8))
    mlp = layers.MlpBlock(mlp_dim=16, dropout_rate=0.5)
    variables = mlp.init(jax.random.key(0), tokens, deterministic=True)
    assert variables["params"]["fc1"]["kernel"].shape == (8, 16)
    deterministic = mlp.apply(variables, tokens, deterministic=True)
    assert deterministic.shape == (2, 3, 8)
    sampled = mlp.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(sampled, deterministic)
