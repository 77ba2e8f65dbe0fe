# The two commands of the README. Each sets itself up first (infra/setup.sh is idempotent).
VENV ?= .venv
export HF_HUB_OFFLINE = 1

.PHONY: setup demo test lint up ps down

setup:
	bash infra/setup.sh

# The main job: the local cluster up, the shipped recipes ingested, their questions answered as
# one batch job through the queues, answers exported to ./m2io-demo, a summary with metrics.
demo: setup
	$(VENV)/bin/m2io demo

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

up ps down: setup
	$(VENV)/bin/m2io $@
