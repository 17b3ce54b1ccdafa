# Fresh machine: `make test` creates .venv, installs everything, runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only machine must not pull the CUDA build of torch: install a CPU torch
# before the package so pip keeps it. Override for GPU machines, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint format demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import sae_lens, polysae_lens; print('sae_lens', sae_lens.__version__, 'polysae_lens', polysae_lens.__version__)"
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

demo: install
	$(PY) -m polysae_lens demo --out demo-out

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-out
