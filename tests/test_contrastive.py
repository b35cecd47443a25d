"""Tests of m2u_jax.contrastive: head shapes and values, the params tree of ContrastiveModel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2u_jax import contrastive


class _Encoder(nn.Module):
    """Stand-in encoder with the M2UNet surface: embed() and __call__ -> (outputs, aux)."""

    width: int = 8

    def setup(self):
        self.backbone = nn.Dense(self.width)
        self.head = nn.Dense(3)

    def embed(self, images, *, train):
        return self.backbone(images.reshape(images.shape[0], -1))

    def __call__(self, images, *, train):
        embedding = self.embed(images, train=train)
        return {"embedding": embedding, "logits": self.head(embedding)}, {}


def test_projection_head_single_layer_is_affine():
    head = contrastive.ProjectionHead(hidden_dim=0, output_dim=3, num_layers=1)
    features = jnp.arange(8.0).reshape(2, 4)
    params = head.init(jax.random.PRNGKey(0), features)["params"]
    assert set(params) == {"output"}
    expected = np.asarray(features) @ np.asarray(params["output"]["kernel"]) + np.asarray(
        params["output"]["bias"]
    )
    np.testing.assert_allclose(head.apply({"params": params}, features), expected, rtol=1e-5)


def test_projection_head_shapes_and_dtype():
    head = contrastive.ProjectionHead(
        hidden_dim=0, output_dim=5, num_layers=3, dtype=jnp.bfloat16, param_dtype=jnp.float32
    )
    features = jnp.ones((4, 6))
    params = head.init(jax.random.PRNGKey(0), features)["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {
        "dense_0": {"kernel": (6, 6), "bias": (6,)},  # hidden_dim 0 -> input width
        "norm_0": {"scale": (6,), "bias": (6,)},
        "dense_1": {"kernel": (6, 6), "bias": (6,)},
        "norm_1": {"scale": (6,), "bias": (6,)},
        "output": {"kernel": (6, 5), "bias": (5,)},
    }
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    outputs = head.apply({"params": params}, features)
    assert outputs.shape == (4, 5) and outputs.dtype == jnp.float32


def test_contrastive_model_params_tree_uses_only_the_embedding():
    network = contrastive.ContrastiveModel(
        encoder=_Encoder(), projection_dim=4, hidden_dim=16, projector_layers=2, predictor_layers=2
    )
    images = jnp.ones((2, 4, 4, 1))
    params = network.init(jax.random.PRNGKey(0), images, train=False)["params"]
    assert set(params) == {"encoder", "projector", "predictor"}
    # embed() runs the backbone only: the stand-in's classification head is never created.
    assert set(params["encoder"]) == {"backbone"}
    assert params["projector"]["dense_0"]["kernel"].shape == (8, 16)
    predictions = network.apply({"params": params}, images, train=True)
    assert predictions.shape == (2, 4)
    # project() needs no predictor params (MoCo's momentum encoder has none).
    key_params = {"encoder": params["encoder"], "projector": params["projector"]}
    keys = network.apply(
        {"params": key_params}, images, train=False, method=contrastive.ContrastiveModel.project
    )
    embedding = np.ones((2, 16)) @ np.asarray(params["encoder"]["backbone"]["kernel"])
    embedding += np.asarray(params["encoder"]["backbone"]["bias"])
    direct = contrastive.ProjectionHead(16, 4, 2).apply(
        {"params": params["projector"]}, jnp.asarray(embedding)
    )
    np.testing.assert_allclose(keys, direct, rtol=1e-5, atol=1e-6)


def test_simclr_model_has_no_predictor():
    network = contrastive.ContrastiveModel(encoder=_Encoder(), projection_dim=4, hidden_dim=0)
    params = network.init(jax.random.PRNGKey(0), jnp.ones((2, 4, 4, 1)), train=False)["params"]
    assert set(params) == {"encoder", "projector"}
    assert params["projector"]["dense_0"]["kernel"].shape == (8, 8)


def test_contrastive_model_falls_back_to_the_embedding_output():
    class _NoEmbed(nn.Module):
        @nn.compact
        def __call__(self, images, *, train):
            return {"embedding": nn.Dense(3, name="backbone")(images.reshape(2, -1))}, {}

    network = contrastive.ContrastiveModel(encoder=_NoEmbed(), projection_dim=2, hidden_dim=0)
    params = network.init(jax.random.PRNGKey(0), jnp.ones((2, 2, 2, 1)), train=False)["params"]
    assert params["encoder"]["backbone"]["kernel"].shape == (4, 3)
    assert network.apply({"params": params}, jnp.ones((2, 2, 2, 1)), train=False).shape == (2, 2)
