"""A process that stops on signals as launcher/run.py does, frozen where the watcher thread alone can act.

    python tests/stop_worker.py ROOT DEADLINE REQUEUE

Saves a complete checkpoint of step 1 to ROOT, installs launcher.preemption.StopSignals, then starts
saving step 2 with its write held inside C code (a second lock of a pthread mutex, the GIL released):
like a rank waiting in a collective or on a slow disk, its thread never returns to Python, so the
Python-level signal handler never runs. DEADLINE: checkpoint.stop_deadline ('none' for none);
REQUEUE: 1 or 0 (the requeue bound not yet reached, or reached).
"""

import ctypes
import os
import sys
from typing import NoReturn

import torch

sys.path.insert(0, os.path.dirname(__file__))
import distopt.checkpoint  # noqa: E402
from launcher.preemption import StopSignals  # noqa: E402
from sharded_worker import build  # noqa: E402


def hang_in_c(path, obj) -> NoReturn:
    """Write part of the file, then block in C for good."""
    path.write_bytes(b"partial")
    print("writing", flush=True)
    mutex = ctypes.create_string_buffer(64)  # PTHREAD_MUTEX_INITIALIZER is all zeros on Linux
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)
    raise AssertionError("unreachable: the second lock blocks for good")


def main() -> None:
    root, deadline, requeue = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model, opt = build({"K": 2, "max_block": 4}, torch.float64, 1)
    distopt.checkpoint.save_checkpoint(root, 1, model, opt)
    stop = StopSignals().install()
    stop.configure(0, None if deadline == "none" else float(deadline), requeue)
    distopt.checkpoint._write = hang_in_c
    distopt.checkpoint.save_checkpoint(root, 2, model, opt)


if __name__ == "__main__":
    main()
