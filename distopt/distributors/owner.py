"""Replicated parameters, one owner per block (DeepSpeed ZeRO stage 0, or a DDP-style loop).

A reduction is a reduce-scatter of the slot layout (distopt.plan): rank r's row holds the blocks r
owns, so r receives exactly their sums. The [world, W] buffer is cut along W into buckets of about
`bucket_mb`; buckets are packed and launched in order, each as soon as every parameter with a
piece in it has been added, that is, during backward (shares are laid out in backward order).
Until then an added gradient is held by reference, not copied, so the only extra memory is the
buckets in flight (at most `inflight`; the oldest is waited for before a new one starts, which on
a GPU orders streams without a host sync) and the received shares. The update goes back by
all-gather over the same layout, in the parameters' dtype, bucket by bucket.

comm_dtype: the dtype reductions are summed in (fp32, or bf16 to halve the bytes; fp64 parameters
always reduce in fp64).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from distopt.comm import Checks
from distopt.distributors.base import BlockStates, CollectiveDistributor
from distopt.plan import Block, Piece, Plan, Precond


@dataclass
class _Reduction:
    """One reduce-scatter of every block's gradient in slot layout ([world, W], cut into buckets)."""

    piece: Piece
    recv: torch.Tensor                                   # this rank's share, W elements
    waiting: dict[int, int]                              # bucket -> parameters still to add
    grads: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # added, not yet packed
    added: set[int] = field(default_factory=set)
    next: int = 0                                        # the next bucket to pack and launch
    works: list[tuple[torch.Tensor, object]] = field(default_factory=list)  # (bucket, work), oldest first


class OwnerDistributor(CollectiveDistributor):
    """Replicated parameters, one owner per block (module docstring)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0,
                 comm_dtype: torch.dtype = torch.float32, inflight: int = 4) -> None:
        super().__init__(group)
        self.bucket_mb, self.comm_dtype, self.inflight = bucket_mb, comm_dtype, inflight
        self._open: Optional[_Reduction] = None
        self._pending: list[_Reduction] = []

    def make_plan(self, params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], precond: Precond,
                  digest_extra: str = "") -> Plan:
        plan = super().make_plan(params, max_block, precond, f"{digest_extra}|{self.bucket_mb}|{self.comm_dtype}")
        width = max(1, int(self.bucket_mb * 2**20) // (self.comm_dtype.itemsize * self.world))
        self._cuts = [(s, min(s + width, plan.slot)) for s in range(0, plan.slot, width)]
        # for every bucket: the (block, share range) pieces in it, and the parameters they belong to
        self._pieces: list[list[tuple[Block, int, int]]] = [[] for _ in self._cuts]
        for b in plan.blocks:
            for j, (s, e) in enumerate(self._cuts):
                lo, hi = max(b.offset, s), min(b.offset + b.numel, e)
                if lo < hi:
                    self._pieces[j].append((b, lo, hi))
        self._params_in = [sorted({b.param for b, _, _ in pieces}) for pieces in self._pieces]
        self._last_bucket = {param: j for j, params in enumerate(self._params_in) for param in params}
        self._buckets_of: dict[int, list[int]] = {}
        for j, params_in in enumerate(self._params_in):
            for param in params_in:
                self._buckets_of.setdefault(param, []).append(j)
        return plan

    # -- reductions --------------------------------------------------------------------------------

    def open(self, group: str, microsteps: int, ranks: int, check: Checks) -> None:
        for red in self._pending:  # the previous reduction had a whole forward to travel: free its buckets
            self._finish_works(red)
        assert self.plan is not None, "make_plan() first"
        recv = self.meter.hold("recv", torch.empty(self.plan.slot, dtype=self.comm_dtype, device=self.device))
        self._send_check(check)
        self._open = _Reduction(Piece(group, microsteps, ranks, self.world, {}), recv,
                                waiting={j: len(params) for j, params in enumerate(self._params_in)})

    def add(self, param: int, grad: Optional[torch.Tensor]) -> None:
        red = self._open
        assert red is not None, "add() outside a reduction: open() first"
        if param in red.added or param not in self._buckets_of:
            return
        red.added.add(param)
        red.grads[param] = grad
        for j in self._buckets_of[param]:
            red.waiting[j] -= 1
        while red.next < len(self._cuts) and red.waiting[red.next] == 0:
            self._launch(red, red.next)
            red.next += 1

    def _launch(self, red: _Reduction, j: int) -> None:
        """Pack bucket j from the held gradients, start its reduce-scatter, drop what is fully packed."""
        s, e = self._cuts[j]
        buffer = self.meter.hold("buckets", torch.zeros(self.world, e - s, dtype=self.comm_dtype, device=self.device))
        for b, lo, hi in self._pieces[j]:
            grad = red.grads[b.param]
            if grad is not None:
                buffer[b.owner, lo - s:hi - s].copy_(grad[b.slices].reshape(-1)[lo - b.offset:hi - b.offset])
        for param in self._params_in[j]:
            if self._last_bucket[param] == j:
                del red.grads[param]
        while sum(len(r.works) for r in self._pending + [red]) >= self.inflight:
            self._finish_oldest(red)
        red.works.append((buffer, self.comm.reduce_scatter(red.recv[s:e], buffer.view(-1))))

    def _finish_oldest(self, current: _Reduction) -> None:
        for red in self._pending + [current]:
            if red.works:
                buffer, work = red.works.pop(0)
                self.comm.wait(work, "reduce_scatter")
                self.meter.release("buckets", buffer)
                return

    def _finish_works(self, red: _Reduction) -> None:
        for buffer, work in red.works:
            self.comm.wait(work, "reduce_scatter")
            self.meter.release("buckets", buffer)
        red.works = []

    def close(self) -> None:
        red = self._open
        assert red is not None, "close() outside a reduction: open() first"
        for param in self._buckets_of:
            self.add(param, None)  # parameters without a gradient this time count as zeros
        self._pending.append(red)
        self._open = None

    def take(self) -> list[Piece]:
        pieces = []
        for red in self._pending:
            self._finish_works(red)
            for b in self.owned:
                red.piece.grads[b.index] = red.recv[b.offset:b.offset + b.numel].view(b.shape)
            self.meter.release("recv", red.recv)
            pieces.append(red.piece)
        self._pending = []
        return pieces

    # -- the update --------------------------------------------------------------------------------

    def write_back(self, params: Sequence[torch.Tensor], states: BlockStates, blocks: Sequence[Block]) -> None:
        """The owners' blocks (masters rounded first) to every rank: one all-gather per bucket, in the
        parameters' (promoted) dtype."""
        super().write_back(params, states, blocks)
        dtype = params[0].dtype
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        for j, (s, e) in enumerate(self._cuts):
            mine = self.meter.hold("gather", torch.zeros(e - s, dtype=dtype, device=self.device))
            for b, lo, hi in self._pieces[j]:
                if b.owner == self.rank:
                    mine[lo - s:hi - s].copy_(params[b.param].data[b.slices].reshape(-1)[lo - b.offset:hi - b.offset])
            out = self.meter.hold("gather", torch.empty(self.world, e - s, dtype=dtype, device=self.device))
            self.comm.wait(self.comm.all_gather(out.view(-1), mine), "all_gather")
            for b, lo, hi in self._pieces[j]:
                if b.owner != self.rank:
                    write_flat(params[b.param].data[b.slices], lo - b.offset, out[b.owner, lo - s:hi - s])
            self.meter.release("gather", mine)
            self.meter.release("gather", out)

    def describe_plan(self) -> None:
        super().describe_plan()
        if self.rank == 0:
            print(f"[distopt] {len(self._cuts)} reduction buckets of up to {self.bucket_mb:g} MB", file=sys.stderr)


def write_flat(view: torch.Tensor, start: int, values: torch.Tensor) -> None:
    """view.reshape(-1)[start:start + len(values)] = values, for a view that may not be contiguous (a
    block cut from a parameter's columns): whole rows at once, the partial first and last rows apart."""
    stop = start + values.numel()
    if view.is_contiguous():
        view.view(-1)[start:stop].copy_(values)
        return
    if view.dim() != 2:  # an N-d block cut in its middle dims (rare): through a copy of the block
        flat = view.reshape(-1).clone()
        flat[start:stop] = values
        view.copy_(flat.view(view.shape))
        return
    row = view.shape[1]
    first, last = start // row, (stop - 1) // row
    if first == last:
        view[first, start - first * row:stop - first * row].copy_(values)
        return
    head = (first + 1) * row - start
    view[first, start - first * row:].copy_(values[:head])
    full = last - first - 1
    if full:
        view[first + 1:last].copy_(values[head:head + full * row].view(full, row))
    view[last, :stop - last * row].copy_(values[head + full * row:])
