"""Test-wide setup: 8 fake CPU devices so sharding is exercised, quiet TensorFlow, and one
persistent XLA compilation cache shared by every process of a run (kept between runs by `make
test`)."""

import os
import shutil
import tempfile

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

# One persistent compilation cache: the xdist workers and every subprocess (train.py, eval.py,
# the study tools) inherit it through the environment, so the tiny programs that many tests and
# subprocesses compile (the tiny config's train steps, evaluation, export) compile once. `make
# test` names a folder kept between runs (Makefile); without one, the pytest process that loads
# this first makes a folder for the run and removes it at the end. Programs that compile in under
# 0.2 s (eager ops, small tests) are not worth a file each.
_CACHE_CREATED = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_CREATED:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="m2u-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    """The process that made the cache folder removes it (xdist workers share it)."""
    if _CACHE_CREATED and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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


@pytest.fixture(scope="session")
def tiny_eval_root(tmp_path_factory):
    """A tiny synthetic dataset for evaluation tests (one category, 32x32): 8 good training
    images; 4 good and 2 per defect kind in test, so validation gets 1 good + 1 of each kind."""
    from m2u_jax.data import synthetic

    root = tmp_path_factory.mktemp("tiny_eval")
    synthetic.generate(
        root, categories="fabric", image_size=32, num_train=8, num_test_good=4, num_test_defect=2
    )
    return str(root)


# Test files in the order of what they cost one worker in `make test`, from `pytest --durations`
# (the figures: docs/testing.md). The order only moves wall time, never a result.
_COSTLIEST_FIRST = (
    "test_trainer",
    "test_reliability_training",
    "test_studies",
    "test_convert_to_onnx",
    "test_reliability_cli",
    "test_workflow",
    "test_benchmark",
    "test_ensemble",
    "test_evaluate",
    "test_multihost",
    "test_scorer_study",
    "test_validation",
)


def pytest_collection_modifyitems(config, items):
    """The costliest files first, then the other files with slow tests, then the rest (stable
    otherwise). xdist hands out whole files in collection order (the Makefile turns off its own
    reordering by test count, which put one-test files such as test_workflow.py last), so the
    long files start at once and the short ones fill the end, instead of one worker finishing a
    long file alone after the other ran out of work."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1]
        if name in _COSTLIEST_FIRST:
            return _COSTLIEST_FIRST.index(name)
        return len(_COSTLIEST_FIRST) + (item.module.__name__ not in slow_modules)

    items.sort(key=rank)
