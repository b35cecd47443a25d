"""Tests for m2u_jax.summary (the function, and once the command line)."""

import json
import os
import subprocess
import sys

from configs import tiny
from m2u_jax import summary


def tiny_config():
    config = tiny.get_config()
    config.model.det_channels = 16
    return config


def test_summarize_tiny():
    result = summary.summarize(tiny_config(), batch_size=2)
    parameters = result["parameters"]
    assert sorted(parameters) == ["anomaly_decoder", "backbone", "detection_head", "image_head"]
    assert result["total_parameters"] == sum(parameters.values())
    assert sum(result["backbone_parameters"].values()) == parameters["backbone"]
    # Hand count of the tiny backbone on 32 px, patch 8, scales (1, 0.5), fusion after each
    # of the 2 blocks: embed 8*8*3*64 + 64 + 16*64 + 2*64, blocks 2 * 33472, fusions 2 * 16832,
    # final norm 128.
    assert result["backbone_parameters"] == {
        "embed": 12288 + 64 + 1024 + 128,
        "block": 2 * 33472,
        "fusion": 2 * 16832,
        "encoder_norm": 128,
    }
    assert parameters["image_head"] == (64 + 1) * 1 + (64 + 1) * 5
    # Lower bound: the weight matmuls of 2 blocks + 2 fusions over 16 + 4 tokens, 2 FLOPs per
    # multiply-add; the heads and attention add more.
    tokens = 20
    dense = 2 * tokens * (2 * (4 * 64 * 64 + 2 * 64 * 128) + 2 * (4 * 64 * 64))
    assert dense / 1e9 < result["gflops_per_image"] < 50 * dense / 1e9
    shapes = result["output_shapes"]
    assert shapes["pixel_logits"] == [2, 32, 32]
    assert shapes["recon"] == [2, 32, 32, 3]
    assert shapes["det"]["points"] == [20, 2]
    assert shapes["type_logits"] == [2, 5]


def test_command_line_prints_json():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "m2u_jax.summary",
            "--config",
            "configs/tiny.py",
            "--config.model.det_channels=16",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    assert result["variant"] == "tiny"
    assert result["parameters"]["backbone"] == 2 * 33472 + 2 * 16832 + 13504 + 128
    assert result["total_parameters"] == sum(result["parameters"].values())
    assert result["gflops_per_image"] > 0
