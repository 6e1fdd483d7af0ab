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
directory that nothing points to. A write that fails on any rank (a full disk, a folder that
cannot be written) raises CheckpointError on every rank with the path and the cause in words; the
temporary directory is removed and the complete checkpoints stay as they were.

`AsyncCheckpointer` writes the same files in the background after a staging copy; `latest` moves
only once every rank's files are written and hashed.

Loading checks the manifest and the sizes of the files, then each rank hashes only the files it
reads (model.pt and the rank files that hold its blocks; any rank's failure stops every rank),
memory-maps them (a resharded run never holds a whole old rank's state in memory), finds each
block by name, so a run can resume at another world size, and refuses a checkpoint whose block plan
differs (other max_block or shapes) or that is corrupt, naming the problem and the steps that are
still complete.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from distopt.protocols import BlockSharded, Wrapper, describe, in_window, stateful
from distopt.state import tree_to

if TYPE_CHECKING:
    from distopt.plan import Block

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


def _barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if _rank_world()[1] > 1:
        dist.barrier(group=group)


def _all_gather(value: Any, group: Optional[dist.ProcessGroup] = None) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value, group=group)
    return out


def _optimizer_files(optimizer: torch.optim.Optimizer, rank: int) -> Optional[dict[str, Any]]:
    """What this rank writes as optim-rank<R>.pt, or None: the blocks it owns (block-sharded state,
    distopt.protocols.BlockSharded), or rank 0 the state_dict of a replicated optimizer."""
    if isinstance(optimizer, BlockSharded):
        return {_block_key(b.name, b.ordinal): st for b, st in optimizer.block_states()}
    return {"state_dict": optimizer.state_dict()} if rank == 0 else None


def _block_key(name: str, ordinal: int) -> str:
    return f"{name}#{ordinal}"


def save_checkpoint(root: str | os.PathLike[str], step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: Optional[dict[str, Any]] = None, keep_last: Optional[int] = None) -> Path:
    """Collective: every rank calls it at the same step, after optimizer.step(). keep_last: keep only
    the newest N complete steps (None: all). A write that fails on any rank (a full disk, a folder that
    cannot be written) raises CheckpointError on every rank, naming the folder and the cause; the
    temporary directory is removed and the complete checkpoints are left as they were."""
    save = _prepare(root, step, model, optimizer, extra, keep_last, staged=False)
    state = save.dcp_state
    return _write_and_publish(save, None, None if state is None else
                              lambda: dcp.save({"model": state}, checkpoint_id=str(save.tmp / "model")))


class AsyncCheckpointer:
    """Checkpoints written in the background while training goes on (`checkpoint.async: true`).

    `save()` is collective like save_checkpoint: it first waits for the previous background save, then
    takes a staging copy of what this rank writes (CPU copies of the optimizer's blocks and of the
    replicated model; torch.distributed.checkpoint.async_save stages an FSDP2 model's shards itself)
    and returns; a thread writes the files, hashes them and agrees with the other ranks over a
    process group of its own (gloo), so its collectives never interleave with training's; rank 0 then
    writes the manifest and moves `latest`, only once every rank's files are complete. The files are
    byte for byte those save_checkpoint writes. `wait()` (the next save, the end of a run, a stop on a
    signal) returns once the checkpoint is published and raises its CheckpointError on every rank.
    Costs the staged copy in host memory while a save is in flight."""

    def __init__(self) -> None:
        self._group: Optional[dist.ProcessGroup] = None
        self._thread: Optional[threading.Thread] = None
        self._result: Optional[Path | BaseException] = None
        self.step: Optional[int] = None  # the step being written or last written

    def save(self, root: str | os.PathLike[str], step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             extra: Optional[dict[str, Any]] = None, keep_last: Optional[int] = None) -> None:
        self.wait()
        save = _prepare(root, step, model, optimizer, extra, keep_last, staged=True)
        group = self._background_group()
        write_shards = None
        if save.dcp_state is not None:
            future = dcp.async_save({"model": save.dcp_state}, checkpoint_id=str(save.tmp / "model"),
                                    process_group=group)
            assert isinstance(future, Future)  # an AsyncSaveResponse comes only with a non-blocking async_stager
            save.dcp_state = None  # async_save staged its own copy
            write_shards = future.result
        self.step, self._result = step, None
        self._thread = threading.Thread(target=self._write, args=(save, group, write_shards),
                                        name=f"distopt-checkpoint-step-{step}", daemon=True)
        self._thread.start()

    def _write(self, save: _Save, group: Optional[dist.ProcessGroup],
               write_shards: Optional[Callable[[], Any]]) -> None:
        try:
            self._result = _write_and_publish(save, group, write_shards)
        except BaseException as e:  # noqa: BLE001 - handed to wait() on the training thread
            self._result = e

    @property
    def busy(self) -> bool:
        """A save is still being written."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Optional[Path]:
        """Block until the save in flight (if any) is published; its directory, or None."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, result = None, self._result
        if isinstance(result, BaseException):
            raise result if isinstance(result, CheckpointError) else CheckpointError(
                f"background checkpoint of step {self.step} failed: {type(result).__name__}: {result}") from result
        return result

    def close(self) -> None:
        """Wait for the save in flight and release the background process group (collective)."""
        try:
            self.wait()
        finally:
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None

    def _background_group(self) -> Optional[dist.ProcessGroup]:
        """gloo over the default group's ranks, made at the first save (every rank saves then); None
        without a process group (one process: nothing to agree on)."""
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group


@dataclass
class _Save:
    """One checkpoint on its way to disk: what this rank writes, and (rank 0) the manifest without `files`."""

    root: Path
    step: int
    tmp: Path
    rank: int
    optim: Optional[dict[str, Any]]        # optim-rank<R>.pt
    model: Optional[dict[str, Any]]        # model.pt (rank 0, replicated model)
    dcp_state: Optional[dict[str, Any]]    # the FSDP2 model's sharded state dict (every rank)
    manifest: Optional[dict[str, Any]]     # rank 0
    keep_last: Optional[int]

    @property
    def final(self) -> Path:
        return self.root / f"step-{self.step}"


def _prepare(root: str | os.PathLike[str], step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             extra: Optional[dict[str, Any]], keep_last: Optional[int], staged: bool) -> _Save:
    """Collective: the temporary directory (rank 0 creates it; a failure stops every rank) and what each
    rank will write. staged: CPU copies taken now (a background write must not see later steps), with
    the storages shared as in the originals, so the files are byte for byte those of a direct save."""
    name = describe(optimizer)
    if in_window(optimizer):
        raise CheckpointError("save_checkpoint() called mid-accumulation: save right after optimizer.step()")
    outer, optimizer = optimizer, stateful(optimizer)
    root = Path(root)
    rank, world = _rank_world()
    tmp, error = root / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}", None
    if rank == 0:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _disk_error(e, tmp, 0)
    tmp, error = _all_gather((tmp, error) if rank == 0 else None)[0]
    if error:
        raise _save_error(root, step, [error])
    copy_: Callable[[Any], Any] = _staged if staged else (lambda value: value)
    model_format = "dcp" if _sharded_model(model) else "torch"
    manifest = None
    if rank == 0:
        blocks, runtime = None, None
        if isinstance(optimizer, BlockSharded):
            blocks = [dict(key=_block_key(b.name, b.ordinal), slices=[[s.start, s.stop] for s in b.slices],
                           file=f"optim-rank{b.owner}.pt") for b in optimizer.plan.blocks]
            runtime = optimizer.runtime_state()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        manifest = copy_(dict(format=FORMAT, step=step, world_size=world, optimizer=name, model_format=model_format,
                              blocks=blocks, param_groups=groups, runtime=runtime,
                              rule_runtime=outer.runtime_state() if isinstance(outer, Wrapper) else None,
                              extra=extra or {}))
    return _Save(root, step, tmp, rank, copy_(_optimizer_files(optimizer, rank)),
                 copy_(model.state_dict()) if model_format == "torch" and rank == 0 else None,
                 get_model_state_dict(model) if model_format == "dcp" else None, manifest, keep_last)


def _write_and_publish(save: _Save, group: Optional[dist.ProcessGroup],
                       write_model_shards: Optional[Callable[[], Any]]) -> Path:
    """Collective over `group`: every rank writes its files (and takes part in the sharded model's
    write even after its own failed, so that no rank waits alone), hashes them, and learns whether
    every rank succeeded; rank 0 then writes the manifest and publishes, or removes the temporary
    directory; every rank learns rank 0's outcome and raises the same CheckpointError on failure."""
    written: dict[str, dict[str, Any]] = {}
    error: Optional[str] = None
    try:
        if save.optim is not None:
            written[f"optim-rank{save.rank}.pt"] = _write_checked(save.tmp / f"optim-rank{save.rank}.pt", save.optim)
        if save.model is not None:
            written["model.pt"] = _write_checked(save.tmp / "model.pt", save.model)
    except _DiskError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, or they would wait for ever
        error = f"{type(e).__name__}: {e}"
    if write_model_shards is not None:  # FSDP2: every rank writes its shards with torch.distributed.checkpoint
        try:
            write_model_shards()
            _barrier(group)
            for f in sorted((save.tmp / "model").iterdir()):  # each rank hashes the files it wrote, rank 0 the metadata
                mine = re.match(rf"__{save.rank}_\d+\.distcp$", f.name)
                if mine or (save.rank == 0 and not f.name.endswith(".distcp")):
                    written[f"model/{f.name}"] = _digest(f)
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP's own error is a BaseException
            error = error or _disk_error(e, save.tmp / "model", _nbytes_of(save.dcp_state))
    outcome = _all_gather((written, error), group)
    errors = sorted({e for _, e in outcome if e})
    if save.rank == 0:
        if not errors:
            try:
                assert save.manifest is not None  # rank 0 always has one (_prepare)
                manifest = dict(save.manifest, files={k: v for w, _ in outcome for k, v in w.items()})
                (save.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
                _publish(save.root, save.tmp, save.final)
                _prune(save.root, save.keep_last)
            except OSError as e:
                errors = [_disk_error(e, save.tmp / "manifest.json", 0)]
            except Exception as e:  # noqa: BLE001 - as above: the other ranks wait for rank 0's outcome
                errors = [f"{type(e).__name__}: {e}"]
        shutil.rmtree(save.tmp, ignore_errors=True)  # left only by a failure: nothing points to it
    errors = _all_gather(errors if save.rank == 0 else None, group)[0]
    if errors:
        raise _save_error(save.root, save.step, errors)
    return save.final


def _save_error(root: Path, step: int, errors: list[str]) -> CheckpointError:
    kept = complete_steps(root) if root.is_dir() else []
    return CheckpointError(f"cannot write the checkpoint of step {step} to {root}: {'; '.join(errors)}; "
                           + (f"the complete checkpoints (steps {kept}) are unchanged" if kept else
                              "no complete checkpoint there"))


def _prune(root: Path, keep_last: Optional[int]) -> None:
    if keep_last:
        for old in sorted(_step_dirs(root))[:-keep_last]:
            shutil.rmtree(_step_dirs(root)[old], ignore_errors=True)


class _DiskError(RuntimeError):
    pass


def _write_checked(path: Path, obj: Any) -> dict[str, Any]:
    """_write, with a failure described in words (torch.save reports a full disk as a C++ stream error
    such as 'unexpected pos 576 vs 534')."""
    try:
        return _write(path, obj)
    except (OSError, RuntimeError) as e:
        raise _DiskError(_disk_error(e, path, _nbytes_of(obj))) from e


def _disk_error(error: BaseException, path: Path, needed: int) -> str:
    """The path and the cause: no space (errno, or less free space than the object's bytes after a
    failed write), a folder that cannot be written, or the error itself; with the fix."""
    where = next(p for p in (path, *path.parents) if p.exists())
    try:
        fs = os.statvfs(where)
        free, read_only = fs.f_bavail * fs.f_frsize, bool(fs.f_flag & os.ST_RDONLY)
    except OSError:
        free, read_only = None, False
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < max(needed, 1)):
        need = f", about {needed} needed" if needed else ""
        return (f"{path}: no space left on device ({free} bytes free there{need}); free space or save the "
                "checkpoints to another disk")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or read_only or not os.access(where, os.W_OK):
        reason = "read-only file system" if read_only or code == errno.EROFS else "permission denied"
        return f"{path}: not writable ({reason}); make {where} writable or save the checkpoints elsewhere"
    return f"{path}: {type(error).__name__}: {error}"


def _nbytes_of(value: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, each storage once: about what torch.save writes."""
    seen: dict[tuple[int, str], int] = {}
    for t in _tensors(value):
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), str(storage.device))] = storage.nbytes()
    return sum(seen.values())


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _staged(value: Any, storages: Optional[dict[tuple[int, str], torch.UntypedStorage]] = None) -> Any:
    """A CPU copy of a (nested) state dict taken now. Tensors that shared a storage share the copy's
    storage at the same offsets and strides, so torch.save writes the same bytes as for the original
    (CPU tensors; a GPU tensor's copy is recorded with the location 'cpu')."""
    storages = {} if storages is None else storages
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = (storage.data_ptr(), str(storage.device))
        if key not in storages:
            copy_storage = storage.clone if storage.device.type == "cpu" else storage.cpu
            storages[key] = copy_storage()  # type: ignore[no-untyped-call]  # torch leaves UntypedStorage.clone/.cpu unannotated
        tensor = torch.empty(0, dtype=value.dtype)
        tensor.set_(storages[key], value.storage_offset(), value.size(), value.stride())
        return tensor
    if isinstance(value, dict):
        mapping = type(value)((k, _staged(v, storages)) for k, v in value.items())
        attributes = getattr(value, "__dict__", None)
        if attributes:  # a state_dict's _metadata (module versions) is pickled with it
            mapping.__dict__.update(copy.deepcopy(attributes))
        return mapping
    if isinstance(value, (list, tuple)):
        return type(value)(_staged(v, storages) for v in value)
    return copy.deepcopy(value)


def _write(path: Path, obj: Any) -> dict[str, Any]:
    torch.save(obj, path)
    return _digest(path)


def _digest(path: Path) -> dict[str, Any]:
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


def complete_steps(root: str | os.PathLike[str]) -> list[int]:
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


def _check_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no manifest.json: it is not a complete distopt checkpoint")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
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


def _verify(path: Path, manifest: dict[str, Any], names: set[str]) -> None:
    for name in sorted(names):
        if _sha256(path / name) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt)")


def resolve(root: str | os.PathLike[str], step: Optional[int] = None) -> Path:
    """The directory of `step`, or the one `latest` points to."""
    root = Path(root)
    if step is None:
        pointer = root / "latest"
        if not pointer.is_file():
            raise CheckpointError(f"no checkpoint in {root}: {pointer} does not exist")
        step = int(pointer.read_text().strip().split("-", 1)[1])
    return _step_dirs(root).get(step, root / f"step-{step}")


def load_checkpoint(root: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: Optional[int] = None) -> dict[str, Any]:
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
        for group, saved_group in zip(optimizer.param_groups, manifest["param_groups"], strict=True):
            for k, v in saved_group.items():
                if k != "param_names":
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    else:
        outer.load_state_dict(_load(path / "optim-rank0.pt")["state_dict"])
    if isinstance(outer, Wrapper):
        outer.load_runtime_state(manifest.get("rule_runtime"))
    _barrier()
    return manifest


def _model_files(manifest: dict[str, Any]) -> set[str]:
    """The model files this rank checks: model.pt, or its share of the DCP files (every file once over the ranks)."""
    if manifest.get("model_format") != "dcp":
        return {"model.pt"}
    rank, world = _rank_world()
    files = sorted(name for name in manifest["files"] if name.startswith("model/"))
    return set(files[rank::world])


def _load_model(path: Path, manifest: dict[str, Any], model: torch.nn.Module) -> None:
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


def _files_of(manifest: dict[str, Any], optimizer: BlockSharded) -> set[str]:
    where = {b["key"]: b["file"] for b in manifest["blocks"]}
    return {where[_block_key(b.name, b.ordinal)] for b, _ in optimizer.block_states()}


def _check_plan(path: Path, manifest: dict[str, Any], optimizer: BlockSharded) -> None:
    saved = {b["key"]: b["slices"] for b in manifest["blocks"]}
    needed = {_block_key(b.name, b.ordinal): [[s.start, s.stop] for s in b.slices] for b in optimizer.plan.blocks}
    if saved != needed:
        raise CheckpointError(f"{path}: the checkpoint's block plan differs from this optimizer's "
                              "(other parameters, shapes or max_block); resume with the same model and max_block")
    if len(manifest["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{path}: {len(manifest['param_groups'])} parameter groups saved, "
                              f"{len(optimizer.param_groups)} in this optimizer")


def _load_blocks(path: Path, manifest: dict[str, Any], optimizer: BlockSharded) -> None:
    """Each rank reads the blocks it owns now, one old rank's file at a time (memory-mapped)."""
    where = {b["key"]: b["file"] for b in manifest["blocks"]}
    by_file: dict[str, list[tuple[Block, dict[str, Any]]]] = {}
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

