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

# 2 CPU ranks under the DeepSpeed launcher: tiny Emu3-style model, ML-FOP-SOAP, TensorBoard + PNG samples in runs/demo
demo: setup
	$(ENV) .venv/bin/deepspeed --num_gpus 2 launcher/run.py --config configs/emu3_tiny_mlfop.yaml \
	  --set run.out_dir=runs/demo --set checkpoint.resume=none
	@echo "TensorBoard: .venv/bin/tensorboard --logdir runs/demo/tensorboard; samples: runs/demo/samples/"

