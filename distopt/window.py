"""The accumulation window: the micro-steps of one optimizer step, as this rank's owned blocks see them.

Per micro-step the window hands the rank's micro-gradient of every block to the distributor (an
asynchronous reduction onto the owners) and, at the next micro-step or at `step()`, takes the
reduced result of its own blocks:

    plain           the running sum of reduced micro-gradients, G (Kronecker statistics come from it)
    fold            pair_source 'microstep': the hierarchical FOP fold of the micro-steps (distopt.fold)
    groups          pair_source 'modality' | 'ranks': per-tag sums, folded once at the boundary

so the fold of micro-step k runs while micro-step k + 1's reduction travels. Items are in each
block's preconditioning layout (distopt.soap.Layout); folds rotate them into SOAP's eigenbasis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from distopt.distributor import Distributor
from distopt.fold import make_fold
from distopt.fop import BlockMetric
from distopt.levels import Bundle, Levels
from distopt.plan import Block


@dataclass
class WindowSpec:
    """What every window of one optimizer shares."""

    params: list[torch.Tensor]
    blocks: dict[int, Block]
    distributor: Distributor
    to_layout: Callable[[Block, torch.Tensor], torch.Tensor]  # flat reduced gradient -> preconditioning layout
    pair_source: str
    fold_schedule: str
    fop: bool
    comm_dtype: torch.dtype


@dataclass
class _Group:
    """Per-tag sum: `total` of `microsteps` micro-steps, each standing for `size` equal sub-batches."""

    total: Bundle
    microsteps: int
    size: int


@dataclass
class Window:
    spec: WindowSpec
    metrics: dict[int, BlockMetric]                 # owned blocks whose metric exists (they fold)
    levels: Levels
    fold: object = None
    plain: dict[int, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    present: set[int] = field(default_factory=set)  # parameters that had a gradient on this rank
    microsteps: int = 0
    pending: Optional[tuple] = None                 # (PendingReduce, tag) still travelling

    def __post_init__(self):
        self.fold = make_fold(self.spec.fold_schedule, self._combine, _add, _scale, self.prepare)

    # -- micro-steps -------------------------------------------------------------------------------

    def add(self, tag: Optional[str], deltas: dict[torch.Tensor, torch.Tensor]) -> None:
        """A micro-step ended: fold the previous one, send this one on its way."""
        self.drain()
        spec = self.spec
        payloads = {i: self._payload(b, deltas.get(spec.params[b.param])) for i, b in spec.blocks.items()}
        self.present.update(i for i, p in enumerate(spec.params) if p in deltas)
        width = 2 if spec.pair_source == "ranks" else 1
        self.pending = (spec.distributor.reduce(payloads, width), tag)
        self.microsteps += 1

    def _payload(self, b: Block, delta: Optional[torch.Tensor]) -> torch.Tensor:
        """A block's flat micro-gradient; with pair_source 'ranks', placed in its rank group's half."""
        dtype = self.spec.comm_dtype
        flat = torch.zeros(b.numel, dtype=dtype) if delta is None else delta[b.slices].to(dtype).reshape(-1)
        if self.spec.pair_source != "ranks":
            return flat
        halves = torch.zeros(2, b.numel, dtype=dtype)
        halves[self.spec.distributor.rank % 2] = flat
        return halves.reshape(-1)

    def drain(self) -> None:
        """Take the micro-step whose reduction was in flight: add it to G and fold it."""
        if self.pending is None:
            return
        pending, tag = self.pending
        self.pending = None
        reduced = pending.wait()
        spec, world = self.spec, self.spec.distributor.world
        if spec.pair_source == "ranks":
            n_even, n_odd = (world + 1) // 2, world // 2
            halves = {i: t.view(2, -1) for i, t in reduced.items()}
            parts = {"even": ({i: h[0] / n_even for i, h in halves.items()}, n_even),
                     "odd": ({i: h[1] / n_odd for i, h in halves.items()}, n_odd)}
            grads = {i: (h[0] + h[1]) / world for i, h in halves.items()}
        else:
            grads = {i: t / world if world > 1 else t for i, t in reduced.items()}
        for b in spec.distributor.owned:
            g = spec.to_layout(b, grads[b.index])
            self.plain[b.index] = g if b.index not in self.plain else self.plain[b.index] + g
        if not spec.fop:
            return
        if spec.pair_source == "microstep":
            self.fold.push(self._items(grads))
        elif spec.pair_source == "modality":
            self._accumulate(tag, self._items(grads), 1)
        else:
            for name, (part, size) in parts.items():
                self._accumulate(name, self._items(part), size)

    def _items(self, grads: dict[int, torch.Tensor]) -> Bundle:
        """Raw micro-gradients (preconditioning layout) of the blocks that fold."""
        return {i: self.spec.to_layout(self.spec.blocks[i], grads[i]) for i in self.metrics}

    def prepare(self, items: Bundle) -> Bundle:
        """Raw gradients into the form folds measure (rotated into each block's eigenbasis)."""
        return {i: self.metrics[i].prepare(x) for i, x in items.items()}

    def _accumulate(self, tag: str, items: Bundle, size: int) -> None:
        if tag not in self.groups:
            self.groups[tag] = _Group(items, 1, size)
        else:
            group = self.groups[tag]
            group.total, group.microsteps = _add(group.total, items), group.microsteps + 1

    def _combine(self, b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        return self.levels.combine(self.metrics, b1, n1, b2, n2)

    # -- the boundary ------------------------------------------------------------------------------

    def folded(self) -> Optional[Bundle]:
        """The folded gradient in the mean-per-micro-step scale (prepared), or None when nothing was paired."""
        if self.spec.pair_source == "microstep":
            result = self.fold.result()
            return result[0] if result is not None and result[1] >= 2 else None
        if len(self.groups) > 2:
            raise RuntimeError(f"pair_source={self.spec.pair_source!r} folds two groups, got {sorted(self.groups)}")
        if len(self.groups) < 2:
            return None
        means = {tag: self.prepare(_scale(g.total, 1.0 / g.microsteps)) for tag, g in self.groups.items()}
        weights = self.levels.modality_weights(self.metrics, means)
        (m1, m2), (g1, g2) = means.values(), self.groups.values()
        return self._combine(_scale(m1, weights[0]), g1.size * g1.microsteps, _scale(m2, weights[1]),
                             g2.size * g2.microsteps)


def _add(b1: Bundle, b2: Bundle) -> Bundle:
    return {i: b1[i] + b2[i] for i in b1}


def _scale(b: Bundle, c: float) -> Bundle:
    return {i: x * c for i, x in b.items()}
