"""The accumulation window: one optimizer step's reduced micro-steps, as this rank's owned blocks see them.

The owner receives *pieces* (distopt.plan.Piece): the mean-over-ranks share of the micro-steps since
the last reduction (distopt.accumulate decides when they are sent). Per owned block a window holds:

    plain           G, the sum of every piece's share (Kronecker statistics come from it)
    fold            pair_source 'microstep': the hierarchical FOP fold of the pieces (distopt.fold)
    groups          pair_source 'modality' | 'ranks': per-group means, folded once at the boundary

Each piece is rotated into SOAP's eigenbasis once, as it arrives (its mean per micro-step, in the
folds' form: distopt.fop.BlockMetric.prepare); the piece itself is then let go. Folds write their
result into the older item, which they own, so a fold costs no gradient-sized buffer beyond its two
inputs. What a window holds at most, per owned block: G, and two rotated items (the fold's z and the
chunk, or the two groups' means); rot(G) is not kept (SOAP's options that need it rotate G).

Nothing in a window refers back to it (the folds' operations live in `_FoldOps`), so a finished
window is freed when step() drops it, without waiting for Python's cyclic collector.
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
    """A group's mean per micro-step (rotated), over its `microsteps`, each standing for `size` sub-batches."""

    mean: Bundle
    microsteps: int
    size: int


class _FoldOps:
    """What the folds call: FOP's combine at the window's level (into the older item), and the plain
    count-weighted average of two means (chunks that arrive in several pieces)."""

    def __init__(self, metrics: dict[int, BlockMetric], levels: Levels) -> None:
        self.metrics, self.levels = metrics, levels

    def combine(self, b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        return self.levels.combine(self.metrics, b1, n1, b2, n2)

    @staticmethod
    def average(b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        for i in b1:
            b1[i].mul_(n1).add_(b2[i], alpha=n2).div_(n1 + n2)
        return b1


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
    peak_bytes: int = 0                             # the most this window held at once (measured as it goes)

    def __post_init__(self) -> None:
        self.ops = _FoldOps(self.metrics, self.levels)
        self.fold: Fold = make_fold(self.fold_schedule, self.ops.combine, self.ops.average)

    def receive(self, pieces: list[Piece]) -> None:
        """Add reduced pieces to G and hand them, rotated, to the fold or their group."""
        for piece in pieces:
            self._receive(piece)

    def _receive(self, piece: Piece) -> None:
        folding: Bundle = {}
        for i, g in piece.grads.items():
            x = self.to_layout(self.blocks[i], g)
            share = x / piece.divisor if piece.divisor > 1 else x
            if i not in self.plain:  # G owns its memory: the piece's buffer is let go once received
                self.plain[i] = share.clone() if share is x else share
            else:
                self.plain[i].add_(share)
            if self.fop and i in self.metrics:
                folding[i] = self.metrics[i].prepare(_mean(x, piece))
        piece.grads = {}
        self._measure(folding)
        if not self.fop:
            return
        if piece.group == "chunk":
            self.fold.push(folding, piece.microsteps)
        else:
            size = piece.ranks if piece.group in ("even", "odd") else 1
            self.groups[piece.group] = _Group(folding, piece.microsteps, size)

    def folded(self) -> Optional[Bundle]:
        """The folded gradient in the mean-per-micro-step scale (rotated), or None when nothing was paired."""
        if not self.groups:
            result = self.fold.result()
            return result[0] if result is not None and result[1] >= 2 else None
        if len(self.groups) > 2:
            raise RuntimeError(f"FOP folds two groups, got {sorted(self.groups)}")
        if len(self.groups) < 2:
            return None
        means = {tag: g.mean for tag, g in self.groups.items()}
        weights = self.levels.modality_weights(self.metrics, means)
        (m1, m2), (g1, g2) = means.values(), self.groups.values()
        for mean, weight in ((m1, weights[0]), (m2, weights[1])):
            if weight != 1.0:
                for x in mean.values():
                    x.mul_(weight)
        self.groups = {}
        return self.ops.combine(m1, g1.size * g1.microsteps, m2, g2.size * g2.microsteps)

    def held_bytes(self, arriving: Optional[Bundle] = None) -> int:
        """Bytes of the tensors this window holds, with an `arriving` item not yet handed to the fold
        (the memory accounting of docs/distributed.md)."""
        tensors = list(self.plain.values()) + list((arriving or {}).values())
        tensors += [x for g in self.groups.values() for x in g.mean.values()]
        tensors += [x for node in self.fold.held() for x in node.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _measure(self, arriving: Bundle) -> None:
        self.peak_bytes = max(self.peak_bytes, self.held_bytes(arriving))


def _mean(x: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A piece's mean per micro-step (per rank of its group for the rank-parity pairs): the sum over
    ranks and micro-steps it carries, scaled by reciprocals as it always was (the results stay bitwise)."""
    ranks = piece.ranks if piece.group in ("even", "odd") else piece.divisor
    if ranks > 1:
        x = x * (1.0 / ranks)
    return x * (1.0 / piece.microsteps) if piece.microsteps > 1 else x
