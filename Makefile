# Two commands: `make run` (set up, then start the platform) and `make test` (set up, then run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

$(BIN)/trident-dagster: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $@

setup: $(BIN)/trident-dagster

run: setup    ## the platform: webserver + daemon on 127.0.0.1:3000, sample cohort in the inbox
	$(BIN)/trident-dagster up

demo: setup   ## headless: process the sample cohort to completion and print where outputs are
	$(BIN)/trident-dagster run --sample

test: setup   ## the test suite
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py

.PHONY: setup run demo test bench
