# Environment shared by `make test`, `make demo` and CI: CPU DeepSpeed on gloo, one thread per rank,
# nothing fetched from a hub at run time.
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
