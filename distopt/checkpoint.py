"""Checkpoints of a (possibly sharded) MLFOPSOAP run, keyed by parameter name and block.

Layout of `<root>/step-<N>/`:
    manifest.json        format, step, world size, blocks (name, ordinal, slices, owner, file),
                         optimizer hyper-parameters, sha256 of every file, user `extra`
    model.pt             the model's state_dict (parameters are replicated; rank 0 writes it)
    optim-rank<R>.pt     the blocks rank R owned: {"<name>#<ordinal>": block state}

Writing is atomic: everything goes to a hidden temporary directory, the manifest (with checksums)
is written last, the directory is renamed to step-<N>, and only then is `<root>/latest` replaced
(write + rename). A crash leaves at most a temporary directory that nothing points to. Loading
verifies the manifest and every checksum before touching the model or optimizer, and finds each
block by name, so a run can resume at another world size; it refuses a checkpoint whose block
plan differs (other max_block or shapes) or that is corrupt, naming the problem and the steps
that are still complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from distopt.mlfop import MLFOPSOAP

FORMAT = "distopt-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _barrier(opt: MLFOPSOAP) -> None:
    if opt.comm.world > 1:
        dist.barrier(group=opt.comm.group)


def _broadcast(opt: MLFOPSOAP, value: Any) -> Any:
    if opt.comm.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(opt.comm.group, 0) if opt.comm.group else 0,
                               group=opt.comm.group)
    return box[0]


def _block_key(name: str, ordinal: int) -> str:
    return f"{name}#{ordinal}"


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: MLFOPSOAP,
                    extra: Optional[dict] = None) -> Path:
    """Collective: every rank calls it at the same step, after optimizer.step()."""
    if optimizer._window is not None:
        raise CheckpointError("save_checkpoint() called mid-accumulation: save right after optimizer.step()")
    root = Path(root)
    rank = optimizer.comm.rank
    tmp = _broadcast(optimizer, root / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    if rank == 0:
        tmp.mkdir(parents=True)
    _barrier(optimizer)
    blocks = {_block_key(b.name, b.ordinal): optimizer.block_state(b) for b in optimizer._owned}
    torch.save(blocks, tmp / f"optim-rank{rank}.pt")
    if rank == 0:
        torch.save(model.state_dict(), tmp / "model.pt")
    _barrier(optimizer)
    final = root / f"step-{step}"
    if rank == 0:
        files = ["model.pt"] + [f"optim-rank{r}.pt" for r in range(optimizer.comm.world)]
        manifest = dict(
            format=FORMAT, step=step, world_size=optimizer.comm.world,
            blocks=[dict(key=_block_key(b.name, b.ordinal), slices=[[s.start, s.stop] for s in b.slices],
                         file=f"optim-rank{b.owner}.pt") for b in optimizer.plan.blocks],
            param_groups=[{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]],
            sha256={f: _sha256(tmp / f) for f in files}, extra=extra or {})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".latest-{uuid.uuid4().hex[:8]}"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    _barrier(optimizer)
    return final


def complete_steps(root: str | os.PathLike) -> list[int]:
    """Steps whose directory has a manifest and files that match their checksums, oldest first."""
    root = Path(root)
    steps = []
    for d in sorted(root.glob("step-*")):
        try:
            _verify(d)
            steps.append(int(d.name.split("-", 1)[1]))
        except (CheckpointError, ValueError):
            continue
    return sorted(steps)


def _verify(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no manifest.json: it is not a complete distopt checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, digest in manifest["sha256"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing (partial checkpoint)")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")
    return manifest


def resolve(root: str | os.PathLike, step: Optional[int] = None) -> Path:
    """The directory of `step`, or the one `latest` points to."""
    root = Path(root)
    if step is not None:
        return root / f"step-{step}"
    pointer = root / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {root}: {pointer} does not exist")
    return root / pointer.read_text().strip()


def load_checkpoint(root: str | os.PathLike, model: torch.nn.Module, optimizer: MLFOPSOAP,
                    step: Optional[int] = None) -> dict:
    """Collective: load model and optimizer state; returns the manifest (its `extra` and `step`)."""
    path = resolve(root, step)
    try:
        manifest = _verify(path)
    except CheckpointError as e:
        others = [s for s in complete_steps(root) if path.name != f"step-{s}"]
        hint = f"; complete checkpoints: steps {others} (pass step=...)" if others else ""
        raise CheckpointError(f"{e}{hint}") from e
    saved = {b["key"]: b for b in manifest["blocks"]}
    needed = {_block_key(b.name, b.ordinal): b for b in optimizer.plan.blocks}
    if set(saved) != set(needed) or any(
            [[s.start, s.stop] for s in needed[k].slices] != saved[k]["slices"] for k in needed):
        raise CheckpointError(f"{path}: the checkpoint's block plan differs from this optimizer's "
                              "(other parameters, shapes or max_block); resume with the same model and max_block")
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    files: dict[str, dict] = {}
    for b in optimizer._owned:
        key = _block_key(b.name, b.ordinal)
        fname = saved[key]["file"]
        if fname not in files:
            files[fname] = torch.load(path / fname, weights_only=True)
        state = files[fname][key]
        target = optimizer.block_state(b)
        target.clear()
        target.update(state)
    if len(manifest["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{path}: {len(manifest['param_groups'])} parameter groups saved, "
                              f"{len(optimizer.param_groups)} in this optimizer")
    for group, saved_group in zip(optimizer.param_groups, manifest["param_groups"]):
        for k, v in saved_group.items():
            if k in group and k != "param_names":
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
            elif k == "modality_norm_ema":
                group[k] = v
    _barrier(optimizer)
    return manifest
