"""Model summary: parameters per module, forward GFLOPs per image, output shapes (JSON).

    python -m m2u_jax.summary --config configs/tiny.py [--config.model.variant=S] [--batch_size=8]

Parameters come from `jax.eval_shape` (nothing is initialised, so S/B summarise in seconds on a
CPU); FLOPs from XLA's cost analysis of the compiled inference forward
(`jax.jit(apply).lower(...).compile().cost_analysis()`), divided by the batch size. XLA counts a
multiply-add as two FLOPs.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from m2u_jax import flops as flops_lib
from m2u_jax import model as model_lib
from m2u_jax.modalities import num_channels


def count_parameters(tree) -> int:
    """Number of scalars in a pytree of arrays / ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def summarize(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
    """Summary dict of the model that `config.model` builds (see module docstring)."""
    model = model_lib.build_model(config.model)
    size = int(config.model.image_size)
    images = jax.ShapeDtypeStruct(
        (batch_size, size, size, num_channels(config.model.modalities)), jnp.float32
    )
    params = jax.eval_shape(
        lambda key: model_lib.init_params(model, config, key), jax.random.PRNGKey(0)
    )
    variables = {"params": params}
    per_module = {name: count_parameters(tree) for name, tree in params.items()}
    backbone_parts: dict[str, int] = {}
    for name, tree in params["backbone"].items():
        group = name.split("_")[0] if name.split("_")[-1].isdigit() else name
        backbone_parts[group] = backbone_parts.get(group, 0) + count_parameters(tree)
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[0], variables, images)
    forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False)[0])
    flops = flops_lib.compiled_flops(forward.lower(variables, images).compile())
    flops = math.nan if flops is None else flops
    return dict(
        variant=config.model.variant,
        image_size=size,
        modalities=str(config.model.modalities),
        dtype=config.model.dtype,
        batch_size=batch_size,
        parameters=per_module,
        backbone_parameters=backbone_parts,
        total_parameters=count_parameters(params),
        gflops_per_image=flops / batch_size / 1e9,
        output_shapes=jax.tree.map(lambda leaf: list(leaf.shape), outputs),
    )


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Batch size the forward is compiled for.")


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    print(json.dumps(summarize(_CONFIG.value, _BATCH.value), indent=2))


if __name__ == "__main__":
    app.run(main)
