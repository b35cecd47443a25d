"""Optimizer of both training stages: AdamW, linear warmup + cosine decay, global-norm clipping.

Weight decay skips normalisation parameters, biases and position embeddings (`decay_mask`): decay
on those only pulls them towards zero without regularising anything useful. The mask is decided
from parameter *names*, not ranks, so it stays right when `model.scan_blocks` stacks every block
parameter along a leading layer axis (a stacked LayerNorm scale is 2-D).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Leaf names that never decay: flax Dense/Conv biases, every norm's scale/bias and LayerScale
# gains (decaying a gain pulls the residual branch towards zero).
_NO_DECAY_LEAF_NAMES = frozenset({"bias", "scale", "layer_scale"})
# Any path component naming a norm layer, a position embedding ('pos_embedding', 'posemb',
# 'position_embedding', ...) or the MSPG scale embedding turns decay off for the whole subtree.
_NO_DECAY_COMPONENT = re.compile(r"(norm|pos(ition)?_?emb|scale_?emb)", re.IGNORECASE)


def _key_name(entry) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def decays(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (tuple of names, root first) gets weight decay."""
    if path and path[-1] in _NO_DECAY_LEAF_NAMES:
        return False
    return not any(_NO_DECAY_COMPONENT.search(component) for component in path)


def decay_mask(params) -> dict:
    """Pytree of bools with the structure of `params`: True where AdamW applies weight decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(tuple(_key_name(entry) for entry in path)), params
    )


def learning_rate_schedule(
    peak_learning_rate: float, warmup_steps: int, total_steps: int
) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to `peak_learning_rate`, then cosine decay towards 0 over `total_steps`.

    Indexed by the number of updates already applied (optax's `count`). Update `count` uses the
    rate at `count + 1`: the first update already moves the parameters (a 0 rate at count 0 would
    waste a quarter of a 4-step smoke run), update `warmup_steps - 1` is at the peak, and the last
    update (`total_steps - 1`) still has a small positive rate.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps + 1,
        end_value=0.0,
    )
    return lambda count: base(count + 1)


def make_optimizer(
    train_config: ml_collections.ConfigDict,
    total_steps: int,
    *,
    clip_apart: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """AdamW of one stage from `config.train`; returns (optimizer, learning-rate schedule).

    Keys read: learning_rate, warmup_steps, weight_decay, grad_clip_norm (0 = no clipping).
    `clip_apart`: top-level parameter collections (e.g. 'detection_head') whose gradients are
    clipped by a global norm of their own, the other parameters by theirs; each group is then
    scaled only by its own norm. Gradient accumulation is not done here but inside the train
    step (a scan over micro-batches), so the optimizer sees one averaged gradient per step.
    """
    schedule = learning_rate_schedule(
        train_config.learning_rate, train_config.warmup_steps, total_steps
    )
    adamw = optax.adamw(schedule, weight_decay=train_config.weight_decay, mask=decay_mask)
    if train_config.grad_clip_norm <= 0:
        return adamw, schedule
    clip = optax.clip_by_global_norm(train_config.grad_clip_norm)
    if clip_apart:
        apart = frozenset(clip_apart)
        clip = optax.multi_transform(
            {"apart": clip, "rest": optax.clip_by_global_norm(train_config.grad_clip_norm)},
            # A prefix of the params tree: one label per top-level collection.
            lambda params: {name: "apart" if name in apart else "rest" for name in params},
        )
    return optax.chain(clip, adamw), schedule


def ema_momentum(decay: float, step: jax.Array) -> jax.Array:
    """Momentum of the fine-tuning params' EMA at `step`: min(decay, (1 + t) / (10 + t)), so the
    first updates are not averaged with the random initialisation (TF's num_updates rule)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def momentum_schedule(base_momentum: float, step: jax.Array, total_steps: int) -> jax.Array:
    """MoCo v3 key-encoder momentum: cosine from `base_momentum` at step 0 to 1.0 at the end.

    m(t) = 1 - (1 - m0) * (cos(pi * t / T) + 1) / 2.
    """
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
    return 1.0 - (1.0 - base_momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
