"""ONNX / TensorRT export of M2U-InspectNet (see README.md in this folder)."""
