# Two commands from a fresh clone: `make demo` and `make test`. Everything the project needs is installed here.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch 2.13.0 lies on this machine's disk; a bare `torch` would resolve to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Two pytest workers (one torch thread each, tests/conftest.py), one test file per worker so module fixtures
# are built once: the suite then fits the 10-minute budget on a 2-core machine. `make test PYTEST_WORKERS=0`
# runs in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test lint install install-dev clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

# SpikingJelly (the neurons of the published Spikformer/SDT code, for the test corpus) goes in without its
# dependencies: its metadata asks for torchvision, which would pull a multi-GB CUDA torch, and its neuron
# modules need only torch and numpy.
SPIKINGJELLY_SPEC ?= spikingjelly==0.0.0.0.14

$(VENV)/.installed-dev: pyproject.toml Makefile $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "$(SPIKINGJELLY_SPEC)"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/hq-ptq run digits-spikformer

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check hq_ptq tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
