# The two set-up commands: `make run` (router) and `make test` (every test). Both need only python3 and npm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?= --port 8080
PYTEST_ARGS ?=
# Workers for the test run: two for the long tests, six for the rest (most tests wait, so more than the cores).
TEST_WORKERS ?= 8
BENCH_ARGS ?=

.PHONY: run test deps system-deps opencode bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

deps: $(VENV)/.installed

# The launcher runs the opencode on PATH; without one, `make run` installs the pinned one (as `make opencode`
# does) and points the router at it, so the set-up command needs only python3 and npm. A --opencode-bin in
# ARGS comes later on the command line and wins. The script alone knows the pinned version and its folder.
PINNED_OPENCODE = $(shell sh tests/setup/install-opencode.sh --path)
OPENCODE_ON_PATH := $(shell command -v opencode 2>/dev/null)

## Run the router in the foreground with this checkout's code: make run ARGS="--port 31000 ~/proj-a"
run: deps $(if $(OPENCODE_ON_PATH),,opencode)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/twistd --pidfile= -n opencoderouter$(if $(OPENCODE_ON_PATH),, --opencode-bin $(PINNED_OPENCODE)) $(ARGS)

## Machine packages some tests drive (Chromium, Avahi, wrk, iproute2); installed when missing (needs root).
system-deps:
	sh tests/setup/install-system-deps.sh

## The pinned real OpenCode from npm, into a cache folder shared by every run.
opencode:
	sh tests/setup/install-opencode.sh

## Lint, types, then every test, spread over $(TEST_WORKERS) workers (tests/scheduling.py): make test PYTEST_ARGS=-x
# Bytecode is written (PYTHONDONTWRITEBYTECODE cleared): else every worker rewrites the tests' asserts
# and every router subprocess compiles the package again.
test: deps system-deps opencode
	$(VENV)/bin/ruff check opencoderouter tests bench twisted
	$(VENV)/bin/mypy
	PYTHONDONTWRITEBYTECODE= PYTHONPATH=$(CURDIR) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

## Benchmarks against the targets, ours next to the Go router, pinned and not, PyPy reported (table +
## bench/results/*.json): make bench BENCH_ARGS=--quick (~5 min; full ~40 min; --no-pypy leaves PyPy out)
bench: deps system-deps opencode
	PYTHONPATH=$(CURDIR) $(PY) bench/run.py --pypy $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
