"""Test-wide setup: 8 fake CPU devices so sharding is exercised, quiet TensorFlow."""

import os

# Must be set before jax is imported anywhere (subprocesses inherit it). 8 fake CPU devices, as
# `make test` sets; and XLA's CPU backend without its expensive LLVM passes: the tests' programs
# are small and run a few times each, so compiling dominates (tests/test_evaluate.py: 68 -> 45
# s). The HLO passes and the numerics are unchanged; an XLA_FLAGS naming an optimisation level wins.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
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


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache in one folder per session, on for the module: the
    tiny programs that several modules train and evaluate (test_evaluate, test_studies,
    test_validation) compile once."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    cache.set_cache_dir(str(tmp_path_factory.getbasetemp() / "xla_compilation_cache"))
    yield
    jax.config.update("jax_compilation_cache_dir", None)
    cache.reset_cache()
