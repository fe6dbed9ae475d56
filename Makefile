# The two commands of the README: `make demo` and `make test` (each creates .venv when missing).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test test-all benchmark mutation clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/medanomaly demo

# the default suite, then every bundle's end-to-end test (marked slow and e2e): what CI runs
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m e2e

test-all: install
	$(PY) -m pytest -q -m ""

# every bundle, each contrast; e.g. `make benchmark BENCHMARK_ARGS="--bundles dae"` for fewer
BENCHMARK_ARGS ?= --contrast all
benchmark: install
	$(VENV)/bin/medanomaly benchmark $(BENCHMARK_ARGS)

# mutation testing of metrics, scoring, masking, latent and anomalies (hours on 2 cores; not in CI),
# e.g. `make mutation MUTATION_ARGS="--modules masking latent"`
MUTATION_ARGS ?=
mutation: install
	$(PY) -m pip install --quiet -e ".[mutation]"
	$(PY) tools/mutation_testing.py $(MUTATION_ARGS)

clean-venv:
	rm -rf $(VENV)
