"""The exported graph's names, the contract between the exporter and every runner: one input
`INPUT_NAME` (`[N, H, W, C]` float32 in [0, 1]) and the outputs `OUTPUT_NAMES` in this order
(m2u_jax/export/graph.py says what each holds). No imports, so the ONNX Runtime runner reads
it without JAX."""

INPUT_NAME = "images"
OUTPUT_NAMES = (
    "anomaly_map",
    "image_score",
    "uncertainty",
    "boxes",
    "box_scores",
    "box_classes",
    "num_boxes",
)
