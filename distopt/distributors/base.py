"""The distributor interface: where each owned block's reduced gradient comes from, and where its
update goes. The optimizer (distopt.mlfop) talks to this interface only and never asks which
distributor it has (in the spirit of Distributed Shampoo's DistributorInterface, smaller):

    make_plan       which rank owns which block (distopt.plan), verified equal on every rank
    check           refuse options this distributor cannot serve, at construction
    open/add/close  one reduction: the rank's p.grad of every parameter, handed over as autograd
                    produces it, summed over ranks onto the owners (asynchronous)
    take            the reductions that finished, as Pieces of owned blocks (distopt.plan.Piece)
    checks          the check values each reduction carried (distopt.comm.Checks), summed over ranks
    all_reduce_sum  a small fp64 vector summed over ranks (FOP partials, norms, flags, checks)
    step_counts     what it needs the step's one agreement all-reduce to count (masters still missing)
    targets         per owned block, the fp32 tensor the update is applied to: a view of the
                    parameter, or the block's fp32 master, which the distributor creates and keeps
                    in the block's state (so checkpoints carry it)
    write_back      the updated blocks into every rank's parameters (rounded to their dtype)

Implementations: LocalDistributor (one process), OwnerDistributor (replicated parameters: DeepSpeed
ZeRO stage 0, DDP-style loops), FSDP2Distributor (DTensor shards). `distopt.distributors.make_distributor`
chooses.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from distopt.comm import Checks, Comm
from distopt.options import MLFOPOptions
from distopt.plan import Block, Piece, Plan, Precond, make_plan
from distopt.soap import state_dtype

BlockStates = Mapping[int, dict[str, Any]]  # owned block index -> that block's optimizer state (a mutable dict)


class Meter:
    """Bytes of the buffers a distributor holds now and at its peak (sum of tensor sizes, so the
    allocator's caching cannot hide or inflate anything)."""

    def __init__(self) -> None:
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def hold(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        self.now[kind] += t.numel() * t.element_size()
        self.peak[kind] = max(self.peak[kind], self.now[kind])
        self.peak["total"] = max(self.peak["total"], sum(self.now.values()))
        return t

    def release(self, kind: str, t: torch.Tensor) -> None:
        self.now[kind] -= t.numel() * t.element_size()


class Distributor(ABC):
    """The interface (module docstring); subclasses communicate, or not."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.meter = Meter()
        self.device = torch.device("cpu")
        self.plan: Optional[Plan] = None
        self._owned: list[Block] = []
        self._blocks_of: dict[int, list[Block]] = {}

    def set_device(self, device: torch.device) -> None:
        """Where communication buffers live: the parameters' device."""
        self.device = device

    def make_plan(self, params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], precond: Precond,
                  digest_extra: str = "") -> Plan:
        """Cut parameters into blocks and pick their owners; every rank must derive the same plan."""
        plan = self.plan = make_plan(params, max_block, self.world, precond)
        self._owned = plan.owned(self.rank)
        self._blocks_of = {}
        for b in plan.blocks:
            self._blocks_of.setdefault(b.param, []).append(b)
        return plan

    @property
    def owned(self) -> list[Block]:
        return self._owned

    def check(self, options: MLFOPOptions) -> None:  # noqa: B027 - a hook: most distributors serve every option
        """Refuse options this distributor cannot serve (a ValueError naming the option and the fix)."""

    # -- reductions --------------------------------------------------------------------------------

    @abstractmethod
    def open(self, group: str, microsteps: int, ranks: int, check: Checks) -> None:
        """Start a reduction of `microsteps` micro-steps' gradients for `group`; `check`'s values must be
        equal on every rank, which the optimizer verifies at step() (`checks`)."""

    @abstractmethod
    def add(self, param: int, grad: Optional[torch.Tensor]) -> None:
        """Parameter `param`'s contribution to the open reduction (None: zeros)."""

    @abstractmethod
    def close(self) -> None:
        """Every parameter has been added (missing ones count as zeros); send what is left."""

    @abstractmethod
    def take(self) -> list[Piece]:
        """The reductions opened so far, finished, oldest first."""

    def checks(self) -> list[tuple[Checks, torch.Tensor]]:
        """The check values of the reductions since the last call, with their sums over ranks."""
        return []

    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        """A small sum over ranks, blocking (one process: the vector itself)."""
        return vector

    # -- the update --------------------------------------------------------------------------------

    def keeps_master(self, param: torch.Tensor) -> bool:
        """Whether the owner updates an fp32 master of the parameter's blocks (kept in their state)
        rather than the parameter itself: low-precision parameters here; every parameter when the
        parameters are shards held elsewhere (FSDP2)."""
        return state_dtype(param) != param.dtype

    def step_counts(self, states: BlockStates) -> dict[str, float]:
        """Counts the step's agreement all-reduce sums over ranks for `targets` (none here)."""
        return {}

    def targets(self, params: Sequence[torch.Tensor], states: BlockStates, blocks: Sequence[Block],
                counts: Mapping[str, float]) -> dict[int, torch.Tensor]:
        """Per block of `blocks` (owned, updated this step): what the update is applied to. A view of
        the parameter, or the block's fp32 master, made from the parameter the first time."""
        out = {}
        for b in blocks:
            p = params[b.param]
            view = p.data[b.slices]
            if not self.keeps_master(p):
                out[b.index] = view
                continue
            st = states[b.index]
            if "master" not in st:
                st["master"] = view.to(state_dtype(p))  # the block's fp32 master copy, on its owner only
            master: torch.Tensor = st["master"]
            out[b.index] = master
        return out

    def write_back(self, params: Sequence[torch.Tensor], states: BlockStates, blocks: Sequence[Block]) -> None:
        """The updated `blocks`' masters rounded into their parameters; then every owned block to the
        other ranks (subclasses)."""
        for b in blocks:
            if self.keeps_master(params[b.param]):
                params[b.param].data[b.slices].copy_(states[b.index]["master"])

    # -- reporting ---------------------------------------------------------------------------------

    @property
    def sent(self) -> Counter[str]:
        """Bytes this rank handed to each kind of collective."""
        return Counter()

    @property
    def calls(self) -> Counter[str]:
        return Counter()

    def describe_plan(self) -> None:  # noqa: B027 - one process has no plan worth printing
        """Print the block plan (rank 0 of a sharded run)."""


class CollectiveDistributor(Distributor):
    """A distributor over a process group: its Comm counts what it sends, every rank checks that it
    derived the same block plan, and each reduction carries its Checks, summed by an async all-reduce."""

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self.comm = Comm(group)
        super().__init__(self.comm.rank, self.comm.world)
        self._checks: list[tuple[Checks, torch.Tensor, object]] = []  # (values, vector, all-reduce work)

    def make_plan(self, params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], precond: Precond,
                  digest_extra: str = "") -> Plan:
        plan = super().make_plan(params, max_block, precond, digest_extra)
        digests = self.comm.all_gather_object(plan.digest(digest_extra))
        if len(set(digests)) != 1:
            raise RuntimeError(f"block plans differ across ranks ({digests}): every rank must build the optimizer "
                               "over the same parameters, names, shapes and options")
        return plan

    @property
    def sent(self) -> Counter[str]:
        return self.comm.sent

    @property
    def calls(self) -> Counter[str]:
        return self.comm.calls

    def _send_check(self, check: Checks) -> None:
        """A reduction's check values start their all-reduce as it opens; checks() collects them."""
        vector = check.vector(self.device)
        self._checks.append((check, vector, self.comm.all_reduce_sum(vector, async_op=True)))

    def checks(self) -> list[tuple[Checks, torch.Tensor]]:
        out = []
        for check, vector, work in self._checks:
            self.comm.wait(work, "all_reduce")
            out.append((check, vector))
        self._checks = []
        return out

    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        summed: torch.Tensor = self.comm.all_reduce_sum(vector)
        return summed

    def describe_plan(self) -> None:
        if self.rank != 0 or self.plan is None:
            return
        rows = self.plan.summary()
        print("[distopt] block plan: " + "; ".join(
            f"rank {r['rank']}: {r['blocks']} blocks, {r['numel']} elements "
            f"({r['state_bytes'] / 2**20:.2f} MiB of state), cost {r['cost']:.3g}" for r in rows)
            + f"; slot {rows[0]['slot']} elements, padding {rows[0]['padding']} "
            f"({rows[0]['padding'] / max(1, sum(r['numel'] for r in rows)):.1%})", file=sys.stderr)
