"""Block plan: how parameters are cut into blocks and which rank owns each block.

A side longer than `max_block` is cut into ceil(side / max_block) pieces of at most max_block (the
last one shorter). Each block is preconditioned on its own (its own factors, eigenbasis and Adam
moments, as in Distributed Shampoo) and has exactly one owner rank, chosen by deterministic greedy
LPT (longest processing time first) on a cost model computed from (name, shape) only, so every
rank derives the same plan without communication; `Plan.digest()` lets ranks verify that.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Block:
    index: int                    # position in the plan (the order of every bucket)
    param: int                    # index of the parameter in optimizer order
    name: str
    ordinal: int                  # block number within its parameter
    slices: tuple[slice, ...]     # where the block sits in the parameter
    shape: tuple[int, ...]
    cost: float
    owner: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def block_slices(shape: Sequence[int], max_block: Optional[int]) -> list[tuple[slice, ...]]:
    """Row-major grid of slices cutting every side longer than max_block."""
    if max_block is None or not shape:
        return [tuple(slice(0, d) for d in shape)]
    ranges = [[slice(s, min(s + max_block, d)) for s in range(0, d, max_block)] for d in shape]
    return [tuple(c) for c in itertools.product(*ranges)]


def block_cost(shape: Sequence[int], rotated: Sequence[bool]) -> float:
    """Eigendecomposition work (d^3 per rotated side) plus elementwise and rotation work."""
    numel = math.prod(shape) if shape else 1
    return sum(d ** 3 for d, r in zip(shape, rotated) if r) + numel * (1 + sum(d for d, r in zip(shape, rotated) if r))


@dataclass(frozen=True)
class Plan:
    blocks: tuple[Block, ...]
    world_size: int

    def owned(self, rank: int) -> list[Block]:
        return [b for b in self.blocks if b.owner == rank]

    def of_param(self, param: int) -> list[Block]:
        return [b for b in self.blocks if b.param == param]

    def split_params(self) -> set[int]:
        """Parameters whose blocks live on more than one rank (their FOP sums need an all-reduce)."""
        owners: dict[int, set[int]] = {}
        for b in self.blocks:
            owners.setdefault(b.param, set()).add(b.owner)
        return {p for p, o in owners.items() if len(o) > 1}

    def digest(self) -> str:
        text = repr([(b.name, b.slices, b.owner) for b in self.blocks]) + f"|{self.world_size}"
        return hashlib.sha256(text.encode()).hexdigest()

    def summary(self) -> list[dict]:
        """Per rank: blocks, elements, fp32 state bytes (m, v, and factor + basis of every side; an
        upper bound: sides that are not rotated hold no factor) and cost."""
        rows = [dict(rank=r, blocks=0, numel=0, state_bytes=0, cost=0.0) for r in range(self.world_size)]
        for b in self.blocks:
            row = rows[b.owner]
            row["blocks"] += 1
            row["numel"] += b.numel
            row["state_bytes"] += 4 * (2 * b.numel + 2 * sum(d * d for d in b.shape))
            row["cost"] += b.cost
        return rows


Rotations = Callable[[int, tuple[int, ...]], Sequence[bool]]


def make_plan(params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], world_size: int,
              rotations: Rotations) -> Plan:
    """params: (name, shape) in optimizer order; rotations(param index, block shape) gives the block's
    own rotated-per-side flags (a block of a long-sided matrix may rotate a side the whole matrix
    would not). Greedy LPT: blocks by cost, largest first (ties by plan order), each to the
    least-loaded rank (ties to the lowest rank)."""
    if max_block is not None and max_block < 1:
        raise ValueError(f"max_block={max_block!r} is invalid: must be a positive integer or None")
    raw = []
    for pi, (name, shape) in enumerate(params):
        for ordinal, sl in enumerate(block_slices(shape, max_block)):
            bshape = tuple(s.stop - s.start for s in sl)
            rotated = rotations(pi, bshape)
            raw.append((pi, name, ordinal, sl, bshape, block_cost(bshape, [r and d > 0 for d, r in zip(bshape, rotated)])))
    load = [0.0] * world_size
    owner = {}
    for i in sorted(range(len(raw)), key=lambda i: (-raw[i][5], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += raw[i][5]
    blocks = tuple(Block(i, pi, name, ordinal, sl, shape, cost, owner[i])
                   for i, (pi, name, ordinal, sl, shape, cost) in enumerate(raw))
    return Plan(blocks, world_size)
