# m2u-jax: `make demo` (the main job) and `make test` (the whole suite). Every target depends on
# `setup`, so a fresh clone needs no other step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8
# Quiet TensorFlow's C++ start-up chatter in every target.
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup test lint format demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements.lock -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: setup
	$(FAKE_DEVICES) $(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

data/synthetic/.done: | setup
	$(PY) -m m2u_jax.data.synthetic --out data/synthetic
	touch $@

demo: setup data/synthetic/.done
	$(PY) train.py --config configs/demo.py --workdir runs/demo

clean:
	rm -rf runs data/synthetic
