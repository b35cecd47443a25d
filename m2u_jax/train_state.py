"""The train state of one stage: a pure pytree that the jitted step consumes (donated) and returns.

Everything needed to continue a run bit-for-bit lives here and goes into the checkpoint: the
parameters, the optimizer state, MoCo v3's momentum-encoder parameters (an EMA, updated inside
the step), the base PRNG key (each step folds in its step number, so no key is carried from step
to step), and the on-device metric accumulators. The accumulators let the step run without any
host sync: the host fetches them only at log/checkpoint steps, then zeroes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Train state of one stage (pretraining or fine-tuning).

    Attributes:
      step: int32 scalar, updates applied in this stage.
      params: the trained parameters (pretraining: `{'encoder', 'projector'[, 'predictor']}`;
        fine-tuning: the M2UNet params).
      opt_state: optax state of `params`.
      ema_params: MoCo v3 momentum encoder `{'encoder', 'projector'}`; None otherwise.
      rng: uint32 `[2]` base key of the stage (dropout keys are `fold_in(rng, step)`).
      metric_sums: {name: f32 scalar}, sums of the per-step metrics since the last log.
      metric_count: int32 scalar, steps summed in `metric_sums`.
      nonfinite_step: int32 scalar, first step (1-based, within the stage) whose loss, a loss
        term or the gradient norm was NaN/Inf; -1 while everything is finite.
      nonfinite_terms: {name: int32 scalar}, 1 for each metric that was not finite at
        `nonfinite_step`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    metric_sums: dict
    metric_count: jax.Array
    nonfinite_step: jax.Array
    nonfinite_terms: dict

    @classmethod
    def create(
        cls,
        params,
        optimizer: optax.GradientTransformation,
        rng: jax.Array,
        metric_names: Sequence[str],
        ema_params=None,
    ) -> TrainState:
        """Fresh state at step 0 (call inside the jitted init so it is created sharded)."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=ema_params,
            rng=rng,
            metric_sums={name: jnp.zeros((), jnp.float32) for name in metric_names},
            metric_count=jnp.zeros((), jnp.int32),
            nonfinite_step=jnp.full((), -1, jnp.int32),
            nonfinite_terms={name: jnp.zeros((), jnp.int32) for name in metric_names},
        )

    def record_metrics(self, metrics: dict) -> TrainState:
        """Adds this step's scalar metrics to the sums and notes the first non-finite step.

        Call after `step` was incremented (so `nonfinite_step` is 1-based like the logs).
        """
        metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
        bad = {name: ~jnp.isfinite(value) for name, value in metrics.items()}
        any_bad = jnp.any(jnp.stack(list(bad.values())))
        first_bad = any_bad & (self.nonfinite_step < 0)
        return self.replace(
            metric_sums={name: self.metric_sums[name] + metrics[name] for name in metrics},
            metric_count=self.metric_count + 1,
            nonfinite_step=jnp.where(first_bad, self.step, self.nonfinite_step),
            nonfinite_terms={
                name: jnp.where(first_bad, bad[name].astype(jnp.int32), self.nonfinite_terms[name])
                for name in metrics
            },
        )

    def reset_metrics(self) -> TrainState:
        """Zeroes the metric sums after the host has fetched them."""
        return self.replace(
            metric_sums=jax.tree.map(jnp.zeros_like, self.metric_sums),
            metric_count=jnp.zeros_like(self.metric_count),
        )
