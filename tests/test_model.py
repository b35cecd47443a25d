"""Tests for m2u_jax.model: the output contract, trunk/tail split, gradients, bf16, predict,
pinned parameter counts of every variant."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, tiny
from m2u_jax import model as model_lib
from m2u_jax.vit import VARIANTS

BATCH = 2


def random_params(model, images, seed=0):
    """Parameters with init-like magnitudes from numpy: `init` compiles its random number
    generation for seconds on a CPU; these tests need generic values, and the real init is
    checked once in `test_real_init_matches_abstract_shapes`."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * noise).astype(np.float32)
        fan_in = math.prod(leaf.shape[:-1]) if name == "kernel" and leaf.ndim > 1 else 100
        return (noise / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_model_config(**overrides):
    config = tiny.get_config()
    config.model.det_channels = 16  # keeps the CPU compile of the tests short
    for key, value in overrides.items():
        config.model[key] = value
    return config.model


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(3), (BATCH, 32, 32, 3))


@pytest.fixture(scope="module")
def setup(images):
    model = model_lib.build_model(tiny_model_config())
    variables = {"params": random_params(model, images)}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return model, variables, forward


def test_build_model_reads_config():
    model = model_lib.build_model(tiny_model_config(scales=(1.0, 0.5), dtype="bfloat16"))
    assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (64, 2, 2, 128)
    assert model.modalities == ("rgb",) and model.image_size == 32
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert model.det_strides == (8, 16) and model.num_channels == 3
    config = tiny.get_config()
    config.data.modalities = "rgb,depth"  # model.modalities is a reference to it
    assert model_lib.build_model(config.model).num_channels == 4


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("variant", "L", "model.variant='L'"),
        ("dtype", "float64", "model.dtype='float64'"),
        ("attention", "flash", "model.attention='flash'"),
        ("posemb", "rope", "model.posemb='rope'"),
        ("mc_dropout_blocks", 3, "model.mc_dropout_blocks=3"),
        ("test_time_flips", 3, "model.test_time_flips=3 is not one of"),
    ],
)
def test_build_model_rejects_bad_values(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model_lib.build_model(tiny_model_config(**{key: value}))


def test_real_init_matches_abstract_shapes(images):
    model = model_lib.build_model(tiny_model_config())
    key = jax.random.key(0, impl="unsafe_rbg")  # fast to compile on CPU
    variables = jax.jit(lambda k: model.init(k, images, train=False))(key)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    assert sorted(variables["params"]) == [
        "anomaly_decoder",
        "backbone",
        "detection_head",
        "image_head",
    ]
    for leaf in jax.tree.leaves(variables):
        assert np.all(np.isfinite(leaf))
    stem = variables["params"]["backbone"]["embed"]["stem_rgb"]["kernel"]
    assert stem.shape == (8, 8, 3, 64) and 0.01 < float(jnp.std(stem)) < 0.2


def test_forward_output_contract(setup, images):
    model, variables, forward = setup
    outputs, aux = forward(variables, images)
    assert outputs["recon"].shape == (BATCH, 32, 32, 3)
    assert outputs["pixel_logits"].shape == (BATCH, 32, 32)
    assert outputs["image_logits"].shape == (BATCH,)
    assert outputs["type_logits"].shape == (BATCH, 5)
    assert outputs["embedding"].shape == (BATCH, 64)
    det = outputs["det"]
    anchors = 4 * 4 + 2 * 2
    assert det["obj_logits"].shape == (BATCH, anchors)
    assert det["cls_logits"].shape == (BATCH, anchors, 4)
    assert det["box_ltrb"].shape == (BATCH, anchors, 4)
    np.testing.assert_array_equal(det["points"][0], [4, 4])
    np.testing.assert_array_equal(det["points"][16], [8, 8])
    np.testing.assert_array_equal(det["strides"], [8] * 16 + [16] * 4)
    for leaf in jax.tree.leaves(outputs):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
    recon = np.asarray(outputs["recon"])
    assert recon.min() >= 0 and recon.max() <= 1
    assert np.all(np.asarray(det["box_ltrb"]) >= 0)
    assert {"block_00", "block_01", "tokens", "fine_grid"} <= set(aux)
    assert aux["block_00"].shape == (BATCH, 16 + 4, 64)
    assert aux["fine_grid"].shape == (BATCH, 4, 4, 64)
    # Embedding = mean of the per-scale token means of the final tokens.
    tokens = np.asarray(aux["tokens"])
    expected = 0.5 * (tokens[:, :16].mean(1) + tokens[:, 16:].mean(1))
    np.testing.assert_allclose(outputs["embedding"], expected, atol=1e-5)
    # The two images give different outputs (no accidental batch mixing or constant maps).
    assert not np.allclose(outputs["pixel_logits"][0], outputs["pixel_logits"][1])


def test_trunk_tail_split_embed_and_dropout(setup, images):
    model, variables, forward = setup
    outputs, _ = forward(variables, images)

    @jax.jit
    def deterministic_parts(variables, images):
        tokens, _ = model.apply(variables, images, method=model_lib.M2UNet.trunk)
        split, _ = model.apply(
            variables,
            tokens,
            image_hw=(32, 32),
            train=False,
            method=model_lib.M2UNet.stochastic_tail,
        )
        embedding = model.apply(variables, images, train=False, method=model_lib.M2UNet.embed)
        return tokens, split, embedding

    tokens, split, embedding = deterministic_parts(variables, images)
    assert tokens.shape == (BATCH, 20, 64)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), split, outputs)
    np.testing.assert_allclose(embedding, outputs["embedding"], atol=1e-6)

    key = jax.random.key(5, impl="unsafe_rbg")
    train_forward = jax.jit(
        lambda k: model.apply(variables, images, train=True, rngs={"dropout": k})[0]["pixel_logits"]
    )
    trained = [train_forward(k) for k in (key, key, jax.random.fold_in(key, 1))]
    np.testing.assert_array_equal(trained[0], trained[1])  # same key, same masks
    assert not np.allclose(trained[0], trained[2])  # another key, other masks
    assert not np.allclose(trained[0], outputs["pixel_logits"])  # dropout is on


def test_gradients_are_finite_and_reach_every_module(setup, images):
    model, variables, _ = setup

    def loss(params):
        outputs, _ = model.apply({"params": params}, images, train=False)
        det = outputs["det"]
        return (
            jnp.mean((outputs["recon"] - images) ** 2)
            + jnp.mean(jax.nn.softplus(outputs["pixel_logits"]))
            + jnp.mean(outputs["image_logits"] ** 2)
            + jnp.mean(outputs["type_logits"] ** 2)
            + jnp.mean(det["obj_logits"] ** 2)
            + jnp.mean(det["box_ltrb"])
            + jnp.mean(det["cls_logits"] ** 2)
        )

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)), path
    for module, tree in grads.items():
        norm = float(jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(tree))))
        assert norm > 0, module
    backbone = grads["backbone"]
    for name in ("block_00", "block_01", "fusion_00", "fusion_01", "embed"):
        assert float(jnp.abs(jax.tree.leaves(backbone[name])[0]).sum()) > 0, name


def test_detached_aux_heads_keep_the_outputs_and_stop_their_gradients_at_the_trunk(images):
    """`detach_aux_heads`: identical outputs; the detection and image-head losses no longer
    reach the backbone or the detail stem, but still train their own heads; the anomaly map's
    loss reaches the trunk either way."""
    config = tiny_model_config(detail_channels=8)
    attached = model_lib.build_model(config)
    config.detach_aux_heads = "always"
    detached = model_lib.build_model(config)
    assert (attached.detach_aux_heads, detached.detach_aux_heads) == (False, True)
    params = random_params(attached, images, seed=5)

    def losses(model, params):
        outputs, _ = model.apply({"params": params}, images, train=False)
        det = outputs["det"]
        aux = (
            jnp.mean(outputs["image_logits"] ** 2)
            + jnp.mean(outputs["type_logits"] ** 2)
            + jnp.mean(det["obj_logits"] ** 2)
            + jnp.mean(det["box_ltrb"])
            + jnp.mean(det["cls_logits"] ** 2)
        )
        return aux, jnp.mean(jax.nn.softplus(outputs["pixel_logits"])), outputs

    @jax.jit
    def run(params):
        result = {}
        for name, model in (("attached", attached), ("detached", detached)):
            aux_grads = jax.grad(lambda p, m=model: losses(m, p)[0])(params)
            pixel_grads = jax.grad(lambda p, m=model: losses(m, p)[1])(params)
            result[name] = (aux_grads, pixel_grads, losses(model, params)[2])
        return result

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(tree))))

    result = run(params)
    jax.tree.map(np.testing.assert_array_equal, result["attached"][2], result["detached"][2])
    for trunk in ("backbone", "detail_stem"):
        assert norm(result["attached"][0][trunk]) > 1e-4, trunk
        assert norm(result["detached"][0][trunk]) == 0.0, trunk
        assert norm(result["detached"][1][trunk]) > 1e-4, trunk  # the anomaly map still trains it
    for head in ("detection_head", "image_head"):
        assert norm(result["detached"][0][head]) > 1e-4, head
        jax.tree.map(
            np.testing.assert_array_equal, result["attached"][0][head], result["detached"][0][head]
        )


# Measured max |bf16 - f32| on the tiny model, batch 8, over 3 random parameter draws and the
# real init: pixel probabilities <= 2.9e-3, recon <= 2.4e-3, image probability <= 1.7e-3
# (box distances <= 0.6 % relative). Documented tolerance: 2e-2 on probabilities and recon.
BF16_TOLERANCE = 2e-2


def test_bfloat16_compute_close_to_float32(setup, images):
    model, variables, forward = setup
    model_bf16 = model_lib.build_model(tiny_model_config(dtype="bfloat16"))
    outputs, _ = forward(variables, images)
    outputs_bf16, aux = jax.jit(lambda v, x: model_bf16.apply(v, x, train=False))(variables, images)
    assert aux["block_00"].dtype == jnp.bfloat16
    assert outputs_bf16["pixel_logits"].dtype == jnp.float32
    pixel = np.abs(
        jax.nn.sigmoid(outputs_bf16["pixel_logits"]) - jax.nn.sigmoid(outputs["pixel_logits"])
    ).max()
    recon = np.abs(outputs_bf16["recon"] - outputs["recon"]).max()
    image = np.abs(
        jax.nn.sigmoid(outputs_bf16["image_logits"]) - jax.nn.sigmoid(outputs["image_logits"])
    ).max()
    assert max(pixel, recon, image) < BF16_TOLERANCE, (pixel, recon, image)
    assert max(pixel, recon, image) > 0  # bf16 really ran


def test_other_input_size_traces(setup):
    model, variables, _ = setup
    # Position embeddings are resampled: a 48x64 input maps back to 48x64 outputs.
    bigger = jax.ShapeDtypeStruct((1, 48, 64, 3), jnp.float32)
    other, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, bigger)
    assert other["pixel_logits"].shape == (1, 48, 64)
    assert other["recon"].shape == (1, 48, 64, 3)
    assert other["det"]["obj_logits"].shape == (1, 6 * 8 + 3 * 4)
    assert aux["tokens"].shape == (1, 6 * 8 + 3 * 4, 64)
    with pytest.raises(ValueError, match="not tiled exactly"):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False),
            variables,
            jax.ShapeDtypeStruct((1, 36, 32, 3), jnp.float32),
        )


def test_image_score_hand_case():
    logits = np.full((2, 10, 10), -20.0, np.float32)
    logits[0, 0, :3] = 20.0  # three certain pixels in image 0
    outputs = dict(pixel_logits=jnp.asarray(logits), image_logits=jnp.asarray([0.0, 20.0]))
    # k = round(0.02 * 100) = 2: image 0 top-2 mean = 1, image 1 = sigmoid(-20) ~ 0.
    scores = model_lib.image_score(outputs, 0.02)
    np.testing.assert_allclose(scores, [0.5 * (1 + 0.5), 0.5 * (0 + 1)], atol=1e-6)
    # k = 5: image 0 top-5 = three ones and two zeros -> 0.6.
    np.testing.assert_allclose(
        model_lib.image_score(outputs, 0.05)[0], 0.5 * (0.6 + 0.5), atol=1e-6
    )
    # A fraction below one pixel still uses k = 1.
    np.testing.assert_allclose(model_lib.image_score(outputs, 1e-6)[0], 0.75, atol=1e-6)


def test_predict(setup, images):
    model, variables, forward = setup
    outputs, _ = forward(variables, images)
    predictions = model_lib.predict(model, variables, images)
    np.testing.assert_allclose(
        predictions["anomaly_map"], jax.nn.sigmoid(outputs["pixel_logits"]), atol=1e-6
    )
    np.testing.assert_allclose(
        predictions["image_score"],
        model_lib.image_score(outputs, model.image_score_topk),
        atol=1e-6,
    )
    m = model.det_max_detections
    assert predictions["boxes_xyxy"].shape == (BATCH, m, 4)
    assert predictions["box_scores"].shape == predictions["box_valid"].shape == (BATCH, m)
    assert predictions["box_classes"].shape == (BATCH, m)
    assert predictions["type_probs"].shape == (BATCH, 5)
    np.testing.assert_allclose(np.sum(predictions["type_probs"], -1), 1.0, atol=1e-5)
    valid = np.asarray(predictions["box_valid"])
    scores = np.asarray(predictions["box_scores"])
    assert np.all(scores[valid] >= model.det_score_threshold)


def test_merge_flip_views_hand_case():
    """Two views of one 1x2 map: the left-right view's map is flipped back, then the pixel,
    image and type probabilities are averaged; boxes come from the unflipped view."""
    pixel = np.log(np.array([[[[0.2 / 0.8, 0.6 / 0.4]]], [[[0.9 / 0.1, 0.4 / 0.6]]]], np.float32))
    outputs = dict(
        pixel_logits=jnp.asarray(pixel.reshape(2, 1, 2)),  # view 0: (0.2, 0.6); view 1: (0.9, 0.4)
        image_logits=jnp.log(jnp.asarray([0.5 / 0.5, 0.9 / 0.1])),  # p = 0.5, 0.9
        type_logits=jnp.log(jnp.asarray([[0.5, 0.5], [0.1, 0.9]])),  # softmax = these
        det=dict(box_ltrb=jnp.asarray([[1.0], [2.0]]), box_bins=jnp.zeros((2, 1, 4, 3))),
    )
    merged = model_lib.merge_flip_views(outputs, 2)  # no detection strides: view 0's boxes
    assert "box_bins" not in merged["det"]  # training-only logits are not merged
    # Pixel (0, 0) pairs view 0's 0.2 with view 1's flipped-back 0.4: mean 0.3; (0, 1): 0.75.
    np.testing.assert_allclose(jax.nn.sigmoid(merged["pixel_logits"]), [[[0.3, 0.75]]], atol=1e-6)
    np.testing.assert_allclose(jax.nn.sigmoid(merged["image_logits"]), [0.7], atol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(merged["type_logits"]), [[0.3, 0.7]], atol=1e-6)
    np.testing.assert_array_equal(merged["det"]["box_ltrb"], [[1.0]])
    assert model_lib.merge_flip_views(outputs, 1) is outputs


def test_merge_flip_views_maps_each_views_anchors_and_box_sides_back():
    """One 4x4 image, one level of stride 2 (2x2 anchors, row-major) and 4 views. Each view's
    anchor (r, c) holds its own index r*2 + c in objectness, class and box outputs; merging
    must map view anchors back to the image's and swap the flipped box sides."""
    count, cells = 4, 4
    p = np.array([0.1, 0.2, 0.3, 0.4], np.float32)  # probability at view anchor 0..3
    logit = np.log(p / (1 - p))
    obj = np.tile(logit, (count, 1))  # [4 views, 4 anchors]
    ltrb = np.stack([np.arange(cells) + 10.0 * side for side in range(4)], -1)  # [4, 4]
    outputs = dict(
        pixel_logits=jnp.zeros((count, 4, 4)),
        image_logits=jnp.zeros((count,)),
        type_logits=jnp.zeros((count, 2)),
        det=dict(
            obj_logits=jnp.asarray(obj),
            cls_logits=jnp.asarray(obj[..., None]),
            box_ltrb=jnp.asarray(np.tile(ltrb, (count, 1, 1)), jnp.float32),
            points=jnp.zeros((cells, 2)),
            strides=jnp.full((cells,), 2.0),
            box_bins=jnp.zeros((count, cells, 4, 3)),
        ),
    )
    merged = model_lib.merge_flip_views(outputs, count, det_strides=(2,))["det"]
    assert "box_bins" not in merged
    # Image anchor 0 (top left) is anchor 0 of view 0, 1 of the left-right view, 2 of the
    # up-down view and 3 of the double flip: mean probability (0.1 + 0.2 + 0.3 + 0.4) / 4.
    # Every image anchor sees each view anchor once, so all four means are 0.25.
    np.testing.assert_allclose(jax.nn.sigmoid(merged["obj_logits"]), [[0.25] * 4], atol=1e-6)
    np.testing.assert_allclose(
        jax.nn.sigmoid(merged["cls_logits"][..., 0]), [[0.25] * 4], atol=1e-6
    )
    # Box sides of image anchor 0: view 0 gives (0, 10, 20, 30); the left-right view's anchor 1
    # gives (1, 11, 21, 31) with left and right swapped: (21, 11, 1, 31); the up-down view's
    # anchor 2: (2, 32, 22, 12); the double flip's anchor 3: (23, 33, 3, 13).
    expected_0 = np.mean(
        [[0, 10, 20, 30], [21, 11, 1, 31], [2, 32, 22, 12], [23, 33, 3, 13]], axis=0
    )
    np.testing.assert_allclose(merged["box_ltrb"][0, 0], expected_0, atol=1e-6)
    # Image anchor 3 (bottom right): views' anchors 3, 2, 1, 0.
    expected_3 = np.mean(
        [[3, 13, 23, 33], [22, 12, 2, 32], [1, 31, 21, 11], [20, 30, 0, 10]], axis=0
    )
    np.testing.assert_allclose(merged["box_ltrb"][0, 3], expected_3, atol=1e-6)
    np.testing.assert_array_equal(merged["points"], outputs["det"]["points"])


def test_predict_with_flips_averages_the_flipped_images_maps(setup, images):
    model, variables, forward = setup
    flipped = model.clone(test_time_flips=4)
    predictions = model_lib.predict(flipped, variables, images)
    views = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    maps = [jax.nn.sigmoid(forward(variables, view)[0]["pixel_logits"]) for view in views]
    maps = [maps[0], maps[1][:, :, ::-1], maps[2][:, ::-1], maps[3][:, ::-1, ::-1]]
    expected = sum(maps) / 4
    np.testing.assert_allclose(predictions["anomaly_map"], expected, atol=1e-5)
    assert not np.allclose(expected, maps[0], atol=1e-3)  # the views do differ
    # Boxes: the dense detection outputs of the views, merged, then decoded and suppressed.
    stacked = model_lib.flip_views(images, 4)
    merged = model_lib.merge_flip_views(forward(variables, stacked)[0], 4, model.det_strides)
    expected_boxes = model_lib.boxes.postprocess(
        merged["det"],
        max_detections=model.det_max_detections,
        iou_threshold=model.det_iou_threshold,
        score_threshold=model.det_score_threshold,
    )
    np.testing.assert_allclose(predictions["boxes_xyxy"], expected_boxes["boxes_xyxy"], atol=1e-5)
    plain = model_lib.predict(model, variables, images)
    assert not np.allclose(predictions["box_scores"], plain["box_scores"], atol=1e-4)
    # The image score is the model's rule applied to the averaged map (top 1 %, half classifier).
    image_probs = (
        sum(jax.nn.sigmoid(forward(variables, view)[0]["image_logits"]) for view in views) / 4
    )
    k = max(1, round(model.image_score_topk * expected[0].size))
    top = np.sort(np.asarray(expected).reshape(BATCH, -1), axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(
        predictions["image_score"], 0.5 * top + 0.5 * np.asarray(image_probs), atol=1e-5
    )


# Full-model parameters per variant for configs/default.py with only model.variant changed
# (rgb, 256 px, scales (1, 0.5), patch 16, decoder 64 channels, detection 128 channels, K = 4).
MODEL_PARAMETERS = {"tiny": 779475, "tiny4": 863251, "S": 25936979, "B": 100802003}


def test_every_variant_is_pinned():
    assert set(MODEL_PARAMETERS) == set(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count(variant):
    config = default.get_config()
    config.model.variant = variant
    config.model.mc_dropout_blocks = min(config.model.mc_dropout_blocks, VARIANTS[variant]["depth"])
    model = model_lib.build_model(config.model)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
    )
    assert (
        sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == MODEL_PARAMETERS[variant]
    )


def test_detail_stem_feeds_pixel_logits_and_boxes_but_not_the_reconstruction(images):
    # tiny at 32 px: patch 8 → the decoder starts at stride 8, detection levels (8, 16).
    model = model_lib.build_model(tiny_model_config(detail_channels=8))
    variables = {"params": random_params(model, images, seed=4)}
    stem = variables["params"]["detail_stem"]
    # Stride-2 convs up to stride 8 = max(decoder start 8, first detection level 8).
    assert sorted(stem) == ["conv_s2", "conv_s4", "conv_s8"]
    assert stem["conv_s2"]["kernel"].shape == (3, 3, 3, 8)
    assert stem["conv_s8"]["kernel"].shape == (3, 3, 8, 8)
    decoder = variables["params"]["anomaly_decoder"]
    # The pixel path merges the stem at strides 8 (start), 4 and 2.
    assert {"pixel_start", "pixel_0", "pixel_1", "pixel_out"} <= set(decoder)
    assert decoder["out"]["kernel"].shape[-1] == 3  # the reconstruction's own 1x1 conv

    @jax.jit
    def run(variables, images):
        full, _ = model.apply(variables, images, train=False)
        state, _ = model.apply(variables, images, method=model_lib.M2UNet.trunk)
        split, _ = model.apply(
            variables,
            state,
            image_hw=(32, 32),
            train=False,
            method=model_lib.M2UNet.stochastic_tail,
        )
        return full, state, split

    full, state, split = run(variables, images)
    assert state["tokens"].shape == (BATCH, 20, 64)
    assert {stride: value.shape for stride, value in state["detail"].items()} == {
        2: (BATCH, 16, 16, 8),
        4: (BATCH, 8, 8, 8),
        8: (BATCH, 4, 4, 8),
    }
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), split, full)

    # Zeroing the stem's last-layer kernels and biases changes what the pixel logits and the
    # boxes see, but the reconstruction has no path from the stem: it stays bit-identical.
    silenced = jax.tree.map(jnp.zeros_like, stem)
    other = {"params": {**variables["params"], "detail_stem": silenced}}
    changed, _, _ = run(other, images)
    np.testing.assert_array_equal(changed["recon"], full["recon"])
    assert np.max(np.abs(changed["pixel_logits"] - full["pixel_logits"])) > 1e-3
    assert np.max(np.abs(changed["det"]["obj_logits"] - full["det"]["obj_logits"])) > 1e-3

    # The off switch keeps the pinned layout: no stem, one 1x1 'out' conv with C + 1 maps.
    plain = jax.eval_shape(
        lambda: model_lib.build_model(tiny_model_config()).init(
            jax.random.key(0), images, train=False
        )
    )["params"]
    assert "detail_stem" not in plain
    assert plain["anomaly_decoder"]["out"]["kernel"].shape[-1] == 4


def test_pixel_head_recon_compares_the_input_with_the_reconstruction(images):
    """`pixel_head_recon`: the pixel logits depend on the reconstruction (its 'out' conv) and
    on the input through the comparison; the trunk/tail split still equals the full call."""
    model = model_lib.build_model(tiny_model_config(detail_channels=8, pixel_head_recon=True))
    variables = {"params": random_params(model, images, seed=5)}
    decoder = variables["params"]["anomaly_decoder"]
    # [input 3, recon 3, |input - recon| 3] → the stride-2 pixel path's width (8: the tiny
    # config's decoder_channels).
    assert decoder["compare_in"]["kernel"].shape == (3, 3, 9, 8)
    assert decoder["compare_merge"]["kernel"].shape == (3, 3, 16, 8)

    @jax.jit
    def run(variables, images):
        full, _ = model.apply(variables, images, train=False)
        state, _ = model.apply(variables, images, method=model_lib.M2UNet.trunk)
        split, _ = model.apply(
            variables,
            state,
            image_hw=(32, 32),
            train=False,
            method=model_lib.M2UNet.stochastic_tail,
        )
        return full, state, split

    full, state, split = run(variables, images)
    np.testing.assert_array_equal(state["images"], images)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), split, full)
    # A different reconstruction (zeroed 'out' conv: recon = sigmoid(0) = 0.5 everywhere)
    # changes the pixel logits: the head reads the reconstruction.
    out = jax.tree.map(jnp.zeros_like, decoder["out"])
    other = {"params": {**variables["params"], "anomaly_decoder": {**decoder, "out": out}}}
    changed, _, _ = run(other, images)
    np.testing.assert_allclose(changed["recon"], 0.5)
    assert np.max(np.abs(changed["pixel_logits"] - full["pixel_logits"])) > 1e-3


def test_detail_growth_widens_the_stem_maps_the_heads_concatenate(images):
    """`detail_growth=2` at 32 px (stem strides 2, 4, 8): widths 8, 16, 32; the decoder's pixel
    path and the first detection level take the grown map of their stride."""
    model = model_lib.build_model(tiny_model_config(detail_channels=8, detail_growth=2))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
    stem = shapes["detail_stem"]
    assert [stem[f"conv_s{s}"]["kernel"].shape for s in (2, 4, 8)] == [
        (3, 3, 3, 8),
        (3, 3, 8, 16),
        (3, 3, 16, 32),
    ]
    decoder, det = shapes["anomaly_decoder"], shapes["detection_head"]
    assert model.decoder_channels == 8  # every decoder stage 8 wide (the floor is min(16, 8))
    # Input widths: decoder features + the stem's map of the stage's stride (+ the pixel path
    # so far, 8 wide, after the start stage).
    assert [decoder[name]["kernel"].shape[2] for name in ("pixel_start", "pixel_0", "pixel_1")] == [
        8 + 32,
        8 + 16 + 8,
        8 + 8 + 8,
    ]
    # Detection level 0 (stride 8): the projected tokens + the 32-wide map.
    assert det["neck_0"]["kernel"].shape == (3, 3, model.det_channels + 32, model.det_channels)


def test_det_box_bins_reach_the_detection_head(images):
    """`model.det_box_bins=4`: the head's 1x1 conv predicts 4 x 4 bin logits per anchor and the
    outputs carry them as `box_bins [B, A, 4, 4]` beside the distances."""
    model = model_lib.build_model(tiny_model_config(det_box_bins=4))
    assert model.det_box_bins == 4
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    predict = variables["params"]["detection_head"]["predict"]["kernel"]
    assert predict.shape[-1] == 1 + model.num_defect_classes + 4 * 4  # not decoupled here
    outputs, _ = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
    anchors = outputs["det"]["box_ltrb"].shape[1]
    assert outputs["det"]["box_bins"].shape == (BATCH, anchors, 4, 4)
