"""benchmarks/convergence.py: --smoke writes a well-formed table, JSON and plots (not a check of the
numbers), every arm of the full benchmark is a valid optimizer config, and the lr sweep takes the
decisions its docstring promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import convergence  # noqa: E402
from distopt import build_optimizer  # noqa: E402

INF = float("inf")


def test_every_arm_is_a_valid_config_and_builds(tmp_path):
    """The smoke run trains one arm per kind of optimizer; the others must at least be right."""
    mode = convergence.MODES["full"]
    model = torch.nn.Linear(4, 4)
    for arm, (name, params) in convergence.ARMS.items():
        for family in mode.families:
            cfg = convergence.run_config(mode, family, arm, mode.ks[-1], 1e-2, 0, str(tmp_path), str(tmp_path))
            assert cfg.optimizer.name == name
        build_optimizer({"name": name, "params": {**params, "lr": 1e-2}}, model.named_parameters())
    smoke = convergence.MODES["smoke"]
    assert {convergence.ARMS[a][0] for a in smoke.arm_names} == {name for name, _ in convergence.ARMS.values()}
    full = convergence.MODES["full"]
    assert full.steps >= 300 and full.seeds >= 5 and full.points >= 5 and max(full.ks) >= 8 * min(full.ks)


def test_sweep_brackets_the_best_then_finds_where_it_stops_converging():
    def tried(finals, conv=None):  # grid index -> (final loss, converged)
        return {i: (v, True if conv is None else conv[i]) for i, v in finals.items()}

    assert convergence.initial_indices(5) == [-2, -1, 0, 1, 2] and convergence.initial_indices(2) == [-1, 0]
    assert convergence.next_index(tried({-1: 2.0, 0: 1.5, 1: 1.0}), 10) == 2, "best at the top edge: go up"
    assert convergence.next_index(tried({-1: 1.0, 0: 1.5, 1: 2.0}), 10) == -2, "best at the bottom edge: go down"
    assert convergence.next_index(tried({-1: 2.0, 0: 1.0, 1: 1.5}), 10) == 2, "bracketed, all converge: find the edge"
    diverged = tried({-1: 2.0, 0: 1.0, 1: INF}, {-1: True, 0: True, 1: False})
    assert convergence.next_index(diverged, 10) is None, "bracketed, and the edge is found"
    assert convergence.next_index(tried({-1: 2.0, 0: 1.5, 1: 1.0}), 3) is None, "the cap"
    assert convergence.converging_range(tried({-2: 3.0, -1: 2.0, 0: 1.0, 1: INF, 2: 1.2},
                                              {-2: False, -1: True, 0: True, 1: False, 2: True})) == (-1, 0)
    assert convergence.lr_at(1e-2, 1) == pytest.approx(1e-2 * 2 ** 0.5, rel=1e-3)
    assert convergence.grid_index(convergence.MODES["full"], convergence.lr_at(1e-2, -3)) == -3


def test_fop_size_is_averaged_over_the_logged_steps_that_have_it():
    history = {"fop": [{"step": 0}, {"step": 5, "correction_mean": 0.2, "cosine_sq_mean": 0.01, "eta_mean": 0.9,
                                     "beta_abs_mean": 0.5},
                       {"step": 10, "correction_mean": 0.4, "cosine_sq_mean": 0.03, "eta_mean": 0.8,
                        "beta_abs_mean": 0.7}]}
    means = convergence.fop_means(history)
    assert means == pytest.approx({"fop_correction": 0.3, "fop_cosine_sq": 0.02, "fop_eta": 0.85, "fop_beta_abs": 0.6})
    assert convergence.fop_means({"fop": [{"step": 0}]}) == dict.fromkeys(means)  # SOAP, AdamW: no FOP


def test_processes_sharing_one_store_keep_each_others_runs(tmp_path):
    """Split work (--arm/--batch) writes one JSON: a save takes in what another process wrote."""
    path, settings = tmp_path / "convergence.json", {"mode": "full"}
    first, second = convergence.Store(path, settings, {"host": "a"}), convergence.Store(path, settings, {"host": "b"})
    first.add("emu3|AdamW|K2|lr0.01|seed0", {"val": [1]})
    second.add("emu3|SOAP|K16|lr0.01|seed0", {"val": [2]})
    first.add("emu3|AdamW|K2|lr0.01|seed1", {"val": [3]})
    on_disk = json.loads(path.read_text())
    assert set(on_disk["runs"]) == {"emu3|AdamW|K2|lr0.01|seed0", "emu3|SOAP|K16|lr0.01|seed0",
                                    "emu3|AdamW|K2|lr0.01|seed1"}
    assert on_disk["environments"] == [{"host": "a"}, {"host": "b"}]
    with pytest.raises(SystemExit, match="other settings"):
        convergence.Store(path, {"mode": "quick"}, {"host": "a"})


def test_smoke_mode_writes_markdown_json_and_plots(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--smoke", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mode = convergence.MODES["smoke"]
    batches = [str(mode.micro * k) for k in mode.ks]

    def no_constant(name):
        raise ValueError(f"non-finite {name} in the JSON")

    data = json.loads((tmp_path / "convergence-smoke.json").read_text(), parse_constant=no_constant)
    assert data["settings"]["mode"] == "smoke" and data["environments"][0]["threads"] == 1
    text = (tmp_path / "convergence-smoke.md").read_text()
    sections = text.split("\n## ")
    assert [s.splitlines()[0] for s in sections[1:]] == [
        "Stability (lr sweep, seed 0, emu3)",
        "emu3: steps to target and final losses at each arm's best lr",
        "janus: steps to target and final losses at each arm's best lr"]
    for section in sections[1:]:
        rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| arm")]
        cells = {(r.split("|")[1].strip(), r.split("|")[2].strip()): r for r in rows}
        for arm in mode.arm_names:
            for batch in batches:
                row = cells.get((arm, batch))
                assert row is not None, (arm, batch, section[:40])
                assert "nan" not in row.lower() and "failed" not in row, row
        for row in rows:
            assert row.count("|") == rows[0].count("|"), row
    runs = data["runs"]
    for family in mode.families:
        for arm in mode.arm_names:
            for k in mode.ks:
                record = runs[convergence.key(family, arm, k, mode.lr_center, 0)]
                assert record["val"] and record["failed"] is None
                assert "fop_correction" in record and (arm == "ML-FOP-SOAP" or record["fop_correction"] is None)
    assert data["summary"]["arms"]["SOAP"]["K2"]["best_lr"] == mode.lr_center
    for png in ("convergence-curves-smoke.png", "convergence-sweep-smoke.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report-only rewrites the same tables from the stored runs without training (no seconds: nothing ran)
    (tmp_path / "convergence-smoke.md").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--smoke", "--report-only",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewritten = (tmp_path / "convergence-smoke.md").read_text()
    assert rewritten.split("\n", 3)[3] == text.split("\n", 3)[3] and "this session" not in rewritten
