"""Contrastive pretraining heads: the SimCLR projection MLP and the MoCo v3 projector/predictor.

`ContrastiveModel` wraps the M2U-InspectNet model as `encoder` and adds the heads, so its params
tree is `{'encoder': <the model's backbone params>, 'projector': ..., 'predictor': ...}` and the
encoder subtree has exactly the paths of the fine-tuning model: fine-tuning copies it over a
fresh initialisation (the task heads start from scratch).

The MLPs use LayerNorm where the papers use BatchNorm: no mutable `batch_stats` collection to
thread through the step and the EMA, and no per-device statistics to synchronise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

PRETRAIN_METHODS = ("simclr", "mocov3")
# MoCo v3 uses a 3-layer projector and a 2-layer predictor; SimCLR a 2-layer projector.
_PROJECTOR_LAYERS = {"simclr": 2, "mocov3": 3}
_PREDICTOR_LAYERS = {"simclr": 0, "mocov3": 2}


class ProjectionHead(nn.Module):
    """MLP `[B, D] -> [B, output_dim]`: (num_layers - 1) x (Dense, LayerNorm, GELU), then Dense.

    `hidden_dim = 0` makes the hidden layers as wide as the input (D), SimCLR's choice.

    SimCLR's projector is the 2-layer form; MoCo v3 uses a 3-layer projector and a 2-layer
    predictor (both this module). The output is float32: the InfoNCE logits that follow divide
    by a small temperature.
    """

    hidden_dim: int
    output_dim: int
    num_layers: int = 2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        hidden = features
        hidden_dim = self.hidden_dim or features.shape[-1]
        for index in range(self.num_layers - 1):
            hidden = nn.Dense(
                hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{index}"
            )(hidden)
            hidden = nn.LayerNorm(
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{index}"
            )(hidden)
            hidden = nn.gelu(hidden)
        outputs = nn.Dense(
            self.output_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="output"
        )(hidden)
        return outputs.astype(jnp.float32)


class ContrastiveModel(nn.Module):
    """Encoder embedding -> projector (-> predictor) for contrastive pretraining.

    `encoder` is an M2UNet; its pooled backbone feature is taken from `encoder.embed(images,
    train=...)` when the model has that (cheaper) method, else from `outputs['embedding']` of a
    full forward pass. `predictor_layers = 0` gives SimCLR (no predictor); `hidden_dim = 0`
    makes the MLPs' hidden layers as wide as their input.
    """

    encoder: nn.Module
    projection_dim: int
    hidden_dim: int
    projector_layers: int = 2
    predictor_layers: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.projector = ProjectionHead(
            self.hidden_dim,
            self.projection_dim,
            self.projector_layers,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.predictor_layers:
            self.predictor = ProjectionHead(
                self.hidden_dim,
                self.projection_dim,
                self.predictor_layers,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

    def embed(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Backbone embedding `[B, D]` of images `[B, H, W, C]` in [0, 1]."""
        if hasattr(self.encoder, "embed"):
            return self.encoder.embed(images, train=train)
        outputs, _ = self.encoder(images, train=train)
        return outputs["embedding"]

    def project(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Projection `[B, projection_dim]` (SimCLR's z; MoCo v3's key when run with EMA params)."""
        return self.projector(self.embed(images, train=train))

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Projection, then the predictor when there is one: `[B, projection_dim]`."""
        projections = self.project(images, train=train)
        if self.predictor_layers:
            return self.predictor(projections)
        return projections


def build_network(config: ml_collections.ConfigDict, model: nn.Module) -> ContrastiveModel:
    """The pretraining network of `config.train.pretrain_method` around `model` (an M2UNet)."""
    method = config.train.pretrain_method
    if method not in PRETRAIN_METHODS:
        raise ValueError(f"train.pretrain_method={method!r}: use one of {PRETRAIN_METHODS}")
    return ContrastiveModel(
        encoder=model,
        projection_dim=config.model.projection_dim,
        hidden_dim=0,  # = the embedding width, as in SimCLR
        projector_layers=_PROJECTOR_LAYERS[method],
        predictor_layers=_PREDICTOR_LAYERS[method],
        dtype=jnp.dtype(config.model.dtype),
        param_dtype=jnp.dtype(config.model.param_dtype),
    )
