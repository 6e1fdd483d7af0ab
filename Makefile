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
	bash scripts/check.sh
	$(ENV) $(PY) -m pytest -q -p no:cacheprovider --durations=10 tests/

# 2 CPU ranks under the DeepSpeed launcher: the tiny Emu3 learns captioned digits with ML-FOP-SOAP; prints the
# digit judge's accuracy on its generated digits; TensorBoard + labelled PNG samples in runs/demo
demo: setup
	$(ENV) .venv/bin/deepspeed --num_gpus 2 launcher/run.py --config configs/demo.yaml
	@echo "TensorBoard: .venv/bin/tensorboard --logdir runs/demo/tensorboard; samples: runs/demo/samples/step-250.png"

