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
from launcher.cluster import PORT_BASE, PORT_SPAN, first_host, job_port, srun_env
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
    for a, b in zip(got, ref["history"][-1], strict=True):
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
    # DeepSpeed's CPU shared-memory all-reduce ran (the launcher sets LOCAL_SIZE), still sums after
    # init_distributed unlinked its /dev/shm files, and left none of them behind (69 MB per rank)
    assert stats["shm_op"] and stats["summed"] == [3.0]
    left = [f for f in stats["shm_files"] if os.path.exists(f)]
    assert not left, f"shared memory left in /dev/shm: {left}"


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


HOSTLISTS = ["vm", "gpu[003-010,012],cpu1", "rack[1-2]-n[08-09]", "a-[7],b", "node[5,1-3]", "x1,x[0-2]"]


def test_first_host_is_the_one_scontrol_lists_first(tmp_path):
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    for nodelist in HOSTLISTS:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                               env={**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")}).stdout.split()
        assert first_host(nodelist) == hosts[0], nodelist


SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[01-10]",
             "SLURM_JOB_ID": "1234567"}


def test_srun_tasks_take_ranks_and_rendezvous_from_slurm():
    assert srun_env(SRUN_TASK) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
                                   "MASTER_PORT": str(PORT_BASE + 4567)}, "the step's tasks and node, not the job's"
    given = srun_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29400")
    assert {job_port(str(j)) for j in range(3 * PORT_SPAN)} == set(range(PORT_BASE, PORT_BASE + PORT_SPAN))
    assert PORT_BASE + PORT_SPAN <= 32768, "below Linux's ephemeral ports"
    # not an srun task (the batch script itself), a one-task step, or a launcher already named the ranks
    assert srun_env({k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}) == {}
    assert srun_env({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == {}
    for launcher_var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        assert srun_env({**SRUN_TASK, launcher_var: "0"}) == {}, launcher_var
    with pytest.raises(RuntimeError, match=r"MASTER_PORT: 'http' is invalid: not a port in 1-65535; unset it"):
        srun_env({**SRUN_TASK, "MASTER_PORT": "http"})
    with pytest.raises(RuntimeError, match=r"SLURM_PROCID: not set, though SLURM_STEP_ID is.*set RANK, LOCAL_RANK"):
        srun_env({k: v for k, v in SRUN_TASK.items() if k != "SLURM_PROCID"})


def cluster_env(env: dict) -> subprocess.CompletedProcess:
    """scripts/slurm/cluster_env.sh as the sbatch scripts source it, outside a job (rendezvous given)."""
    script = "set -euo pipefail; source scripts/slurm/cluster_env.sh; procs=$(procs_per_node); " \
             "echo $procs $rendezvous $NCCL_DEBUG $TORCH_NCCL_ASYNC_ERROR_HANDLING $DEEPSPEED_TIMEOUT"
    ours = ("SLURM_", "NCCL_", "TORCH_NCCL_", "DEEPSPEED_", "DISTOPT_")
    outside = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**outside, "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_ADDR": "gpu01",
                               "MASTER_PORT": "24242", **env})


def test_slurm_cluster_env_takes_the_jobs_gpus_keeps_given_values_and_refuses_bad_counts():
    assert cluster_env({"SLURM_GPUS_PER_NODE": "h100:4"}).stdout.split() == ["4", "gpu01:24242", "WARN", "1", "30"]
    given = cluster_env({"DISTOPT_PROCS_PER_NODE": "3", "SLURM_GPUS_PER_NODE": "8", "NCCL_DEBUG": "INFO",
                         "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "DEEPSPEED_TIMEOUT": "5"})
    assert given.stdout.split() == ["3", "gpu01:24242", "INFO", "3", "5"]
    bad = cluster_env({"DISTOPT_PROCS_PER_NODE": "eight"})
    assert bad.returncode != 0 and "processes per node: 'eight' is invalid: not a positive integer; set " \
        "DISTOPT_PROCS_PER_NODE" in bad.stderr, bad.stderr


def test_process_group_timeout_is_deepspeed_timeout_minutes():
    code = ("import torch, torch.distributed as dist; from distopt.deepspeed_glue import init_distributed; "
            "init_distributed(); group = dist.distributed_c10d._get_default_group(); "
            "print('timeout', group._get_backend(torch.device('cpu')).options._timeout.total_seconds()); "
            "dist.destroy_process_group()")
    proc = run([sys.executable, "-c", code], env={"DEEPSPEED_TIMEOUT": "3"})
    assert "timeout 180.0" in proc.stdout, proc.stdout[-2000:]


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
