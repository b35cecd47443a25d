"""Tests for m2u_jax.heads: decoder geometry and numbers, detection anchors and init, image and
projection heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2u_jax import heads


def key(seed):
    # rbg keys: XLA compiles their random bits far faster than threefry's on CPU.
    return jax.random.key(seed, impl="unsafe_rbg")


def test_decoder_start_stride():
    assert heads.decoder_start_stride(16, 1.0, 256, 256) == 16
    assert heads.decoder_start_stride(8, 1.0, 32, 32) == 8
    assert heads.decoder_start_stride(12, 1.0, 252, 252) == 4  # 8 does not divide 252
    assert heads.decoder_start_stride(16, 0.5, 256, 256) == 32  # a half-scale stream
    assert heads.decoder_start_stride(1, 1.0, 5, 5) == 1


def _silu(values):
    return np.asarray(jax.nn.silu(jnp.asarray(values)))


def test_decoder_numbers_without_conv_stages():
    # Patch 2 = stride 2: the decoder is proj (1x1) -> GELU -> out (1x1) -> bilinear x2.
    decoder = heads.AnomalyDecoder(channels=4, image_channels=3, patch_size=2, patch_stride=2)
    grid = np.random.default_rng(0).normal(size=(2, 4, 4, 6)).astype(np.float32)
    variables = jax.jit(lambda k: decoder.init(k, grid, (8, 8), train=False))(key(0))
    params = variables["params"]
    assert sorted(params) == ["out", "proj"]
    recon, pixel_logits = decoder.apply(variables, grid, (8, 8), train=False)
    assert recon.shape == (2, 8, 8, 3) and pixel_logits.shape == (2, 8, 8)
    hidden = _silu(grid @ params["proj"]["kernel"][0, 0] + params["proj"]["bias"])
    maps = hidden @ params["out"]["kernel"][0, 0] + params["out"]["bias"]
    maps = jax.image.resize(maps, (2, 8, 8, 4), method="linear", antialias=False)
    np.testing.assert_allclose(recon, jax.nn.sigmoid(maps[..., :3]), atol=1e-5)
    np.testing.assert_allclose(pixel_logits, maps[..., 3], atol=1e-5)


def test_decoder_stages_channels_and_overlapping_tokens():
    decoder = heads.AnomalyDecoder(channels=64, image_channels=1, patch_size=32, patch_stride=16)
    grid = jnp.zeros((1, 15, 15, 8))  # 256 px, 32 px patches at stride 16
    shapes = jax.eval_shape(lambda: decoder.init(key(0), grid, (256, 256), train=False))
    params = shapes["params"]
    assert sorted(params) == ["out", "proj", "up_0", "up_1", "up_2"]
    assert [params[f"up_{i}"]["kernel"].shape[-1] for i in range(3)] == [32, 16, 16]
    recon, logits = jax.eval_shape(
        lambda v: decoder.apply(v, grid, (256, 256), train=False), shapes
    )
    assert recon.shape == (1, 256, 256, 1) and logits.shape == (1, 256, 256)


@pytest.fixture(scope="module")
def detection():
    head = heads.DetectionHead(
        channels=8, num_classes=3, strides=(8, 16, 64), patch_size=8, patch_stride=8
    )
    grid = jnp.zeros((2, 8, 8, 4))  # 64 px image
    variables = jax.jit(lambda k: head.init(k, grid, (64, 64), train=False))(key(0))
    return head, grid, variables


def test_detection_layout_and_anchor_points(detection):
    head, grid, variables = detection
    det = head.apply(variables, grid, (64, 64), train=False)
    anchors = 64 + 16 + 1
    assert det["obj_logits"].shape == (2, anchors)
    assert det["cls_logits"].shape == (2, anchors, 3)
    assert det["box_ltrb"].shape == (2, anchors, 4)
    assert det["points"].shape == (anchors, 2) and det["strides"].shape == (anchors,)
    np.testing.assert_array_equal(det["points"][:3], [[4, 4], [12, 4], [20, 4]])
    np.testing.assert_array_equal(det["points"][8], [4, 12])  # second row
    np.testing.assert_array_equal(det["points"][64], [8, 8])  # level 2 starts
    np.testing.assert_array_equal(det["points"][-1], [32, 32])
    np.testing.assert_array_equal(det["strides"][np.array([0, 63, 64, 79, 80])], [8, 8, 16, 16, 64])
    points, strides = heads.anchor_points((64, 64), (8, 16, 64))
    np.testing.assert_array_equal(points, det["points"])
    np.testing.assert_array_equal(strides, det["strides"])
    # 16 = 2 x 8: a strided conv; 64 != 2 x 16: re-aligned from the projection.
    assert "down_1" in variables["params"] and "down_2" not in variables["params"]


def test_detection_init_values_on_zero_features(detection):
    head, grid, variables = detection
    det = head.apply(variables, grid, (64, 64), train=False)
    prior_logit = np.log(0.01 / 0.99)
    # Zero tokens -> zero features everywhere (zero conv biases): outputs are the biases.
    np.testing.assert_allclose(det["obj_logits"], prior_logit, atol=1e-5)
    np.testing.assert_allclose(det["cls_logits"], prior_logit, atol=1e-5)
    expected_ltrb = np.log(2.0) * det["strides"][None, :, None]
    np.testing.assert_allclose(
        det["box_ltrb"], np.broadcast_to(expected_ltrb, (2, 81, 4)), rtol=1e-5
    )
    random_grid = jax.random.normal(key(1), grid.shape)
    det = head.apply(variables, random_grid, (64, 64), train=False)
    assert np.all(np.asarray(det["box_ltrb"]) >= 0)
    assert det["obj_logits"].dtype == jnp.float32
    with pytest.raises(ValueError, match="det_strides entry 16"):
        head.apply(variables, grid, (72, 72), train=False)


def test_image_and_projection_heads():
    embedding = jax.random.normal(key(0), (3, 8))
    image_head = heads.ImageHead(num_defect_classes=4, dropout_rate=0.5)
    variables = jax.jit(lambda k: image_head.init(k, embedding, train=False))(key(1))

    @jax.jit
    def run(variables):
        deterministic = image_head.apply(variables, embedding, train=False)
        sampled = image_head.apply(variables, embedding, train=True, rngs={"dropout": key(2)})
        return deterministic, sampled[0]

    (image_logits, type_logits), sampled = run(variables)
    assert image_logits.shape == (3,) and type_logits.shape == (3, 5)
    params = variables["params"]
    np.testing.assert_allclose(
        image_logits,
        embedding @ params["image"]["kernel"][:, 0] + params["image"]["bias"][0],
        atol=1e-5,
    )
    assert not np.allclose(sampled, image_logits)


def test_decoupled_detection_head_takes_classes_from_their_own_branch():
    head = heads.DetectionHead(
        channels=8, num_classes=3, strides=(8, 16), patch_size=8, patch_stride=8, decoupled=True
    )
    grid = jax.random.normal(key(2), (2, 8, 8, 4))  # 64 px image
    variables = jax.jit(lambda k: head.init(k, grid, (64, 64), train=False))(key(0))
    params = variables["params"]
    assert {"cls_conv", "cls_predict", "head_conv", "predict"} <= set(params)
    assert params["predict"]["kernel"].shape == (1, 1, 8, 5)  # objectness + 4 box distances
    assert params["cls_predict"]["kernel"].shape == (1, 1, 8, 3)
    prior_logit = np.log(0.01 / 0.99)
    np.testing.assert_allclose(params["cls_predict"]["bias"], prior_logit, rtol=1e-6)
    np.testing.assert_allclose(params["predict"]["bias"], [prior_logit, 0, 0, 0, 0], atol=1e-6)

    det = head.apply(variables, grid, (64, 64), train=False)
    assert det["cls_logits"].shape == (2, 80, 3) and det["box_ltrb"].shape == (2, 80, 4)

    # The class logits are the class branch's 1x1 conv of its features, nothing else: zero its
    # kernel and they are its bias everywhere, while objectness and boxes do not move.
    cls_bias = np.array([0.5, -1.0, 2.0], np.float32)
    flat = {**params, "cls_predict": {"kernel": jnp.zeros((1, 1, 8, 3)), "bias": cls_bias}}
    cut = head.apply({"params": flat}, grid, (64, 64), train=False)
    np.testing.assert_allclose(cut["cls_logits"], np.broadcast_to(cls_bias, (2, 80, 3)))
    np.testing.assert_array_equal(cut["obj_logits"], det["obj_logits"])
    np.testing.assert_array_equal(cut["box_ltrb"], det["box_ltrb"])
    # And the other way round: zero the box branch's 1x1 conv, the classes stay.
    flat = {**params, "predict": {"kernel": jnp.zeros((1, 1, 8, 5)), "bias": jnp.zeros((5,))}}
    cut = head.apply({"params": flat}, grid, (64, 64), train=False)
    np.testing.assert_array_equal(cut["cls_logits"], det["cls_logits"])
    np.testing.assert_allclose(cut["obj_logits"], 0.0)
    expected_ltrb = np.log(2.0) * det["strides"][None, :, None]
    np.testing.assert_allclose(
        cut["box_ltrb"], np.broadcast_to(expected_ltrb, (2, 80, 4)), rtol=1e-6
    )


def test_detection_head_box_bins_are_distributions_whose_expectation_is_the_distance():
    """`box_bins=8`: the 1x1 conv predicts objectness + 4 x 8 bin logits (zero biases: uniform
    bins, so every side starts at 3.5 strides); `box_ltrb` is each side's softmax-weighted bin
    index times its level's stride, computed here by hand from the returned logits."""
    head, grid, variables = _small_decoupled_head(box_bins=8)
    assert variables["params"]["predict"]["kernel"].shape == (1, 1, 8, 1 + 4 * 8)
    # Zero tokens -> zero features (zero conv biases): the bin logits are their zero biases.
    det = head.apply(variables, jnp.zeros_like(grid), (64, 64), train=False)
    assert det["box_bins"].shape == (2, 80, 4, 8) and det["box_ltrb"].shape == (2, 80, 4)
    np.testing.assert_allclose(det["box_bins"], 0.0, atol=1e-6)
    expected = np.broadcast_to(3.5 * np.asarray(det["strides"])[None, :, None], (2, 80, 4))
    np.testing.assert_allclose(det["box_ltrb"], expected, rtol=1e-5)

    det = head.apply(variables, grid, (64, 64), train=False)  # a random token grid
    logits = np.asarray(det["box_bins"], np.float64)
    assert np.std(logits) > 0.01  # the random grid moves the bins off uniform
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    by_hand = (probs @ np.arange(8.0)) * np.asarray(det["strides"])[None, :, None]
    np.testing.assert_allclose(det["box_ltrb"], by_hand, rtol=1e-5)
    # The distance is bounded by the last bin: 7 strides.
    assert np.all(np.asarray(det["box_ltrb"]) <= 7 * np.asarray(det["strides"])[None, :, None])
    # Without bins the head returns no `box_bins`; one bin is rejected.
    plain = heads.DetectionHead(channels=8, num_classes=3, strides=(8,), patch_size=8)
    plain_variables = plain.init(key(0), grid, (64, 64), train=False)
    assert "box_bins" not in plain.apply(plain_variables, grid, (64, 64), train=False)
    with pytest.raises(ValueError, match="model.det_box_bins must be 0 or >= 2, got 1"):
        heads.DetectionHead(channels=8, num_classes=3, strides=(8,), box_bins=1).init(
            key(0), grid, (64, 64), train=False
        )


def _small_decoupled_head(**options):
    """(head, token grid of a 64-px image, initialised variables) of an 8-channel decoupled
    head at strides 8 and 16 with `options` (branch_convs, norm_groups, box_bins)."""
    head = heads.DetectionHead(
        channels=8,
        num_classes=3,
        strides=(8, 16),
        patch_size=8,
        patch_stride=8,
        decoupled=True,
        **options,
    )
    grid = jax.random.normal(key(3), (2, 8, 8, 4))  # 64 px image
    variables = jax.jit(lambda k: head.init(k, grid, (64, 64), train=False))(key(0))
    return head, grid, variables


def test_detection_head_group_norm_by_hand():
    """`norm_groups=4` puts a GroupNorm between every 3x3 conv of the head and its SiLU: the box
    branch's output is predict(silu(gn(head_conv(features)))), with gn computed by hand over
    (rows, cols, channels of the group) per image, on level 0 and with non-trivial scale/bias."""
    head, grid, variables = _small_decoupled_head(norm_groups=4)
    params = dict(variables["params"])
    assert {"neck_0_norm", "down_1_norm", "neck_1_norm", "head_conv_norm", "cls_conv_norm"} <= set(
        params
    )
    assert params["head_conv_norm"]["scale"].shape == (8,)
    scale = jax.random.uniform(key(5), (8,), minval=0.5, maxval=2.0)
    bias = jax.random.normal(key(6), (8,))
    params["head_conv_norm"] = {"scale": scale, "bias": bias}
    det, state = head.apply(
        {"params": params},
        grid,
        (64, 64),
        train=False,
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    conv_out = np.asarray(state["intermediates"]["head_conv"]["__call__"][0], np.float64)
    groups = conv_out.reshape(2, 8, 8, 4, 2)  # 4 groups of 2 channels
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    normed = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(2, 8, 8, 8)
    hidden = jax.nn.silu(normed * np.asarray(scale) + np.asarray(bias))
    predict = params["predict"]
    expected = np.einsum("bhwc,cf->bhwf", hidden, predict["kernel"][0, 0]) + predict["bias"]
    np.testing.assert_allclose(
        det["obj_logits"][:, :64], expected[..., 0].reshape(2, 64), atol=1e-4
    )
    # Without groups the head has no norm params and its output differs.
    plain = heads.DetectionHead(
        channels=8, num_classes=3, strides=(8, 16), patch_size=8, patch_stride=8, decoupled=True
    )
    plain_params = {k: v for k, v in params.items() if not k.endswith("_norm")}
    det_plain = plain.apply({"params": plain_params}, grid, (64, 64), train=False)
    assert not np.allclose(det_plain["obj_logits"], det["obj_logits"])
    with pytest.raises(ValueError, match="det_norm_groups=3 must be 0 or divide"):
        heads.DetectionHead(
            channels=8, num_classes=3, strides=(8,), patch_size=8, patch_stride=8, norm_groups=3
        ).init(key(0), grid, (64, 64), train=False)


def test_detection_head_stacks_branch_convs():
    """`branch_convs=2` adds a second 3x3 conv + SiLU to each branch (YOLOX's depth): the box
    branch's output is predict(silu(conv_1(silu(conv_0(features))))), checked by hand on level 0,
    and layer 0 keeps the one-layer head's names (old checkpoints restore)."""
    head, grid, variables = _small_decoupled_head(branch_convs=2)
    params = variables["params"]
    assert {"head_conv", "head_conv_1", "cls_conv", "cls_conv_1"} <= set(params)
    assert params["head_conv_1"]["kernel"].shape == (3, 3, 8, 8)
    assert params["cls_conv_1"]["kernel"].shape == (3, 3, 8, 8)

    det, state = head.apply(
        variables,
        grid,
        (64, 64),
        train=False,
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    first_layer = state["intermediates"]["head_conv"]["__call__"][0]  # level 0, before SiLU
    assert first_layer.shape == (2, 8, 8, 8)

    def conv(x, layer):
        out = jax.lax.conv_general_dilated(
            x, layer["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return out + layer["bias"]

    hidden = jax.nn.silu(conv(jax.nn.silu(first_layer), params["head_conv_1"]))
    expected = conv(hidden, params["predict"])  # [obj, 4 box logits]
    np.testing.assert_allclose(
        det["obj_logits"][:, :64], expected[..., 0].reshape(2, 64), atol=1e-5
    )
    np.testing.assert_allclose(
        det["box_ltrb"][:, :64],
        jax.nn.softplus(expected[..., 1:].reshape(2, 64, 4)) * 8,
        rtol=1e-5,
        atol=1e-5,
    )
    # The class branch stacks its own two layers the same way.
    cls_first = state["intermediates"]["cls_conv"]["__call__"][0]
    cls_hidden = jax.nn.silu(conv(jax.nn.silu(cls_first), params["cls_conv_1"]))
    np.testing.assert_allclose(
        det["cls_logits"][:, :64],
        conv(cls_hidden, params["cls_predict"]).reshape(2, 64, 3),
        atol=1e-5,
    )
    # A second layer changes the output (it is in the path, not only in the params).
    one_layer = heads.DetectionHead(
        channels=8, num_classes=3, strides=(8, 16), patch_size=8, patch_stride=8, decoupled=True
    )
    shallow = {k: v for k, v in params.items() if k not in ("head_conv_1", "cls_conv_1")}
    det_1 = one_layer.apply({"params": shallow}, grid, (64, 64), train=False)
    assert not np.allclose(det_1["obj_logits"], det["obj_logits"])
    np.testing.assert_allclose(
        det_1["obj_logits"][:, :64],
        conv(jax.nn.silu(first_layer), params["predict"])[..., 0].reshape(2, 64),
        atol=1e-5,
    )


def _conv3x3_stride2_same(inputs, kernel, bias):
    """By hand: a 3x3, stride-2, SAME-padded conv (XLA pads 0 before and 1 after an even side
    at stride 2), as numpy loops over the kernel taps."""
    batch, height, width, _ = inputs.shape
    padded = np.pad(inputs, ((0, 0), (0, 1), (0, 1), (0, 0)))
    out = np.zeros((batch, height // 2, width // 2, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            taps = padded[:, dy : dy + height : 2, dx : dx + width : 2]
            out += taps @ kernel[dy, dx]
    return out + bias


def test_detail_stem_widths_grow_by_stride_and_maps_match_a_hand_conv():
    """`growth=2`: 4, 8, 16 channels at strides 2, 4, 8 (growth 1: 4 at every stride); each map
    is silu(3x3 stride-2 conv) of the previous one, the first of the input mapped to [-1, 1]."""
    images = np.random.default_rng(1).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    stem = heads.DetailStem(channels=4, max_stride=8, growth=2)
    params = jax.jit(lambda k: stem.init(k, images))(key(2))["params"]
    assert {name: params[name]["kernel"].shape for name in params} == {
        "conv_s2": (3, 3, 3, 4),
        "conv_s4": (3, 3, 4, 8),
        "conv_s8": (3, 3, 8, 16),
    }
    maps = stem.apply({"params": params}, images)
    assert {s: m.shape for s, m in maps.items()} == {
        2: (2, 8, 8, 4),
        4: (2, 4, 4, 8),
        8: (2, 2, 2, 16),
    }
    expected = images.astype(np.float64) * 2.0 - 1.0
    for stride in (2, 4, 8):
        layer = params[f"conv_s{stride}"]
        expected = np.asarray(
            jax.nn.silu(
                _conv3x3_stride2_same(
                    expected, np.asarray(layer["kernel"], np.float64), np.asarray(layer["bias"])
                )
            )
        )
        np.testing.assert_allclose(maps[stride], expected, atol=1e-5)
    flat = heads.DetailStem(channels=4, max_stride=8)
    flat_shapes = jax.eval_shape(lambda: flat.init(key(2), images))["params"]
    assert [flat_shapes[f"conv_s{s}"]["kernel"].shape[-1] for s in (2, 4, 8)] == [4, 4, 4]
    with pytest.raises(ValueError, match="model.detail_growth must be >= 1, got 0"):
        heads.DetailStem(channels=4, growth=0).init(key(0), images)
