"""Block plan: how parameters are cut into blocks, which rank owns each block, and where each block
sits in its owner's share of the communication buffers.

A side longer than `max_block` is cut into ceil(side / max_block) pieces of at most max_block (the
last one shorter). Each block is preconditioned on its own (its own factors, eigenbasis and Adam
moments, as in Distributed Shampoo) and has exactly one owner rank. Owners come from a deterministic
greedy LPT (longest processing time first) that balances two loads at once, the optimizer's compute
and the bytes each rank owns, normalised by their totals:

    block order:  by max(cost_b / C, numel_b / N), largest first (ties by plan order)
    owner:        the rank r minimising max((cost_r + cost_b) / C, (numel_r + numel_b) / N)

Compute alone would pile the cheap but large Adam-path blocks (embeddings, output heads) onto a few
ranks; bytes alone would ignore the eigendecompositions. Every rank derives the same plan from
(name, shape) and the options; `Plan.digest()` lets ranks verify that.

Each owner's blocks are laid out back to back in its *share* (backward order: later parameters
first, since their gradients are ready first); every share is padded to the largest, the *slot*
W, so that one [world, W] buffer is what reduce-scatter and all-gather move. Padding = world W - N
elements, printed by `summary()`.

A `Piece` is what a distributor delivers to the owner of blocks: one reduction's gradients of the
blocks this rank owns (the data type the distributors and the accumulation window share).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

PrecondDims = tuple[tuple[int, bool], ...]  # per dim of the block's preconditioning layout: (size, rotated)


@dataclass(frozen=True)
class Block:
    index: int                    # position in the plan
    param: int                    # index of the parameter in optimizer order
    name: str
    ordinal: int                  # block number within its parameter
    slices: tuple[slice, ...]     # where the block sits in the parameter
    shape: tuple[int, ...]
    precond: PrecondDims
    cost: float
    owner: int
    offset: int = 0               # where the block starts in its owner's share

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def state_numel(self) -> int:
        """fp32 elements of its SOAP state: m and v, plus a factor and a basis per rotated side."""
        return 2 * self.numel + sum(2 * d * d for d, rotated in self.precond if rotated)


@dataclass
class Piece:
    """Reduced gradients of this rank's owned blocks (block index -> tensor in block shape, in the
    communication dtype): the sum over `ranks` ranks of `microsteps` micro-steps, divided by `divisor`
    to be this piece's share of the mean over all ranks (a sum over every rank: divisor = world; a
    mean already, as FSDP2 reduces: 1)."""

    group: str                         # "chunk", a modality tag, "even" or "odd"
    microsteps: int
    ranks: int
    divisor: int
    grads: dict[int, torch.Tensor]


def block_slices(shape: Sequence[int], max_block: Optional[int]) -> list[tuple[slice, ...]]:
    """Row-major grid of slices cutting every side longer than max_block."""
    if max_block is None or not shape:
        return [tuple(slice(0, d) for d in shape)]
    ranges = [[slice(s, min(s + max_block, d)) for s in range(0, d, max_block)] for d in shape]
    return [tuple(c) for c in itertools.product(*ranges)]


def block_cost(numel: int, precond: PrecondDims) -> float:
    """Eigendecomposition work (d^3 per rotated side) plus elementwise and rotation work."""
    rotated = [d for d, r in precond if r]
    return sum(d ** 3 for d in rotated) + max(numel, 1) * (1 + sum(rotated))


@dataclass(frozen=True)
class Plan:
    blocks: tuple[Block, ...]
    world_size: int
    _owned: dict[int, list[Block]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        owned: dict[int, list[Block]] = {r: [] for r in range(self.world_size)}
        for b in self.blocks:
            owned[b.owner].append(b)
        for r in owned:
            owned[r].sort(key=lambda b: b.offset)
        object.__setattr__(self, "_owned", owned)

    def owned(self, rank: int) -> list[Block]:
        """This rank's blocks in share order."""
        return self._owned[rank]

    def share(self, rank: int) -> int:
        return sum(b.numel for b in self._owned[rank])

    @property
    def slot(self) -> int:
        """W: the largest share; every share is padded to it in the communication buffers."""
        return max([self.share(r) for r in range(self.world_size)] + [1])

    @property
    def padding(self) -> int:
        return self.world_size * self.slot - sum(b.numel for b in self.blocks)

    def of_param(self, param: int) -> list[Block]:
        return [b for b in self.blocks if b.param == param]

    def split_params(self) -> set[int]:
        """Parameters whose blocks live on more than one rank (their FOP sums need an all-reduce)."""
        owners: dict[int, set[int]] = {}
        for b in self.blocks:
            owners.setdefault(b.param, set()).add(b.owner)
        return {p for p, o in owners.items() if len(o) > 1}

    def digest(self, extra: str = "") -> str:
        """sha256 of names, slices and owners, plus `extra` (options that change the collective sequence)."""
        text = repr([(b.name, b.slices, b.owner) for b in self.blocks]) + f"|{self.world_size}|{extra}"
        return hashlib.sha256(text.encode()).hexdigest()

    def summary(self) -> list[dict[str, Any]]:
        """Per rank: blocks, elements, fp32 state bytes (m, v, and factor + basis of every rotated side)
        and cost; the slot and padding are the same on every row."""
        rows = [dict(rank=r, blocks=0, numel=0, state_bytes=0, cost=0.0, slot=self.slot, padding=self.padding)
                for r in range(self.world_size)]
        for b in self.blocks:
            row = rows[b.owner]
            row["blocks"] += 1
            row["numel"] += b.numel
            row["state_bytes"] += 4 * b.state_numel
            row["cost"] += b.cost
        return rows


Precond = Callable[[int, tuple[int, ...]], PrecondDims]


def make_plan(params: Sequence[tuple[str, Sequence[int]]], max_block: Optional[int], world_size: int,
              precond: Precond) -> Plan:
    """params: (name, shape) in optimizer order; precond(param index, block shape) gives the block's
    own preconditioning dims (size, rotated): a block of a long-sided matrix may rotate a side that
    the whole matrix would not."""
    if max_block is not None and max_block < 1:
        raise ValueError(f"max_block={max_block!r} is invalid: must be a positive integer or None")
    raw = []
    for pi, (name, shape) in enumerate(params):
        for ordinal, sl in enumerate(block_slices(shape, max_block)):
            bshape = tuple(s.stop - s.start for s in sl)
            dims = tuple(precond(pi, bshape))
            raw.append((pi, name, ordinal, sl, bshape, dims, block_cost(math.prod(bshape), dims)))
    owner = _balance([r[6] for r in raw], [math.prod(r[4]) for r in raw], world_size)
    offsets, fill = {}, [0] * world_size
    for i in sorted(range(len(raw)), key=lambda i: (-raw[i][0], raw[i][2])):  # backward order within each share
        offsets[i] = fill[owner[i]]
        fill[owner[i]] += math.prod(raw[i][4])
    blocks = tuple(Block(i, pi, name, ordinal, sl, shape, dims, cost, owner[i], offsets[i])
                   for i, (pi, name, ordinal, sl, shape, dims, cost) in enumerate(raw))
    return Plan(blocks, world_size)


def _balance(costs: Sequence[float], sizes: Sequence[int], world_size: int) -> list[int]:
    """Two-load greedy LPT (module docstring); ties go to the lowest rank."""
    total_cost, total_size = max(sum(costs), 1e-30), max(sum(sizes), 1)
    load_cost, load_size = [0.0] * world_size, [0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-max(costs[i] / total_cost, sizes[i] / total_size), i)):
        r = min(range(world_size), key=lambda r: (max((load_cost[r] + costs[i]) / total_cost,
                                                      (load_size[r] + sizes[i]) / total_size), r))
        owner[i] = r
        load_cost[r] += costs[i]
        load_size[r] += sizes[i]
    return owner
