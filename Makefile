# degen_hooks: `make demo` and `make test` work from a fresh clone on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
export HF_HUB_OFFLINE = 1
export WANDB_MODE = disabled
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-fast lint bench notebooks clean

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]" "transformer-lens==3.9.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m degen_hooks demo --out degen_hooks_report

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check degen_hooks tests benchmarks
	$(PY) -m ruff format --check degen_hooks tests benchmarks

bench: setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks

clean:
	rm -rf $(VENV) degen_hooks_report .pytest_cache
