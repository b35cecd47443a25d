"""Tests for m2u_jax.checkpoint.load_vit_npz with .npz files written in the AugReg and
big_vision key layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2u_jax import checkpoint, layers, model, vit

WIDTH, HEADS, MLP = 16, 2, 32


def small_model(**overrides):
    fields = dict(
        width=WIDTH,
        depth=2,
        num_heads=HEADS,
        mlp_dim=MLP,
        modalities=("rgb", "depth"),
        image_size=16,
        scales=(1.0, 0.5),
        patch_size=4,
        patch_stride=4,
        fusion_every=1,
        mc_dropout_blocks=1,
        decoder_channels=8,
        det_channels=8,
        det_strides=(4, 8),
    )
    fields.update(overrides)
    return model.M2UNet(**fields)


def zero_params(net):
    channels = net.num_channels
    shapes = jax.eval_shape(
        lambda: net.init(jax.random.key(0), jnp.zeros((1, 16, 16, channels)), train=False)
    )["params"]
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def augreg_arrays(rng, *, patch=4, grid=4, depth=2, with_cls=True):
    """A ViT in the AugReg / vit_jax key layout (posemb with the class token, _1/_2/_3 names)."""
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    arrays = {
        "embedding/kernel": normal(patch, patch, 3, WIDTH),
        "embedding/bias": normal(WIDTH),
        "cls": normal(1, 1, WIDTH),
        "Transformer/posembed_input/pos_embedding": normal(1, grid * grid + int(with_cls), WIDTH),
        "Transformer/encoder_norm/scale": normal(WIDTH),
        "Transformer/encoder_norm/bias": normal(WIDTH),
        "head/kernel": normal(WIDTH, 10),
        "head/bias": normal(10),
        "pre_logits/kernel": normal(WIDTH, WIDTH),
        "pre_logits/bias": normal(WIDTH),
    }
    for index in range(depth):
        block = f"Transformer/encoderblock_{index}/"
        attention = block + "MultiHeadDotProductAttention_1/"
        for projection in ("query", "key", "value"):
            arrays[f"{attention}{projection}/kernel"] = normal(WIDTH, HEADS, WIDTH // HEADS)
            arrays[f"{attention}{projection}/bias"] = normal(HEADS, WIDTH // HEADS)
        arrays[attention + "out/kernel"] = normal(HEADS, WIDTH // HEADS, WIDTH)
        arrays[attention + "out/bias"] = normal(WIDTH)
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}{norm}/scale"] = normal(WIDTH)
            arrays[f"{block}{norm}/bias"] = normal(WIDTH)
        arrays[block + "MlpBlock_3/Dense_0/kernel"] = normal(WIDTH, MLP)
        arrays[block + "MlpBlock_3/Dense_0/bias"] = normal(MLP)
        arrays[block + "MlpBlock_3/Dense_1/kernel"] = normal(MLP, WIDTH)
        arrays[block + "MlpBlock_3/Dense_1/bias"] = normal(WIDTH)
    return arrays


def to_big_vision(arrays):
    """AugReg names -> big_vision names (_0/_1/_0), posemb at the top, 'params/' prefix."""
    renamed = {}
    for key, value in arrays.items():
        key = key.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
        key = key.replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0")
        key = key.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
        renamed["params/" + key] = value
    return renamed


def check_blocks(
    backbone, arrays, prefix="Transformer/encoderblock_{}/", names=("1", "0", "2", "3")
):
    attention, norm_attn, norm_mlp, mlp = names
    for index in range(2):
        block = backbone[f"block_{index:02d}"]
        source = prefix.format(index)
        mha = f"{source}MultiHeadDotProductAttention_{attention}/"
        for slot, projection in enumerate(("query", "key", "value")):
            np.testing.assert_array_equal(
                block["attention"]["qkv"]["kernel"][:, slot], arrays[f"{mha}{projection}/kernel"]
            )
            np.testing.assert_array_equal(
                block["attention"]["qkv"]["bias"][slot], arrays[f"{mha}{projection}/bias"]
            )
        np.testing.assert_array_equal(
            block["attention"]["out"]["kernel"], arrays[mha + "out/kernel"]
        )
        np.testing.assert_array_equal(block["attention"]["out"]["bias"], arrays[mha + "out/bias"])
        for ours, theirs in (("norm_attn", norm_attn), ("norm_mlp", norm_mlp)):
            for leaf in ("scale", "bias"):
                np.testing.assert_array_equal(
                    block[ours][leaf], arrays[f"{source}LayerNorm_{theirs}/{leaf}"]
                )
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            for leaf in ("kernel", "bias"):
                np.testing.assert_array_equal(
                    block["mlp"][ours][leaf], arrays[f"{source}MlpBlock_{mlp}/{theirs}/{leaf}"]
                )


def test_load_augreg_layout(tmp_path):
    arrays = augreg_arrays(np.random.default_rng(0))
    path = tmp_path / "augreg.npz"
    np.savez(path, **arrays)
    net = small_model()
    params = zero_params(net)
    loaded = checkpoint.load_vit_npz(str(path), params)
    backbone = loaded["backbone"]
    embed = backbone["embed"]
    np.testing.assert_array_equal(embed["stem_rgb"]["kernel"], arrays["embedding/kernel"])
    np.testing.assert_array_equal(embed["stem_rgb"]["bias"], arrays["embedding/bias"])
    # 1-channel stem: the colour kernel summed over channels (its response to a grey image).
    np.testing.assert_allclose(
        embed["stem_depth"]["kernel"][..., 0, :], arrays["embedding/kernel"].sum(2), atol=1e-6
    )
    np.testing.assert_array_equal(embed["stem_depth"]["bias"], arrays["embedding/bias"])
    # Class-token position dropped; 4x4 grid = model grid, no resampling.
    np.testing.assert_array_equal(
        embed["pos_embedding"], arrays["Transformer/posembed_input/pos_embedding"][:, 1:]
    )
    check_blocks(backbone, arrays)
    np.testing.assert_array_equal(
        backbone["encoder_norm"]["scale"], arrays["Transformer/encoder_norm/scale"]
    )
    # Everything else keeps its initial value, and the input is untouched.
    assert not np.any(backbone["fusion_00"]["attention"]["qkv"]["kernel"])
    assert not np.any(embed["scale_embedding"])
    assert not np.any(params["backbone"]["block_00"]["mlp"]["fc1"]["kernel"])
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(loaded):
        assert leaf.dtype == np.float32
    # Variables ({'params': ...}) work too; the model runs on the loaded parameters.
    variables = checkpoint.load_vit_npz(str(path), {"params": params})
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["block_01"]["norm_mlp"]["bias"],
        arrays["Transformer/encoderblock_1/LayerNorm_2/bias"],
    )
    outputs, _ = jax.jit(lambda v: net.apply(v, jnp.full((1, 16, 16, 4), 0.5), train=False))(
        variables
    )
    assert np.all(np.isfinite(outputs["pixel_logits"]))


def test_load_big_vision_scanned_layout_with_resampling(tmp_path):
    rng = np.random.default_rng(1)
    arrays = to_big_vision(augreg_arrays(rng, patch=2, grid=2, with_cls=False))
    stacked = {}
    for key in list(arrays):
        if "/encoderblock_0/" in key:
            rest = key.split("/encoderblock_0/")[1]
            other = key.replace("/encoderblock_0/", "/encoderblock_1/")
            stacked[f"params/Transformer/encoderblock/{rest}"] = np.stack(
                [arrays.pop(key), arrays.pop(other)]
            )
    path = tmp_path / "big_vision.npz"
    np.savez(path, **arrays, **stacked)
    net = small_model(modalities=("rgb",), scan_blocks=True, mc_dropout_blocks=0)
    params = zero_params(net)
    assert "scan_00" in params["backbone"]
    loaded = checkpoint.load_vit_npz(str(path), params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    flat = vit.unroll_scanned_params(loaded["backbone"])
    unstacked = {key.replace("params/", ""): value for key, value in arrays.items()} | {
        key.replace("params/", "").replace("encoderblock/", f"encoderblock_{index}/"): value[index]
        for key, value in stacked.items()
        for index in range(2)
    }
    check_blocks(flat, unstacked, names=("0", "0", "1", "0"))
    # 2x2 position grid -> the model's 4x4 grid by half-pixel bilinear resizing.
    grid = unstacked["pos_embedding"].reshape(1, 2, 2, WIDTH)
    expected = layers.resize_bilinear(grid, 4, 4).reshape(1, 16, WIDTH)
    np.testing.assert_allclose(flat["embed"]["pos_embedding"], expected, atol=1e-6)
    # Patch 2 -> 4 by PI-resize: a bilinearly upsampled patch gives the original token.
    kernel = flat["embed"]["stem_rgb"]["kernel"]
    assert kernel.shape == (4, 4, 3, WIDTH)
    patch = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    upsampled = np.asarray(layers.resize_bilinear(patch, 4, 4))[0]
    np.testing.assert_allclose(
        np.einsum("ijc,ijcd->d", upsampled, kernel),
        np.einsum("ijc,ijcd->d", patch[0], unstacked["embedding/kernel"]),
        atol=1e-4,
    )


def test_pi_resize_downsampling_is_least_squares():
    kernel = np.random.default_rng(2).normal(size=(4, 4, 1, 3)).astype(np.float32)
    same = checkpoint.pi_resize_patch_kernel(kernel, 4)
    assert same is kernel
    smaller = checkpoint.pi_resize_patch_kernel(kernel, 2)
    assert smaller.shape == (2, 2, 1, 3)
    # Least squares: resize^T @ w' is the projection of w onto resize^T's range; for a kernel
    # that already lies in that range (an upsampled 2x2 one) the reconstruction is exact.
    rows = layers.resize_matrix(4, 2)
    resize = np.kron(rows, rows)
    in_range = (resize.T @ rng_vector(4)).reshape(4, 4, 1, 1)
    recovered = checkpoint.pi_resize_patch_kernel(in_range, 2).reshape(4, 1)
    np.testing.assert_allclose(resize.T @ recovered, in_range.reshape(16, 1), atol=1e-5)


def rng_vector(size):
    return np.random.default_rng(3).normal(size=(size, 1))


def test_load_errors_name_the_key(tmp_path):
    net = small_model()
    params = zero_params(net)
    rng = np.random.default_rng(4)

    def save(arrays, name):
        path = tmp_path / name
        np.savez(path, **arrays)
        return str(path)

    arrays = augreg_arrays(rng)
    arrays["Transformer/encoderblock_0/Mystery/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="encoderblock_0/Mystery/kernel"):
        checkpoint.load_vit_npz(save(arrays, "unknown_block.npz"), params)
    arrays = augreg_arrays(rng)
    arrays["optimizer/momentum"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="optimizer/momentum"):
        checkpoint.load_vit_npz(save(arrays, "unknown.npz"), params)
    arrays = augreg_arrays(rng)
    arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((16, 64), np.float32)
    with pytest.raises(
        ValueError,
        match=r"MlpBlock_3/Dense_0/kernel' has shape \(16, 64\) but the model expects \(16, 32\)",
    ):
        checkpoint.load_vit_npz(save(arrays, "shape.npz"), params)
    arrays = augreg_arrays(rng, depth=3)
    with pytest.raises(ValueError, match="encoder block 2, but the model has 2 blocks"):
        checkpoint.load_vit_npz(save(arrays, "deep.npz"), params)
    arrays = augreg_arrays(rng)
    del arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/kernel"]
    with pytest.raises(ValueError, match="lacks \\['value'\\]"):
        checkpoint.load_vit_npz(save(arrays, "partial.npz"), params)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, embedding=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz"):
        checkpoint.load_vit_npz(str(pickled), params)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        checkpoint.load_vit_npz(str(tmp_path / "missing.npz"), params)
