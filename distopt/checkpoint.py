"""Checkpoints of a training run, with ML-FOP-SOAP's sharded state keyed by parameter name and block.

Layout of `<root>/step-<N>/`:
    manifest.json        format, step, world size, blocks (name, ordinal, slices, owner, file),
                         optimizer hyper-parameters and runtime state (fisher_norm's running norms),
                         sha256 and size of every file, user `extra`
    model.pt             the model's state_dict (parameters are replicated; rank 0 writes it), or
    model/               the FSDP2-sharded model, written by every rank with torch.distributed.checkpoint
    optim-rank<R>.pt     the blocks rank R owned: {"<name>#<ordinal>": block state}; for any other
                         (replicated) optimizer, rank 0 writes its state_dict() as optim-rank0.pt

Writing is atomic: everything goes to a hidden temporary directory; each rank hashes the file it
wrote and rank 0 writes the manifest last, renames the directory to step-<N>, and only then
replaces `<root>/latest` (write + rename). Re-saving a step first moves the old step-<N> aside
(`.replaced-step-<N>-*`, still found as step N), and deletes it only once the new one is in place.
`keep_last` prunes the oldest complete steps after a save. A crash leaves at most a temporary
directory that nothing points to.

Loading checks the manifest and the sizes of the files, then each rank hashes only the files it
reads (model.pt and the rank files that hold its blocks; any rank's failure stops every rank),
memory-maps them (a resharded run never holds a whole old rank's state in memory), finds each
block by name, so a run can resume at another world size, and refuses a checkpoint whose block plan
differs (other max_block or shapes) or that is corrupt, naming the problem and the steps that are
still complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from distopt.protocols import BlockSharded, Wrapper, describe, in_window, stateful
from distopt.state import tree_to

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


def _all_gather(value: Any) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _optimizer_files(optimizer: torch.optim.Optimizer, rank: int) -> Optional[dict]:
    """What this rank writes as optim-rank<R>.pt, or None: the blocks it owns (block-sharded state,
    distopt.protocols.BlockSharded), or rank 0 the state_dict of a replicated optimizer."""
    if isinstance(optimizer, BlockSharded):
        return {_block_key(b.name, b.ordinal): st for b, st in optimizer.block_states()}
    return {"state_dict": optimizer.state_dict()} if rank == 0 else None


def _block_key(name: str, ordinal: int) -> str:
    return f"{name}#{ordinal}"


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: Optional[dict] = None, keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it at the same step, after optimizer.step(). keep_last: keep only
    the newest N complete steps (None: all)."""
    name = describe(optimizer)
    if in_window(optimizer):
        raise CheckpointError("save_checkpoint() called mid-accumulation: save right after optimizer.step()")
    outer, optimizer = optimizer, stateful(optimizer)
    root = Path(root)
    rank, world = _rank_world()
    tmp = _all_gather(root / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}" if rank == 0 else None)[0]
    if rank == 0:
        tmp.mkdir(parents=True)
    _barrier()
    written = {}
    mine = _optimizer_files(optimizer, rank)
    if mine is not None:
        written[f"optim-rank{rank}.pt"] = _write(tmp / f"optim-rank{rank}.pt", mine)
    model_format = "dcp" if _sharded_model(model) else "torch"
    if model_format == "dcp":  # FSDP2: every rank writes its shards with torch.distributed.checkpoint
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp / "model"))
        _barrier()
        for f in sorted((tmp / "model").iterdir()):  # each rank hashes the files it wrote, rank 0 the metadata
            if re.match(rf"__{rank}_\d+\.distcp$", f.name) or (rank == 0 and not f.name.endswith(".distcp")):
                written[f"model/{f.name}"] = _digest(f)
    elif rank == 0:
        written["model.pt"] = _write(tmp / "model.pt", model.state_dict())
    files = {k: v for per_rank in _all_gather(written) for k, v in per_rank.items()}  # each rank hashed its own
    final = root / f"step-{step}"
    if rank == 0:
        sharded = isinstance(optimizer, BlockSharded)
        blocks = [dict(key=_block_key(b.name, b.ordinal), slices=[[s.start, s.stop] for s in b.slices],
                       file=f"optim-rank{b.owner}.pt") for b in optimizer.plan.blocks] if sharded else None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        manifest = dict(format=FORMAT, step=step, world_size=world, optimizer=name, model_format=model_format,
                        blocks=blocks, param_groups=groups,
                        runtime=optimizer.runtime_state() if sharded else None,
                        rule_runtime=outer.runtime_state() if isinstance(outer, Wrapper) else None, files=files,
                        extra=extra or {})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        _publish(root, tmp, final)
        if keep_last:
            for old in sorted(_step_dirs(root))[:-keep_last]:
                shutil.rmtree(_step_dirs(root)[old], ignore_errors=True)
    _barrier()
    return final


def _write(path: Path, obj: Any) -> dict:
    torch.save(obj, path)
    return _digest(path)


def _digest(path: Path) -> dict:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sharded_model(model: torch.nn.Module) -> bool:
    """FSDP2-sharded (its parameters are DTensors): saved and loaded with torch.distributed.checkpoint."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """tmp becomes `final` and `latest` points to it; an older `final` is deleted only afterwards."""
    replaced = None
    if final.exists():
        replaced = root / f".replaced-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, replaced)
    os.replace(tmp, final)
    pointer = root / f".latest-{uuid.uuid4().hex[:8]}"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _step_dirs(root: Path) -> dict[int, Path]:
    """Step -> directory: step-<N>, or the copy a re-save moved aside if a crash left no step-<N>."""
    dirs = {}
    for d in sorted(root.glob(".replaced-step-*")) + sorted(root.glob("step-*")):
        match = re.fullmatch(r"(?:\.replaced-)?step-(\d+)(?:-[0-9a-f]+)?", d.name)
        if match and d.is_dir():
            dirs[int(match.group(1))] = d
    return dirs


def complete_steps(root: str | os.PathLike) -> list[int]:
    """Steps whose directory has a valid manifest and every file at its recorded size, oldest first
    (the sha256 of each file is checked by the ranks that read it, in load_checkpoint)."""
    steps = []
    for step, d in _step_dirs(Path(root)).items():
        try:
            _check_manifest(d)
            steps.append(step)
        except CheckpointError:
            continue
    return sorted(steps)


def _check_manifest(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no manifest.json: it is not a complete distopt checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing (partial checkpoint)")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum (truncated: {f.stat().st_size} bytes, "
                                  f"the manifest says {meta['bytes']})")
    return manifest


def _verify(path: Path, manifest: dict, names: set[str]) -> None:
    for name in sorted(names):
        if _sha256(path / name) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt)")


def resolve(root: str | os.PathLike, step: Optional[int] = None) -> Path:
    """The directory of `step`, or the one `latest` points to."""
    root = Path(root)
    if step is None:
        pointer = root / "latest"
        if not pointer.is_file():
            raise CheckpointError(f"no checkpoint in {root}: {pointer} does not exist")
        step = int(pointer.read_text().strip().split("-", 1)[1])
    return _step_dirs(root).get(step, root / f"step-{step}")


def load_checkpoint(root: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: Optional[int] = None) -> dict:
    """Collective: load model and optimizer state; returns the manifest (its `extra` and `step`)."""
    outer, name, optimizer = optimizer, describe(optimizer), stateful(optimizer)
    path = resolve(root, step)
    try:
        manifest = _check_manifest(path)
        if manifest["optimizer"] != name:
            raise CheckpointError(f"{path} holds {manifest['optimizer']} state; this run uses {name}")
        if isinstance(optimizer, BlockSharded):
            _check_plan(path, manifest, optimizer)
        needed = _model_files(manifest) | (_files_of(manifest, optimizer) if isinstance(optimizer, BlockSharded)
                                           else {"optim-rank0.pt"})
        _verify(path, manifest, needed)
        error = None
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in _all_gather(error) if e]
    if errors:  # every rank stops, with every rank's reason
        others = [s for s in complete_steps(root) if _step_dirs(Path(root)).get(s) != path]
        hint = f"; complete checkpoints: steps {others} (pass step=...)" if others else ""
        raise CheckpointError("; ".join(sorted(set(errors))) + hint)
    _load_model(path, manifest, model)
    if isinstance(optimizer, BlockSharded):
        _load_blocks(path, manifest, optimizer)
        for group, saved_group in zip(optimizer.param_groups, manifest["param_groups"]):
            for k, v in saved_group.items():
                if k != "param_names":
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    else:
        outer.load_state_dict(_load(path / "optim-rank0.pt")["state_dict"])
    if isinstance(outer, Wrapper):
        outer.load_runtime_state(manifest.get("rule_runtime"))
    _barrier()
    return manifest


def _model_files(manifest: dict) -> set[str]:
    """The model files this rank checks: model.pt, or its share of the DCP files (every file once over the ranks)."""
    if manifest.get("model_format") != "dcp":
        return {"model.pt"}
    rank, world = _rank_world()
    files = sorted(name for name in manifest["files"] if name.startswith("model/"))
    return set(files[rank::world])


def _load_model(path: Path, manifest: dict, model: torch.nn.Module) -> None:
    """Either format into either kind of model: torch.distributed.checkpoint reshards DTensors and fills
    plain tensors; a model.pt goes into a sharded model as a full state dict."""
    if manifest.get("model_format") == "dcp":
        state = {"model": get_model_state_dict(model) if _sharded_model(model) else model.state_dict()}
        dcp.load(state, checkpoint_id=str(path / "model"))
        if _sharded_model(model):
            set_model_state_dict(model, state["model"])
        else:
            model.load_state_dict(state["model"])
    elif _sharded_model(model):
        set_model_state_dict(model, _load(path / "model.pt"), options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(_load(path / "model.pt"))


def _load(path: Path) -> Any:
    """Memory-mapped: tensors are read from the page cache as they are copied, not all at once."""
    return torch.load(path, weights_only=True, mmap=True, map_location="cpu")


def _files_of(manifest: dict, optimizer: BlockSharded) -> set[str]:
    where = {b["key"]: b["file"] for b in manifest["blocks"]}
    return {where[_block_key(b.name, b.ordinal)] for b, _ in optimizer.block_states()}


def _check_plan(path: Path, manifest: dict, optimizer: BlockSharded) -> None:
    saved = {b["key"]: b["slices"] for b in manifest["blocks"]}
    needed = {_block_key(b.name, b.ordinal): [[s.start, s.stop] for s in b.slices] for b in optimizer.plan.blocks}
    if saved != needed:
        raise CheckpointError(f"{path}: the checkpoint's block plan differs from this optimizer's "
                              "(other parameters, shapes or max_block); resume with the same model and max_block")
    if len(manifest["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{path}: {len(manifest['param_groups'])} parameter groups saved, "
                              f"{len(optimizer.param_groups)} in this optimizer")


def _load_blocks(path: Path, manifest: dict, optimizer: BlockSharded) -> None:
    """Each rank reads the blocks it owns now, one old rank's file at a time (memory-mapped)."""
    where = {b["key"]: b["file"] for b in manifest["blocks"]}
    by_file: dict[str, list] = {}
    for b, target in optimizer.block_states():
        by_file.setdefault(where[_block_key(b.name, b.ordinal)], []).append((b, target))
    for file, targets in sorted(by_file.items()):
        saved = _load(path / file)
        for b, target in targets:
            target.clear()
            target.update(tree_to(saved[_block_key(b.name, b.ordinal)], optimizer.block_device(b)))
            if not optimizer.keeps_master(b):  # e.g. resumed from an FSDP2 run into fp32 replicated parameters
                target.pop("master", None)
        del saved
    optimizer.load_runtime_state(manifest["runtime"])

