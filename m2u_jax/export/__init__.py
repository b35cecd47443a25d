"""ONNX / TensorRT export of M2U-InspectNet (tools/convert_to_onnx/README.md has the walk-through).

`graph` (the exported JAX function), `convert` (checkpoint → checked ONNX file), `onnx_graph`
(the ONNX passes that make it TensorRT-ready), `parity` (ONNX Runtime vs JAX), `trt_check`
(TensorRT-readiness without TensorRT), `jax2tf_export` (the jax2tf backend's subprocess) and
`onnx_runner` (ONNX Runtime inference; imports without JAX). Nothing is imported here, so
`onnx_runner` and `trt_check` stay light.
"""
