"""Real launchers (deepspeed, torchrun, mpiexec) run a short sharded training end to end, and faults
end runs instead of hanging them."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distopt.deepspeed_glue import prepare_config
from sharded_worker import train

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = str(ROOT / "tests" / "launch_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=240, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_against_reference(out: Path, steps=4, k=2):
    ref = train(dict(K=k, W=1, global_batch=True, max_block=4, steps=steps), 0, 1)
    got = torch.load(out / "params.pt", weights_only=True)
    for a, b in zip(got, ref["history"][-1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=5e-10)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world"] == 2 and stats["counters"]["fop_folds"] > 0
    return stats


def test_deepspeed_launcher_with_the_engine(tmp_path):
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT,
         "--out", str(tmp_path), "--engine", "deepspeed"], env={"DS_ACCELERATOR": "cpu"})
    stats = check_against_reference(tmp_path)
    assert stats["allreduce_calls"] == 0, "the engine's own gradient all-reduce must stay off"
    assert stats["sent"]["reduce_scatter"] > 0 and stats["sent"]["all_gather"] > 0


def test_torchrun(tmp_path):
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT,
         "--out", str(tmp_path), "--engine", "plain"])
    check_against_reference(tmp_path)


def test_mpiexec_with_mpi4py_discovery(tmp_path):
    run([str(BIN / "mpiexec"), "-n", "2", sys.executable, SCRIPT, "--out", str(tmp_path), "--engine", "plain"],
        env={"MASTER_PORT": str(free_port())})
    check_against_reference(tmp_path)


def test_a_killed_rank_makes_the_others_exit(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--out", str(tmp_path), "--engine", "plain", "--steps", "6",
                               "--die-at", "2", "1"], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    start = time.monotonic()
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes[1] == 17
    assert codes[0] != 0, "the surviving rank must fail, not finish or hang"
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("cfg,match", [
    ({"zero_optimization": {"stage": 2}}, r"zero_optimization.stage=2.*flat 1-D partitions.*Use stage 0"),
    ({"fp16": {"enabled": True}}, r"fp16.enabled.*torch_autocast"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled.*torch_autocast"),
    ({"optimizer": {"type": "AdamW"}}, r"remove the 'optimizer' block"),
])
def test_bad_deepspeed_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        prepare_config(cfg, "mlfop_soap")


def test_clipping_moves_into_the_optimizer():
    cfg, clip = prepare_config({"gradient_clipping": 1.5, "zero_optimization": {"stage": 0}}, "mlfop_soap")
    assert clip == 1.5 and cfg["gradient_clipping"] == 0.0
    cfg, clip = prepare_config({"gradient_clipping": 1.5}, "adamw")
    assert clip is None and cfg["gradient_clipping"] == 1.5, "other optimizers keep DeepSpeed's clipping"
