"""Test-wide setup: 8 fake CPU devices so sharding is exercised, quiet TensorFlow."""

import os

# Must be set before jax is imported anywhere; `make test` sets the same flag.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
    """A tiny synthetic MVTec-layout dataset (one category, 32x32) for training tests.

    16 good training images, 2 good and 1-per-defect-kind test images: enough for a batch of 8
    in both training stages and a few evaluation batches, written in about a second.
    """
    from m2u_jax.data import synthetic

    root = tmp_path_factory.mktemp("tiny_synthetic")
    synthetic.generate(
        root, categories="fabric", image_size=32, num_train=16, num_test_good=2, num_test_defect=1
    )
    return str(root)
