"""The accumulation window: the micro-steps of one optimizer step, as this rank's owned blocks see them.

Gradients leave a rank only when the fold needs them (`Schedule`): a micro-step's gradient either
stays in p.grad, where autograd keeps summing (keep), or p.grad is taken and reduced onto the block
owners (reduce), or taken into a local per-tag sum (stash). The owner receives *pieces*: the sum
over ranks of the micro-steps since the last reduction. With the streaming fold only micro-step 1
and the dyadic chunk sums are needed, so the window reduces at micro-steps 1, 2, 4, 8, ... and the
tail at step(): ceil(log2 K) + 1 reductions, not K.

    schedule        fop off   keep every micro-step; step() reduces the sum once (as DDP's no_sync)
                    streaming reduce at 1, 2, 4, ...; step() reduces the tail (K not a power of two)
                    tree      reduce every micro-step (every fold pairs single micro-steps)
                    modality  stash per tag; step() reduces each tag's sum (one reduction per tag)
                    ranks     keep; step() reduces twice, once per rank-parity group

What a window holds on the owner, per owned block:
    plain           G, the sum of every piece divided by the world (Kronecker statistics come from it)
    fold            pair_source 'microstep': the hierarchical FOP fold of the pieces (distopt.fold)
    groups          pair_source 'modality' | 'ranks': per-group means, folded once at the boundary
Items are in each block's preconditioning layout (distopt.soap.Layout); folds rotate them into
SOAP's eigenbasis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from distopt.fold import make_fold
from distopt.fop import BlockMetric
from distopt.levels import Bundle, Levels
from distopt.plan import Block

KEEP, REDUCE, STASH = "keep", "reduce", "stash"


@dataclass(frozen=True)
class Schedule:
    """When a rank's gradient leaves it (module docstring)."""

    fop: bool
    pair_source: str
    fold_schedule: str

    def action(self, k: int) -> str:
        """What to do with the gradient of micro-step k (1-based) of the window."""
        if not self.fop or self.pair_source == "ranks":
            return KEEP
        if self.pair_source == "modality":
            return STASH
        if self.fold_schedule == "tree" or k & (k - 1) == 0:
            return REDUCE
        return KEEP

    def tail(self, k: int) -> bool:
        """Whether step() reduces what p.grad still holds after K = k micro-steps."""
        if not self.fop:
            return True
        return self.pair_source == "microstep" and self.fold_schedule == "streaming" and k & (k - 1) != 0

    def reductions(self, k: int, tags: int) -> int:
        """Reductions per step for K = k micro-steps (`tags` modality tags): the collective count formula."""
        if not self.fop:
            return 1
        if self.pair_source == "ranks":
            return 2
        if self.pair_source == "modality":
            return tags
        if self.fold_schedule == "tree":
            return k
        return max(k, 1).bit_length() if k & (k - 1) == 0 else k.bit_length() + 1


@dataclass
class Piece:
    """Reduced gradients of this rank's owned blocks: the sum over `ranks` ranks of `microsteps`
    micro-steps, in block shape (raw sums, in the communication dtype)."""

    group: str                      # "chunk", a modality tag, "even" or "odd"
    microsteps: int
    ranks: int
    grads: dict[int, torch.Tensor]  # block index -> tensor


@dataclass
class _Group:
    """A group's mean per micro-step summed over its `microsteps`, each standing for `size` sub-batches;
    `in_plain`: what its mean is multiplied by in G."""

    total: Bundle
    microsteps: int
    size: int
    in_plain: float


@dataclass
class Window:
    metrics: dict[int, BlockMetric]                 # owned blocks whose metric exists (they fold)
    levels: Levels
    fold_schedule: str
    fop: bool
    world: int                                      # pieces are sums over this many ranks (the divisor)
    to_layout: Callable[[Block, torch.Tensor], torch.Tensor]
    blocks: dict[int, Block]
    fold: object = None
    plain: dict[int, torch.Tensor] = field(default_factory=dict)
    plain_prepared: dict[int, torch.Tensor] = field(default_factory=dict)  # G in the folds' space, from their items
    groups: dict[str, _Group] = field(default_factory=dict)
    present: set[int] = field(default_factory=set)  # parameters that had a gradient on this rank
    microsteps: int = 0
    last_reduced: int = 0                           # micro-step index of the last reduction
    stash: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # tag -> param index -> local sum
    stash_microsteps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.fold = make_fold(self.fold_schedule, self._combine, _add, _scale, self.prepare)

    def receive(self, piece: Piece) -> None:
        """Add a reduced piece to G and hand it to the fold or its group."""
        items = {i: self.to_layout(self.blocks[i], g) for i, g in piece.grads.items()}
        for i, x in items.items():
            share = x / self.world if self.world > 1 else x
            self.plain[i] = share if i not in self.plain else self.plain[i] + share
        if not self.fop:
            return
        folding = {i: items[i] for i in self.metrics}
        if piece.group == "chunk":
            self.fold.push(_scale(folding, 1.0 / self.world) if self.world > 1 else folding, piece.microsteps)
        elif piece.group in ("even", "odd"):
            self.groups[piece.group] = _Group(_scale(folding, 1.0 / piece.ranks), piece.microsteps, piece.ranks,
                                              piece.microsteps * piece.ranks / self.world)
        else:
            self.groups[piece.group] = _Group(_scale(folding, 1.0 / self.world) if self.world > 1 else folding,
                                              piece.microsteps, 1, piece.microsteps)

    def prepare(self, items: Bundle, count: float) -> Bundle:
        """Raw means of `count` micro-steps into the form folds measure (rotated into each block's
        eigenbasis); count x them also adds up G in that form, rot(G) with no rotation of its own."""
        prepared = {i: self.metrics[i].prepare(x) for i, x in items.items()}
        for i, x in prepared.items():
            self.plain_prepared[i] = x * count if i not in self.plain_prepared else self.plain_prepared[i] + x * count
        return prepared

    def _combine(self, b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        return self.levels.combine(self.metrics, b1, n1, b2, n2)

    def folded(self) -> Optional[Bundle]:
        """The folded gradient in the mean-per-micro-step scale (prepared), or None when nothing was paired."""
        if not self.groups:
            result = self.fold.result()
            return result[0] if result is not None and result[1] >= 2 else None
        if len(self.groups) > 2:
            raise RuntimeError(f"FOP folds two groups, got {sorted(self.groups)}")
        if len(self.groups) < 2:
            return None
        means = {tag: self.prepare(_scale(g.total, 1.0 / g.microsteps), g.in_plain) for tag, g in self.groups.items()}
        weights = self.levels.modality_weights(self.metrics, means)
        (m1, m2), (g1, g2) = means.values(), self.groups.values()
        return self._combine(_scale(m1, weights[0]), g1.size * g1.microsteps, _scale(m2, weights[1]),
                             g2.size * g2.microsteps)

    def held_bytes(self) -> int:
        """Bytes of the tensors this window holds (the memory accounting of docs/distributed.md)."""
        tensors = list(self.plain.values()) + list(self.plain_prepared.values())
        tensors += [x for s in self.stash.values() for x in s.values()]
        tensors += [x for g in self.groups.values() for x in g.total.values()]
        for node in _fold_nodes(self.fold):
            tensors += list(node.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def _fold_nodes(fold) -> list[Bundle]:
    nodes = [item for item, _ in getattr(fold, "stack", [])]
    nodes += [x[0] for x in (getattr(fold, "z", None), getattr(fold, "chunk", None)) if x is not None]
    return nodes


def _add(b1: Bundle, b2: Bundle) -> Bundle:
    return {i: b1[i] + b2[i] for i in b1}


def _scale(b: Bundle, c: float) -> Bundle:
    return {i: x * c for i, x in b.items()}
