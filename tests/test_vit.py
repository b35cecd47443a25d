"""Tests for m2u_jax.vit: MSPG geometry and numbers, layer plans, scan/unrolled equality, remat,
pinned backbone sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2u_jax import layers, vit


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def random_params(module, *args, seed=0, **kwargs):
    """Parameters with init-like magnitudes from numpy (no compiled RNG: `init` of a model
    costs seconds of XLA compile on a CPU, and these tests only need generic values)."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * noise).astype(np.float32)
        fan_in = math.prod(leaf.shape[:-1]) if name == "kernel" and leaf.ndim > 1 else 100
        return (noise / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------- geometry


def test_token_grid_counts_overlapping_patches():
    assert vit.token_grid(32, 8, 8, 1.0) == 4
    assert vit.token_grid(32, 8, 4, 1.0) == 7  # (32 - 8) / 4 + 1
    assert vit.token_grid(32, 8, 4, 0.5) == 3  # 16 px side
    assert vit.token_grid(256, 16, 8, 1.0) == 31
    assert vit.stream_grids(32, 48, 8, 4, (1.0, 0.5)) == ((7, 11), (3, 5))
    with pytest.raises(ValueError, match="not tiled exactly"):
        vit.token_grid(30, 8, 4, 1.0)
    with pytest.raises(ValueError, match="smaller than model.patch_size"):
        vit.token_grid(32, 8, 8, 0.125)


def test_posemb_matrix_identity_and_resampling():
    same = vit.posemb_matrix(4, 32, 4, 32, patch_size=8, patch_stride=8, scale=1.0)
    np.testing.assert_array_equal(same, np.eye(4, dtype=np.float32))
    overlapping = vit.posemb_matrix(7, 32, 7, 32, patch_size=8, patch_stride=4, scale=1.0)
    np.testing.assert_allclose(overlapping, np.eye(7), atol=1e-6)
    # Half-scale stream with patch == stride: each coarse token averages two fine positions.
    half = vit.posemb_matrix(4, 32, 2, 32, patch_size=8, patch_stride=8, scale=0.5)
    np.testing.assert_allclose(half, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # A twice larger input stretches the grid like a half-pixel resize.
    bigger = vit.posemb_matrix(4, 32, 8, 64, patch_size=8, patch_stride=8, scale=1.0)
    np.testing.assert_allclose(bigger, layers.resize_matrix(4, 8), atol=1e-6)


def _embed(**overrides):
    fields = dict(
        width=8,
        modalities=("rgb",),
        image_size=16,
        scales=(1.0,),
        patch_size=4,
        patch_stride=4,
    )
    fields.update(overrides)
    return vit.MultiScalePatchEmbed(**fields)


def _patch_tokens(images, kernel, bias, patch):
    """Reference non-overlapping patch embedding in numpy: [B, H, W, C] -> [B, N, D]."""
    batch, height, width, channels = images.shape
    patches = images.reshape(batch, height // patch, patch, width // patch, patch, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch, patch, channels)
    return np.einsum("bnijc,ijcd->bnd", patches, kernel) + bias


def test_patch_embedding_numbers_single_modality():
    images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    module = _embed()
    params = random_params(module, images)
    tokens = module.apply({"params": params}, images)
    assert tokens.shape == (2, 16, 8)
    expected = _patch_tokens(
        images * 2 - 1, params["stem_rgb"]["kernel"], params["stem_rgb"]["bias"], 4
    )
    expected = expected + np.asarray(params["pos_embedding"])
    np.testing.assert_allclose(tokens, expected, atol=1e-5)


def test_patch_embedding_overlapping_multiscale_multimodal():
    images = np.random.default_rng(1).random((2, 16, 16, 4)).astype(np.float32)
    module = _embed(modalities=("rgb", "depth"), scales=(1.0, 0.5), patch_stride=2)
    params = random_params(module, images)
    params["modality_gate_kernel"] = np.zeros_like(params["modality_gate_kernel"])
    params["modality_gate_bias"] = np.zeros_like(params["modality_gate_bias"])
    assert params["stem_rgb"]["kernel"].shape == (4, 4, 3, 8)
    assert params["stem_depth"]["kernel"].shape == (4, 4, 1, 8)
    assert params["pos_embedding"].shape == (1, 49, 8)  # 7 x 7 scale-1 grid
    apply = jax.jit(lambda params: module.apply({"params": params}, images))
    tokens = apply(params)
    assert tokens.shape == (2, 49 + 9, 8)  # 7x7 at scale 1, 3x3 at scale 0.5
    # Zero-initialised gate = average of the stems; check the first fine token by hand.
    normalised = images * 2 - 1
    first_patch = normalised[:, :4, :4]
    rgb = np.einsum("bijc,ijcd->bd", first_patch[..., :3], params["stem_rgb"]["kernel"])
    depth = np.einsum("bijc,ijcd->bd", first_patch[..., 3:], params["stem_depth"]["kernel"])
    stems = 0.5 * (rgb + params["stem_rgb"]["bias"] + depth + params["stem_depth"]["bias"])
    expected = stems + params["pos_embedding"][0, 0] + params["scale_embedding"][0]
    np.testing.assert_allclose(tokens[:, 0], expected, atol=1e-5)
    # A gate that strongly prefers depth makes the token the depth stem alone.
    gated = dict(params, modality_gate_bias=np.array([-50.0, 50.0], np.float32))
    tokens = apply(gated)
    expected = depth + params["stem_depth"]["bias"] + params["pos_embedding"][0, 0]
    expected = expected + params["scale_embedding"][0]
    np.testing.assert_allclose(tokens[:, 0], expected, atol=1e-4)


def test_patch_embedding_rejects_wrong_channels_and_posemb():
    with pytest.raises(ValueError, match="model.modalities=rgb,thermal"):
        _embed(modalities=("rgb", "thermal")).init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="model.posemb='rope'"):
        _embed(posemb="rope").init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))


def test_sincos_posemb_is_fixed_and_resampled_per_scale():
    images = jnp.zeros((1, 16, 16, 3))
    module = _embed(posemb="sincos2d", scales=(1.0, 0.5))
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), images))["params"]
    assert "pos_embedding" not in shapes
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)  # tokens = posemb
    tokens = module.apply({"params": params}, images)
    table = layers.sincos_2d_posemb(4, 4, 8)
    np.testing.assert_allclose(tokens[0, :16], table.reshape(16, 8), atol=1e-6)
    coarse = table.reshape(2, 2, 2, 2, 8).mean(axis=(1, 3)).reshape(4, 8)
    np.testing.assert_allclose(tokens[0, 16:], coarse, atol=1e-6)


# ----------------------------------------------------------------------------- layer plans


def _names(plan):
    return [
        spec.name if spec.kind != "scan" else f"{spec.name}x{spec.num_periods}" for spec in plan
    ]


def test_backbone_plan_unrolled_and_scanned():
    trunk, tail = vit.backbone_plan(6, 2, 2, 2, scan=False)
    assert _names(trunk) == [
        "block_00",
        "block_01",
        "fusion_00",
        "block_02",
        "block_03",
        "fusion_01",
    ]
    assert _names(tail) == ["block_04", "block_05", "fusion_02"]
    trunk, tail = vit.backbone_plan(12, 2, 2, 3, scan=True)
    # Periods 0-3 complete in the trunk; block 8 alone; the split cuts period 4.
    assert _names(trunk) == ["scan_00x4", "block_08"]
    assert _names(tail) == ["block_09", "fusion_04", "block_10", "block_11", "fusion_05"]
    trunk, tail = vit.backbone_plan(12, 2, 1, 2, scan=True)  # one scale: no fusion
    assert _names(trunk) == ["scan_00x10"]
    assert _names(tail) == ["scan_10x2"]
    trunk, tail = vit.backbone_plan(3, 0, 2, 0, scan=False)
    assert _names(trunk) == ["block_00", "block_01", "block_02"] and tail == ()
    with pytest.raises(ValueError, match="mc_dropout_blocks=4"):
        vit.backbone_plan(3, 1, 2, 4, scan=False)


# ----------------------------------------------------------------------------- backbone


def _backbone(**overrides):
    fields = dict(
        width=16,
        depth=5,
        num_heads=2,
        mlp_dim=32,
        modalities=("rgb",),
        image_size=16,
        scales=(1.0, 0.5),
        patch_size=4,
        patch_stride=4,
        fusion_every=1,
        tail_blocks=2,
    )
    fields.update(overrides)
    return vit.Backbone(**fields)


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(7), (2, 16, 16, 3))


def test_scan_equals_unrolled_with_converted_params(images):
    # depth 5, fusion after every block, last 2 blocks in the tail: the trunk scans 3 periods
    # and the tail 2 (other cuts are covered by the plan tests). The scanned copy also remats.
    unrolled = _backbone()
    scanned = _backbone(scan_blocks=True, remat=True)
    scan_params = random_params(scanned, images, train=False)
    assert sorted(scan_params) == ["embed", "encoder_norm", "scan_00", "scan_03"]
    assert scan_params["scan_00"]["block_0"]["mlp"]["fc1"]["kernel"].shape == (3, 16, 32)
    assert scan_params["scan_03"]["fusion"]["layer_scale"].shape == (2, 16)
    flat = vit.unroll_scanned_params(scan_params)
    unrolled_shapes = jax.eval_shape(lambda: unrolled.init(jax.random.key(0), images, train=False))[
        "params"
    ]
    assert jax.tree.structure(flat) == jax.tree.structure(unrolled_shapes)
    assert _count(flat) == _count(scan_params) == _count(unrolled_shapes)
    tokens_scan, aux_scan = jax.jit(lambda p: scanned.apply({"params": p}, images, train=False))(
        scan_params
    )
    tokens_flat, aux_flat = jax.jit(lambda p: unrolled.apply({"params": p}, images, train=False))(
        flat
    )
    assert tokens_scan.shape == (2, 16 + 4, 16)
    np.testing.assert_allclose(tokens_scan, tokens_flat, atol=1e-5)
    assert sorted(aux_scan) == sorted(aux_flat) == [f"block_{i:02d}" for i in range(5)]
    for name in aux_flat:
        np.testing.assert_allclose(aux_scan[name], aux_flat[name], atol=1e-5)
    round_trip = vit.scan_params_like(flat, scan_params)
    jax.tree.map(np.testing.assert_array_equal, round_trip, scan_params)


def test_trunk_then_tail_equals_call_and_remat_keeps_gradients(images):
    model = _backbone(depth=2, fusion_every=2, tail_blocks=1)  # fusion after block 1 only
    variables = {"params": random_params(model, images, train=False)}
    # Final LayerNorm with scale 1, bias 0: zero mean, unit variance per token.
    variables["params"]["encoder_norm"] = dict(scale=np.ones(16, np.float32), bias=np.zeros(16))

    def split_forward(variables):
        tokens, aux = model.apply(variables, images, train=False)
        trunk_tokens, trunk_aux = model.apply(variables, images, train=False, method=model.trunk)
        final, tail_aux = model.apply(
            variables, trunk_tokens, (16, 4), train=False, method=model.tail
        )
        return tokens, final, trunk_aux, tail_aux

    tokens, final, trunk_aux, tail_aux = jax.jit(split_forward)(variables)
    np.testing.assert_allclose(final, tokens, atol=1e-6)
    assert sorted(trunk_aux) == ["block_00"] and sorted(tail_aux) == ["block_01"]
    np.testing.assert_allclose(np.mean(final, axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.std(final, axis=-1), 1.0, atol=1e-3)

    remat_model = _backbone(depth=2, fusion_every=2, tail_blocks=1, remat=True)

    def loss(params, module):
        tokens, _ = module.apply({"params": params}, images, train=False)
        return jnp.mean(tokens[:, :, 0] ** 2)

    grads = jax.jit(jax.grad(lambda p: loss(p, model)))(variables["params"])
    remat_grads = jax.jit(jax.grad(lambda p: loss(p, remat_model)))(variables["params"])
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, remat_grads)
    assert np.abs(grads["block_00"]["mlp"]["fc1"]["kernel"]).sum() > 0


# ----------------------------------------------------------------------------- sizes

# Backbone parameters of every variant for the default geometry: rgb, 256 px, scales (1, 0.5),
# patch 16 / stride 16, fusion every 2 blocks, learned position embedding.
BACKBONE_PARAMETERS = {"tiny": 149632, "tiny4": 233408, "S": 25243776, "B": 100032768}


def test_every_variant_is_pinned():
    assert set(BACKBONE_PARAMETERS) == set(vit.VARIANTS)


@pytest.mark.parametrize("variant", sorted(vit.VARIANTS))
def test_backbone_parameter_count(variant):
    model = vit.Backbone(
        **vit.VARIANTS[variant],
        modalities=("rgb",),
        image_size=256,
        tail_blocks=2 if variant != "tiny" else 1,
    )
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
    )
    assert _count(shapes) == BACKBONE_PARAMETERS[variant]
    width, depth = vit.VARIANTS[variant]["width"], vit.VARIANTS[variant]["depth"]
    mlp = vit.VARIANTS[variant]["mlp_dim"]
    block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width
    fusion = 4 * width * width + 4 * width + 2 * width + width
    embed = 16 * 16 * 3 * width + width + 256 * width + 2 * width
    expected = depth * block + (depth // 2) * fusion + embed + 2 * width
    assert expected == BACKBONE_PARAMETERS[variant]
