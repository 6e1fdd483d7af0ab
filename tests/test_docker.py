"""The cluster image, validated without a Docker engine: hadolint (a real linter) and a parser."""

import subprocess
import sys
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_has_cuda_pinned_dependencies_and_no_ssh_server():
    parser = DockerfileParser(path=str(DOCKERFILE))
    assert parser.baseimage.startswith("nvidia/cuda:") and "devel" in parser.baseimage, "nvcc for DeepSpeed's JIT ops"
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    for tool in ("pdsh", "openssh-server"):  # ranks start by srun or torchrun (docs/cluster.md), never over ssh
        assert tool not in runs
    assert not any(i["instruction"] == "EXPOSE" for i in parser.structure)
    assert "pip install -c constraints.txt -r requirements.txt" in runs
    copies = [i["value"] for i in parser.structure if i["instruction"] == "COPY"]
    assert copies[0] == "requirements.txt constraints.txt ./", "pinned dependencies are installed before the code"
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in pins), pins
    assert "launcher/run.py" in parser.structure[-1]["value"]
