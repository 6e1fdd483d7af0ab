"""The prepared GPU check (scripts/gpu_check.sh -> benchmarks/gpu_check.py) runs end to end on the CPU in
its smoke size, so the script a lent GPU machine will run is known to work before it gets there."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [a["arm"] for a in report["arms"]] == ["adamw", "soap", "mlfop_soap"]
    mlfop = report["arms"][2]
    assert report["mlfop_loss_falls"] and mlfop["counters"]["fop_folds"] > 0 and mlfop["counters"]["eigh"] > 0
    assert report["arms"][1]["counters"]["fop_folds"] == 0, "the SOAP arm is ML-FOP-SOAP with fop off"
    assert "| mlfop_soap |" in (tmp_path / "gpu_check.md").read_text()
