"""jax2tf → TF SavedModel → tf2onnx, run inside the pinned `.venv-jax2tf` (jax 0.7.1).

Not for direct use: `convert.export_jax2tf` (`--backend jax2tf`) writes the params in a
version-independent form and runs, in `.venv-jax2tf` (where this package is installed with
`--no-deps`),

    python -m m2u_jax.export.jax2tf_export --spec SPEC.json

SPEC.json:

    {"params": "params.npz",          # flattened params tree, '/'-joined keys (float32)
     "model_config": {...},            # config.model as plain JSON (to_dict)
     "mc_seed": 0,
     "attention": "matmul",            # export attention form (graph.EXPORT_ATTENTION_FORMS)
     "check_images": "images.npy",    # optional: the SavedModel's outputs on them are saved
     "jobs": [{"onnx": "out.onnx",     # raw tf2onnx output; convert finalises it
               "saved_model": "out.savedmodel",
               "batch": 4 | null,      # null = dynamic batch
               "mc_samples": 1, "fp16": false}, ...],
     "report": "report.json"}         # written: per job the files, output names and timings

Per job: `graph.inference_with_params` through jax2tf (plain TF ops) → a SavedModel with a
`serving_default` signature (input `images`, the seven outputs by name), reloaded and run on
the check images, then converted by tf2onnx at opset 17. Why these jax2tf flags and the two
workarounds below: tools/convert_to_onnx/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2u_jax.export import graph as export_graph
from m2u_jax.export import interface
from m2u_jax.export.onnx_graph import OPSET

# TensorFlow, tf2onnx and jax2tf are imported in the functions that use them: tf2onnx is
# installed only in .venv-jax2tf, and the project environment imports this module too
# (`unflatten_params`, in the tests).


def _log1p_to_onnx(ctx, node, name, args):
    """tf2onnx handler: TF `Log1p` (from `jax.nn.softplus`) → ONNX Log(x + 1); tf2onnx 1.17 has
    no converter for it. Softplus feeds it exp(-|x|) ∈ (0, 1], where log(1 + x) in float32 is
    accurate to far below the parity tolerance."""
    del name, args
    from tf2onnx import utils

    numpy_dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, numpy_dtype))
    plus_one = ctx.make_node("Add", [node.input[0], one.output[0]], op_name_scope=node.name)
    ctx.replace_inputs(node, [plus_one.output[0]])
    node.type = "Log"


@contextlib.contextmanager
def _gather_free_take_along_axis():
    """While active, `jnp.take_along_axis` is computed without a gather.

    jax2tf with `enable_xla=False` cannot convert the batched gathers that `take_along_axis`
    lowers to (`operand_batching_dims`), and `m2u_jax.boxes.batched_nms` uses it to pick the NMS
    candidates. Here it becomes a one-hot selection: `where(index == a, values[a], 0)` summed
    over a (a sum with one non-zero term is exact, also for ±inf, and booleans use `any`). Only
    this subprocess, which does nothing but export, sees the patch.
    """
    original = jnp.take_along_axis

    def take_along_axis(values, indices, axis, **kwargs):
        del kwargs
        axis = axis % values.ndim
        moved_values = jnp.moveaxis(values, axis, -1)[..., None, :]  # [..., 1, A]
        moved_indices = jnp.moveaxis(indices, axis, -1)[..., None]  # [..., k, 1]
        selected = moved_indices == jnp.arange(values.shape[axis])  # [..., k, A]
        if values.dtype == jnp.bool_:
            picked = jnp.any(selected & moved_values, axis=-1)
        else:
            picked = jnp.sum(jnp.where(selected, moved_values, jnp.zeros((), values.dtype)), -1)
        return jnp.moveaxis(picked.astype(values.dtype), -1, axis)

    jnp.take_along_axis = take_along_axis
    try:
        yield
    finally:
        jnp.take_along_axis = original


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b/c': array} → nested dicts (inverse of `convert.flatten_params`)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _export_job(job: dict, model, params, mc_seed: int, check_images) -> dict:
    import tensorflow as tf
    import tf2onnx
    from jax.experimental import jax2tf

    height = width = int(model.image_size)
    channels = int(model.num_channels)
    batch = job["batch"]
    inference = export_graph.inference_with_params(
        model, num_mc_samples=int(job["mc_samples"]), mc_seed=mc_seed
    )
    image_shape = f"(b, {height}, {width}, {channels})" if batch is None else None
    converted = jax2tf.convert(
        inference,
        polymorphic_shapes=[None, image_shape],
        native_serialization=False,
        enable_xla=False,
        with_gradient=True,
    )
    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, params)
    signature = tf.TensorSpec([batch, height, width, channels], tf.float32, name="images")

    @tf.function(autograph=False, input_signature=[signature])
    def serve(images):
        outputs = converted(module.params, images)
        return dict(zip(interface.OUTPUT_NAMES, outputs))

    module.serve = serve
    start = time.perf_counter()
    tf.saved_model.save(module, job["saved_model"], signatures={"serving_default": serve})
    saved_seconds = time.perf_counter() - start

    # Reload: the SavedModel must be self-contained and servable. Its outputs on the check images
    # go back to convert, which compares them with JAX (no second JAX compile here).
    loaded = tf.saved_model.load(job["saved_model"])
    serving = loaded.signatures["serving_default"]
    outputs_path = None
    if check_images is not None:
        images = check_images[:batch] if batch else check_images
        tf_outputs = serving(images=tf.constant(images))
        outputs_path = job["saved_model"] + ".check_outputs.npz"
        np.savez(outputs_path, **{name: value.numpy() for name, value in tf_outputs.items()})

    # tf2onnx converts the reloaded serving signature itself (frozen, variables → constants).
    # Without catching errors, tf2onnx skips its deep copy of the graph before every
    # optimizer pass (a third of its run time); a failing optimizer then fails the export.
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    start = time.perf_counter()
    tf2onnx.convert.from_function(
        _ConcreteFunctionSource(serving),
        input_signature=[signature],
        opset=OPSET,
        custom_op_handlers={"Log1p": (_log1p_to_onnx, [])},
        output_path=job["onnx"],
    )
    return dict(
        onnx=job["onnx"],
        saved_model=job["saved_model"],
        # tf2onnx names the outputs of a reloaded signature after its tensors (Identity:0, ...).
        # `outputs` follow tf.nest's flattening of the output dict (sorted keys).
        output_names={
            tensor.name: spec.name
            for tensor, spec in zip(serving.outputs, tf.nest.flatten(serving.structured_outputs))
        },
        check_outputs=outputs_path,
        saved_model_seconds=saved_seconds,
        tf2onnx_seconds=time.perf_counter() - start,
        jax_version=jax.__version__,
        tf_version=tf.__version__,
        tf2onnx_version=tf2onnx.__version__,
    )


class _ConcreteFunctionSource:
    """What `tf2onnx.convert.from_function` needs from its argument: `get_concrete_function`.
    Hands it an already-traced function (the reloaded signature), so jax2tf does not trace the
    model again."""

    def __init__(self, concrete_function):
        self._concrete_function = concrete_function

    def get_concrete_function(self, *args, **kwargs):
        del args, kwargs
        return self._concrete_function


def run(spec: dict) -> dict:
    """Runs every job of `spec` (module docstring); returns the report."""
    with np.load(spec["params"], allow_pickle=False) as archive:
        params = unflatten_params({key: archive[key] for key in archive.files})
    check_images = np.load(spec["check_images"]) if spec.get("check_images") else None
    model_config = ml_collections.ConfigDict(spec["model_config"])
    jobs = []
    for job in spec["jobs"]:
        model, export_params = export_graph.build_export_model(
            model_config,
            params,
            fp16=bool(job["fp16"]),
            attention=spec["attention"],
        )
        # jax2tf traces `serve` when it is saved and again when tf2onnx converts it.
        with _gather_free_take_along_axis():
            jobs.append(_export_job(job, model, export_params, int(spec["mc_seed"]), check_images))
    return {"jobs": jobs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON export spec written by convert")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    with open(args.spec) as file:
        spec = json.load(file)
    report = run(spec)
    with open(spec["report"], "w") as file:
        json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
