# m2u-jax: `make demo` (the main job) and `make test` (the whole suite). Every target depends on
# `setup`, so a fresh clone needs no other step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
# Quiet TensorFlow's C++ start-up chatter in every target.
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup setup-jax2tf test-cache test test-fast lint format demo clean gpu-wheels gpu-check-dry

setup: $(VENV)/.installed

# The jax2tf export backend needs jax 0.7.1 (the last jax2tf with plain-TF-op output), so it gets
# its own pinned environment, built on demand (and by `make test`, whose export tests use it).
JAX2TF_VENV := .venv-jax2tf
setup-jax2tf: $(JAX2TF_VENV)/.installed

$(JAX2TF_VENV)/.installed: tools/convert_to_onnx/requirements-jax2tf.txt
	$(PYTHON) -m venv $(JAX2TF_VENV)
	$(JAX2TF_VENV)/bin/pip install -q --upgrade pip
	$(JAX2TF_VENV)/bin/pip install -q -r tools/convert_to_onnx/requirements-jax2tf.txt
	# m2u_jax itself (editable), for `python -m m2u_jax.export.jax2tf_export`; no deps: this
	# environment keeps its own pins (jax 0.7.1).
	$(JAX2TF_VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements.lock -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

# Two pytest-xdist workers, whole files each (module fixtures train once): compiling is mostly
# single-threaded, so two processes keep both cores busy (about 1.8x faster on 2 cores). Files go
# out in tests/conftest.py's order (costliest first), not xdist's default by number of tests.
TEST_WORKERS ?= 2
# The tests' XLA compilation cache lives on between runs: about three quarters of a training
# test is compiling, and a warm cache reads those programs back (make test 8 min 46 s cold,
# 5 min 46 s warm; docs/testing.md). Programs of older code stay behind, so the cache is emptied
# once it outgrows TEST_XLA_CACHE_MB (one run writes about 50 MB). A fresh clone (CI) runs cold.
TEST_XLA_CACHE ?= $(CURDIR)/.cache/xla-tests
TEST_XLA_CACHE_MB ?= 500
TEST_ENV = $(FAKE_DEVICES) JAX_COMPILATION_CACHE_DIR=$(TEST_XLA_CACHE)
test-cache:
	@if [ -d "$(TEST_XLA_CACHE)" ] && \
	    [ "$$(du -sm "$(TEST_XLA_CACHE)" | cut -f1)" -gt $(TEST_XLA_CACHE_MB) ]; then \
	    echo "emptying $(TEST_XLA_CACHE) (over $(TEST_XLA_CACHE_MB) MB)"; rm -rf "$(TEST_XLA_CACHE)"; fi
	@mkdir -p "$(TEST_XLA_CACHE)"

test: setup setup-jax2tf test-cache
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The inner loop: every test but those marked slow (training runs, exports, subprocesses).
test-fast: setup test-cache
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The demo's embedded data: 3 categories at 64 px (see configs/demo.py), ~10 s to write. The
# stamp names the generator arguments, so changing them regenerates the data on the next run.
DEMO_DATA_ARGS := --image-size 64 --num-train 200 --num-test-good 60 --num-test-defect 80
DEMO_DATA_STAMP := data/synthetic/.done-64px-200-60-80
$(DEMO_DATA_STAMP): | setup
	rm -f data/synthetic/.done*
	$(PY) -m m2u_jax.data.synthetic --out data/synthetic $(DEMO_DATA_ARGS)
	touch $@

# Train (pretrain + fine-tune, then eval into runs/demo/eval), export ONNX with its parity check,
# print the summary table. A re-run resumes from the last checkpoint and re-exports.
demo: setup $(DEMO_DATA_STAMP)
	$(PY) train.py --config configs/demo.py --workdir runs/demo
	$(PY) tools/convert_to_onnx/convert.py --config configs/demo.py --workdir runs/demo \
		--output runs/demo/model.onnx --dynamic-batch
	$(PY) tools/demo_summary.py --config configs/demo.py --workdir runs/demo \
		--onnx runs/demo/model.onnx

clean:
	rm -rf runs data/synthetic .cache

# tools/gpu_check.sh on a lent GPU: the wheels its python lacks, carried in .gpu_wheels.
gpu-wheels: setup
	$(VENV)/bin/pip download -q --no-deps -d .gpu_wheels ml-collections==1.1.0

# The same script on this CPU with configs/tiny.py (a smoke test of the script itself).
gpu-check-dry: setup
	GPU_CHECK_DRY=1 PYTHON=$(PY) OUT=runs/gpu_check_dry bash tools/gpu_check.sh
