"""TensorRT-readiness check of an ONNX graph, without TensorRT.

`check_model(model, trt)` lists every `Finding` in the graph (subgraphs of Loop / If / Scan
included) that TensorRT's ONNX parser of version `trt` ('8.5', '8.6' or '10') would reject
(severity 'error': opset > 17, IR > 8, operators outside onnx-tensorrt's support matrix,
non-constant axes, ...) or accepts only with restrictions ('warning': Loop, If, int64 on 8.x,
...); `errors(findings)` keeps the errors. The operator tables are hard-coded from
onnx-tensorrt's docs/operators.md; the full list of rules is in tools/convert_to_onnx/README.md.
Default target 8.5 (JetPack 5.1), the oldest: a graph that passes it passes all three.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

MAX_OPSET = 17
MAX_IR_VERSION = 8
TRT_TARGETS = ("8.5", "8.6", "10")
TOPK_MAX_K = 3840

# Operators the ONNX parser of TensorRT 8.5 supports (onnx-tensorrt docs/operators.md, 8.5 GA).
_TRT85_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GRU HardSigmoid HardSwish Identity If ImageScaler
    InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
    Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
# TensorRT 8.6 added the ONNX LayerNormalization importer (its INormalizationLayer).
_TRT86_OPS = _TRT85_OPS | {"LayerNormalization"}
# TensorRT 10.x additions (onnx-tensorrt docs/operators.md for 10.x).
_TRT10_OPS = _TRT86_OPS | frozenset(
    """
    Attention BlackmanWindow CastLike DeformConv Gelu GroupNormalization HammingWindow
    HannWindow Hardmax IsInf Mish RMSNormalization RotaryEmbedding STFT TensorScatter
    """.split()
)
SUPPORTED_OPS = {"8.5": _TRT85_OPS, "8.6": _TRT86_OPS, "10": _TRT10_OPS}

# Operators whose axes (input index) must be a build-time constant.
_CONSTANT_INPUTS = {
    "Slice": (3,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "TopK": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
    "CumSum": (1,),
}
_FLOAT_ONLY_ON_TRT8 = ("TopK", "ArgMax", "ArgMin")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
_RESTRICTED = {
    "Loop": "supported; loop-carried values must keep their shape and scan outputs need a "
    "static length",
    "If": "supported; both branches must give outputs of the same rank",
    "NonZero": "supported from TensorRT 8.5; its output shape is data-dependent",
    "NonMaxSuppression": "supported; output padded to a fixed shape",
    "Scan": "supported with static trip counts",
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: `severity` 'error' | 'warning', the operator, the node name, a message."""

    severity: str
    op_type: str
    node: str
    message: str

    def __str__(self) -> str:
        where = f"{self.op_type} '{self.node}'" if self.node else self.op_type or "model"
        return f"{self.severity}: {where}: {self.message}"


def _collect_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value (after shape inference), across all subgraphs."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; the checker reports errors
        inferred = model
    types: dict[str, int] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            types[value.name] = value.type.tensor_type.elem_type
        for initializer in graph.initializer:
            types[initializer.name] = initializer.data_type
        for node in graph.node:
            for attribute in node.attribute:
                for subgraph in _subgraphs(attribute):
                    visit(subgraph)

    visit(inferred.graph)
    return types


def _subgraphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    if attribute.type == onnx.AttributeProto.GRAPHS:
        return list(attribute.graphs)
    return []


def _constant_values(graph: onnx.GraphProto, outer: dict[str, np.ndarray]) -> dict:
    values = dict(outer)
    for initializer in graph.initializer:
        values[initializer.name] = numpy_helper.to_array(initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attribute))
    return values


def _einsum_problems(equation: str) -> list[str]:
    problems = []
    if "..." in equation:
        problems.append(f"equation {equation!r} uses an ellipsis, which TensorRT rejects")
    operands = equation.replace(" ", "").split("->")[0].split(",")
    for operand in operands:
        letters = operand.replace("...", "")
        if len(set(letters)) != len(letters):
            problems.append(f"operand {operand!r} of {equation!r} repeats an index (diagonal)")
    return problems


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def check_model(model: onnx.ModelProto, trt: str = "8.5") -> list[Finding]:
    """All findings (module docstring) for TensorRT `trt` ('8.5', '8.6' or '10')."""
    if trt not in SUPPORTED_OPS:
        raise ValueError(f"unknown TensorRT target {trt!r}; use one of {TRT_TARGETS}")
    findings: list[Finding] = []
    default_opset = max(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
        default=0,
    )
    if default_opset > MAX_OPSET:
        findings.append(
            Finding("error", "", "", f"opset {default_opset} > {MAX_OPSET} (TensorRT 8.5/8.6)")
        )
    if model.ir_version > MAX_IR_VERSION:
        findings.append(
            Finding("error", "", "", f"IR version {model.ir_version} > {MAX_IR_VERSION}")
        )
    types = _collect_types(model)
    trt8 = trt.startswith("8")
    supported = SUPPORTED_OPS[trt]

    def visit(graph: onnx.GraphProto, outer_constants: dict) -> None:
        constants = _constant_values(graph, outer_constants)
        for node in graph.node:
            name, op = node.name, node.op_type
            add = lambda severity, message, op=op, name=name: findings.append(
                Finding(severity, op, name, message)
            )
            if node.domain not in ("", "ai.onnx"):
                add("error", f"custom domain {node.domain!r} needs a TensorRT plugin")
            elif op not in supported:
                add("error", f"not supported by the TensorRT {trt} ONNX parser")
            if op in _RESTRICTED:
                add("warning", _RESTRICTED[op])
            if op == "Einsum":
                for problem in _einsum_problems(_attribute(node, "equation", b"").decode()):
                    add("error", problem)
            if op == "Resize":
                if _attribute(node, "antialias", 0):
                    add("error", "antialiased resize is not supported")
                mode = _attribute(node, "mode", b"nearest").decode()
                if mode not in ("nearest", "linear"):
                    add("error", f"resize mode {mode!r} (TensorRT: nearest, linear)")
                transform = _attribute(node, "coordinate_transformation_mode", b"").decode()
                if transform == "tf_crop_and_resize":
                    add("error", "coordinate_transformation_mode 'tf_crop_and_resize'")
            for index in _CONSTANT_INPUTS.get(op, ()):
                if index < len(node.input) and node.input[index]:
                    if node.input[index] not in constants:
                        add("error", f"input {index} ({node.input[index]}) must be a constant")
            if op == "TopK":
                k = constants.get(node.input[1]) if len(node.input) > 1 else None
                if k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                    add("error", f"K={int(np.asarray(k).reshape(-1)[0])} >= {TOPK_MAX_K}")
                if _attribute(node, "sorted", 1) != 1:
                    add("error", "sorted=0 is not supported")
            if op == "Dropout" and len(node.input) > 2 and node.input[2]:
                training = constants.get(node.input[2])
                if training is None or bool(np.asarray(training)):
                    add("error", "training_mode must be a constant False")
            if trt8 and op in _FLOAT_ONLY_ON_TRT8:
                if types.get(node.input[0], onnx.TensorProto.FLOAT) not in _FLOAT_TYPES:
                    add("error", f"TensorRT {trt} supports {op} on FP32/FP16 inputs only")
            if trt8 and op in ("Conv", "ConvTranspose") and len(node.input) > 1:
                if node.input[1] not in constants:
                    add("warning", "weights are not a constant (TensorRT 8.x prefers constants)")
            for attribute in node.attribute:
                for subgraph in _subgraphs(attribute):
                    visit(subgraph, constants)

    visit(model.graph, {})
    if trt8:
        for value_name, element_type in sorted(types.items()):
            if element_type == onnx.TensorProto.DOUBLE:
                findings.append(Finding("error", "", value_name, "float64 tensor"))
        if any(element_type == onnx.TensorProto.INT64 for element_type in types.values()):
            findings.append(
                Finding(
                    "warning",
                    "",
                    "",
                    "int64 tensors: TensorRT 8.x casts them to int32 (fine for shapes/indices)",
                )
            )
    return findings


def errors(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.severity == "error"]
