"""m2u_jax.predictions: streaming a split's predictions (the trained-model paths are in
test_evaluate.py)."""

import numpy as np
import pytest

from configs import tiny
from m2u_jax import predictions


def test_collect_split_logs_progress_with_the_time_left(monkeypatch):
    lines = []
    monkeypatch.setattr(predictions, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(predictions.logging, "info", lambda text, *args: lines.append(text % args))

    def batches():
        for index in range(3):
            yield {
                "valid": np.array([True, True, index < 2]),
                "images": np.zeros((3, 4, 4, 3), np.float32),
                "paths": np.array([f"{index}_{k}.png" for k in range(3)]),
                "categories": np.array(["c"] * 3),
                "defect_names": np.array(["good"] * 3),
                "labels": np.zeros(3, np.int32),
                "boxes": np.zeros((3, 1, 4), np.float32),
                "box_classes": np.zeros((3, 1), np.int32),
                "box_valid": np.zeros((3, 1), np.float32),
                "masks": np.zeros((3, 4, 4), np.float32),
            }

    def predict(images, index):
        return {"image_score": np.full(len(images), 0.1 * index, np.float32)}

    config = tiny.get_config()
    rows = predictions.collect_split(
        config, "test", predict, keep_maps=False, batches=batches(), total=8
    )
    assert rows["image_score"].tolist() == pytest.approx([0, 0, 0, 0.1, 0.1, 0.1, 0.2, 0.2])
    assert [line.split(",")[0] for line in lines] == [
        "test: 3 of 8 images", "test: 6 of 8 images", "test: 8 of 8 images"
    ]  # fmt: skip
    assert "s left" in lines[0] and "images/s" in lines[0]
