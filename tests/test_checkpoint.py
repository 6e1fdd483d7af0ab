"""Our checkpoint format: atomic, verified, keyed by name and block, loadable at another world size."""

import json
import os
from typing import Any

import pytest
import torch

from distopt.checkpoint import CheckpointError, complete_steps, load_checkpoint, save_checkpoint
from sharded_worker import build, run_sharded, train

FP64_TOL: dict[str, Any] = dict(rtol=1e-8, atol=5e-10)


def _run(tmp_path, **config):
    return train({"K": 2, "W": 1, **config}, 0, 1)


def test_resume_in_one_process_is_bit_identical(tmp_path):
    full = _run(tmp_path, steps=6, max_block=4)
    _run(tmp_path, steps=3, max_block=4, save_at=2, save=str(tmp_path))
    resumed = _run(tmp_path, start=3, steps=6, max_block=4, load=str(tmp_path))
    for a, b in zip(full["history"][-1], resumed["history"][-1], strict=True):
        assert torch.equal(a, b)
    assert resumed["counters"]["fop_folds"] > 0


def test_corrupt_or_partial_checkpoint_is_refused_and_the_previous_stays_usable(tmp_path):
    model, opt = build({"K": 2}, torch.float64, 1)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, opt, extra={"data_position": step})
    assert (tmp_path / "latest").read_text() == "step-2"
    blob = tmp_path / "step-2" / "optim-rank0.pt"
    blob.write_bytes(blob.read_bytes()[:-10])
    (tmp_path / ".tmp-step-3-deadbeef").mkdir()  # a crash mid-write leaves only this behind
    with pytest.raises(CheckpointError, match=r"optim-rank0.pt does not match its checksum.*steps \[1\]"):
        load_checkpoint(tmp_path, model, opt)
    assert complete_steps(tmp_path) == [1]
    manifest = load_checkpoint(tmp_path, model, opt, step=1)
    assert manifest["extra"] == {"data_position": 1}
    (tmp_path / "step-1" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path, model, opt, step=1)


def test_saving_mid_accumulation_is_refused(tmp_path):
    model, opt = build({"K": 2}, torch.float64, 1)
    opt.end_microstep()
    with pytest.raises(CheckpointError, match="mid-accumulation"):
        save_checkpoint(tmp_path, 0, model, opt)


def test_another_block_plan_is_refused(tmp_path):
    model, opt = build({"K": 2, "max_block": 4}, torch.float64, 1)
    save_checkpoint(tmp_path, 0, model, opt)
    model2, opt2 = build({"K": 2}, torch.float64, 1)
    with pytest.raises(CheckpointError, match="block plan differs"):
        load_checkpoint(tmp_path, model2, opt2)
    manifest = json.loads((tmp_path / "step-0" / "manifest.json").read_text())
    assert {b["key"] for b in manifest["blocks"]} >= {"l1.weight#0", "l1.weight#3"}


def test_resume_at_the_same_world_size_is_bit_identical(tmp_path):
    base = dict(K=2, W=2, global_batch=True, max_block=4)
    full = run_sharded(2, [{**base, "steps": 6}], str(tmp_path / "a"))
    run_sharded(2, [{**base, "steps": 3, "save_at": 2, "save": str(tmp_path / "ck")}], str(tmp_path / "b"))
    resumed = run_sharded(2, [{**base, "start": 3, "steps": 6, "load": str(tmp_path / "ck")}], str(tmp_path / "c"))
    for r in range(2):
        for a, b in zip(full[r][0]["history"][-1], resumed[r][0]["history"][-1], strict=True):
            assert torch.equal(a, b)


def test_four_then_two_then_three_ranks_continue_the_trajectory(tmp_path):
    """The global batch is the same at every world size; only summation order changes."""
    base = dict(K=2, global_batch=True, max_block=4)
    full = run_sharded(4, [{**base, "W": 4, "steps": 6}], str(tmp_path / "full"))
    ck = str(tmp_path / "ck")
    run_sharded(4, [{**base, "W": 4, "steps": 2, "save_at": 1, "save": ck}], str(tmp_path / "w4"))
    run_sharded(2, [{**base, "W": 2, "start": 2, "steps": 4, "load": ck, "save_at": 3, "save": ck}],
                str(tmp_path / "w2"))
    last = run_sharded(3, [{**base, "W": 3, "start": 4, "steps": 6, "load": ck}], str(tmp_path / "w3"))
    for a, b in zip(last[0][0]["history"][-1], full[0][0]["history"][-1], strict=True):
        torch.testing.assert_close(a, b, **FP64_TOL)
    assert complete_steps(ck) == [1, 3]


def test_a_replicated_optimizer_round_trips_too(tmp_path):
    from distopt import build_optimizer

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, build_optimizer({"name": "soap", "params": {"verbose": False}}, model.named_parameters())

    def train_steps(model, opt, steps):
        for s in steps:
            torch.manual_seed(s)
            model(torch.randn(8, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = make()
    train_steps(model, opt, range(6))
    model_a, opt_a = make()
    train_steps(model_a, opt_a, range(3))
    save_checkpoint(tmp_path, 2, model_a, opt_a)
    model_b, opt_b = make()
    assert load_checkpoint(tmp_path, model_b, opt_b)["optimizer"] == "SOAP"
    train_steps(model_b, opt_b, range(3, 6))
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    _, mlfop = build({"K": 2}, torch.float64, 1)
    with pytest.raises(CheckpointError, match="holds SOAP state; this run uses MLFOPSOAP"):
        load_checkpoint(tmp_path, torch.nn.Linear(4, 3), mlfop)


def test_keep_last_prunes_and_a_resave_never_loses_the_complete_step(tmp_path, monkeypatch):
    model, opt = build({"K": 2}, torch.float64, 1)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, opt, keep_last=2)
    assert complete_steps(tmp_path) == [3, 4]
    # re-saving step 4 crashes after the old copy was moved aside: step 4 is still there, and loads
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)  # the os module distopt.checkpoint calls
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(tmp_path, 4, model, opt)
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / "step-4").exists() and complete_steps(tmp_path) == [3, 4]
    assert load_checkpoint(tmp_path, model, opt)["step"] == 4


def _files(step_dir):
    """Every file's bytes, except DCP's .metadata: it records the save's own temporary path and a random
    save id (two synchronous saves differ there too), so it is compared without those, and the
    manifest without that file's hash and size."""
    import pickle

    out = {}
    for f in sorted(step_dir.rglob("*")):
        if f.name == ".metadata":
            meta = pickle.loads(f.read_bytes())
            out[str(f.relative_to(step_dir))] = (meta.state_dict_metadata, meta.planner_data, meta.storage_data)
        elif f.name == "manifest.json" and (step_dir / "model" / ".metadata").exists():
            manifest = json.loads(f.read_text())
            del manifest["files"]["model/.metadata"]
            out[f.name] = manifest
        elif f.is_file():
            out[str(f.relative_to(step_dir))] = f.read_bytes()
    return out


def test_async_saves_write_the_bytes_of_a_synchronous_save_and_resume_the_same(tmp_path):
    """Under both layouts (owners' blocks with a replicated model, and FSDP2 shards through DCP's
    async_save), the background save of step 2 writes its files only after step 3 changed every
    parameter and state (the worker holds its writes until then, and fails if a write comes from the
    training thread): every file equals the synchronous save's byte for byte (the manifest too, sha256
    included), and a run resumed from it continues the trajectory exactly."""
    base = dict(K=2, W=2, global_batch=True, max_block=4, steps=4, save_at=2)
    layouts = {"owners": {}, "fsdp2": {"fsdp": "fsdp"}}
    configs = [{**base, **extra, "save": str(tmp_path / f"{name}-{how}"), **({"save_async": True} if how == "async"
                                                                          else {})}
               for name, extra in layouts.items() for how in ("sync", "async")]
    # the configs run one after the other in each worker: the resumed runs load the finished async saves
    resumed = [{**base, **extra, "start": 3, "save_at": None, "load": str(tmp_path / f"{name}-async")}
               for name, extra in layouts.items()]
    results = run_sharded(2, configs + resumed, str(tmp_path / "run"))[0]
    for i, name in enumerate(layouts):
        sync, background = _files(tmp_path / f"{name}-sync" / "step-2"), _files(tmp_path / f"{name}-async" / "step-2")
        assert sync.keys() == background.keys() and len(sync) >= 3, (name, sorted(background))
        assert [f for f in sync if sync[f] != background[f]] == [], f"{name}: files differ from the synchronous save"
        assert complete_steps(tmp_path / f"{name}-async") == [2]
        for a, b in zip(results[len(configs) + i]["history"][-1], results[2 * i]["history"][-1], strict=True):
            assert torch.equal(a, b), f"{name}: resumed from the async save"


def test_a_full_disk_and_a_read_only_folder_fail_with_the_path_and_keep_the_newest_checkpoint(tmp_path):
    """Two ranks save to a real 256 KiB tmpfs (a private mount namespace; root, as the Slurm tests):
    filled up, every rank's synchronous and background save fails with the folder and 'no space left
    on device' instead of torch.save's C++ stream error; made read-only, with 'not writable'. Each
    time the temporary directory is gone and step 1 still loads on both ranks."""
    import subprocess
    import sys
    from pathlib import Path

    mount, out = tmp_path / "disk", tmp_path / "result"
    mount.mkdir()
    worker = Path(__file__).parent / "disk_worker.py"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=256k tmpfs "{mount}" && '
                           f'exec "{sys.executable}" "{worker}" "{mount}" "{out}"'],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        results = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        cases = {"full": (2, "no space left on device"), "full_async": (3, "no space left on device"),
                 "read_only": (4, "not writable (read-only file system)")}
        for case, (step, cause) in cases.items():
            got = results[case]
            assert got["error"] and f"cannot write the checkpoint of step {step} to {mount}" in got["error"] \
                and cause in got["error"] and "complete checkpoints (steps [1]) are unchanged" in got["error"], got
            assert [e for e in got["entries"] if e.startswith(".tmp")] == [], f"{case}: temporary directory left"
            assert got["complete"] == [1] and got["loaded"] == 1, got
