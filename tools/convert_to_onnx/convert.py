"""Export a trained M2U-InspectNet checkpoint to ONNX for ONNX Runtime and TensorRT.

    python tools/convert_to_onnx/convert.py --config configs/demo.py --workdir runs/demo \\
        --output runs/demo/model.onnx [--backend jax2onnx|jax2tf] [--batch N | --dynamic-batch] \\
        [--mc-samples T] [--fp16] [--step STEP] [--trt 8.5|8.6|10] [--attention matmul|einsum]

Steps:
1. Restore the fine-tuned params from WORKDIR/checkpoints (`load_inference_variables`; the
   newest checkpoint or `--step`; `--random-init` exports fresh params, for benchmarks).
2. Build the export graph (`export_graph.make_inference_fn`): images `[N, H, W, C]` float32 in
   [0, 1] → anomaly_map `[N, H, W]`, image_score `[N]`, uncertainty `[N]`, boxes `[N, M, 4]`,
   box_scores `[N, M]`, box_classes `[N, M]` int32, num_boxes `[N]` int32 (normalisation, MC
   dropout with T fixed masks, and box post-processing inside the graph). Attention is
   exported as batched MatMuls (`--attention matmul`, default: the attention core 5-23 %
   faster than Einsum in ONNX Runtime's CPU provider, the demo graph 2-4 %; float32 logits
   also under `--fp16`) or as explicit-letter Einsums (`--attention einsum`, the form of
   earlier exports). TensorRT 8.5+ parses both (trt_check.py passes either).
3. Convert it:
   - `jax2onnx` (default): jaxpr → ONNX in this environment, `to_onnx(fn, inputs=[shape],
     opset=17)` with the params closed over (they become initializers);
   - `jax2tf`: the params (an .npz of the flattened tree, '/'-joined keys) and `config.model`
     (JSON) cross over to `.venv-jax2tf` (jax 0.7.1), where `jax2tf_export.py` runs jax2tf
     (plain TF ops) → TF SavedModel (written beside the ONNX file as PATH.savedmodel/) →
     tf2onnx at opset 17.
4. Finalise the graph for TensorRT (`finalize`): IR version 8, reduction axes as attributes at
   opset 17 (jax2onnx emits the opset-18 input form for ReduceMean), stale shape annotations
   and dead nodes removed, CastLike (TensorRT ≥ 10 only) rewritten as Cast, boolean Where run
   on int32 (ONNX Runtime's CPU Where has no bool kernel), cast/layout nodes
   of constants folded (constant conv weights; float16 weights stored as float16), input and
   outputs named `images` and the seven output names, a dynamic batch named `batch`, metadata
   (`m2u.*` keys: modalities, image size, MC samples, precision, ...) for `infer_onnx.py`.
5. `onnx.checker`, the TensorRT-readiness check (`trt_check.py`), and ONNX Runtime vs JAX
   parity on real images (`parity.py`); everything goes to PATH.parity.json.

Exit status: 0 success; 1 parity failed; 2 bad config, checkpoint or arguments; 3 the graph
fails the checker or the TensorRT check; 4 the jax2tf subprocess failed.

`--fp16`: the model is exported with `model.dtype='float16'` (float32 parameters cast to
float16 at use, stored as float16 in the file). Every float32 island of the model stays float32:
attention logits and softmax, LayerNorm statistics, the pixel / image logits and everything
after them (sigmoids, image score, MC statistics, box decoding and NMS). Graph inputs and outputs
stay float32. jax2onnx cannot export float16 *parameters* (it emits Conv nodes with mixed
float16/float32 inputs), and a hand-written ONNX float32→float16 pass would lose those float32
islands, so the precision policy is the model's own mixed-precision one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make m2u_jax, configs and tools importable
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from tools.convert_to_onnx import export_graph, parity, trt_check  # noqa: E402

OPSET = 17
IR_VERSION = 8
BACKENDS = ("jax2onnx", "jax2tf")
JAX2TF_PYTHON = REPO_ROOT / ".venv-jax2tf" / "bin" / "python"
JAX2TF_SCRIPT = pathlib.Path(__file__).resolve().parent / "jax2tf_export.py"
BATCH_DIM = "batch"
EXIT_PARITY, EXIT_INPUT, EXIT_GRAPH, EXIT_BACKEND = 1, 2, 3, 4
# Before opset 18 these reductions take `axes` as an attribute, not as an input.
_REDUCE_AXES_ATTRIBUTE_BEFORE_18 = (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)


class ExportError(RuntimeError):
    """A conversion step failed; the message says which and why."""


# ----------------------------------------------------------------------------- inputs


def load_config(path: str):
    """Loads a config file (`get_config()`, as train.py does) and validates it."""
    from m2u_jax import config as config_lib

    config = config_lib.config_from_file(path)
    config_lib.validate(config)
    return config


def load_inference_variables(config, workdir: str, step: int | None = None) -> dict:
    """`{'params': ...}` of a fine-tuned checkpoint in WORKDIR/checkpoints (numpy arrays).

    Restores only the `params` of the `state` item (orbax partial restore), so the optimizer
    state never has to be rebuilt. `step=None` takes the newest checkpoint. Raises
    FileNotFoundError when there is no checkpoint, ValueError for an unknown step or a
    pretraining-stage checkpoint (it has no task heads).
    """
    import jax
    import orbax.checkpoint as ocp

    from m2u_jax import model as model_lib
    from m2u_jax import run_checkpoint
    from m2u_jax.config import num_channels

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} does not exist: train first (python train.py --workdir {workdir})"
        )
    manager = run_checkpoint.make_manager(workdir, keep=1, async_save=False)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no checkpoint")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise ValueError(f"checkpoint step {step} is not in {directory} (have {steps})")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("stage") != "finetune":
            raise ValueError(
                f"checkpoint {step} in {directory} is from the {meta.get('stage')!r} stage; "
                "export needs a fine-tuned checkpoint (the pretraining stage has no heads)"
            )
        model = model_lib.build_model(config.model)
        side = int(config.data.image_size)
        dummy = jax.ShapeDtypeStruct((1, side, side, num_channels(config.data.modalities)), "f4")
        keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        abstract = jax.eval_shape(lambda x: model.init(keys, x, train=False), dummy)["params"]
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {
            "params": jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                abstract,
            )
        }
        restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=device), abstract)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract, restore_args=restore_args, partial_restore=True
                    )
                ),
            )["state"]
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"checkpoint {step} in {directory} does not match config.model "
                f"(variant, sizes, scan_blocks?): {error}"
            ) from None
    finally:
        manager.close()
    return {"params": jax.tree.map(np.asarray, restored["params"])}


def random_inference_variables(config, seed: int = 0) -> dict:
    """Freshly initialised `{'params': ...}` (numpy), for benchmarks and tests."""
    import jax

    from m2u_jax import model as model_lib
    from m2u_jax.config import num_channels

    model = model_lib.build_model(config.model)
    side = int(config.data.image_size)
    dummy = np.zeros((1, side, side, num_channels(config.data.modalities)), np.float32)
    keys = {"params": jax.random.PRNGKey(seed), "dropout": jax.random.PRNGKey(seed + 1)}
    variables = jax.jit(lambda: model.init(keys, dummy, train=False))()
    return {"params": jax.tree.map(np.asarray, variables["params"])}


def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested params → {'a/b/c': numpy array}: the version-independent form that crosses over
    to the jax2tf environment (`jax2tf_export.unflatten_params` inverts it)."""
    flat = {}
    for name, value in params.items():
        if "/" in str(name):
            raise ValueError(f"parameter name {name!r} contains '/'")
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, key + "/"))
        else:
            flat[key] = np.asarray(value)
    return flat


# ----------------------------------------------------------------------------- backends


def export_jax2onnx(model, params: dict, *, batch: int | None, mc_samples: int, mc_seed: int):
    """jax2onnx export of the inference function → raw ModelProto (before `finalize`)."""
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    # jax arrays, not numpy: with numpy params jax2onnx's linen Conv lowering keeps a float32
    # kernel next to a float16 input under model.dtype=float16 (an invalid graph).
    params = jax.tree.map(jnp.asarray, params)
    inference = export_graph.make_inference_fn(
        model, params, num_mc_samples=mc_samples, mc_seed=mc_seed
    )
    shape = (BATCH_DIM if batch is None else int(batch), *_image_shape(model))
    return to_onnx(
        inference,
        inputs=[shape],
        opset=OPSET,
        model_name="m2u_inspectnet",
        input_names=[export_graph.INPUT_NAME],
        output_names=list(export_graph.OUTPUT_NAMES),
    )


def _image_shape(model) -> tuple[int, int, int]:
    return int(model.image_size), int(model.image_size), int(model.num_channels)


def export_jax2tf(
    model_config,
    params: dict,
    jobs: list[dict],
    *,
    mc_seed: int,
    attention: str = "matmul",
    check_images=None,
) -> list[dict]:
    """Runs `jax2tf_export.py` in `.venv-jax2tf` once for all `jobs` (dicts with `onnx`,
    `saved_model`, `batch` (None = dynamic), `mc_samples`, `fp16`). Returns the subprocess'
    per-job reports; the raw ONNX files are at each job's `onnx` path and, with
    `check_images` `[n, S, S, C]`, each SavedModel's outputs on them at `check_outputs`."""
    if not JAX2TF_PYTHON.exists():
        raise ExportError(
            f"{JAX2TF_PYTHON} not found: build the jax2tf environment with `make jax2tf-env`"
        )
    with tempfile.TemporaryDirectory(prefix="m2u_jax2tf_") as scratch:
        np.savez(os.path.join(scratch, "params.npz"), **flatten_params(params))
        if check_images is not None:
            np.save(os.path.join(scratch, "check_images.npy"), np.asarray(check_images, np.float32))
        spec = dict(
            params=os.path.join(scratch, "params.npz"),
            check_images=None
            if check_images is None
            else os.path.join(scratch, "check_images.npy"),
            model_config=json.loads(json.dumps(model_config.to_dict(), default=list)),
            mc_seed=int(mc_seed),
            attention=attention,
            jobs=[
                dict(job, batch=None if job["batch"] is None else int(job["batch"])) for job in jobs
            ],
            report=os.path.join(scratch, "report.json"),
        )
        spec_path = os.path.join(scratch, "spec.json")
        with open(spec_path, "w") as file:
            json.dump(spec, file, indent=2)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("XLA_FLAGS", None)  # no fake devices: the export runs on one CPU device
        result = subprocess.run(
            [str(JAX2TF_PYTHON), str(JAX2TF_SCRIPT), "--spec", spec_path],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
            raise ExportError(f"jax2tf export failed (exit {result.returncode}):\n{tail}")
        with open(spec["report"]) as file:
            return json.load(file)["jobs"]


# ----------------------------------------------------------------------------- graph passes


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def _reduce_axes_to_attributes(graph: onnx.GraphProto, outer: dict | None = None) -> None:
    """ReduceMean & co. with a constant `axes` *input* (opset ≥ 18 form) → `axes` attribute."""
    constants = {**(outer or {}), **_constant_arrays(graph)}
    for node in graph.node:
        if node.op_type in _REDUCE_AXES_ATTRIBUTE_BEFORE_18 and len(node.input) > 1:
            axes_name = node.input[1]
            if axes_name:
                if axes_name not in constants:
                    raise ExportError(f"{node.op_type} {node.name}: axes {axes_name} not constant")
                axes = [int(axis) for axis in np.asarray(constants[axes_name]).reshape(-1)]
                node.attribute.append(helper.make_attribute("axes", axes))
            del node.input[1:]
        for subgraph in _subgraphs(node):
            _reduce_axes_to_attributes(subgraph, constants)


_FOLDABLE_OPS = ("Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity")


def _evaluate_constant_node(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray:
    attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    data = inputs[0]
    if node.op_type == "Cast":
        return data.astype(helper.tensor_dtype_to_np_dtype(attributes["to"]))
    if node.op_type == "Transpose":
        return np.transpose(data, attributes.get("perm"))
    if node.op_type == "Reshape":
        shape = [int(size) for size in inputs[1]]
        if not attributes.get("allowzero", 0):  # 0 copies the input's size on that axis
            shape = [data.shape[i] if size == 0 else size for i, size in enumerate(shape)]
        return data.reshape(shape)
    if node.op_type == "Squeeze":
        axes = tuple(int(axis) for axis in inputs[1]) if len(inputs) > 1 else None
        return np.squeeze(data, axis=axes)
    if node.op_type == "Unsqueeze":
        axes = sorted(int(axis) % (data.ndim + len(inputs[1])) for axis in inputs[1])
        for axis in axes:
            data = np.expand_dims(data, axis)
        return data
    return data  # Identity


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Evaluates layout/cast nodes whose inputs are all constants (e.g. the Transpose and Cast
    of a float16 conv kernel) and stores their results as initializers: TensorRT 8.x wants
    constant conv weights, and float16 weights are then stored as float16."""
    constants = _constant_arrays(graph)
    outputs = {value.name for value in graph.output}
    kept = []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if (
            node.op_type in _FOLDABLE_OPS
            and inputs
            and all(name in constants for name in inputs)
            and node.output[0] not in outputs
        ):
            value = _evaluate_constant_node(node, [constants[name] for name in inputs])
            constants[node.output[0]] = value
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            continue
        kept.append(node)
        for subgraph in _subgraphs(node):
            _fold_constants(subgraph)
    del graph.node[:]
    graph.node.extend(kept)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value after ONNX shape inference, subgraphs included."""
    types: dict[str, int] = {}

    def collect(graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            types[value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            for subgraph in _subgraphs(node):
                collect(subgraph)

    collect(onnx.shape_inference.infer_shapes(model).graph)
    return types


def _cast_like_to_cast(model: onnx.ModelProto) -> None:
    """CastLike (opset 15; TensorRT ≥ 10 only) → Cast to the inferred type of its second input."""
    types = _value_types(model)

    def rewrite(graph):
        for node in graph.node:
            if node.op_type == "CastLike" and types.get(node.input[1]):
                target = types[node.input[1]]
                del node.input[1:]
                node.op_type = "Cast"
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("to", target))
            for subgraph in _subgraphs(node):
                rewrite(subgraph)

    rewrite(model.graph)


def _boolean_where_through_int32(model: onnx.ModelProto) -> None:
    """Where on boolean values (jax2onnx's bounds-checked gather of the NMS keep-mask at batch 1)
    → Where on int32 between Casts: ONNX Runtime's CPU Where has no bool kernel; TensorRT
    accepts both."""
    types = _value_types(model)

    def rewrite(graph):
        rewritten = []
        for node in graph.node:
            data = node.input[1:] if node.op_type == "Where" else []
            if data and all(types.get(name) == onnx.TensorProto.BOOL for name in data):
                as_int = []
                for name in data:
                    cast_name = f"{node.name or node.output[0]}__{name}__int32"
                    rewritten.append(
                        helper.make_node("Cast", [name], [cast_name], to=onnx.TensorProto.INT32)
                    )
                    as_int.append(cast_name)
                selected = f"{node.output[0]}__int32"
                rewritten.append(
                    helper.make_node("Where", [node.input[0], *as_int], [selected], name=node.name)
                )
                rewritten.append(
                    helper.make_node("Cast", [selected], [node.output[0]], to=onnx.TensorProto.BOOL)
                )
                continue
            rewritten.append(node)
            for subgraph in _subgraphs(node):
                rewrite(subgraph)
        del graph.node[:]
        graph.node.extend(rewritten)

    rewrite(model.graph)


def _replace_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every consumer of value `old` (subgraphs included) reads `new` instead."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for subgraph in _subgraphs(node):
            _replace_uses(subgraph, old, new)


def _rename_outputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Renames graph outputs (and their producers' outputs and consumers) by `names`."""
    for value in graph.output:
        new = names.get(value.name)
        if new is None or new == value.name:
            continue
        old = value.name
        value.name = new
        for init in graph.initializer:
            if init.name == old:  # a constant output (e.g. T = 1 uncertainty): give it a node
                init.name = f"{new}__constant"
                graph.node.append(helper.make_node("Identity", [init.name], [new]))
        for node in graph.node:
            for index, name in enumerate(node.output):
                if name == old:
                    node.output[index] = new
        _replace_uses(graph, old, new)


def _outer_names_used(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    used = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for subgraph in _subgraphs(node):
            used |= _outer_names_used(subgraph)
        defined.update(node.output)
    used.update(value.name for value in graph.output)
    return used - defined


def _prune(graph: onnx.GraphProto, keep: set[str] | None = None) -> None:
    """Removes nodes that feed no graph output and unused initializers, recursively."""
    needed = {value.name for value in graph.output} | set(keep or ())
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for subgraph in _subgraphs(node):
                needed |= _outer_names_used(subgraph)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        for subgraph in _subgraphs(node):
            _prune(subgraph, keep={value.name for value in subgraph.output})
    used_initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_initializers)


def _clear_value_info(graph: onnx.GraphProto) -> None:
    """Drops intermediate shape annotations: jax2onnx leaves some stale (e.g. NHWC shapes on
    NCHW tensors), which ONNX Runtime rejects; consumers infer shapes themselves."""
    del graph.value_info[:]
    for node in graph.node:
        for subgraph in _subgraphs(node):
            _clear_value_info(subgraph)


def _name_io(model: onnx.ModelProto) -> None:
    """Input `images`, outputs in `OUTPUT_NAMES` order, symbolic batch dims named `batch`."""
    graph = model.graph
    if len(graph.input) != 1:
        raise ExportError(f"expected one graph input, found {[v.name for v in graph.input]}")
    if graph.input[0].name != export_graph.INPUT_NAME:
        old = graph.input[0].name
        graph.input[0].name = export_graph.INPUT_NAME
        _replace_uses(graph, old, export_graph.INPUT_NAME)
    by_name = {value.name: value for value in graph.output}
    if set(by_name) != set(export_graph.OUTPUT_NAMES):
        raise ExportError(f"graph outputs {sorted(by_name)} != {export_graph.OUTPUT_NAMES}")
    ordered = [
        onnx.ValueInfoProto.FromString(by_name[name].SerializeToString())
        for name in export_graph.OUTPUT_NAMES
    ]
    del graph.output[:]
    graph.output.extend(ordered)
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def finalize(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """The graph passes of step 4 (module docstring), in place; returns `model`."""
    _reduce_axes_to_attributes(model.graph)
    _clear_value_info(model.graph)
    _cast_like_to_cast(model)
    _boolean_where_through_int32(model)
    _fold_constants(model.graph)
    _name_io(model)
    _prune(model.graph)
    used_domains = set()

    def collect(graph):
        for node in graph.node:
            used_domains.add(node.domain or "")
            for subgraph in _subgraphs(node):
                collect(subgraph)

    collect(model.graph)
    imports = [entry for entry in model.opset_import if entry.domain in used_domains | {""}]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    model.ir_version = IR_VERSION
    model.producer_name = "m2u-jax tools/convert_to_onnx"
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = f"m2u.{key}", str(value)
    return model


# ----------------------------------------------------------------------------- conversion


def convert(
    config,
    variables: dict,
    output: str,
    *,
    backend: str = "jax2onnx",
    batch: int | None = 1,
    mc_samples: int = 1,
    fp16: bool = False,
    mc_seed: int = 0,
    parity_count: int = 4,
    trt: str = "8.5",
    attention: str = "matmul",
    extra_metadata: dict | None = None,
) -> dict:
    """Exports, finalises, checks and compares one model (module docstring); writes `output`
    (and PATH.savedmodel/ for jax2tf) and `output`.parity.json. Returns the report dict, whose
    `passed` is True only if the checker, the TensorRT check and parity all pass."""
    jobs = [dict(output=output, batch=batch, mc_samples=mc_samples, fp16=fp16)]
    return convert_many(
        config,
        variables,
        jobs,
        backend=backend,
        mc_seed=mc_seed,
        parity_count=parity_count,
        trt=trt,
        attention=attention,
        extra_metadata=extra_metadata,
    )[0]


def convert_many(
    config,
    variables: dict,
    jobs: list[dict],
    *,
    backend: str = "jax2onnx",
    mc_seed: int = 0,
    parity_count: int = 4,
    trt: str = "8.5",
    attention: str = "matmul",
    extra_metadata: dict | None = None,
) -> list[dict]:
    """`convert` for several exports of one model (`jobs`: dicts with `output`, `batch`
    (None = dynamic), `mc_samples`, `fp16`); the jax2tf backend converts them all in one
    subprocess, so TensorFlow starts once. `attention`: the exported attention form
    (`export_graph.EXPORT_ATTENTION_FORMS`)."""
    import jax

    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} is not one of {BACKENDS}")
    for job in jobs:
        if job["batch"] is not None and int(job["batch"]) < 1:
            raise ValueError(f"--batch must be >= 1, got {job['batch']}")
        if int(job["mc_samples"]) < 1:
            raise ValueError(f"--mc-samples must be >= 1, got {job['mc_samples']}")
        pathlib.Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
    model32, params = export_graph.build_export_model(
        config.model, variables["params"], attention=attention
    )
    largest_batch = max([parity_count] + [int(job["batch"] or 0) for job in jobs])
    images, image_source = parity.parity_images(config, largest_batch)

    raw_models, backend_reports, export_seconds = [], [], []
    if backend == "jax2onnx":
        for job in jobs:
            model = (
                model32
                if not job["fp16"]
                else export_graph.build_export_model(
                    config.model, variables["params"], fp16=True, attention=attention
                )[0]
            )
            start = time.perf_counter()
            raw_models.append(
                export_jax2onnx(
                    model, params, batch=job["batch"], mc_samples=job["mc_samples"], mc_seed=mc_seed
                )
            )
            export_seconds.append(time.perf_counter() - start)
            backend_reports.append({})
    else:
        tf_jobs = [
            dict(
                onnx=str(pathlib.Path(job["output"]).with_suffix(".tf2onnx.onnx")),
                saved_model=str(pathlib.Path(job["output"]).with_suffix(".savedmodel")),
                batch=job["batch"],
                mc_samples=int(job["mc_samples"]),
                fp16=bool(job["fp16"]),
            )
            for job in jobs
        ]
        start = time.perf_counter()
        backend_reports = export_jax2tf(
            config.model,
            params,
            tf_jobs,
            mc_seed=mc_seed,
            attention=attention,
            check_images=images[:largest_batch],
        )
        elapsed = (time.perf_counter() - start) / len(jobs)
        for tf_job, backend_report in zip(tf_jobs, backend_reports):
            raw = onnx.load(tf_job["onnx"])
            _rename_outputs(raw.graph, backend_report["output_names"])
            raw_models.append(raw)
            os.remove(tf_job["onnx"])
            export_seconds.append(elapsed)

    reports = []
    for job, raw, backend_report, seconds in zip(jobs, raw_models, backend_reports, export_seconds):
        reference = jax.jit(
            export_graph.make_inference_fn(
                model32, params, num_mc_samples=int(job["mc_samples"]), mc_seed=mc_seed
            )
        )
        metadata = dict(
            backend=backend,
            modalities=str(config.data.modalities),
            image_size=int(config.data.image_size),
            channels=int(model32.num_channels),
            mc_samples=int(job["mc_samples"]),
            mc_seed=int(mc_seed),
            precision="float16" if job["fp16"] else "float32",
            batch="dynamic" if job["batch"] is None else int(job["batch"]),
            attention=attention,
            det_score_threshold=float(config.model.det_score_threshold),
            det_max_detections=int(config.model.det_max_detections),
            num_defect_classes=int(config.model.num_defect_classes),
            input="images [N,H,W,C] float32 in [0,1], channels-last, normalised inside",
            outputs=",".join(export_graph.OUTPUT_NAMES),
            **(extra_metadata or {}),
        )
        model = finalize(raw, metadata)
        report = _check_and_save(
            model,
            job,
            reference,
            images,
            image_source=image_source,
            parity_count=parity_count,
            score_threshold=float(config.model.det_score_threshold),
            trt=trt,
        )
        report.update(backend=backend, export_seconds=seconds, backend_report=backend_report)
        if backend == "jax2tf":
            report["saved_model"] = backend_report["saved_model"]
            report["saved_model_parity"] = _saved_model_parity(
                backend_report, reference, images, job, float(config.model.det_score_threshold)
            )
            report["passed"] = report["passed"] and report["saved_model_parity"]["passed"]
        with open(job["output"] + ".parity.json", "w") as file:
            json.dump(report, file, indent=2)
        reports.append(report)
    return reports


def _saved_model_parity(backend_report, reference, images, job, score_threshold) -> dict:
    """The reloaded SavedModel's outputs (computed in the jax2tf subprocess) against JAX."""
    from tools.convert_to_onnx.export_graph import OUTPUT_NAMES

    path = backend_report.get("check_outputs")
    if not path:
        return {"passed": False, "error": "the jax2tf subprocess saved no SavedModel outputs"}
    with np.load(path) as archive:
        candidate = {name: archive[name] for name in archive.files}
    os.remove(path)
    count = len(candidate["image_score"])
    expected = dict(zip(OUTPUT_NAMES, (np.asarray(v) for v in reference(images[:count]))))
    report = parity.compare_outputs(
        expected, candidate, fp16=bool(job["fp16"]), score_threshold=score_threshold
    )
    report["batch_size"] = count
    return report


def _check_and_save(
    model, job, reference, images, *, image_source, parity_count, score_threshold, trt
):
    output = job["output"]
    onnx.save(model, output)
    report: dict = dict(
        onnx=output,
        bytes=os.path.getsize(output),
        opset=OPSET,
        ir_version=model.ir_version,
        batch="dynamic" if job["batch"] is None else int(job["batch"]),
        mc_samples=int(job["mc_samples"]),
        precision="float16" if job["fp16"] else "float32",
        images=image_source,
        num_nodes=len(model.graph.node),
    )
    try:
        onnx.checker.check_model(output)
        report["checker"] = "ok"
    except onnx.checker.ValidationError as error:
        report["checker"] = f"failed: {error}"
    findings = trt_check.check_model(model, trt)
    report["tensorrt"] = dict(
        target=trt,
        errors=[str(finding) for finding in trt_check.errors(findings)],
        warnings=[str(finding) for finding in findings if finding.severity != "error"],
    )
    batch_sizes = (int(job["batch"]),) if job["batch"] is not None else (1, parity_count)
    start = time.perf_counter()
    try:
        session = parity.onnx_session(output)
        report["parity"] = parity.check_parity(
            session,
            reference,
            images,
            batch_sizes=batch_sizes,
            fp16=bool(job["fp16"]),
            score_threshold=score_threshold,
        )
    except Exception as error:  # noqa: BLE001 - an ONNX Runtime failure is a parity failure
        report["parity"] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    report["parity_seconds"] = time.perf_counter() - start
    graph_ok = report["checker"] == "ok" and not report["tensorrt"]["errors"]
    report["graph_ok"] = graph_ok
    report["passed"] = bool(graph_ok and report["parity"]["passed"])
    return report


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Export a trained checkpoint to ONNX (TensorRT-ready) and check parity.",
    )
    parser.add_argument("--config", required=True, help="config file (configs/*.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run directory with checkpoints/ (train.py)")
    source.add_argument(
        "--random-init", action="store_true", help="export fresh params (benchmarks, smoke tests)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--backend", default="jax2onnx", choices=BACKENDS)
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument(
        "--dynamic-batch",
        "--dynamic_batch",
        action="store_true",
        help="symbolic batch dimension 'batch'",
    )
    parser.add_argument(
        "--mc-samples",
        "--mc_samples",
        type=int,
        default=1,
        help="MC-dropout samples T fixed in the graph (1 = deterministic)",
    )
    parser.add_argument(
        "--mc-seed", "--mc_seed", type=int, default=0, help="seed of the T dropout masks"
    )
    parser.add_argument("--fp16", action="store_true", help="float16 compute (see --help text)")
    parser.add_argument("--parity-images", type=int, default=4, help="images for the parity check")
    parser.add_argument(
        "--trt",
        default="8.5",
        choices=trt_check.TRT_TARGETS,
        help="TensorRT version the graph is checked against",
    )
    parser.add_argument(
        "--attention",
        default="matmul",
        choices=export_graph.EXPORT_ATTENTION_FORMS,
        help="attention as batched MatMuls (default; faster in ONNX Runtime) or as "
        "explicit-letter Einsums (the form of earlier exports); TensorRT parses both",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
        if args.random_init:
            if int(config.model.num_defect_classes) == 0:  # 0 = from the data
                from m2u_jax.data import splits

                config = splits.with_data_num_defect_classes(config)
            variables, source = random_inference_variables(config, int(config.seed)), "random init"
        else:
            from m2u_jax.config import with_run_num_defect_classes

            # 0 = from the data: the number the run resolved (WORKDIR/config.json).
            config = with_run_num_defect_classes(config, args.workdir)
            variables = load_inference_variables(config, args.workdir, args.step)
            source = f"{args.workdir} step {args.step or 'latest'}"
    except (FileNotFoundError, ValueError) as error:
        print(f"convert.py: {error}", file=sys.stderr)
        return EXIT_INPUT
    try:
        report = convert(
            config,
            variables,
            args.output,
            backend=args.backend,
            batch=None if args.dynamic_batch else args.batch,
            mc_samples=args.mc_samples,
            fp16=args.fp16,
            mc_seed=args.mc_seed,
            parity_count=args.parity_images,
            trt=args.trt,
            attention=args.attention,
            extra_metadata=dict(checkpoint=source, config=args.config),
        )
    except ValueError as error:
        print(f"convert.py: {error}", file=sys.stderr)
        return EXIT_INPUT
    except ExportError as error:
        print(f"convert.py: {error}", file=sys.stderr)
        return EXIT_BACKEND
    _print_summary(report)
    if not report["graph_ok"]:
        return EXIT_GRAPH
    return 0 if report["passed"] else EXIT_PARITY


def _print_summary(report: dict) -> None:
    print(
        f"wrote {report['onnx']} ({report['bytes'] / 1e6:.2f} MB, {report['num_nodes']} nodes, "
        f"opset {report['opset']}, IR {report['ir_version']}, {report['precision']}, "
        f"batch {report['batch']}, T={report['mc_samples']}, {report['backend']}, "
        f"{report['export_seconds']:.1f}s)"
    )
    if "saved_model" in report:
        print(f"wrote {report['saved_model']}/ (TF SavedModel, signature serving_default)")
    print(f"onnx.checker: {report['checker']}")
    tensorrt = report["tensorrt"]
    print(
        f"TensorRT {tensorrt['target']} check: {len(tensorrt['errors'])} error(s), "
        f"{len(tensorrt['warnings'])} warning(s)"
    )
    for line in tensorrt["errors"]:
        print(f"  {line}")
    result = report["parity"]
    for batch in result.get("batches", []):
        diffs = ", ".join(f"{name} {value:.2e}" for name, value in batch["max_abs_diff"].items())
        boxes = batch.get("boxes", {})
        print(
            f"parity batch {batch['batch_size']}: max |ONNX-JAX| {diffs}; boxes matched "
            f"{boxes.get('matched')}, unmatched {boxes.get('unmatched')}, borderline "
            f"{boxes.get('borderline')} -> {'ok' if batch['passed'] else 'FAILED'}"
        )
    if "error" in result:
        print(f"parity: {result['error']}")
    print(f"images: {report['images']}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}; details in {report['onnx']}.parity.json")


if __name__ == "__main__":
    sys.exit(main())
