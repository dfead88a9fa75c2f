# sntrack — every target does its own set-up (venv, services, topology, migrations); safe to run twice.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 3

.PHONY: help venv services setup test test-fast demo bench soak lint schemas topology clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv:  ## create .venv and install the pinned dependencies
	@bash infra/venv.sh

services:  ## start (or install) PostgreSQL and RabbitMQ when they are down
	@bash infra/services.sh

setup: venv services  ## venv + services + broker topology + database schema
	@$(BIN)/sntrack topology apply >/dev/null
	@$(BIN)/sntrack db migrate --create

test: venv services  ## run the whole test suite against the real servers
	@bash infra/browser.sh || echo "[browser] could not install chromium: the dashboard's browser tests will skip" >&2
	$(BIN)/pytest -q -m "restarts or alone"  # the chaos suite, the tests that restart the servers, the timed ones
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile -q -m "not restarts and not alone"

demo: setup  ## a real spectral-norm vs baseline study through the whole pipeline
	@bash infra/demo.sh

bench: setup  ## benchmarks; results in bench/results/
	@bash infra/browser.sh || echo "[browser] could not install chromium: the dashboard benchmark will fail" >&2
	$(BIN)/python -m bench

soak: setup  ## one million events from 100 simulated workers (about 20 min); results in bench/results/soak.md
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

lint:  ## ruff, schema and topology staleness
	$(BIN)/ruff check .
	$(BIN)/python -m schemas.jsonschema --check
	$(BIN)/python -m schemas.asyncapi --check
	$(BIN)/sntrack topology check

schemas:  ## regenerate schemas/json and docs/asyncapi.json from the models
	$(BIN)/python -m schemas.jsonschema
	$(BIN)/python -m schemas.asyncapi

topology:  ## regenerate infra/rabbitmq/definitions.json from the code
	$(BIN)/sntrack topology export

clean:  ## remove the venv and caches (not the databases)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
