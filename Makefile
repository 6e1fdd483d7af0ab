# `make test` and `make demo` work on a fresh machine: both set up .venv first if needed.
SHELL := /bin/bash
PY := .venv/bin/python
ENV := source scripts/env.sh &&

.PHONY: setup test demo bench
setup:
	bash scripts/setup.sh

test: setup
	$(ENV) $(PY) -m pytest -q -p no:cacheprovider --durations=10 tests/

demo: setup
	$(ENV) $(PY) scripts/demo.py

bench: setup
	$(ENV) $(PY) benchmarks/optimizer_step.py
