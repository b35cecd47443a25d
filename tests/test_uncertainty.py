"""Tests for m2u_jax.uncertainty: MC dropout (trunk once, exact split), ensembles, statistics,
the review policy and its calibration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from m2u_jax import model as model_lib
from m2u_jax import uncertainty

BATCH = 2


def random_params(model, images, seed=0):
    """Init-like parameters from numpy (a compiled `init` costs seconds of CPU per test)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if path[-1].key == "scale":
            return (1.0 + 0.1 * noise).astype(np.float32)
        fan_in = math.prod(leaf.shape[:-1]) if path[-1].key == "kernel" and leaf.ndim > 1 else 100
        return (noise / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def build(**overrides):
    config = tiny.get_config()
    config.model.det_channels = 16
    for key, value in overrides.items():
        config.model[key] = value
    return model_lib.build_model(config.model)


def key(seed):
    return jax.random.key(seed, impl="unsafe_rbg")  # fast to compile on CPU


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (BATCH, 32, 32, 3))


@pytest.fixture(scope="module")
def variables(images):
    return {"params": random_params(build(), images)}


def test_mc_split_is_exact_per_key(images):
    # One scale and one detection level keep the (threefry) compile short; the tail is still
    # the last backbone block plus every head.
    model = build(dropout_rate=0.3, scales=(1.0,), det_strides=(8,))
    variables = {"params": random_params(model, images, seed=2)}
    # threefry (the default) draws the same bits with and without vmap; rbg keys do not.
    rng, num_samples = jax.random.key(7), 3
    samples = uncertainty.mc_dropout_samples(model, variables, images, rng, num_samples)
    assert samples["pixel_logits"].shape == (num_samples, BATCH, 32, 32)
    assert samples["det"]["obj_logits"].shape == (num_samples, BATCH, 16)

    full_forward = jax.jit(
        lambda k: model.apply(
            variables, images, train=True, dropout_tail_only=True, rngs={"dropout": k}
        )[0]
    )
    for index, sample_key in enumerate(jax.random.split(rng, num_samples)):
        reference = full_forward(sample_key)
        for name in ("pixel_logits", "recon", "image_logits", "type_logits", "embedding"):
            np.testing.assert_allclose(samples[name][index], reference[name], atol=1e-5)
        np.testing.assert_allclose(
            samples["det"]["box_ltrb"][index], reference["det"]["box_ltrb"], atol=1e-4
        )
    # Dropout really samples: the tail outputs differ between keys ...
    assert not np.allclose(samples["pixel_logits"][0], samples["pixel_logits"][1])
    # The statistics of mc_dropout_predict, from the same samples.
    statistics = uncertainty.sample_statistics(samples, model.score_kwargs)
    probs = jax.nn.sigmoid(samples["pixel_logits"])
    np.testing.assert_allclose(statistics["map_mean"], probs.mean(0), atol=1e-6)
    np.testing.assert_allclose(statistics["map_var"], probs.var(0), atol=1e-6)
    scores = jax.vmap(lambda sample: model_lib.image_score(sample, model.image_score_topk))(samples)
    np.testing.assert_allclose(
        scores[1], model_lib.image_score(jax.tree.map(lambda a: a[1], samples), 0.01), atol=1e-7
    )
    np.testing.assert_allclose(statistics["score_mean"], scores.mean(0), atol=1e-6)
    np.testing.assert_allclose(statistics["score_var"], scores.var(0), atol=1e-7)
    assert np.all(np.asarray(statistics["score_var"]) > 0)
    assert np.all(np.asarray(statistics["mutual_info"]) >= 0)


def test_chunked_mc_statistics_equal_one_vmap(images):
    # threefry keys (the default) draw the same bits per key whether vmapped or looped over, so
    # the chunk size changes the schedule, not the samples. (test_mc_split_is_exact_per_key
    # checks each sample of the default chunked run against a full forward with its key.)
    model = build(dropout_rate=0.3, scales=(1.0,), det_strides=(8,))
    variables = {"params": random_params(model, images, seed=3)}
    rng, num_samples = jax.random.key(11), 3
    all_at_once = uncertainty.mc_dropout_predict(
        model, variables, images, rng, num_samples, chunk_size=0
    )
    assert np.all(np.asarray(all_at_once["score_var"]) > 0)  # dropout really samples
    # Chunks of 2 of 3 samples: one loop step plus a remainder of one.
    chunked = uncertainty.mc_dropout_predict(
        model, variables, images, rng, num_samples, chunk_size=2
    )
    for name, value in all_at_once.items():
        np.testing.assert_allclose(chunked[name], value, atol=1e-6, rtol=0, err_msg=name)
    with pytest.raises(ValueError, match="mc_chunk_size=-1"):
        uncertainty.mc_dropout_predict(model, variables, images, rng, num_samples, chunk_size=-1)


@pytest.mark.parametrize(
    "heads",
    [dict(detail_channels=8), dict(detail_channels=8, pixel_head_recon=True)],
    ids=["detail", "compare_recon"],
)
def test_hoisted_heads_give_the_samples_of_the_whole_tail(images, heads):
    # With mc_dropout_blocks=0 the statistics run the heads up to their dropout once
    # (M2UNet.sample_hidden) and only the output layers per sample: they must equal the
    # statistics of the whole stochastic tail run per sample with the same keys (the
    # demo's and cpu_real's heads: a detail path; and the pixel head comparing with the recon).
    model = build(dropout_rate=0.3, scales=(1.0,), det_strides=(8,), mc_dropout_blocks=0, **heads)
    variables = {"params": random_params(model, images, seed=4)}
    rng, num_samples = jax.random.key(5), 5
    whole_tail = uncertainty.mc_dropout_samples(model, variables, images, rng, num_samples)
    reference = uncertainty.sample_statistics(whole_tail, model.score_kwargs)
    assert np.all(np.asarray(reference["score_var"]) > 0)  # dropout really samples
    for chunk_size in (0, 2):  # one vmap; chunks of 2 of 5 (two loop steps and a remainder)
        hoisted = uncertainty.mc_dropout_predict(
            model, variables, images, rng, num_samples, chunk_size=chunk_size
        )
        for name, value in reference.items():
            np.testing.assert_allclose(
                hoisted[name], value, atol=1e-6, rtol=0, err_msg=f"{name}, chunk {chunk_size}"
            )


def test_combined_moments_equal_the_moments_of_all_samples():
    # Chan's pairwise update, against numpy's two-pass mean and variance over 2 + 3 + 1 samples.
    rng = np.random.default_rng(0)
    values = rng.uniform(size=(6, 4)).astype(np.float32)
    groups = [values[:2], values[2:5], values[5:]]

    def moments(group):
        return uncertainty._moments(
            {"score": jnp.asarray(group), "map": jnp.asarray(group), "score_entropy": group}
        )

    combined = moments(groups[0])
    for group in groups[1:]:
        combined = uncertainty._combine(combined, moments(group))
    count, means, squares = combined
    assert count == 6
    np.testing.assert_allclose(means["score"], values.mean(0), atol=1e-7)
    np.testing.assert_allclose(squares["map"] / count, values.var(0), atol=1e-7)
    np.testing.assert_allclose(means["score_entropy"], values.mean(0), atol=1e-7)


@pytest.fixture(scope="module")
def deterministic():
    """A dropout-free model and its jitted plain forward (shared: one compile)."""
    model = build(dropout_rate=0.0)
    return model, jax.jit(lambda v, x: model.apply(v, x, train=False)[0])


def test_mc_without_dropout_matches_plain_forward(images, variables, deterministic):
    model, forward = deterministic
    plain = forward(variables, images)
    single = uncertainty.mc_dropout_predict(model, variables, images, key(0), 1)
    np.testing.assert_allclose(single["map_mean"], jax.nn.sigmoid(plain["pixel_logits"]), atol=1e-6)
    np.testing.assert_allclose(
        single["score_mean"], model_lib.image_score(plain, model.image_score_topk), atol=1e-6
    )
    many = uncertainty.mc_dropout_predict(model, variables, images, key(1), 4)
    np.testing.assert_allclose(many["score_var"], 0.0, atol=1e-12)
    np.testing.assert_allclose(many["map_var"], 0.0, atol=1e-12)
    np.testing.assert_allclose(many["mutual_info"], 0.0, atol=1e-6)
    np.testing.assert_allclose(many["score_mean"], single["score_mean"], atol=1e-6)
    np.testing.assert_allclose(
        many["entropy"], uncertainty.binary_entropy(single["score_mean"]), atol=1e-6
    )
    assert many["map_mean"].shape == (BATCH, 32, 32) and many["type_probs_mean"].shape == (2, 5)


def test_ensemble_predict(images, variables, deterministic):
    model, forward = deterministic
    other = {"params": random_params(model, images, seed=1)}
    stack = lambda *trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    same = uncertainty.ensemble_predict(model, stack(variables, variables), images)
    np.testing.assert_allclose(same["score_var"], 0.0, atol=1e-12)
    np.testing.assert_allclose(same["mutual_info"], 0.0, atol=1e-6)
    mixed = uncertainty.ensemble_predict(model, stack(variables, other), images)
    first, second = forward(variables, images), forward(other, images)
    maps = [jax.nn.sigmoid(outputs["pixel_logits"]) for outputs in (first, second)]
    np.testing.assert_allclose(mixed["map_mean"], (maps[0] + maps[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(mixed["map_var"], ((maps[0] - maps[1]) / 2) ** 2, atol=1e-6)
    scores = [model_lib.image_score(outputs, model.image_score_topk) for outputs in (first, second)]
    np.testing.assert_allclose(mixed["score_mean"], (scores[0] + scores[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(same["score_mean"], scores[0], atol=1e-6)
    assert np.all(np.asarray(mixed["score_var"]) > 0)


@pytest.mark.parametrize("heads", ["hoisted", "whole tail"])
def test_statistics_with_flips_are_those_of_the_flip_averaged_prediction(images, variables, heads):
    """Without dropout, every MC sample and every (identical) ensemble member is
    `M2UNet.predict`'s flip-averaged prediction; with dropout, the samples of the raw-sample
    path are the merged views."""
    blocks = 0 if heads == "hoisted" else 1
    model = build(dropout_rate=0.0, test_time_flips=4, mc_dropout_blocks=blocks)
    predicted = model_lib.predict(model, variables, images)
    many = uncertainty.mc_dropout_predict(model, variables, images, key(1), 2)
    np.testing.assert_allclose(many["map_mean"], predicted["anomaly_map"], atol=1e-6)
    np.testing.assert_allclose(many["score_mean"], predicted["image_score"], atol=1e-6)
    np.testing.assert_allclose(many["type_probs_mean"], predicted["type_probs"], atol=1e-6)
    np.testing.assert_allclose(many["score_var"], 0.0, atol=1e-12)
    plain = model_lib.predict(model.clone(test_time_flips=1), variables, images)
    assert not np.allclose(many["map_mean"], plain["anomaly_map"], atol=1e-4)
    if heads == "hoisted":
        stacked = uncertainty.stack_members([variables["params"], variables["params"]])
        same = uncertainty.ensemble_predict(model, stacked, images)
        np.testing.assert_allclose(same["map_mean"], predicted["anomaly_map"], atol=1e-6)
        np.testing.assert_allclose(same["score_mean"], predicted["image_score"], atol=1e-6)
    else:
        samples = uncertainty.mc_dropout_samples(model, variables, images, key(1), 2)
        np.testing.assert_allclose(
            jax.nn.sigmoid(samples["pixel_logits"][0]), predicted["anomaly_map"], atol=1e-6
        )
        assert samples["det"]["obj_logits"].shape[:2] == (2, BATCH)


def test_sample_statistics_hand_case():
    # Two samples, one image, one pixel: probabilities 0.5 and 0.5 vs 0.1 and 0.9.
    image_logits = jnp.asarray([[0.0, np.log(0.1 / 0.9)], [0.0, np.log(0.9 / 0.1)]])
    pixel_logits = jnp.broadcast_to(image_logits[:, :, None, None], (2, 2, 1, 1))
    outputs = dict(
        image_logits=image_logits, pixel_logits=pixel_logits, type_logits=jnp.zeros((2, 2, 3))
    )
    stats = uncertainty.sample_statistics(outputs, dict(topk_fraction=1.0))
    # Score = 0.5 * (pixel prob + image prob) = the same probability here.
    np.testing.assert_allclose(stats["score_mean"], [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(stats["score_var"], [0.0, 0.16], atol=1e-6)
    np.testing.assert_allclose(stats["entropy"], [np.log(2), np.log(2)], atol=1e-5)
    h_01 = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))
    np.testing.assert_allclose(stats["mutual_info"], [0.0, np.log(2) - h_01], atol=1e-5)
    np.testing.assert_allclose(stats["map_var"][:, 0, 0], [0.0, 0.16], atol=1e-6)
    np.testing.assert_allclose(stats["type_probs_mean"], np.full((2, 3), 1 / 3), atol=1e-6)
