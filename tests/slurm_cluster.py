"""A real single-node Slurm cluster (munged, slurmctld, slurmd) in a temporary directory."""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from launcher.cluster import PORT_BASE, PORT_SPAN

CONF = """ClusterName=distopt-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={tmp}/ctld
SlurmdSpoolDir={tmp}/d
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
FirstJobId={first_job_id}
"""


def free_job_port() -> int:
    """A free port in the range Slurm jobs rendezvous on (launcher/cluster.py); a cluster started with
    first_job_id=port - PORT_BASE + PORT_SPAN gives its first job that port."""
    for port in random.sample(range(PORT_BASE, PORT_BASE + PORT_SPAN), 200):
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {PORT_BASE}-{PORT_BASE + PORT_SPAN - 1}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, tmp: Path, first_job_id: int = 1):
        self.tmp = tmp
        (tmp / "ctld").mkdir(parents=True)
        (tmp / "d").mkdir()
        host = socket.gethostname().split(".")[0]
        conf = CONF.format(host=host, tmp=tmp, cpus=os.cpu_count(), ctld_port=_free_port(), d_port=_free_port(),
                           first_job_id=first_job_id)
        (tmp / "slurm.conf").write_text(conf)
        self.env = {**os.environ, "SLURM_CONF": str(tmp / "slurm.conf")}
        self.munge_socket = tmp / "munge.socket"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> SlurmCluster:
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--pid-file={self.tmp}/munged.pid", f"--log-file={self.tmp}/munged.log",
                     f"--seed-file={self.tmp}/munged.seed"])
        # cred_expire: how long a requeued job waits before it may start again (Slurm's default, 120 s)
        (self.tmp / "slurm.conf").write_text((self.tmp / "slurm.conf").read_text() +
                                             f"AuthInfo=socket={self.munge_socket},cred_expire=10\n")
        self._wait(lambda: self.munge_socket.exists(), "munged socket")
        self._spawn(["slurmctld", "-D"])
        self._spawn(["slurmd", "-D"])
        self._wait(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%T"]).stdout, "an idle node")
        return self

    def _spawn(self, cmd):
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))

    def _wait(self, cond, what, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in self.tmp.glob("*.log"))
        raise TimeoutError(f"Slurm: no {what} after {timeout}s\n{logs}")

    def run(self, cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)

    def submit(self, args: list[str], cwd: Path, env: dict) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **env}, cwd=cwd,
                             capture_output=True, text=True, check=True).stdout
        return out.strip().split(";")[0]

    def wait_job(self, job: str, timeout: int) -> str:
        state = ""

        def done():
            nonlocal state
            out = self.run(["scontrol", "show", "job", job]).stdout
            match = re.search(r"JobState=(\S+)", out)
            state = match.group(1) if match else state
            return state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

        self._wait(done, f"end of job {job}", timeout)
        return state

    def stop(self) -> None:
        # Jobs run under slurmstepd, outside the daemons' process groups: cancel them first, or a job that
        # has not ended (a failed or timed-out test) keeps its ranks running after the cluster is gone.
        self.run(["scancel", "--user", getpass.getuser()])
        with contextlib.suppress(TimeoutError):
            self._wait(lambda: not self.run(["squeue", "-h"]).stdout.strip(), "end of the cancelled jobs", timeout=30)
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
