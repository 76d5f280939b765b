# Two commands: `make run` (set up, then start the platform) and `make test` (set up, then run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/trident-dagster: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,hf,scale]'
	touch $@

setup: $(BIN)/trident-dagster

run: setup    ## the platform on 127.0.0.1:3000; this folder is the project (trident.yaml, dagster_home/, data/)
	$(BIN)/trident-dagster up

demo: setup   ## headless: process the sample cohort to completion and print where outputs are
	$(BIN)/trident-dagster run --sample

servers:      ## PostgreSQL and Redis binaries (Debian packages) for the scale-out tests, which start them
	@command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null; }

test: setup servers  ## the test suite
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py

.PHONY: setup servers run demo test bench
