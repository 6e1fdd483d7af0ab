"""Checkpoints on a disk that fills up, then turns read-only: two gloo ranks, run by
tests/test_checkpoint.py inside a private mount namespace (`unshare -m`) whose checkpoint folder is a
small tmpfs, so the disk is really full and really read-only, and nothing outside is touched.

    python tests/disk_worker.py ROOT OUT     ROOT: the tmpfs mount point; OUT: results (JSON, per rank)

Step 1 is saved while there is room; then rank 0 fills the disk and both ranks save step 2 (every
rank raises), the async saver saves step 3 (its wait() raises); rank 0 makes the mount read-only and
both save step 4. After each failure the ranks record the error, the folder's entries and whether the
newest complete checkpoint still loads.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from distopt import comm  # noqa: E402
from distopt.checkpoint import AsyncCheckpointer, CheckpointError, complete_steps, load_checkpoint, save_checkpoint  # noqa: E402
from sharded_worker import build  # noqa: E402


def fill(root: Path) -> None:
    with open(root / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def attempt(save, root: Path, model, opt) -> dict:
    try:
        save()
        error = None
    except CheckpointError as e:
        error = str(e)
    dist.barrier()
    manifest = load_checkpoint(root, model, opt)  # the newest complete checkpoint, hashes checked
    result = dict(error=error, entries=sorted(p.name for p in root.iterdir()), complete=complete_steps(root),
                  loaded=manifest["step"])
    dist.barrier()  # every rank has looked before the next save's temporary directory appears
    return result


def rank_main(rank: int, root: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, opt = build({"K": 2, "max_block": 4}, torch.float64, 2)
    save_checkpoint(root, 1, model, opt)
    if rank == 0:
        fill(root)
    dist.barrier()
    results = {"full": attempt(lambda: save_checkpoint(root, 2, model, opt), root, model, opt)}
    saver = AsyncCheckpointer()

    def in_background():
        saver.save(root, 3, model, opt)
        saver.wait()

    results["full_async"] = attempt(in_background, root, model, opt)
    saver.close()
    if rank == 0:
        (root / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    dist.barrier()
    results["read_only"] = attempt(lambda: save_checkpoint(root, 4, model, opt), root, model, opt)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(results))
    comm.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(rank_main, args=(Path(sys.argv[1]), Path(sys.argv[2])), nprocs=2, join=True)
