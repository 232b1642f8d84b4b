# Each target sets itself up: the venv is (re)built when missing or when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATASET ?= synthetic
CONFIG ?=
CONFIG_ARG := $(if $(CONFIG),--config $(CONFIG),)

.PHONY: setup train-federated evaluate export test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

train-federated: setup
	OPENBLAS_NUM_THREADS=1 $(BIN)/fedrec train --dataset $(DATASET) $(CONFIG_ARG)

evaluate: setup
	OPENBLAS_NUM_THREADS=1 $(BIN)/fedrec evaluate --dataset $(DATASET) $(CONFIG_ARG)

export: setup
	$(BIN)/fedrec export --dataset $(DATASET) $(CONFIG_ARG)

test: setup
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf artifacts .pytest_cache
