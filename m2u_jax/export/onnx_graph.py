"""ONNX graph passes that make a raw jax2onnx / tf2onnx export TensorRT-ready.

`finalize(model, metadata)` rewrites the ModelProto in place: reduction axes as attributes at
opset 17 (jax2onnx emits the opset-18 input form), stale shape annotations cleared, CastLike
(TensorRT ≥ 10 only) as Cast, boolean Where run on int32 (ONNX Runtime's CPU Where has no bool
kernel), cast/layout nodes of constants folded (constant conv weights; float16 weights stored
as float16), input `images` and outputs `interface.OUTPUT_NAMES` with a symbolic batch named
`batch`, dead nodes and unused initializers removed, IR version 8, `m2u.*` metadata.
`rename_outputs` maps tf2onnx's tensor names to the output names. Raises `ExportError`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from m2u_jax.export.interface import INPUT_NAME, OUTPUT_NAMES

OPSET = 17
IR_VERSION = 8
BATCH_DIM = "batch"
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


def rename_outputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
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
    if graph.input[0].name != INPUT_NAME:
        old = graph.input[0].name
        graph.input[0].name = INPUT_NAME
        _replace_uses(graph, old, INPUT_NAME)
    by_name = {value.name: value for value in graph.output}
    if set(by_name) != set(OUTPUT_NAMES):
        raise ExportError(f"graph outputs {sorted(by_name)} != {OUTPUT_NAMES}")
    ordered = [
        onnx.ValueInfoProto.FromString(by_name[name].SerializeToString()) for name in OUTPUT_NAMES
    ]
    del graph.output[:]
    graph.output.extend(ordered)
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def finalize(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """The graph passes (module docstring), in place; returns `model`."""
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
    model.producer_name = "m2u-jax tools/convert_to_onnx"  # kept: the files stay byte-identical
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = f"m2u.{key}", str(value)
    return model
