"""Checkpoints of a training run, with MLFOPSOAP's sharded state keyed by parameter name and block.

Layout of `<root>/step-<N>/`:
    manifest.json        format, step, world size, blocks (name, ordinal, slices, owner, file),
                         optimizer hyper-parameters and runtime state (fisher_norm's running norms),
                         sha256 of every file, user `extra`
    model.pt             the model's state_dict (parameters are replicated; rank 0 writes it)
    optim-rank<R>.pt     the blocks rank R owned: {"<name>#<ordinal>": block state}; for any other
                         (replicated) optimizer, rank 0 writes its state_dict() as optim-rank0.pt

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

FORMAT = "distopt-checkpoint-v2"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _broadcast(value: Any) -> Any:
    if _rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers that keep block-owned state expose block_states() (ML-FOP-SOAP); others are replicated."""
    return hasattr(optimizer, "block_states")


def _optimizer_files(optimizer: torch.optim.Optimizer, rank: int) -> Optional[dict]:
    """What this rank writes as optim-rank<R>.pt, or None."""
    if _sharded(optimizer):
        return {_block_key(b.name, b.ordinal): st for b, st in optimizer.block_states()}
    return {"state_dict": optimizer.state_dict()} if rank == 0 else None


def _describe(optimizer: torch.optim.Optimizer) -> str:
    """What the manifest records, so that a run resumes only into the same kind of optimizer."""
    return optimizer.describe() if hasattr(optimizer, "describe") else type(optimizer).__name__


def _stateful(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: a two-objective rule keeps none between steps, its base does."""
    return getattr(optimizer, "base", optimizer)


def _block_key(name: str, ordinal: int) -> str:
    return f"{name}#{ordinal}"


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: Optional[dict] = None) -> Path:
    """Collective: every rank calls it at the same step, after optimizer.step()."""
    name = _describe(optimizer)
    if getattr(optimizer, "in_window", False):
        raise CheckpointError("save_checkpoint() called mid-accumulation: save right after optimizer.step()")
    optimizer = _stateful(optimizer)
    root = Path(root)
    rank, world = _rank_world()
    tmp = _broadcast(root / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    if rank == 0:
        tmp.mkdir(parents=True)
    _barrier()
    mine = _optimizer_files(optimizer, rank)
    if mine is not None:
        torch.save(mine, tmp / f"optim-rank{rank}.pt")
    if rank == 0:
        torch.save(model.state_dict(), tmp / "model.pt")
    _barrier()
    final = root / f"step-{step}"
    if rank == 0:
        sharded = _sharded(optimizer)
        files = ["model.pt"] + [f"optim-rank{r}.pt" for r in range(world if sharded else 1)]
        blocks = [dict(key=_block_key(b.name, b.ordinal), slices=[[s.start, s.stop] for s in b.slices],
                       file=f"optim-rank{b.owner}.pt") for b in optimizer.plan.blocks] if sharded else None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        runtime = optimizer.runtime_state() if sharded else None
        manifest = dict(format=FORMAT, step=step, world_size=world, optimizer=name,
                        blocks=blocks, param_groups=groups, runtime=runtime, sha256={f: _sha256(tmp / f) for f in files},
                        extra=extra or {})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".latest-{uuid.uuid4().hex[:8]}"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    _barrier()
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


def load_checkpoint(root: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: Optional[int] = None) -> dict:
    """Collective: load model and optimizer state; returns the manifest (its `extra` and `step`)."""
    outer, name, optimizer = optimizer, _describe(optimizer), _stateful(optimizer)
    path = resolve(root, step)
    try:
        manifest = _verify(path)
    except CheckpointError as e:
        others = [s for s in complete_steps(root) if path.name != f"step-{s}"]
        hint = f"; complete checkpoints: steps {others} (pass step=...)" if others else ""
        raise CheckpointError(f"{e}{hint}") from e
    if manifest["optimizer"] != name:
        raise CheckpointError(f"{path} holds {manifest['optimizer']} state; this run uses {name}")
    if _sharded(optimizer):
        _check_plan(path, manifest, optimizer)
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    if _sharded(optimizer):
        _load_blocks(path, manifest, optimizer)
        for group, saved_group in zip(optimizer.param_groups, manifest["param_groups"]):
            for k, v in saved_group.items():
                if k != "param_names":
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    else:
        outer.load_state_dict(torch.load(path / "optim-rank0.pt", weights_only=True)["state_dict"])
    _barrier()
    return manifest


def _check_plan(path: Path, manifest: dict, optimizer: torch.optim.Optimizer) -> None:
    saved = {b["key"]: b["slices"] for b in manifest["blocks"]}
    needed = {_block_key(b.name, b.ordinal): [[s.start, s.stop] for s in b.slices] for b in optimizer.plan.blocks}
    if saved != needed:
        raise CheckpointError(f"{path}: the checkpoint's block plan differs from this optimizer's "
                              "(other parameters, shapes or max_block); resume with the same model and max_block")
    if len(manifest["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{path}: {len(manifest['param_groups'])} parameter groups saved, "
                              f"{len(optimizer.param_groups)} in this optimizer")


def _load_blocks(path: Path, manifest: dict, optimizer: torch.optim.Optimizer) -> None:
    """Each rank reads the blocks it owns now, from whichever rank's file holds them."""
    where = {b["key"]: b["file"] for b in manifest["blocks"]}
    files: dict[str, dict] = {}
    for b, target in optimizer.block_states():
        key = _block_key(b.name, b.ordinal)
        if where[key] not in files:
            files[where[key]] = torch.load(path / where[key], weights_only=True)
        target.clear()
        target.update(files[where[key]][key])
    optimizer.load_runtime_state(manifest["runtime"])
