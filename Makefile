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

.PHONY: run test setup system-deps lint typecheck pytest schema

run: setup
	$(BIN)/corral serve

test: setup lint typecheck pytest

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

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

schema: setup
	$(BIN)/corral schema > schema.graphql
