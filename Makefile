# The two commands of the README. Each sets itself up first (infra/setup.sh is idempotent).
VENV ?= .venv
export HF_HUB_OFFLINE = 1

.PHONY: setup demo test lint up ps down

setup:
	bash infra/setup.sh

# The main job: bring the local cluster up and check every queue, S3 and pgvector end to end.
demo: setup
	$(VENV)/bin/m2io smoke

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

up ps down: setup
	$(VENV)/bin/m2io $@
