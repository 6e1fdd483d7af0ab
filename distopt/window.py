"""The accumulation window: one optimizer step's reduced micro-steps, as this rank's owned blocks see them.

The owner receives *pieces* (distopt.plan.Piece): the mean-over-ranks share of the micro-steps since
the last reduction (distopt.accumulate decides when they are sent). Per owned block a window holds:

    plain           G, the sum of every piece's share (Kronecker statistics come from it)
    fold            pair_source 'microstep': the hierarchical FOP fold of the pieces (distopt.fold)
    groups          pair_source 'modality' | 'ranks': per-group means, folded once at the boundary

Items are in each block's preconditioning layout (distopt.soap.Layout); folds rotate them into
SOAP's eigenbasis. Nothing in a window refers back to it (the folds' operations live in `_FoldOps`),
so a finished window is freed when step() drops it, without waiting for Python's cyclic collector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from distopt.fold import Fold, make_fold
from distopt.fop import BlockMetric
from distopt.levels import Bundle, Levels
from distopt.plan import Block, Piece

ToLayout = Callable[[Block, torch.Tensor], torch.Tensor]


@dataclass
class _Group:
    """A group's mean per micro-step summed over its `microsteps`, each standing for `size` sub-batches;
    `in_plain`: what its mean is multiplied by in G."""

    total: Bundle
    microsteps: int
    size: int
    in_plain: float


class _FoldOps:
    """What the folds call: FOP's combine at the window's level, and `prepare`, which rotates raw means
    into the folds' form and adds rot(G) up on the way (G in the folds' space, with no rotation of its own)."""

    def __init__(self, metrics: dict[int, BlockMetric], levels: Levels) -> None:
        self.metrics, self.levels = metrics, levels
        self.plain_prepared: Bundle = {}

    def prepare(self, items: Bundle, count: float) -> Bundle:
        prepared = {i: self.metrics[i].prepare(x) for i, x in items.items()}
        for i, x in prepared.items():
            self.plain_prepared[i] = x * count if i not in self.plain_prepared else self.plain_prepared[i] + x * count
        return prepared

    def combine(self, b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        return self.levels.combine(self.metrics, b1, n1, b2, n2)


@dataclass
class Window:
    metrics: dict[int, BlockMetric]                 # owned blocks whose metric exists (they fold)
    levels: Levels
    fold_schedule: str
    fop: bool
    to_layout: ToLayout
    blocks: dict[int, Block]
    plain: Bundle = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ops = _FoldOps(self.metrics, self.levels)
        self.fold: Fold = make_fold(self.fold_schedule, self.ops.combine, _add, _scale, self.ops.prepare)

    @property
    def plain_prepared(self) -> Bundle:
        """G in the folds' space (rotated), from the items the folds prepared."""
        return self.ops.plain_prepared

    def receive(self, pieces: list[Piece]) -> None:
        """Add reduced pieces to G and hand them to the fold or their group."""
        for piece in pieces:
            self._receive(piece)

    def _receive(self, piece: Piece) -> None:
        items = {i: self.to_layout(self.blocks[i], g) for i, g in piece.grads.items()}
        for i, x in items.items():
            share = x / piece.divisor if piece.divisor > 1 else x
            self.plain[i] = share if i not in self.plain else self.plain[i] + share
        if not self.fop:
            return
        folding = {i: items[i] for i in self.metrics}
        if piece.group == "chunk":
            self.fold.push(_scale(folding, 1.0 / piece.divisor) if piece.divisor > 1 else folding, piece.microsteps)
        elif piece.group in ("even", "odd"):
            self.groups[piece.group] = _Group(_scale(folding, 1.0 / piece.ranks), piece.microsteps, piece.ranks,
                                              piece.microsteps * piece.ranks / piece.divisor)
        else:
            self.groups[piece.group] = _Group(_scale(folding, 1.0 / piece.divisor) if piece.divisor > 1 else folding,
                                              piece.microsteps, 1, piece.microsteps)

    def folded(self) -> Optional[Bundle]:
        """The folded gradient in the mean-per-micro-step scale (prepared), or None when nothing was paired."""
        if not self.groups:
            result = self.fold.result()
            return result[0] if result is not None and result[1] >= 2 else None
        if len(self.groups) > 2:
            raise RuntimeError(f"FOP folds two groups, got {sorted(self.groups)}")
        if len(self.groups) < 2:
            return None
        means = {tag: self.ops.prepare(_scale(g.total, 1.0 / g.microsteps), g.in_plain)
                 for tag, g in self.groups.items()}
        weights = self.levels.modality_weights(self.metrics, means)
        (m1, m2), (g1, g2) = means.values(), self.groups.values()
        return self.ops.combine(_scale(m1, weights[0]), g1.size * g1.microsteps, _scale(m2, weights[1]),
                                g2.size * g2.microsteps)

    def held_bytes(self) -> int:
        """Bytes of the tensors this window holds (the memory accounting of docs/distributed.md)."""
        tensors = list(self.plain.values()) + list(self.plain_prepared.values())
        tensors += [x for g in self.groups.values() for x in g.total.values()]
        tensors += [x for node in self.fold.held() for x in node.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _add(b1: Bundle, b2: Bundle) -> Bundle:
    return {i: b1[i] + b2[i] for i in b1}


def _scale(b: Bundle, c: float) -> Bundle:
    return {i: x * c for i, x in b.items()}



