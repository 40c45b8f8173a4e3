# crucible: `make demo` and `make test` on a fresh machine; `make bench` and `make lint`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA GPU get the CPU build of torch (a plain `torch` would pull a
# multi-GB CUDA build); GPU machines take torch from pyproject's open range.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv install system-deps demo test test-fast bench gpu-check lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

$(STAMP): $(BIN)/python pyproject.toml
ifneq ($(HAS_GPU),1)
	$(BIN)/pip install -q "$(TORCH_CPU)"
endif
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv install: $(STAMP)

# Prometheus is a real server in the tests and the demo; install it where it is missing.
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

demo: install system-deps
	$(BIN)/crucible demo

test: install system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install system-deps
	$(BIN)/python bench/run_all.py

# On a GPU machine: the GPU tests and benchmarks, summarised in gpu-check/gpu_check.md (see
# bench/gpu_check.py; on an image whose python3 already has CUDA torch, `python3
# bench/gpu_check.py` does the same without the venv).
gpu-check: install
	$(BIN)/python bench/gpu_check.py --out gpu-check

# mypy checks the package through a link named `crucible` (the repo root is the package).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p .lint && ln -sfn "$(CURDIR)" .lint/crucible
	cd .lint && MYPYPATH=. ../$(BIN)/mypy -p crucible --config-file ../pyproject.toml

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf build *.egg-info .lint .pytest_cache .mypy_cache .ruff_cache
