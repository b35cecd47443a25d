"""Predictive uncertainty: MC dropout and deep ensembles (the review policy: `m2u_jax.review`).

MC dropout runs the deterministic trunk (`M2UNet.trunk`) once and samples only the stochastic
tail (`M2UNet.stochastic_tail`: the last `mc_dropout_blocks` backbone blocks and every head)
over T dropout keys, all under one `jit`: T samples cost one trunk + T tails instead of T full
passes. The tails run `chunk_size` samples at a time (`eval.mc_chunk_size`): `jax.lax.map(...,
batch_size=chunk_size)`, a loop over groups of `jax.vmap`-ed samples, or all T in one `vmap`
with `chunk_size=0`. Chunks keep the T x B activations of the tail out of a CPU's caches
(chunks of 1-2 cut the MC time by a third on the demo and S128 configs); on GPU/TPU, 0 (one
vmap over all T, the most parallel work) is expected to be best (not yet measured). The
chunking changes the schedule, not the samples: sample t uses `jax.random.split(rng, T)[t]` as
its dropout key whatever the chunk size, so it equals
`model.apply(variables, images, train=True, dropout_tail_only=True, rngs={'dropout': key_t})`
for threefry keys (JAX's default); 'rbg' / 'unsafe_rbg' keys draw different (equally valid) bits
under vmap than in a loop, so with them the samples depend on the chunk size.

Per image, the statistics treat the image score `p_t` of every sample (see
`model.image_score`) as the probability that the image is defective:
- `score_mean` = mean_t p_t, `score_var` = var_t p_t (population variance),
- `entropy` = H(score_mean) — predictive entropy of the mean probability, in nats, with
  H(p) = -p log p - (1-p) log(1-p),
- `mutual_info` = H(score_mean) - mean_t H(p_t) (BALD: the epistemic part; ≥ 0),
and per pixel `map_mean` / `map_var` of the pixel probabilities sigmoid(pixel_logits).
`type_probs_mean [B, K+1]` is the mean defect-type distribution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m2u_jax.layers import mean, variance
from m2u_jax.model import M2UNet, image_score

_EPS = 1e-6
# The outputs `sample_statistics` reads: the loop of a chunked run carries only these.
_STATISTICS_INPUTS = ("pixel_logits", "image_logits", "type_logits")
# Samples per chunk when the caller does not say (configs/default.py `eval.mc_chunk_size`).
DEFAULT_MC_CHUNK_SIZE = 2


def binary_entropy(probs: jax.Array) -> jax.Array:
    """Entropy (nats) of Bernoulli(probs), elementwise; 0 at probs ∈ {0, 1}."""
    probs = jnp.clip(probs, _EPS, 1.0 - _EPS)
    return -(probs * jnp.log(probs) + (1.0 - probs) * jnp.log1p(-probs))


def sample_statistics(outputs: dict, score_kwargs: dict) -> dict[str, jax.Array]:
    """Stacked per-sample outputs (leading sample axis T on every array) → the statistics in
    the module docstring: `score_mean, score_var, entropy, mutual_info [B]`,
    `map_mean, map_var [B, H, W]`, `type_probs_mean [B, K+1]`."""
    scores = jax.vmap(lambda sample: image_score(sample, **score_kwargs))(outputs)  # [T, B]
    maps = jax.nn.sigmoid(outputs["pixel_logits"].astype(jnp.float32))  # [T, B, H, W]
    score_mean = mean(scores, 0)
    entropy = binary_entropy(score_mean)
    expected_entropy = mean(binary_entropy(scores), 0)
    return dict(
        score_mean=score_mean,
        score_var=variance(scores, 0),
        entropy=entropy,
        # Clamped: with identical samples the difference is a rounding error around zero.
        mutual_info=jnp.maximum(entropy - expected_entropy, 0.0),
        map_mean=mean(maps, 0),
        map_var=variance(maps, 0),
        type_probs_mean=mean(jax.nn.softmax(outputs["type_logits"], axis=-1), 0),
    )


def mc_dropout_predict(
    model: M2UNet,
    variables,
    images: jax.Array,
    rng: jax.Array,
    num_samples: int,
    *,
    chunk_size: int = DEFAULT_MC_CHUNK_SIZE,
) -> dict[str, jax.Array]:
    """MC-dropout prediction (module docstring).

    Args:
      model: an M2UNet (its `dropout_rate` is the MC rate, `mc_dropout_blocks` the sampled
        depth, `score_kwargs` the score reduction).
      variables: `{'params': ...}`.
      images: `[B, H, W, C]` float32 in [0, 1].
      rng: a PRNG key; split into `num_samples` dropout keys.
      num_samples: T (static).
      chunk_size: tail samples run at a time (static; `eval.mc_chunk_size`); 0, or ≥ T, runs
        all T in one vmap. Same samples for every value, up to float rounding.

    Returns:
      dict of `[B]` / `[B, H, W]` arrays (see `sample_statistics`).
    """
    return _mc_dropout_statistics(
        model, num_samples, _effective_chunk_size(chunk_size, num_samples), variables, images, rng
    )


def mc_dropout_samples(
    model: M2UNet,
    variables,
    images: jax.Array,
    rng: jax.Array,
    num_samples: int,
    *,
    chunk_size: int = DEFAULT_MC_CHUNK_SIZE,
) -> dict:
    """The raw outputs of the T tail samples, every array with a leading `[T]` axis — what
    `mc_dropout_predict` reduces (for analysis, and for tests of the trunk/tail split)."""
    return _mc_dropout_samples(
        model,
        num_samples,
        _effective_chunk_size(chunk_size, num_samples),
        None,
        variables,
        images,
        rng,
    )


def _effective_chunk_size(chunk_size: int, num_samples: int) -> int:
    """0 for every chunk size that runs all samples at once, so that they share one compile."""
    if chunk_size < 0:
        raise ValueError(f"eval.mc_chunk_size={chunk_size} must be >= 0 (0 = all samples at once)")
    return 0 if chunk_size >= num_samples else chunk_size


def _tail_samples(
    model: M2UNet,
    num_samples: int,
    chunk_size: int,
    output_keys: tuple[str, ...] | None,
    variables,
    images,
    rng,
) -> dict:
    """Trunk once (deterministic), then the stochastic tail over T dropout keys, `chunk_size`
    at a time (0 = all in one vmap). `output_keys` limits the sample outputs to those keys
    (None = all): a loop carries every output it returns, where a vmap's unused outputs are
    dropped by XLA."""
    tokens, _ = model.apply(variables, images, train=False, method=M2UNet.trunk)

    def one_sample(key):
        outputs, _ = model.apply(
            variables,
            tokens,
            image_hw=images.shape[1:3],
            train=True,
            rngs={"dropout": key},
            method=M2UNet.stochastic_tail,
        )
        return outputs if output_keys is None else {name: outputs[name] for name in output_keys}

    keys = jax.random.split(rng, num_samples)
    if chunk_size == 0:
        return jax.vmap(one_sample)(keys)
    return jax.lax.map(one_sample, keys, batch_size=chunk_size)


_mc_dropout_samples = jax.jit(_tail_samples, static_argnums=(0, 1, 2, 3))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _mc_dropout_statistics(
    model: M2UNet, num_samples: int, chunk_size: int, variables, images, rng
):
    samples = _tail_samples(
        model, num_samples, chunk_size, _STATISTICS_INPUTS, variables, images, rng
    )
    return sample_statistics(samples, model.score_kwargs)


def stack_members(members: list[dict]) -> dict:
    """Params trees of E ensemble members → the stacked `{'params': ...}` of `ensemble_predict`
    (each leaf gains a leading axis E)."""
    return {"params": jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)}


def ensemble_predict(model: M2UNet, stacked_variables, images: jax.Array) -> dict[str, jax.Array]:
    """Deep-ensemble prediction: `stacked_variables` holds E members' variables stacked on a
    leading axis (e.g. `jax.tree.map(lambda *x: jnp.stack(x), *members)`); the deterministic
    forward is `jax.vmap`-ed over it under jit. Returns the statistics of
    `sample_statistics` with members as samples."""
    return _ensemble(model, stacked_variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _ensemble(model: M2UNet, stacked_variables, images):
    members = jax.vmap(lambda variables: model.apply(variables, images, train=False)[0])(
        stacked_variables
    )
    return sample_statistics(members, model.score_kwargs)
