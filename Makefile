# The two commands of the README: `make demo` and `make test` (each creates .venv when missing).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test test-all benchmark clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/medanomaly demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# every bundle, each contrast; e.g. `make benchmark BENCHMARK_ARGS="--bundles dae"` for fewer
BENCHMARK_ARGS ?= --contrast all
benchmark: install
	$(VENV)/bin/medanomaly benchmark $(BENCHMARK_ARGS)

clean-venv:
	rm -rf $(VENV)
