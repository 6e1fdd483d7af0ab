"""scripts/torch_build.py: which torch build `make setup` installs and accepts, decided without a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import torch_build  # noqa: E402


def test_the_build_follows_the_gpu_unless_overridden():
    assert torch_build.choose(gpu_visible=False) == "cpu"
    assert torch_build.choose(gpu_visible=True) == "cuda"
    assert torch_build.choose(gpu_visible=True, override="cpu") == "cpu"
    assert torch_build.choose(gpu_visible=False, override="cuda") == "cuda"
    with pytest.raises(ValueError, match=r"DISTOPT_TORCH_BUILD='rocm' is invalid: choose one of \('cpu', 'cuda'\)"):
        torch_build.choose(gpu_visible=False, override="rocm")


@pytest.mark.parametrize("build,version,cuda,error", [
    ("cpu", "2.13.0+cpu", None, None),
    ("cuda", "2.13.0+cu128", "12.8", None),
    ("cpu", "2.13.0", "12.8", "a CUDA build on a machine without a visible GPU"),
    ("cuda", "2.13.0+cpu", None, "a CPU build on a machine with a GPU"),
    ("cpu", "2.12.1+cpu", None, "the project pins 2.13.0"),
])
def test_the_installed_torch_is_checked_against_the_build(build, version, cuda, error):
    found = torch_build.check(build, version, cuda, "2.13.0")
    assert (found is None) if error is None else (error in found), found


def test_this_machine_gets_the_cpu_build_and_has_it():
    """The CI machines have no GPU: the script says cpu, and the venv's torch passes the check."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_build.py")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, check=True).stdout.strip()
    assert out == ("cuda" if torch_build.gpu_visible() else "cpu")
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_build.py"), "--check", out, "2.13.0"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
