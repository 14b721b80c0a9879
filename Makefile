# Two entry points for a fresh machine: `make demo` and `make test`. Each sets up
# its own virtualenv first; nothing is installed outside .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LINTED := $(wildcard psclient psserver psworker protos tests examples benchmarks)

.PHONY: demo test bench lint proto proto-check setup clean base-image stream-servers

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "streamps needs Python 3.11+, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,plot]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/online_mf.py --demo

# The stream sources' tests run against real redis-server and nats-server from Debian's
# packages, installed here when missing and we may (else those tests say why they skip).
STREAM_SERVERS := redis-server nats-server

test: $(STAMP) proto-check lint stream-servers
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

stream-servers:
	@missing=""; for bin in $(STREAM_SERVERS); do PATH="$$PATH:/usr/sbin" command -v $$bin >/dev/null || missing="$$missing $$bin"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null) \
	    || echo "could not install$$missing: the stream sources' tests will skip"; }

# The bench extra (Ray, the Redis client with hiredis, psutil, py-spy) from PyPI, redis-server
# from Debian's packages (installed when missing and we may; its rows say why if not), and
# MovieLens 100K fetched once into data/. A few minutes on 2 cores; writes benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || echo "redis-server unavailable: its row will say so"; }
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

# Generated code is committed; `proto` rewrites it, `proto-check` fails on drift.
proto: $(STAMP)
	$(PY) protos/generate.py

proto-check: $(STAMP)
	$(PY) protos/generate.py --check

# A local stand-in for the image's python:3.11-slim base where no registry is reachable
# (needs root, debootstrap and a Docker engine; .ci/run does this when the image is missing).
base-image:
	deploy/make-base-image.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
