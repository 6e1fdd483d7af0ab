"""Rank discovery for processes that Slurm's `srun` starts directly, one per GPU, with no launcher
process and no ssh between nodes (scripts/slurm/train_deepspeed.sbatch; docs/cluster.md says why).

DeepSpeed's `init_distributed` reads the env:// variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and otherwise asks MPI; an srun task has neither, only its step's SLURM_* variables.
`srun_env` translates them. The rendezvous port comes from the job id, so two jobs sharing a node do
not collide on a fixed port, and every task of a job computes the same one without talking.

    python -m launcher.cluster      prints the job's rendezvous HOST:PORT (for torchrun's --rdzv_endpoint)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# Ports 20000-29999: above the registered services most nodes run, below Linux's ephemeral range
# (32768-60999), from which the kernel picks the source port of every outgoing connection.
PORT_BASE, PORT_SPAN = 20000, 10000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist, as `scontrol show hostnames` lists it first:
    "gpu[003-010,012],cpu1" -> "gpu003"; "rack[1-2]-n[08-09]" -> "rack1-n08"."""
    head = re.split(r",(?![^\[]*\])", nodelist.strip(), maxsplit=1)[0]  # first item, commas in [] kept
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], head)


def job_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: PORT_BASE + job_id mod PORT_SPAN."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _need(env: Mapping[str, str], name: str) -> str:
    if not env.get(name):
        raise RuntimeError(f"{name}: not set, though SLURM_STEP_ID is (an srun task); set RANK, LOCAL_RANK, "
                           "WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each task instead")
    return env[name]


def rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT): given values win; otherwise the first node of the step (where srun
    places task 0) or of the job, and the job's port."""
    addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or _need(env, "SLURM_JOB_NODELIST"))
    port = env.get("MASTER_PORT") or job_port(_need(env, "SLURM_JOB_ID"))
    if not str(port).isdigit() or not 0 < int(port) < 65536:
        raise RuntimeError(f"MASTER_PORT: {port!r} is invalid: not a port in 1-65535; unset it to use the "
                           f"job's port ({PORT_BASE} + SLURM_JOB_ID mod {PORT_SPAN})")
    return addr, int(port)


def srun_env(env: Mapping[str, str]) -> dict[str, str]:
    """The env:// variables of an srun task (SLURM_STEP_ID set), from its step's SLURM_* variables;
    empty outside srun, in a one-task step (`srun --pty bash`: a world of one needs no rendezvous and
    keeps its free local port), or when a launcher already named the ranks: deepspeed/torchrun set
    RANK, and under mpirun the ranks are MPI's while Slurm's variables describe MPI's daemons."""
    # imported here, not at the top: `python -m launcher.cluster` (the sbatch scripts) needs no torch
    from distopt.deepspeed_glue import LAUNCHER_RANK_VARIABLES

    if "SLURM_STEP_ID" not in env or env.get("SLURM_STEP_NUM_TASKS") == "1" \
            or any(k in env for k in LAUNCHER_RANK_VARIABLES):
        return {}
    addr, port = rendezvous(env)
    return {"RANK": _need(env, "SLURM_PROCID"), "LOCAL_RANK": _need(env, "SLURM_LOCALID"),
            "WORLD_SIZE": _need(env, "SLURM_STEP_NUM_TASKS"), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def launch_world_size(env: Mapping[str, str]) -> int:
    """The number of processes the launcher started, from the environment alone (before the process
    group): WORLD_SIZE (deepspeed, torchrun, srun_env), MPI's (Open MPI, MPICH / Hydra, PMIx), else 1."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if str(env.get(name, "")).isdigit():
            return int(env[name])
    return 1


if __name__ == "__main__":
    host, port = rendezvous(os.environ)
    print(f"{host}:{port}")
