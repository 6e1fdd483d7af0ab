"""Distributors: where each block's reduced micro-gradient comes from and where its update goes.

The optimizer's math (window, folds, levels, SOAP) only sees the blocks this rank owns. A
distributor hides how they got there (in the spirit of Distributed Shampoo's DistributorInterface,
smaller):

    plan            which rank owns which block (distopt.plan), verified equal on every rank
    reduce          a micro-step's gradient of every block, summed over ranks onto the owners (async)
    all_reduce_sum  a small fp64 vector summed over ranks (FOP partials, norms, flags)
    write_back      the owners' new block values to every replica

Implementations: `LocalDistributor` (one process, no communication) and `OwnerDistributor` (every
rank holds the whole model, as under DeepSpeed ZeRO stage 0 or DDP; blocks are owned by one rank).
`make_distributor` is the one place that chooses between them; pass `distributor=` to choose yourself.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections import Counter
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from distopt.comm import Comm, PendingReduce
from distopt.plan import Block, Plan, Rotations, make_plan


class Distributor(ABC):
    rank: int
    world: int
    plan: Plan

    def make_plan(self, params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int],
                  rotations: Rotations) -> Plan:
        """Cut parameters into blocks and pick their owners; every rank must derive the same plan."""
        self.plan = make_plan(params, max_block, self.world, rotations)
        self._owned = self.plan.owned(self.rank)
        return self.plan

    @property
    def owned(self) -> list[Block]:
        return self._owned

    @property
    def sent(self) -> Counter:
        """Bytes this rank put into each kind of collective."""
        return Counter()

    @property
    def calls(self) -> Counter:
        return Counter()

    @abstractmethod
    def reduce(self, payloads: dict[int, torch.Tensor], width: int = 1) -> PendingReduce:
        """Sum every block's flat payload over ranks onto its owner (async)."""

    @abstractmethod
    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        """A small sum over ranks, blocking."""

    @abstractmethod
    def write_back(self, params: list[torch.Tensor], updated: dict[int, torch.Tensor]) -> None:
        """Owners' new block values to every rank."""

    def describe_plan(self) -> None:
        """Print the block plan (rank 0 of a sharded run)."""


class LocalDistributor(Distributor):
    """One process: every block is owned here and nothing is communicated."""

    rank, world = 0, 1

    def reduce(self, payloads: dict[int, torch.Tensor], width: int = 1) -> PendingReduce:
        return PendingReduce([], 0, ready=payloads)

    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        return vector

    def write_back(self, params: list[torch.Tensor], updated: dict[int, torch.Tensor]) -> None:
        pass  # the owner updated the parameters in place


class OwnerDistributor(Distributor):
    """Replicated parameters, one owner per block: gradients reduced to owners in buckets, updated
    blocks all-gathered. `group`: the ranks to shard over (default: the world)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0):
        self.comm = Comm(group, bucket_mb)
        self.rank, self.world = self.comm.rank, self.comm.world

    def make_plan(self, params, max_block, rotations):
        plan = super().make_plan(params, max_block, rotations)
        self.comm.verify_plan(plan.digest())
        return plan

    @property
    def sent(self) -> Counter:
        return self.comm.sent

    @property
    def calls(self) -> Counter:
        return self.comm.calls

    def reduce(self, payloads: dict[int, torch.Tensor], width: int = 1) -> PendingReduce:
        return self.comm.reduce_to_owners(self.plan, payloads, width)

    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce_sum(vector)

    def write_back(self, params: list[torch.Tensor], updated: dict[int, torch.Tensor]) -> None:
        dtype = params[0].dtype
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        values = {b.index: params[b.param].data[b.slices] for b in self.owned}
        gathered = self.comm.all_gather_blocks(self.plan, values, dtype)
        for b in self.plan.blocks:
            if b.owner != self.rank:
                params[b.param].data[b.slices].copy_(gathered[b.index].view(b.shape))

    def describe_plan(self) -> None:
        if self.rank == 0:
            print("[distopt] block plan: " + "; ".join(
                f"rank {r['rank']}: {r['blocks']} blocks, {r['numel']} elements "
                f"({r['state_bytes'] / 2**20:.2f} MiB of state), cost {r['cost']:.3g}" for r in self.plan.summary()),
                file=sys.stderr)


def make_distributor(process_group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0) -> Distributor:
    """The distributor for these parameters: owners over the group (default: the world) when
    torch.distributed is initialised with more than one rank, else one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return OwnerDistributor(process_group, bucket_mb)
    return LocalDistributor()
