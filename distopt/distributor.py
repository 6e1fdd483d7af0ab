"""Distributors: where each block's reduced gradient comes from and where its update goes.

The optimizer's math (window, folds, levels, SOAP) only sees the blocks this rank owns. A
distributor hides how they got there (in the spirit of Distributed Shampoo's DistributorInterface,
smaller):

    make_plan       which rank owns which block (distopt.plan), verified equal on every rank
    open/add/close  one reduction: the rank's p.grad of every parameter, handed over as autograd
                    produces it, summed over ranks onto the owners (asynchronous)
    take            the reductions that finished, as Pieces of owned blocks (window.Piece)
    all_reduce_sum  a small fp64 vector summed over ranks (FOP partials, norms, flags, checks)
    write_back      the owners' new block values to every replica

`LocalDistributor`: one process, no communication, no copies. `OwnerDistributor`: every rank holds
the whole model (DeepSpeed ZeRO stage 0, or a DDP-style loop) and each block has one owner. The FSDP2
distributor (distopt.fsdp2) is the third. `distopt.mlfop.make_distributor` is the one place that
chooses; pass `MLFOPSOAP(distributor=...)` to choose yourself.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from distopt.comm import Comm
from distopt.plan import Block, Plan, Precond, make_plan
from distopt.window import Piece


class Meter:
    """Bytes of the buffers a distributor holds now and at its peak (sum of tensor sizes, so the
    allocator's caching cannot hide or inflate anything)."""

    def __init__(self):
        self.now: Counter = Counter()
        self.peak: Counter = Counter()

    def hold(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        self.now[kind] += t.numel() * t.element_size()
        self.peak[kind] = max(self.peak[kind], self.now[kind])
        self.peak["total"] = max(self.peak["total"], sum(v for k, v in self.now.items()))
        return t

    def release(self, kind: str, t: torch.Tensor) -> None:
        self.now[kind] -= t.numel() * t.element_size()


class Distributor(ABC):
    rank: int = 0
    world: int = 1
    plan: Plan
    replicated_params = True  # every rank holds every parameter (the owner updates it in place, then it is sent)

    @property
    def divisor(self) -> int:
        """What a reduced piece is divided by to be a mean over ranks (pieces are sums over `divisor` ranks)."""
        return self.world

    def __init__(self):
        self.meter = Meter()
        self.device = torch.device("cpu")

    def set_device(self, device: torch.device) -> None:
        """Where communication buffers live: the parameters' device."""
        self.device = device

    def make_plan(self, params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], precond: Precond,
                  digest_extra: str = "") -> Plan:
        """Cut parameters into blocks and pick their owners; every rank must derive the same plan."""
        self.plan = make_plan(params, max_block, self.world, precond)
        self._owned = self.plan.owned(self.rank)
        self._blocks_of: dict[int, list[Block]] = {}
        for b in self.plan.blocks:
            self._blocks_of.setdefault(b.param, []).append(b)
        return self.plan

    @property
    def owned(self) -> list[Block]:
        return self._owned

    @property
    def sent(self) -> Counter:
        """Bytes this rank handed to each kind of collective."""
        return Counter()

    @property
    def calls(self) -> Counter:
        return Counter()

    @abstractmethod
    def open(self, group: str, microsteps: int, ranks: int, check: Sequence[float]) -> None:
        """Start a reduction of `microsteps` micro-steps' gradients for `group`; `check` (a few small
        integers) must be equal on every rank, which step() verifies."""

    @abstractmethod
    def add(self, param: int, grad: Optional[torch.Tensor]) -> None:
        """Parameter `param`'s contribution to the open reduction (None: zeros)."""

    @abstractmethod
    def close(self) -> None:
        """Every parameter has been added (missing ones count as zeros); send what is left."""

    @abstractmethod
    def take(self) -> list[Piece]:
        """The reductions opened so far, finished, oldest first."""

    @abstractmethod
    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        """A small sum over ranks, blocking."""

    @abstractmethod
    def write_back(self, params: list[torch.Tensor]) -> None:
        """Owners' current block values to every rank."""

    def checks(self) -> list[torch.Tensor]:
        """The summed check vectors of the reductions since the last call (see `open`)."""
        return []

    def describe_plan(self) -> None:
        """Print the block plan (rank 0 of a sharded run)."""


class LocalDistributor(Distributor):
    """One process: every block is owned here; a 'reduction' hands p.grad's blocks over as views."""

    def __init__(self):
        super().__init__()
        self._open: Optional[Piece] = None
        self._done: list[Piece] = []

    def open(self, group, microsteps, ranks, check):
        self._open = Piece(group, microsteps, 1, {})

    def add(self, param, grad):
        if grad is not None:
            for b in self._blocks_of[param]:
                self._open.grads[b.index] = grad[b.slices]

    def close(self):
        for b in self.owned:  # parameters without a gradient this time count as zeros
            if b.index not in self._open.grads:
                self._open.grads[b.index] = torch.zeros(b.shape, device=self.device)
        self._done.append(self._open)
        self._open = None

    def take(self):
        done, self._done = self._done, []
        return done

    def all_reduce_sum(self, vector):
        return vector

    def write_back(self, params):
        pass  # the owner updated the parameters in place


class CollectiveDistributor(Distributor):
    """A distributor over a process group: its Comm counts what it sends, every rank checks that it
    derived the same block plan, and each reduction carries a small check vector summed by all-reduce."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        super().__init__()
        self.comm = Comm(group)
        self.rank, self.world = self.comm.rank, self.comm.world
        self._checks: list[tuple] = []  # (vector, all-reduce work) per reduction since checks()

    def make_plan(self, params, max_block, precond, digest_extra=""):
        plan = super().make_plan(params, max_block, precond, digest_extra)
        digests = self.comm.all_gather_object(plan.digest(digest_extra))
        if len(set(digests)) != 1:
            raise RuntimeError(f"block plans differ across ranks ({digests}): every rank must build the optimizer "
                               "over the same parameters, names, shapes and options")
        return plan

    @property
    def sent(self) -> Counter:
        return self.comm.sent

    @property
    def calls(self) -> Counter:
        return self.comm.calls

    def checks(self):
        out = []
        for vector, work in self._checks:
            self.comm.wait(work, "all_reduce")
            out.append(vector)
        self._checks = []
        return out

    def all_reduce_sum(self, vector):
        return self.comm.all_reduce_sum(vector)


@dataclass
class _Reduction:
    """One reduce-scatter of every block's gradient in slot layout ([world, W], cut into buckets)."""

    piece: Piece
    recv: torch.Tensor                                   # this rank's share, W elements
    waiting: dict[int, int]                              # bucket -> parameters still to add
    grads: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # added, not yet packed
    added: set[int] = field(default_factory=set)
    next: int = 0                                        # the next bucket to pack and launch
    works: list = field(default_factory=list)            # (bucket buffer, work) launched, oldest first
    check: Optional[tuple] = None                        # (tensor, work) of the check all-reduce


class OwnerDistributor(CollectiveDistributor):
    """Replicated parameters, one owner per block.

    A reduction is a reduce-scatter of the slot layout (distopt.plan): rank r's row holds the blocks r
    owns, so r receives exactly their sums. The [world, W] buffer is cut along W into buckets of about
    `bucket_mb`; buckets are packed and launched in order, each as soon as every parameter with a
    piece in it has been added, that is, during backward (shares are laid out in backward order).
    Until then an added gradient is held by reference, not copied, so the only extra memory is the
    buckets in flight (at most `inflight`; the oldest is waited for before a new one starts, which on
    a GPU orders streams without a host sync) and the received shares. The update goes back by
    all-gather over the same layout, in the parameters' dtype, bucket by bucket.

    comm_dtype: the dtype reductions are summed in (fp32, or bf16 to halve the bytes; fp64
    parameters always reduce in fp64).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0,
                 comm_dtype: torch.dtype = torch.float32, inflight: int = 4):
        super().__init__(group)
        self.bucket_mb, self.comm_dtype, self.inflight = bucket_mb, comm_dtype, inflight
        self._open: Optional[_Reduction] = None
        self._pending: list[_Reduction] = []

    def make_plan(self, params, max_block, precond, digest_extra=""):
        plan = super().make_plan(params, max_block, precond, f"{digest_extra}|{self.bucket_mb}|{self.comm_dtype}")
        elem = self.comm_dtype.itemsize
        width = max(1, int(self.bucket_mb * 2**20) // (elem * self.world))
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
        for j, params in enumerate(self._params_in):
            for param in params:
                self._buckets_of.setdefault(param, []).append(j)
        return plan

    @property
    def n_buckets(self) -> int:
        return len(self._cuts)

    # -- reductions --------------------------------------------------------------------------------

    def open(self, group, microsteps, ranks, check):
        for red in self._pending:  # the previous reduction had a whole forward to travel: free its buckets
            self._finish_works(red)
        recv = self.meter.hold("recv", torch.empty(self.plan.slot, dtype=self.comm_dtype, device=self.device))
        reduction = _Reduction(Piece(group, microsteps, ranks, {}), recv,
                               waiting={j: len(params) for j, params in enumerate(self._params_in)})
        vector = check_vector(check, self.device)
        reduction.check = (vector, self.comm.all_reduce_sum(vector, async_op=True))
        self._open = reduction

    def add(self, param, grad):
        red = self._open
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

    def close(self):
        red = self._open
        for param in self._buckets_of:
            self.add(param, None)  # parameters without a gradient this time count as zeros
        self._pending.append(red)
        self._open = None

    def take(self):
        pieces = []
        for red in self._pending:
            self._finish_works(red)
            self._checks.append(red.check)
            for b in self.owned:
                red.piece.grads[b.index] = red.recv[b.offset:b.offset + b.numel].view(b.shape)
            self.meter.release("recv", red.recv)
            pieces.append(red.piece)
        self._pending = []
        return pieces

    # -- the update --------------------------------------------------------------------------------

    def write_back(self, params):
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
        if self.rank == 0:
            rows = self.plan.summary()
            print("[distopt] block plan: " + "; ".join(
                f"rank {r['rank']}: {r['blocks']} blocks, {r['numel']} elements "
                f"({r['state_bytes'] / 2**20:.2f} MiB of state), cost {r['cost']:.3g}" for r in rows)
                + f"; slot {rows[0]['slot']} elements, padding {rows[0]['padding']} "
                f"({rows[0]['padding'] / max(1, sum(r['numel'] for r in rows)):.1%}), "
                f"{len(self._cuts)} buckets", file=sys.stderr)


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


def check_vector(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """[1, x, x^2 for each x]: summed over ranks it shows whether every rank had the same values
    (sum x^2 * n == (sum x)^2 exactly when they are all equal). Filled element by element, so a
    vector on a GPU costs no host synchronisation."""
    vector = torch.zeros(1 + 2 * len(values), dtype=torch.float64, device=device)
    vector[0] = 1.0
    for i, x in enumerate(values):
        vector[1 + 2 * i], vector[2 + 2 * i] = float(x), float(x) * float(x)
    return vector


def disagreement(summed: Sequence[float]) -> list[int]:
    """Indices of the values (see check_vector) on which ranks disagreed."""
    n = summed[0]
    return [i for i in range((len(summed) - 1) // 2) if summed[2 + 2 * i] * n != summed[1 + 2 * i] ** 2]
