#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv) on a CPU machine.
# torch is pinned by constraints.txt to the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.distopt-setup-done
if [ -f "$stamp" ] && [ "$stamp" -nt requirements.txt ] && [ "$stamp" -nt setup.py ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
DS_BUILD_OPS=0 .venv/bin/pip install -q -c constraints.txt -r requirements.txt
.venv/bin/pip install -q -c constraints.txt --no-deps -e .
source scripts/env.sh  # the extensions folder, and the venv's ninja (the one every later run finds)
# DeepSpeed JIT-builds a small shared-memory comm op on first launch (~50 s); build it once here.
.venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, torch.__version__
PY
touch "$stamp"
