# Two commands: `make run` (set up, then start the platform) and `make test` (set up, then run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/trident-dagster: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $@

setup: $(BIN)/trident-dagster

run: setup    ## the platform on 127.0.0.1:3000; this folder is the project (trident.yaml, dagster_home/, data/)
	$(BIN)/trident-dagster up

demo: setup   ## headless: process the sample cohort to completion and print where outputs are
	$(BIN)/trident-dagster run --sample

test: setup   ## the test suite
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py

.PHONY: setup run demo test bench
