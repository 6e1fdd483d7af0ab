#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv). torch is pinned by constraints.txt; on a
# machine without a visible GPU that is the CPU wheel (an unpinned torch pulls a multi-GB CUDA build), on a
# GPU machine the CUDA build (scripts/torch_build.py decides; DISTOPT_TORCH_BUILD=cpu|cuda overrides).
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
# DeepSpeed's CPU accelerator JIT-builds a small shared-memory comm op on first launch (~50 s); build it once here.
if [ "${DS_ACCELERATOR:-}" = cpu ]; then
  .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
fi
.venv/bin/python scripts/torch_build.py --check "$(python3 scripts/torch_build.py)" 2.13.0
touch "$stamp"
