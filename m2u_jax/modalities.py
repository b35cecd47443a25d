"""Input modalities and list-valued keys, with no dependency beyond Python: the deploy path
(`Predictor.from_onnx` with numpy, Pillow and onnxruntime only) reads them too."""

from __future__ import annotations

MODALITY_CHANNELS = {"rgb": 3, "gray": 1, "thermal": 1, "xray": 1, "depth": 1}

# Read from the sample's image file itself (at most one per list); every other modality comes
# from a side file beside it. 'gray' is that file as one luma channel: a set from monochrome
# cameras trains a 1-channel model instead of three equal channels (a 14-22 % cheaper cpu_real
# train step, docs/performance.md; NEU-DET ended 0.007-0.024 mAP@0.5 lower, docs/quality.md).
IMAGE_FILE_MODALITIES = ("rgb", "gray")

__all__ = ["IMAGE_FILE_MODALITIES", "MODALITY_CHANNELS", "num_channels", "split_list"]


def split_list(value: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'); the command-line form of list-valued keys."""
    if isinstance(value, (tuple, list)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


def num_channels(modalities: str) -> int:
    """Channels of the stacked input for a comma-separated modality list."""
    return sum(MODALITY_CHANNELS[m] for m in split_list(modalities))
