# AIOS mesh. Two commands do everything on a fresh machine:
#   make demo   - build, start the embedded stack and every service, run support triage, stop
#   make test   - build and run every test (unit, integration, e2e, chaos)
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
STAMP := $(VENV)/.installed
GEN := gen
PROTOS := $(wildcard proto/aiosmesh/v1/*.proto)
GEN_STAMP := $(GEN)/.stamp
MODEL := .cache/intent-classifier.joblib

.PHONY: all install gen model demo up down status test test-unit test-integration test-e2e lint bench clean

all: install

$(STAMP): constraints.txt requirements.in pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found. Install CPython 3.11 (e.g. apt-get install python3.11 python3.11-venv) or run: make PY=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade-strategy only-if-needed -c constraints.txt -r requirements.in
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# Generated into a scratch folder and swapped in, so a running process never sees half a package.
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf $(GEN).tmp && mkdir -p $(GEN).tmp
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GEN).tmp --pyi_out=$(GEN).tmp --grpc_python_out=$(GEN).tmp $(PROTOS)
	touch $(GEN).tmp/aiosmesh/__init__.py $(GEN).tmp/aiosmesh/v1/__init__.py
	rm -rf $(GEN).old && { test ! -d $(GEN) || mv $(GEN) $(GEN).old; } && mv $(GEN).tmp $(GEN) && rm -rf $(GEN).old
	echo "$(CURDIR)/$(GEN)" > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/aiosmesh-gen.pth
	touch $@

install: $(STAMP) $(GEN_STAMP)

gen: $(GEN_STAMP)

# The intent classifier is fitted once on BANKING77 (minus a held-out part) and cached.
$(MODEL): | $(STAMP)
	$(BIN)/python -m services.inference.fit

model: install $(MODEL)

demo: install $(MODEL)
	$(BIN)/python -m tools.demo

up: install $(MODEL)
	$(BIN)/python -m infra.stack up

down:
	@test -x $(BIN)/python && $(BIN)/python -m infra.stack down || echo "nothing to stop"

status: install
	$(BIN)/aios status

test: install $(MODEL)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy services/planner/domain services/policy/domain services/observability/domain services/memory/domain.py services/executor/domain

bench: install $(MODEL)
	$(BIN)/python -m tools.bench.run

clean:
	rm -rf $(GEN) .run
