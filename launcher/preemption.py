"""Stopping a run cleanly on a signal: preemption and time limits (docs/cluster.md, "Preemption").

SIGUSR1 (Slurm's warning ahead of the time limit, `--signal=B:USR1@<seconds>`, passed on to the
ranks by the batch scripts) and SIGTERM (preemption, `scancel`, torchrun's agent passing its own
signal on) ask the run to stop. The request is only noted when it arrives; at the next optimizer-step
boundary every rank contributes it to the one small all-reduce the launcher makes there anyway, so
every rank agrees on the same step, writes the checkpoint of that step together with the others and
exits with EXIT_STOPPED. No rank saves alone and none waits in a collective for a rank that left.

A second signal, or `checkpoint.stop_deadline` seconds after the first, ends the process at once
(`os._exit`, from a watcher thread, so it works while the training thread waits inside a collective):
a checkpoint being written is left as a hidden temporary directory that nothing points to, so the
newest complete checkpoint is untouched. Copies of one signal that arrive within REPEAT_WINDOW_S of
the first count as that signal: `scancel --full` signals the batch shell, srun and the ranks, and srun
passes its copy on, so each rank sees the same request two or three times within milliseconds.

Exit codes (the batch scripts requeue on 75 and 76):
    75  EXIT_STOPPED      stopped after writing the checkpoint of the step reached; requeue to continue
    76  EXIT_ABORTED      stopped at once (second signal, deadline) before that checkpoint was complete;
                          the newest complete checkpoint is an earlier one; requeue to continue from it
    77  EXIT_NO_REQUEUE   as 75 or 76, but the Slurm job was requeued checkpoint.max_requeues times
                          already (SLURM_RESTART_COUNT): do not requeue; resubmit to continue
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Optional

EXIT_STOPPED = 75   # sysexits' EX_TEMPFAIL: a temporary failure, to be retried
EXIT_ABORTED = 76
EXIT_NO_REQUEUE = 77
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REPEAT_WINDOW_S = 3.0


def requeue_count(env: Mapping[str, str]) -> int:
    """How often Slurm has requeued this job (0 outside Slurm or in its first run)."""
    return int(env.get("SLURM_RESTART_COUNT") or 0)


class StopSignals:
    """Notes SIGUSR1 / SIGTERM for the step boundary; exits at once on a repeat or after the deadline.

    install() before anything slow (a signal during start-up then stops the run at its first step
    boundary), configure() once the rank and the config are known."""

    def __init__(self) -> None:
        self.rank: Optional[int] = None
        self.deadline: Optional[float] = None
        self.requeue = True
        self.checkpoint_complete = False   # the stop's checkpoint is published: a forced exit reports 75
        self.first: Optional[float] = None  # time.monotonic() of the first signal
        self._lock = threading.Lock()
        self._reader: Optional[socket.socket] = None
        self._writer: Optional[socket.socket] = None

    @property
    def requested(self) -> bool:
        return self.first is not None

    def install(self) -> StopSignals:
        """Python runs signal handlers on the main thread only, between bytecodes, so a rank blocked in a
        collective would never see a second signal. Its C-level handler also writes each signal's
        number to the wakeup fd at once; a watcher thread reads it there and acts."""
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        for sig in SIGNALS:
            signal.signal(sig, _noted)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="distopt-stop-signals", daemon=True).start()
        return self

    def configure(self, rank: int, deadline: Optional[float], requeue: bool) -> None:
        with self._lock:
            self.rank, self.deadline, self.requeue = rank, deadline, requeue
            if self.requested:
                self._start_deadline()

    def exit_code(self) -> int:
        if not self.requeue:
            return EXIT_NO_REQUEUE
        return EXIT_STOPPED if self.checkpoint_complete else EXIT_ABORTED

    def _watch(self) -> None:
        reader = self._reader
        assert reader is not None  # install() opens it before it starts this thread
        while True:
            data = reader.recv(64)
            if not data:
                return
            for number in data:  # other handled signals (SIGINT) pass through the same fd: ignored here
                if number in SIGNALS:
                    self._on_signal(signal.Signals(number))

    def _on_signal(self, sig: signal.Signals) -> None:
        with self._lock:
            now = time.monotonic()
            if self.first is None:
                self.first = now
                self._say(f"{sig.name}: stopping at the next step boundary, with a checkpoint of that step")
                self._start_deadline()
            elif now - self.first >= REPEAT_WINDOW_S:
                self._exit_now(f"second signal ({sig.name})")

    def _start_deadline(self) -> None:
        if self.deadline:
            timer = threading.Timer(self.deadline, self._exit_now,
                                    (f"no stop checkpoint {self.deadline:g} s after the signal "
                                     "(checkpoint.stop_deadline)",))
            timer.daemon = True
            timer.start()

    def _exit_now(self, reason: str) -> None:
        code = self.exit_code()
        state = "the stop checkpoint is complete" if self.checkpoint_complete else \
            "the newest complete checkpoint is an earlier one"
        self._say(f"{reason}: exiting at once with code {code}; {state}")
        os._exit(code)

    def _say(self, message: str) -> None:
        rank = "?" if self.rank is None else self.rank
        print(f"[distopt] rank {rank}: {message}", file=sys.stderr, flush=True)


def _noted(signum: int, frame) -> None:
    """The Python-level handler: nothing to do, the watcher thread has the signal from the wakeup fd
    (installing a handler replaces the default action, which would end the process)."""
