# The two commands of the README. Each sets itself up first (infra/setup.sh is idempotent).
VENV ?= .venv
export HF_HUB_OFFLINE = 1

.PHONY: setup demo test test-unit lint up ps down

setup:
	bash infra/setup.sh

# The main job: the local cluster up, the shipped recipes ingested, their questions answered as
# one batch job through the queues, answers exported to ./m2io-demo, a summary with metrics.
demo: setup
	$(VENV)/bin/m2io demo

test: setup
	$(VENV)/bin/python -m pytest

# The pure tests only (no server, no worker): seconds.
test-unit: setup
	$(VENV)/bin/python -m pytest -m unit

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

up ps down: setup
	$(VENV)/bin/m2io $@
