# The two commands a new user needs (see README): `make run` and `make test`.
# Both create/refresh .venv/ at the repo root and install what they need first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.corral-installed
# The test suite runs every database test on SQLite and on this PostgreSQL too.
# An unreachable server fails the run; set it empty to run the SQLite half only.
CORRAL_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
export CORRAL_TEST_POSTGRES_URL

.PHONY: run test setup lint typecheck pytest schema

run: setup
	$(BIN)/corral serve

test: setup lint typecheck pytest

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

schema: setup
	$(BIN)/corral schema > schema.graphql
