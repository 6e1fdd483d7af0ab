# `make test` and `make demo` work on a fresh machine: both set up .venv first if needed.
SHELL := /bin/bash
PY := .venv/bin/python
ENV := source scripts/env.sh &&

.PHONY: setup services test demo
setup:
	bash scripts/setup.sh

services:
	bash scripts/setup_test_services.sh

test: setup services
	$(ENV) $(PY) -m pytest -q -p no:cacheprovider --durations=10 tests/

demo: setup
	$(ENV) $(PY) scripts/demo.py

