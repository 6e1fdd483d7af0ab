"""The FSDP2 distributor: parameters, gradients and optimizer state all sharded.

The user shards the model as PyTorch documents (`fully_shard` per decoder layer, then the root, with
a MixedPrecisionPolicy) and hands `model.named_parameters()` to the optimizer: DTensors, each rank
holding dim-0 rows of every parameter (`Shard(0)`; HSDP adds a `Replicate()` mesh dimension). FSDP2
reduce-scatters every backward's gradient and calls the post-accumulate-grad hooks with p.grad this
rank's rows of the mean over ranks, so the window's schedule applies as it is: keep (FSDP2 adds the
next micro-step's rows into p.grad), or take p.grad and *redistribute*: one all-to-all within the
shard group sends every block's rows to the block's owner (Distributed Shampoo's lossless
fully_shard distributor, at block granularity), ceil(log2 K) + 1 times per step for the streaming
fold. At step() the owners' updated blocks go back to the rows' holders by the reverse all-to-all.

Owners are chosen within the shard group; under HSDP every replica group computes the same blocks
from the same (all-reduced) gradients, so replicas stay identical with no optimizer traffic between
them. The owner keeps an fp32 master of each block (fetched once from the shards by all-to-all, and
kept with the block's state in checkpoints): it cannot update a DTensor's rows in place.

Rows follow `torch.chunk` (FSDP2's split): with n rows on S ranks, rank i holds
[min(i c, n), min((i + 1) c, n)) with c = ceil(n / S), possibly none (`rows_of`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from distopt.comm import Checks
from distopt.distributors.base import BlockStates, CollectiveDistributor
from distopt.options import MLFOPOptions
from distopt.plan import Block, Piece, Plan, Precond


def rows_of(n: int, world: int, rank: int) -> tuple[int, int]:
    """The dim-0 rows rank `rank` of `world` holds of an n-row parameter (torch.chunk's split)."""
    chunk = math.ceil(n / world) if n else 0
    return min(rank * chunk, n), min((rank + 1) * chunk, n)


def shard_dim(p: DTensor) -> int:
    """The mesh dimension p is sharded over (its other dimensions must replicate it)."""
    dims = [i for i, placement in enumerate(p.placements) if placement == Shard(0)]
    others = [placement for i, placement in enumerate(p.placements) if i not in dims]
    if len(dims) != 1 or any(placement != Replicate() for placement in others):
        raise ValueError(f"a parameter of shape {tuple(p.shape)} has placements {p.placements}: the FSDP2 distributor "
                         "needs Shard(0) on one mesh dimension and Replicate() on the others (fully_shard's default; "
                         "HSDP's (Replicate(), Shard(0)))")
    return dims[0]


@dataclass
class _Exchange:
    """One redistribution in flight: the all-to-all's buffers and work handle."""

    piece: Piece
    check: Checks
    grads: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # param -> local rows of p.grad
    recv: Optional[torch.Tensor] = None
    send: Optional[torch.Tensor] = None
    work: object = None


class FSDP2Distributor(CollectiveDistributor):
    """Owners within the shard group of FSDP2-sharded (DTensor) parameters; see the module docstring."""

    def __init__(self, params: Sequence[DTensor], comm_dtype: torch.dtype = torch.float32) -> None:
        mesh = params[0].device_mesh
        dims = {shard_dim(p) for p in params}
        if len(dims) != 1 or any(p.device_mesh != mesh for p in params):
            raise ValueError("the FSDP2 distributor needs every parameter on one device mesh with one sharded "
                             "dimension (shard the whole model with the same mesh)")
        self.mesh_dim = dims.pop()
        super().__init__(own_group(mesh, self.mesh_dim))
        self.replicas = math.prod(mesh.size(i) for i in range(mesh.ndim) if i != self.mesh_dim)
        self.comm_dtype = comm_dtype
        self.master_dtype = torch.float64 if comm_dtype == torch.float64 else torch.float32
        self._shapes = [tuple(p.shape) for p in params]
        self._open: Optional[_Exchange] = None
        self._pending: list[_Exchange] = []

    def check(self, options: MLFOPOptions) -> None:
        if options.fop and options.pair_source == "ranks":
            raise ValueError("pair_source='ranks' folds per-rank gradients, but FSDP2's reduce-scatter hands over the "
                             "mean over ranks; use 'microstep' or 'modality' with FSDP2-sharded parameters")

    def make_plan(self, params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], precond: Precond,
                  digest_extra: str = "") -> Plan:
        plan = super().make_plan(params, max_block, precond, f"{digest_extra}|fsdp2|{self.comm_dtype}")
        # rows: the part of block b that rank r holds, as (first, last) global rows, or None
        self._rows = {(b.index, r): self._overlap(b, r) for b in plan.blocks for r in range(self.world)}
        self._by_owner = [sorted((b for b in plan.blocks if b.owner == r), key=lambda b: b.index)
                          for r in range(self.world)]
        self._send_splits = [sum(self._numel(b, self.rank) for b in self._by_owner[r]) for r in range(self.world)]
        self._recv_splits = [sum(self._numel(b, r) for b in self._by_owner[self.rank]) for r in range(self.world)]
        return plan

    def _overlap(self, b: Block, rank: int) -> Optional[tuple[int, int]]:
        lo, hi = rows_of(self._shapes[b.param][0], self.world, rank) if self._shapes[b.param] else (0, 1)
        start, stop = (b.slices[0].start, b.slices[0].stop) if b.slices else (0, 1)
        first, last = max(lo, start), min(hi, stop)
        return (first, last) if first < last else None

    def _numel(self, b: Block, rank: int) -> int:
        rows = self._rows[(b.index, rank)]
        return 0 if rows is None else (rows[1] - rows[0]) * (b.numel // max(b.shape[0], 1) if b.shape else 1)

    def _local_rows(self, local: torch.Tensor, b: Block, rank: int) -> torch.Tensor:
        """This rank's rows of block b, from its local shard (rows counted from the shard's first row)."""
        rows = self._rows[(b.index, rank)]
        assert rows is not None
        lo = rows_of(self._shapes[b.param][0], self.world, rank)[0]
        return local[(slice(rows[0] - lo, rows[1] - lo),) + tuple(b.slices[1:])]

    # -- redistribution of gradients ---------------------------------------------------------------

    def open(self, group: str, microsteps: int, ranks: int, check: Checks) -> None:
        """Nothing is allocated or sent here: under FSDP2 `open` and `add` run in gradient hooks, on
        FSDP2's reduce-scatter stream; `close` (at the end of backward) does the work."""
        self._open = _Exchange(Piece(group, microsteps, 1, 1, {}), check)

    def add(self, param: int, grad: Optional[torch.Tensor]) -> None:
        assert self._open is not None, "add() outside a reduction: open() first"
        self._open.grads[param] = None if grad is None else _local(grad)

    def close(self) -> None:
        """Every owned block's rows of this rank, packed by destination into one send buffer (copied in
        place, cast to the wire's dtype on the way), then one all-to-all. The previous exchange's send
        buffer is let go first (its all-to-all had a micro-step to finish): at most one is held."""
        ex = self._open
        assert ex is not None, "close() outside a reduction: open() first"
        for pending in self._pending:
            self._release_send(pending)
        self._send_check(ex.check)
        send = self.meter.hold("send", torch.empty(sum(self._send_splits), dtype=self.comm_dtype, device=self.device))
        offset = 0
        for r in range(self.world):
            for b in self._by_owner[r]:
                n = self._numel(b, self.rank)
                if not n:
                    continue
                local = ex.grads.get(b.param)
                if local is None:
                    send[offset:offset + n].zero_()
                else:
                    rows = self._local_rows(local, b, self.rank)
                    send[offset:offset + n].view(rows.shape).copy_(rows)
                offset += n
        ex.grads, ex.send = {}, send
        ex.recv = self.meter.hold("recv", torch.empty(sum(self._recv_splits), dtype=self.comm_dtype,
                                                      device=self.device))
        ex.work = self.comm.all_to_all(ex.recv, ex.send, self._recv_splits, self._send_splits)
        self._pending.append(ex)
        self._open = None

    def _release_send(self, ex: _Exchange) -> None:
        if ex.send is not None:
            self.comm.wait(ex.work, "all_to_all")
            self.meter.release("send", ex.send)
            ex.send = None

    def take(self) -> list[Piece]:
        out = []
        for ex in self._pending:
            assert ex.recv is not None
            self._release_send(ex)
            ex.piece.grads = self._assemble(ex.recv)
            self.meter.release("recv", ex.recv)
            out.append(ex.piece)
        self._pending = []
        return out

    def _assemble(self, recv: torch.Tensor, own: bool = False) -> dict[int, torch.Tensor]:
        """Every owned block from its rows as the ranks sent them (sources in rank order = row order).
        `own`: every block in memory of its own (the masters), not a view that would keep the whole
        receive buffer alive beside them."""
        parts: dict[int, list[torch.Tensor]] = {b.index: [] for b in self.owned}
        offset = 0
        for r in range(self.world):
            for b in self._by_owner[self.rank]:
                n = self._numel(b, r)
                if n:
                    rows = self._rows[(b.index, r)]
                    assert rows is not None
                    parts[b.index].append(recv[offset:offset + n].view((rows[1] - rows[0],) + tuple(b.shape[1:])))
                    offset += n
        return {b.index: torch.cat(parts[b.index]) if len(parts[b.index]) > 1 else
                parts[b.index][0].clone() if own else parts[b.index][0] for b in self.owned}

    # -- masters and the update --------------------------------------------------------------------

    def keeps_master(self, param: torch.Tensor) -> bool:
        return True  # the owner cannot update a DTensor's rows held elsewhere: it updates its master

    def step_counts(self, states: BlockStates) -> dict[str, float]:
        """Owned blocks without a master yet (a new run, or one resumed from replicated parameters):
        if any rank has one, every rank takes part in the all-to-all that fetches them."""
        return {"masters_missing": float(sum("master" not in states[b.index] for b in self.owned))}

    def targets(self, params: Sequence[torch.Tensor], states: BlockStates, blocks: Sequence[Block],
                counts: Mapping[str, float]) -> dict[int, torch.Tensor]:
        if counts.get("masters_missing", 0):
            for index, master in self._fetch(params).items():
                states[index].setdefault("master", master)
        return {b.index: states[b.index]["master"] for b in blocks}

    def _fetch(self, params: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The current value of every owned block, from the shards (one all-to-all): the owners' masters."""
        dtype = self.master_dtype
        send_parts = [self._local_rows(_local(params[b.param]), b, self.rank).reshape(-1).to(dtype)
                      for r in range(self.world) for b in self._by_owner[r]
                      if self._rows[(b.index, self.rank)] is not None]
        send = torch.cat(send_parts) if send_parts else torch.zeros(0, dtype=dtype, device=self.device)
        recv = torch.empty(sum(self._recv_splits), dtype=dtype, device=self.device)
        self.comm.wait(self.comm.all_to_all(recv, send, self._recv_splits, self._send_splits), "all_to_all")
        return self._assemble(recv, own=True)

    def write_back(self, params: Sequence[torch.Tensor], states: BlockStates, blocks: Sequence[Block]) -> None:
        """Every owned block's master into every holder's rows, sent in the parameters' dtype when they
        share one (the rows are cast to it anyway: bf16 halves the bytes)."""
        dtypes = {p.dtype for p in params}
        wire = dtypes.pop() if len(dtypes) == 1 else self.master_dtype
        send_parts = []
        for r in range(self.world):
            for b in self._by_owner[self.rank]:
                rows = self._rows[(b.index, r)]
                if rows is not None:
                    start = b.slices[0].start
                    master = states[b.index]["master"]
                    send_parts.append(master[rows[0] - start:rows[1] - start].reshape(-1).to(wire))
        send = torch.cat(send_parts) if send_parts else torch.zeros(0, dtype=wire, device=self.device)
        recv = torch.empty(sum(self._send_splits), dtype=wire, device=self.device)
        self.comm.wait(self.comm.all_to_all(recv, send, self._send_splits, self._recv_splits), "all_to_all")
        offset = 0
        for r in range(self.world):
            for b in self._by_owner[r]:
                n = self._numel(b, self.rank)
                if n:
                    target = self._local_rows(_local(params[b.param]), b, self.rank)
                    target.copy_(recv[offset:offset + n].view(target.shape))
                    offset += n


def own_group(mesh: DeviceMesh, dim: int) -> dist.ProcessGroup:
    """A process group of the ranks of this rank's slice along the mesh's dimension `dim` (the shard
    group), separate from FSDP2's: distopt's all-to-alls then travel on their own communicator instead
    of queueing behind FSDP2's all-gathers and reduce-scatters. Every rank calls it (a collective)."""
    groups = mesh.mesh.movedim(dim, -1).reshape(-1, mesh.size(dim)).tolist()
    mine, _ = dist.new_subgroups_by_enumeration(groups)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    assert isinstance(mine, dist.ProcessGroup)
    return mine


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter."""
    assert isinstance(p, DTensor)
    return p.to_local()
