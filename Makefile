# Mambacast: every target sets itself up from nothing (a virtualenv in .venv) before it runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned and installed first: an open range would pull a CUDA build (GBs) on a CPU box.
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

DATA_DIR ?= $(CURDIR)/data
PORT ?= 3000
DEMO_RANGE ?= 2019...2024
# make evaluate: the real files, in a data directory of their own (the demo's stays as it was)
DATA ?= ../shared/data
EVAL_DIR ?= $(CURDIR)/data-evaluate
export MAMBACAST_DATA_DIR := $(abspath $(DATA_DIR))
export DAGSTER_HOME := $(MAMBACAST_DATA_DIR)/dagster_home
# A single-run backfill records one "planned" event per asset instead of one per partition.
export DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS := true
# dg runs in the project's virtualenv; without this it warns that none is activated
DG := VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg

.PHONY: setup instance demo evaluate test ui lint bench mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

## instance: the Dagster instance in the data directory, and a .env that points the dagster CLI
## (run from this folder) at it, so CLI runs show up in the UI; explicit variables still win.
instance: $(DAGSTER_HOME)/dagster.yaml
	@printf '%s\n' \
		'# Written by `make instance`; read by the dagster CLI when run from this folder.' \
		'MAMBACAST_DATA_DIR=$${MAMBACAST_DATA_DIR:-$(MAMBACAST_DATA_DIR)}' \
		'DAGSTER_HOME=$${DAGSTER_HOME:-$(DAGSTER_HOME)}' \
		'DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=true' > .env

$(DAGSTER_HOME)/dagster.yaml: pipelines/dagster.yaml | setup
	mkdir -p $(DAGSTER_HOME)
	cp $< $@
	# Create the SQLite schemas now: two runs starting at once on a fresh instance would race.
	$(BIN)/dagster instance migrate > /dev/null

## demo: set up, materialize every asset over six years of the synthetic market (the last two
## walk-forward folds), print results
demo: setup instance
	$(BIN)/python -m pipelines.run demo --range $(DEMO_RANGE)
	$(BIN)/python -m pipelines.report

## evaluate: the real daily Bitcoin, on-chain and FRED files in DATA through the file connectors,
## the walk-forward over every fold from 2018, reports/evaluation.{json,html} (STOCKS=1 adds SPY
## and AAPL)
evaluate: setup
	mkdir -p $(EVAL_DIR)/dagster_home
	cp pipelines/dagster.yaml $(EVAL_DIR)/dagster_home/dagster.yaml
	MAMBACAST_DATA_DIR=$(EVAL_DIR) DAGSTER_HOME=$(EVAL_DIR)/dagster_home \
		$(BIN)/dagster instance migrate > /dev/null
	MAMBACAST_DATA_DIR=$(EVAL_DIR) DAGSTER_HOME=$(EVAL_DIR)/dagster_home \
		$(BIN)/python -m pipelines.run evaluate --data $(DATA) $(if $(STOCKS),--stocks)

## test: set up, then the whole test suite
test: setup
	$(BIN)/python -m pytest -n 2

## ui: the Dagster UI (and daemon, for schedules) on http://127.0.0.1:$(PORT). It has no login and
## can launch runs, so it listens on this machine only unless UI_HOST says otherwise (opt-in:
## `UI_HOST=0.0.0.0 make ui` serves the network; put a firewall or an authenticating proxy in
## front). UI_HOST, not HOST: shells and containers often export HOST as the machine's name.
ui: UI_HOST ?= 127.0.0.1
ui: setup instance
	$(if $(filter-out 127.0.0.1 localhost ::1,$(UI_HOST)),@echo "WARNING: the Dagster UI has no login and listens on $(UI_HOST) port $(PORT): other machines can reach it" >&2)
	$(DG) dev --host $(UI_HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(DG) check defs

bench: setup instance
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/step_load.py
	$(BIN)/python benchmarks/mamba.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/backtest.py

## mutate: mutation testing (mutmut) of the guard modules against their tests, one worker under
## nice; benchmarks/results/mutation.{json,md}. MODULES=lake picks some, JOBS=2 uses both cores
JOBS ?= 1
mutate: setup
	nice -n 19 $(BIN)/python benchmarks/mutation.py --max-children $(JOBS) $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
