"""Names of the box / defect-type classes: the fallback list for a run that recorded none, and
the name of one class index. Dependency-free: the deploy path (ONNX runner, predictor) and the
evaluation reports share it."""

from __future__ import annotations

from collections.abc import Sequence

AGNOSTIC_NAME = "defect"  # the one class of the class-agnostic protocol


def default_class_names(num_classes: int) -> list[str]:
    """Class names when a run recorded none: `['defect']` for one class, else
    `['class_0', ..., 'class_{K-1}']` (K = `num_classes`; `[]` when unknown)."""
    if num_classes == 1:
        return [AGNOSTIC_NAME]
    return [f"class_{index}" for index in range(max(num_classes, 0))]


def class_name(class_id: int, class_names: Sequence[str]) -> str:
    """The name of class `class_id`: `class_names[class_id]`; a single name (a class-agnostic
    run) names every box; 'defect' for a negative (class-agnostic) index; `class_<id>` past the
    list."""
    if len(class_names) == 1:
        return class_names[0]
    if 0 <= class_id < len(class_names):
        return class_names[class_id]
    return AGNOSTIC_NAME if class_id < 0 else f"class_{class_id}"
