"""benchmarks/convergence.py --quick produces a well-formed table and its plots (not a check of the numbers)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_convergence_benchmark_writes_its_table_and_plots(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "convergence-quick.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| optimizer")
            and not line.startswith("| variant")]
    main = [r for r in rows if r.count("|") == 12]
    ablations = [r for r in rows if r.count("|") == 5]
    assert sorted(r.split("|")[1].strip() for r in main) == sorted(["AdamW", "SOAP", "ML-FOP-SOAP"] * 2)
    assert {r.split("|")[1].strip() for r in ablations} >= {"FOP off", "level head", "level global", "eta sum"}
    for row in main + ablations:
        assert "nan" not in row.lower()
    for png in ("convergence-curves-quick.png", "convergence-steps-quick.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
