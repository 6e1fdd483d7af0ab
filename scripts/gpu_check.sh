#!/usr/bin/env bash
# The prepared one-GPU check (issue: GPU clusters for real): CUDA, an NCCL world of one, bf16.
# The tiny configs through the launcher (when DeepSpeed and datasets are there) and a ~1B-parameter
# Llama-shaped model with K = 8 micro-steps of 4k tokens: step time and peak memory for AdamW, SOAP and
# ML-FOP-SOAP side by side, and a check that ML-FOP-SOAP's loss falls. Under 8 minutes on an H100.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          (default: $OUT if set, else runs/gpu_check)
#
# A machine without DeepSpeed or datasets installs them from wheels in .whl/ when that folder exists
# (e.g. `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8 -w .whl`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} TORCH_NCCL_ASYNC_ERROR_HANDLING=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 benchmarks/gpu_check.py --out "$out"
