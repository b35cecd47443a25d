"""Predictive uncertainty: MC dropout and deep ensembles (the review policy: `m2u_jax.review`).

MC dropout runs everything that does not depend on the dropout key once and samples only the
rest over T dropout keys, all under one `jit`: the trunk (`M2UNet.trunk`) always, and with
`mc_dropout_blocks == 0` (last-layer dropout) also the heads up to their dropout
(`M2UNet.sample_hidden`), so a sample is the dropout, the output layers and the score
(`M2UNet.sample_outputs`); with sampled blocks it is the whole `M2UNet.stochastic_tail`. The
samples run `chunk_size` at a time (`eval.mc_chunk_size`) in a loop that accumulates the moments
of the statistics (never `[T, B, H, W]` maps), or all T in one `vmap` with `chunk_size=0`.
Chunks keep the activations out of a CPU's caches (docs/performance.md: 1 is best on the demo);
on GPU/TPU, 0 (the most parallel work) is expected to be best (not yet measured). The split and
the chunking change the schedule, not the samples: sample t uses `jax.random.split(rng, T)[t]` as
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

With `model.test_time_flips` F > 1 every sample, and every ensemble member, is the mean over
the image and its flips (`model.merge_flip_views`), as `M2UNet.predict` and the exported graph
compute it: the trunk runs on the F·B views, each sample's outputs are merged per image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m2u_jax.layers import mean
from m2u_jax.model import M2UNet, flip_views, image_score, merge_flip_views, views_trunk

_EPS = 1e-6
# Samples per chunk when the caller does not say (configs/default.py `eval.mc_chunk_size`).
DEFAULT_MC_CHUNK_SIZE = 1


def binary_entropy(probs: jax.Array) -> jax.Array:
    """Entropy (nats) of Bernoulli(probs), elementwise; 0 at probs ∈ {0, 1}."""
    probs = jnp.clip(probs, _EPS, 1.0 - _EPS)
    return -(probs * jnp.log(probs) + (1.0 - probs) * jnp.log1p(-probs))


def sample_statistics(outputs: dict, score_kwargs: dict) -> dict[str, jax.Array]:
    """Stacked per-sample outputs (leading sample axis T on every array) → the statistics in
    the module docstring: `score_mean, score_var, entropy, mutual_info [B]`,
    `map_mean, map_var [B, H, W]`, `type_probs_mean [B, K+1]`."""
    quantities = jax.vmap(lambda sample: _sample_quantities(sample, score_kwargs))(outputs)
    return _statistics(_moments(quantities))


def _sample_quantities(outputs: dict, score_kwargs: dict) -> dict[str, jax.Array]:
    """One sample's outputs → what the statistics average: its image score `p` `[B]`, the
    entropy of `p`, the pixel probabilities `[B, H, W]` and the type distribution."""
    score = image_score(outputs, **score_kwargs)
    return dict(
        score=score,
        score_entropy=binary_entropy(score),
        map=jax.nn.sigmoid(outputs["pixel_logits"].astype(jnp.float32)),
        type_probs=jax.nn.softmax(outputs["type_logits"], axis=-1),
    )


# The quantities whose variance is reported; the others only need their mean.
_WITH_VARIANCE = ("score", "map")


def _moments(quantities: dict) -> tuple:
    """Quantities with a leading sample axis n → (n, means, sums of squared deviations)."""
    count = next(iter(quantities.values())).shape[0]
    means = {name: mean(value, 0) for name, value in quantities.items()}
    squares = {
        name: jnp.sum(jnp.square(quantities[name] - means[name]), axis=0) for name in _WITH_VARIANCE
    }
    return count, means, squares


def _combine(first: tuple, second: tuple) -> tuple:
    """The moments of two groups of samples joined (Chan et al.'s pairwise update): what a
    chunked MC run accumulates instead of keeping `[T, B, H, W]` maps."""
    count_a, means_a, squares_a = first
    count_b, means_b, squares_b = second
    count = count_a + count_b
    weight_b = count_b / count
    deltas = {name: means_b[name] - means_a[name] for name in means_a}
    means = {name: means_a[name] + deltas[name] * weight_b for name in means_a}
    squares = {
        name: squares_a[name] + squares_b[name] + jnp.square(deltas[name]) * count_a * weight_b
        for name in squares_a
    }
    return count, means, squares


def _statistics(moments: tuple) -> dict[str, jax.Array]:
    count, means, squares = moments
    entropy = binary_entropy(means["score"])
    return dict(
        score_mean=means["score"],
        score_var=squares["score"] / count,
        entropy=entropy,
        # Clamped: with identical samples the difference is a rounding error around zero.
        mutual_info=jnp.maximum(entropy - means["score_entropy"], 0.0),
        map_mean=means["map"],
        map_var=squares["map"] / count,
        type_probs_mean=means["type_probs"],
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
        model, num_samples, _effective_chunk_size(chunk_size, num_samples), variables, images, rng
    )


def _effective_chunk_size(chunk_size: int, num_samples: int) -> int:
    """0 for every chunk size that runs all samples at once, so that they share one compile."""
    if chunk_size < 0:
        raise ValueError(f"eval.mc_chunk_size={chunk_size} must be >= 0 (0 = all samples at once)")
    return 0 if chunk_size >= num_samples else chunk_size


def _tail_samples(model: M2UNet, num_samples: int, chunk_size: int, variables, images, rng):
    """Trunk once (deterministic), then the whole stochastic tail over T dropout keys,
    `chunk_size` at a time (0 = all in one vmap); every output, stacked on a leading T axis."""
    flips = model.test_time_flips
    trunk_state = views_trunk(model, variables, images)

    def one_sample(key):
        outputs, _ = model.apply(
            variables,
            trunk_state,
            image_hw=images.shape[1:3],
            train=True,
            rngs={"dropout": key},
            method=M2UNet.stochastic_tail,
        )
        return merge_flip_views(outputs, flips)

    keys = jax.random.split(rng, num_samples)
    if chunk_size == 0:
        return jax.vmap(one_sample)(keys)
    return jax.lax.map(one_sample, keys, batch_size=chunk_size)


_mc_dropout_samples = jax.jit(_tail_samples, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _mc_dropout_statistics(
    model: M2UNet, num_samples: int, chunk_size: int, variables, images, rng
):
    """The statistics of T samples, with everything that does not depend on the dropout key
    computed once: the trunk always; with `mc_dropout_blocks == 0` also the heads up to their
    last-layer dropout (`M2UNet.sample_hidden`), so a sample is only the dropout, the output
    layers and the score. Chunks accumulate moments (`_combine`), never `[T, ...]` maps."""
    image_hw = images.shape[1:3]
    flips = model.test_time_flips
    trunk_state = views_trunk(model, variables, images)
    if model.mc_dropout_blocks == 0:
        hidden = model.apply(variables, trunk_state, image_hw=image_hw, method=M2UNet.sample_hidden)
        method = M2UNet.sample_outputs
    else:
        hidden, method = trunk_state, M2UNet.stochastic_tail

    def quantities(keys):  # [n] keys → per-sample quantities with a leading axis n
        def one_sample(key):
            outputs = model.apply(
                variables,
                hidden,
                image_hw=image_hw,
                train=True,
                rngs={"dropout": key},
                method=method,
            )
            outputs = outputs if method is M2UNet.sample_outputs else outputs[0]
            return _sample_quantities(merge_flip_views(outputs, flips), model.score_kwargs)

        return jax.vmap(one_sample)(keys)

    keys = jax.random.split(rng, num_samples)
    if chunk_size == 0:
        return _statistics(_moments(quantities(keys)))
    num_chunks, remainder = divmod(num_samples, chunk_size)
    first = _moments(quantities(keys[:chunk_size]))

    def accumulate(moments, chunk_keys):
        return _combine(moments, _moments(quantities(chunk_keys))), None

    # (Raw uint32 keys carry a trailing key axis: keep it.)
    chunked = keys[chunk_size : num_chunks * chunk_size].reshape(
        (num_chunks - 1, chunk_size) + keys.shape[1:]
    )
    moments, _ = jax.lax.scan(accumulate, _as_float_count(first), chunked)
    if remainder:
        moments = _combine(moments, _moments(quantities(keys[num_chunks * chunk_size :])))
    return _statistics(moments)


def _as_float_count(moments: tuple) -> tuple:
    """The loop carry's count as a float32 array (it grows by `chunk_size` per step)."""
    count, means, squares = moments
    return jnp.float32(count), means, squares


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
    flips = model.test_time_flips

    def member(variables):
        outputs, _ = model.apply(variables, flip_views(images, flips), train=False)
        return merge_flip_views(outputs, flips)

    return sample_statistics(jax.vmap(member)(stacked_variables), model.score_kwargs)
