# Fresh machine: `make test` creates .venv, installs everything, runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in before the package, so pip keeps it. TORCH_BUILD picks the build:
# "cuda" (PyPI's default Linux build, CUDA libraries included: several GB) when
# `nvidia-smi` finds an NVIDIA GPU, else "cpu" (PyTorch's CPU-only wheel index).
# Override either way: make install TORCH_BUILD=cuda (or cpu); or give TORCH_SPEC
# in full, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
TORCH_VERSION ?= 2.13.0
TORCH_BUILD ?= $(if $(shell nvidia-smi -L 2>/dev/null),cuda,cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# An extra index, not --index-url: where it cannot be reached pip only warns and
# takes torch from the other indexes or a local wheel (a CPU one on this project's
# CI machines). With neither reachable, PyPI's Linux default is the CUDA build.
TORCH_SPEC_cpu = torch==$(TORCH_VERSION) --extra-index-url $(TORCH_CPU_INDEX)
TORCH_SPEC_cuda = torch==$(TORCH_VERSION)
TORCH_SPEC ?= $(TORCH_SPEC_$(TORCH_BUILD))
ifeq ($(filter $(TORCH_BUILD),cpu cuda),)
$(error TORCH_BUILD=$(TORCH_BUILD) is not allowed: use cpu or cuda)
endif

.PHONY: install test lint format demo bench clean install-dashboard test-dashboard

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { echo "installing torch ($(TORCH_BUILD) build): $(TORCH_SPEC)"; $(PY) -m pip install -q $(TORCH_SPEC); }
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
