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

NODE_STAMP := runner/js/node_modules/.corral-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test setup system-deps lint typecheck pytest pytest-3.13 schema

run: setup
	$(BIN)/corral serve

test: setup lint typecheck pytest pytest-3.13

setup: system-deps $(STAMP) $(NODE_STAMP)

# Debian packages: Chromium for the Playwright host, v2ray as the Xray-compatible sidecar,
# bubblewrap for the commands' sandbox (CORRAL_SANDBOX).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v xray >/dev/null 2>&1 || command -v v2ray >/dev/null 2>&1 || missing="$$missing v2ray"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v bwrap >/dev/null 2>&1 || missing="$$missing bubblewrap"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(NODE_STAMP): runner/js/package.json runner/js/package-lock.json
	cd runner/js && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# Two pytest-xdist workers (the machine's two cores): each worker has its own PostgreSQL
# database, temp dirs and child processes; `loadgroup` spreads tests one by one (as `load`)
# except those marked xdist_group, which stay on one worker. PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
pytest: setup
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

# The runner, stream and process tests again on Python 3.13 (Debian 13's), in their own venv:
# asyncio's child handling and the drivers differ there. pyenv's 3.13 or a python3.13 on PATH;
# without one the leg is skipped, saying so.
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3) $(shell command -v python3.13 2>/dev/null))
VENV313 := .venv-3.13
PY313_TESTS ?= tests/test_process.py tests/test_supervisor.py tests/test_streams.py tests/test_policy.py

pytest-3.13: setup
	@if [ -z "$(PY313)" ]; then \
	  echo "SKIPPED: no Python 3.13 here (pyenv or python3.13): the 3.13 leg did not run"; \
	else \
	  set -e; \
	  if [ ! -f $(VENV313)/.corral-installed ] || [ pyproject.toml -nt $(VENV313)/.corral-installed ]; then \
	    test -x $(VENV313)/bin/python || $(PY313) -m venv $(VENV313); \
	    $(VENV313)/bin/python -m pip install --quiet --upgrade pip; \
	    $(VENV313)/bin/python -m pip install --quiet -e '.[test]'; \
	    touch $(VENV313)/.corral-installed; \
	  fi; \
	  echo "Python 3.13 leg: $$($(VENV313)/bin/python --version)"; \
	  $(VENV313)/bin/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup $(PY313_TESTS); \
	fi

schema: setup
	$(BIN)/corral schema > schema.graphql
