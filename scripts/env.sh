# Environment shared by `make test`, `make demo` and CI: DeepSpeed on gloo where no GPU is visible, one thread per rank,
# nothing fetched from a hub at run time.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
# DeepSpeed on the CPU (gloo) unless a GPU is visible (scripts/torch_build.py's rule) or DS_ACCELERATOR is set
if [ -z "${DS_ACCELERATOR:-}" ] && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null; then
  export DS_ACCELERATOR=cpu
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"
# The venv's bin first: DeepSpeed's JIT op is built by whichever `ninja` PATH finds, and the Slurm
# batch script activates the venv. Two ninja versions (the venv's 1.13, a system 1.11) read each
# other's build log as invalid and rebuild the op (~25 s) on every switch.
export PATH="$PWD/.venv/bin:$PATH"
