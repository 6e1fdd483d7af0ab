"""Which torch build `make setup` installs and checks: the CPU wheel (CI, laptops: the default), or a
CUDA build where a GPU is visible. Printed for scripts/setup.sh; `choose` is tested without a GPU.

    python scripts/torch_build.py        # prints cpu or cuda

A GPU is visible when the NVIDIA driver's device files exist (/dev/nvidia0, ...) or nvidia-smi is on
the PATH. DISTOPT_TORCH_BUILD=cpu|cuda overrides the guess.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Optional

BUILDS = ("cpu", "cuda")


def choose(gpu_visible: bool, override: Optional[str] = None) -> str:
    """The build to install: the override when given (it must be one of BUILDS), else cuda where a GPU
    is visible and cpu elsewhere."""
    if override:
        if override not in BUILDS:
            raise ValueError(f"DISTOPT_TORCH_BUILD={override!r} is invalid: choose one of {BUILDS}")
        return override
    return "cuda" if gpu_visible else "cpu"


def gpu_visible() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def check(build: str, version: str, cuda: Optional[str], expected: str) -> Optional[str]:
    """An error message when the installed torch is not the build asked for, else None."""
    if not version.startswith(expected):
        return f"torch {version} is installed, the project pins {expected} (constraints.txt)"
    if build == "cpu" and cuda is not None:
        return (f"torch {version} is a CUDA build on a machine without a visible GPU: reinstall the CPU wheel, "
                "or set DISTOPT_TORCH_BUILD=cuda if this machine has a GPU")
    if build == "cuda" and cuda is None:
        return (f"torch {version} is a CPU build on a machine with a GPU: install the CUDA build "
                "(pip install torch==2.13.0 from PyPI), or set DISTOPT_TORCH_BUILD=cpu")
    return None


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        import torch

        error = check(sys.argv[2], torch.__version__, torch.version.cuda, sys.argv[3])
        if error:
            sys.exit(f"make setup: {error}")
    else:
        print(choose(gpu_visible(), os.environ.get("DISTOPT_TORCH_BUILD")))
