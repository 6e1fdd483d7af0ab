"""Jobs that survive the cluster, with real processes: a signal stops every rank at the same step
boundary with a checkpoint of that step and a documented exit code; a repeat or the deadline exits at
once and keeps the newest complete checkpoint; torchrun restarts a killed worker from the newest
checkpoint; a Slurm job (the DeepSpeed batch script, background checkpoints) stopped by USR1 is
requeued and completes. Every interrupted run is held against one uninterrupted 2-rank run: every
loss it logged, in every attempt, equals that run's at the same step, bit for bit, and so do the
final weights."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distopt.checkpoint import complete_steps, load_checkpoint
from launcher.cluster import PORT_BASE, PORT_SPAN, job_port
from launcher.preemption import EXIT_ABORTED, EXIT_NO_REQUEUE, EXIT_STOPPED, REPEAT_WINDOW_S
from sharded_worker import build
from slurm_cluster import SlurmCluster, free_job_port
from test_launchers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = str(ROOT / "launcher" / "run.py")
CONFIG = "configs/emu3_tiny_mlfop.yaml"
STEPS = 10
LOSSES = ("loss/text", "loss/image")


def settings(out: Path, cache: Path, extra=()) -> list[str]:
    args = [f"run.out_dir={out}", f"data.cache_dir={cache}", f"schedule.steps={STEPS}", "schedule.warmup_steps=1",
            "logging.every=1", "logging.progress=false", "eval.every=0", "checkpoint.every=3",
            "batch.micro_batch_size=4", *extra]
    return [a for kv in args for a in ("--set", kv)]


@pytest.fixture(scope="module")
def cache(digits_cache):
    return digits_cache


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """The uninterrupted run: two ranks started as srun starts them (env:// variables, no launcher)."""
    out = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    with contextlib.ExitStack() as logs_open:
        logs = [logs_open.enter_context(open(out / f"rank{r}.log", "w")) for r in range(2)]
        ranks = [subprocess.Popen([sys.executable, RUN, "--config", CONFIG, *settings(out, cache)], cwd=ROOT,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=logs[r],
                                  stderr=subprocess.STDOUT) for r in range(2)]
        try:
            codes = [p.wait(timeout=300) for p in ranks]
        finally:
            for p in ranks:
                p.kill()
    assert codes == [0, 0], (out / "rank0.log").read_text()[-3000:]
    return out


def logged(out: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of `tag` in every events file: each process writes its own."""
    values = []
    for events in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return values


def assert_same_run(out: Path, reference: Path) -> None:
    """Every loss `out` logged, in any attempt, equals the uninterrupted run's at that step (bitwise);
    every step was logged; the final checkpoints hold the same weights."""
    for tag in LOSSES:
        want = dict(logged(reference, tag))
        got = logged(out, tag)
        assert {step for step, _ in got} == set(want) == set(range(STEPS)), tag
        assert [(step, v, want[step]) for step, v in got if v != want[step]] == [], tag
    final = Path("checkpoints") / f"step-{STEPS - 1}" / "model.pt"
    a, b = torch.load(reference / final), torch.load(out / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


class Output:
    """A process's output lines, read by a thread as they come, so the test can act on them."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 240) -> tuple[int, re.Match]:
        """The first line at index >= after that matches: (its index, the match)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    match = re.search(pattern, self.lines[i])
                    if match:
                        return i, match
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)[-4000:]}")
                self._cond.wait(left)


def wait_until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_signal_or_the_deadline_exits_at_once_and_keeps_the_newest_checkpoint(tmp_path):
    """tests/stop_worker.py: a complete step 1, then a save of step 2 held inside C code (as a rank in a
    collective). A copy of the signal within the repeat window changes nothing; a second signal after
    it exits at once with 76; so does the deadline (here with 77: the requeue bound is reached). The
    newest complete checkpoint stays step 1, `latest` points to it, and it loads."""
    cases = {"second signal": ("none", "1", EXIT_ABORTED, "second signal (SIGTERM): exiting at once with code 76"),
             "deadline": ("0.5", "0", EXIT_NO_REQUEUE, "(checkpoint.stop_deadline): exiting at once with code 77")}
    procs = {}
    for name, (deadline, requeue, _, _) in cases.items():
        procs[name] = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stop_worker.py"), str(tmp_path / name),
                                        deadline, requeue], cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
            proc.send_signal(signal.SIGUSR1)
        first = time.monotonic()
        procs["second signal"].send_signal(signal.SIGUSR1)  # a copy (scancel --full): not a second signal
        time.sleep(REPEAT_WINDOW_S + 0.2 - (time.monotonic() - first))
        assert procs["second signal"].poll() is None, "a copy within the repeat window must not end the process"
        procs["second signal"].send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=30) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    model, opt = build({"K": 2, "max_block": 4}, torch.float64, 1)
    for name, (_, _, code, message) in cases.items():
        stdout = procs[name].stdout
        assert stdout is not None
        output = stdout.read()
        assert codes[name] == code and message in output, (name, codes[name], output)
        assert output.count("SIGUSR1: stopping at the next step boundary") == 1, output
        root = tmp_path / name
        assert complete_steps(root) == [1] and (root / "latest").read_text() == "step-1"
        assert [p.name[:12] for p in root.iterdir() if p.name.startswith(".")] == [".tmp-step-2-"]
        assert load_checkpoint(root, model, opt)["step"] == 1


def test_a_job_requeued_more_often_than_max_requeues_does_not_start(tmp_path, cache):
    """The bound on Slurm requeues (SLURM_RESTART_COUNT) holds where the batch script cannot read the
    ranks' code (torchrun's script requeues on its own signal): beyond it the run refuses with 77."""
    proc = subprocess.run([sys.executable, RUN, "--config", CONFIG, *settings(tmp_path / "out", cache),
                           "--set", "checkpoint.max_requeues=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3"})
    assert proc.returncode == EXIT_NO_REQUEUE, proc.stderr[-3000:]
    assert "Slurm job 42: requeue 3 (checkpoint.max_requeues: 2)" in proc.stderr
    assert "requeued 3 times, more than checkpoint.max_requeues 2: not starting" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def worker_pid(agent: int, rank: int) -> int:
    for child in psutil.Process(agent).children(recursive=True):
        if child.environ().get("RANK") == str(rank) and RUN in child.cmdline():
            return child.pid
    raise AssertionError(f"torchrun {agent} has no worker of rank {rank}")


def test_torchrun_restarts_a_killed_worker_stops_on_sigterm_and_the_rerun_ends_as_if_uninterrupted(
        reference, tmp_path, cache):
    """torchrun --max-restarts 1: rank 1 is killed once a checkpoint exists; torchrun restarts both
    workers, which resume from the newest complete checkpoint; SIGTERM to the agent (which passes it
    on) then stops them at the next step boundary with a checkpoint of that step (the workers exit 75;
    torchrun itself exits 1 after a signal); the same command run again finishes the run."""
    out = tmp_path / "run"
    # as scripts/slurm/train_torchrun.sbatch: the c10d rendezvous, and a store of their own for each
    # attempt's workers; a store reused across attempts (torchrun's default, and the static rendezvous)
    # can hand a restarted worker the previous attempt's gloo addresses (pytorch/pytorch#135712)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"localhost:{free_port()}", RUN, "--config", CONFIG, *settings(out, cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = Output(agent.stdout)
    try:
        wait_until(lambda: (out / "checkpoints" / "latest").exists(), "the first checkpoint")
        os.kill(worker_pid(agent.pid, 1), signal.SIGKILL)
        restarted, _ = log.wait_for(r"torchrun restarted the workers \(restart 1\)")
        resumed, match = log.wait_for(r"resumed from \S+ step (\d+)", after=restarted)
        stepped, _ = log.wait_for(r"^step \d+/", after=resumed)  # the restarted workers train
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=120)
    finally:
        agent.kill()
    _, stopped = log.wait_for(r"stopped on a signal at step (\d+)/.*exit code (\d+)", after=stepped)
    step = int(stopped.group(1)) - 1
    assert code == 1 and int(stopped.group(2)) == EXIT_STOPPED, "".join(log.lines)[-3000:]
    assert int(match.group(1)) < step < STEPS - 1 and complete_steps(out / "checkpoints")[-1] == step
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step}"
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"resumed from {out / 'checkpoints'} step {step}" in again.stderr, \
        again.stderr[-3000:]
    assert_same_run(out, reference)


def slurm_state(cluster: SlurmCluster, job: str) -> tuple[str, int]:
    out = cluster.run(["scontrol", "show", "job", job]).stdout
    state, restarts = re.search(r"JobState=(\S+)", out), re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "", int(restarts.group(1)) if restarts else 0)


def test_slurm_job_stopped_by_usr1_is_requeued_and_completes_as_if_uninterrupted(reference, tmp_path, cache):
    """scripts/slurm/train_deepspeed.sbatch under a real Slurm, checkpoints written in the background
    at every step: the GPU count probed on the node (none: 2 CPU ranks), both ranks started by srun
    with no launcher, ranks and rendezvous read from Slurm, the port derived from the job id. USR1 to
    the batch shell, srun and the ranks (scancel --full: each rank sees it more than once) stops both
    ranks at one step boundary after the checkpoint in flight and that step's checkpoint; they exit 75,
    the script requeues the job, and its second run resumes and completes."""
    port = free_job_port()
    cluster = SlurmCluster(tmp_path / "slurm", first_job_id=port - PORT_BASE + PORT_SPAN).start()
    out, log_file = tmp_path / "run", tmp_path / "job.out"
    try:
        job = cluster.submit(["-n", "1", "-c", "2", "--signal=B:USR1@5", "-o", str(log_file),
                              "scripts/slurm/train_deepspeed.sbatch", CONFIG,
                              *settings(out, cache, ["checkpoint.async=true", "checkpoint.every=1"])],
                             cwd=ROOT, env={"DS_ACCELERATOR": "cpu"})
        log = lambda: log_file.read_text() if log_file.exists() else ""  # noqa: E731
        wait_until(lambda: re.search(r"^0: step 3/", log(), re.M), "training in the job")
        cluster.run(["scancel", "--signal=USR1", "--full", job], check=True)
        wait_until(lambda: slurm_state(cluster, job)[1] == 1, "the job requeued", timeout=120)
        state = cluster.wait_job(job, timeout=300)  # it starts again once cred_expire (10 s) has passed
        text = log()
        assert state == "COMPLETED" and slurm_state(cluster, job)[1] == 1, text[-4000:]
    finally:
        cluster.stop()
    host = socket.gethostname().split(".")[0]
    assert job_port(job) == port and f"1 node(s) x 2 processes, rendezvous {host}:{port}" in text
    assert {line[:3] for line in text.splitlines()} >= {"0: ", "1: "}, "srun --label: both ranks are srun tasks"
    stopped = re.search(r"stopped on a signal at step (\d+)/.*exit code (\d+)", text)
    assert stopped and int(stopped.group(2)) == EXIT_STOPPED, text[-4000:]
    step = int(stopped.group(1)) - 1
    for expected in ("0: [distopt] waiting for the checkpoint of step", "training step exited with code 75",
                     f"requeueing job {job} (requeue 1)", "requeue 1 (checkpoint.max_requeues: 10)",
                     f"resumed from {out / 'checkpoints'} step {step}", "training step exited with code 0"):
        assert expected in text, (expected, text[-4000:])
    assert sorted(p.name for p in (out / "checkpoints" / f"step-{STEPS - 1}").glob("optim-rank*.pt")) == \
        ["optim-rank0.pt", "optim-rank1.pt"], "a world of 2: a task that missed Slurm's ranks would train alone"
    assert_same_run(out, reference)
