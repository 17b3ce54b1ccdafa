# Fresh machine: `make test` creates .venv, installs everything, runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only machine must not pull the CUDA build of torch: install a CPU torch
# before the package so pip keeps it. Override for GPU machines, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint format demo bench clean install-dashboard test-dashboard

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

# The `dashboard` extra, in its own environment: sae-dashboard pins
# transformer-lens < 3 while .venv tests against 3.x. Its decode-clt dependency
# pulls torchvision and torchaudio; the registry's Linux builds need CUDA torch,
# so the installed torch is pinned (else pip swaps in the CUDA build) and each
# is removed if it does not import (a broken torchvision breaks transformers).
DASH_VENV ?= .venv-dashboard
DASH_PY := $(DASH_VENV)/bin/python

install-dashboard: $(DASH_VENV)/.installed

$(DASH_VENV)/.installed: pyproject.toml
	test -x $(DASH_PY) || python3 -m venv $(DASH_VENV)
	$(DASH_PY) -m pip install -q --upgrade pip
	$(DASH_PY) -c "import torch" 2>/dev/null || $(DASH_PY) -m pip install -q $(TORCH_SPEC)
	$(DASH_PY) -m pip install -q -e ".[dev,dashboard]" "torch==$$($(DASH_PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	for m in torchvision torchaudio; do $(DASH_PY) -c "import $$m" 2>/dev/null || $(DASH_PY) -m pip uninstall -q -y $$m; done
	$(DASH_PY) -c "import sae_dashboard, transformers, polysae_lens.dashboard; from transformers import AutoModelForCausalLM; print('dashboard extra OK')"
	touch $@

test-dashboard: install-dashboard
	POLYSAE_REQUIRE_DASHBOARD=1 $(DASH_PY) -m pytest -q tests/test_dashboard.py

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
	rm -rf $(VENV) $(DASH_VENV) .pytest_cache .mypy_cache .ruff_cache demo-out
