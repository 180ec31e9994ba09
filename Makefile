# degen_hooks: `make demo` and `make test` work from a fresh clone on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# TransformerLens 4 (no HookedTransformer: the bridge family only), in a venv of its own.
VENV4  ?= .venv-tl4
PY4     = $(VENV4)/bin/python
export HF_HUB_OFFLINE = 1
export WANDB_MODE = disabled
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-fast test-tl4 lint bench notebooks clean

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
# $(1): the venv, $(2): the transformer-lens version.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -e ".[dev]" "transformer-lens==$(2)"
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call make_venv,$(VENV),3.9.0)

$(VENV4)/.installed: pyproject.toml
	$(call make_venv,$(VENV4),4.3.0)

setup: $(VENV)/.installed

demo: setup
	$(PY) -m degen_hooks demo --out degen_hooks_report

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The fast suite against TransformerLens 4 (CI runs it before `make test`).
test-tl4: $(VENV4)/.installed
	$(PY4) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check degen_hooks tests benchmarks
	$(PY) -m ruff format --check degen_hooks tests benchmarks

bench: setup
	OMP_NUM_THREADS=1 $(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(VENV4) degen_hooks_report .pytest_cache
