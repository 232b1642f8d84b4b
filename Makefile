# Each target sets itself up: the venv is (re)built when missing or when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATASET ?= synthetic
CONFIG ?=
CONFIG_ARG := $(if $(CONFIG),--config $(CONFIG),)
# `make serve` answers for one merchant's customers (the large shop by default on synthetic data).
MERCHANT ?= $(if $(filter synthetic,$(DATASET)),northwind,)
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1
EXPORTS := artifacts/$(DATASET)/exports

.PHONY: setup train-federated evaluate evaluate-foldin export serve bench-serve test lint clean

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

evaluate-foldin: setup
	OPENBLAS_NUM_THREADS=1 $(BIN)/fedrec evaluate-foldin --dataset $(DATASET) $(CONFIG_ARG)

export: setup
	$(BIN)/fedrec export --dataset $(DATASET) $(CONFIG_ARG)

# Serves the latest export; trains one first when there is none yet.
serve: setup $(EXPORTS)/LATEST
	$(BIN)/fedrec serve --export $(EXPORTS) $(if $(MERCHANT),--merchant $(MERCHANT),) --host $(HOST) --port $(PORT) --workers $(WORKERS)

$(EXPORTS)/LATEST:
	$(MAKE) train-federated DATASET=$(DATASET)

# Load test (wrk) of the shipped export and two synthetic 1M-item HNSW catalogues -> results/bench-serve.json
bench-serve: setup
	@command -v wrk >/dev/null || { echo "error: bench-serve needs wrk: apt-get install wrk"; exit 2; }
	test -f artifacts/synthetic/exports/LATEST || $(MAKE) train-federated DATASET=synthetic
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m serving.bench

test: setup
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf artifacts .pytest_cache
