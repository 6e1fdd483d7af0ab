"""Hierarchical folding of the K micro-step gradients of one optimizer step.

A fold merges two equal-count gradient means with FOP (`combine(x1, n1, x2, n2)`), the older first.
Items are opaque to this module (one tensor per block, a dict of them, ...): each is the mean per
micro-step of `count` micro-steps, already in the form folds work on (for SOAP's metric: rotated into
the eigenbasis, once, when it arrives); `average(x1, n1, x2, n2)` is their plain count-weighted mean.

`streaming` (canonical): z folds with the plain mean of the next equal-count chunk,
z_j = FOP(z_{j-1}, mean(g_{2^(j-1)+1 .. 2^j})), the MLMC-style telescoping. Level 1 is micro-step 1
against 2 (with modality-pure interleaved micro-batches: text against image), higher levels fold
sampling variance. ceil(log2 K) folds; a chunk is summed raw (by autograd, in p.grad, before it is
reduced at all) and rotated once, so K = 8 costs four rotations, not eight; two buffers.

`tree`: a binary counter. Micro-step 1 folds with 2, 3 with 4, the pairs with each other, and so
on: every level-1 fold pairs two single micro-steps. K - 1 folds, every micro-step rotated, at
most floor(log2 K) + 1 items held.

K not a power of two: the leftovers at the boundary are folded count-weighted, newest first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Protocol, Union

Combine = Callable[[Any, int, Any, int], Any]  # FOP of two count-weighted means
Average = Callable[[Any, int, Any, int], Any]  # their plain count-weighted mean


class Fold(Protocol):
    def push(self, item: Any, count: int = 1) -> None: ...

    def result(self) -> Optional[tuple[Any, int]]: ...

    def held(self) -> list[Any]: ...


class TreeFold:
    def __init__(self, combine: Combine) -> None:
        self.combine = combine
        self.stack: list[tuple[Any, int]] = []

    def push(self, item: Any, count: int = 1) -> None:
        """One micro-step's gradient (count = 1: every level-1 fold pairs single micro-steps)."""
        if count != 1:
            raise ValueError(f"the tree schedule folds single micro-steps, got a sum of {count}")
        node = (item, 1)
        while self.stack and self.stack[-1][1] == node[1]:
            older, n = self.stack.pop()
            node = (self.combine(older, n, node[0], node[1]), n + node[1])
        self.stack.append(node)

    def result(self) -> Optional[tuple[Any, int]]:
        """The folded item and its count, or None when nothing was pushed."""
        while len(self.stack) > 1:
            newer, n2 = self.stack.pop()
            older, n1 = self.stack.pop()
            self.stack.append((self.combine(older, n1, newer, n2), n1 + n2))
        return self.stack[0] if self.stack else None

    def held(self) -> list[Any]:
        """The items the fold holds now (for memory accounting)."""
        return [item for item, _ in self.stack]


class StreamingFold:
    def __init__(self, combine: Combine, average: Average) -> None:
        self.combine, self.average = combine, average
        self.z: Optional[tuple[Any, int]] = None
        self.chunk: Optional[tuple[Any, int]] = None  # the current chunk's mean, and its count

    def push(self, item: Any, count: int = 1) -> None:
        """The mean of `count` micro-steps (one micro-step, or a whole chunk reduced at once)."""
        if self.z is None:
            self.z = (item, count)
            return
        chunk = (item, count) if self.chunk is None else \
            (self.average(self.chunk[0], self.chunk[1], item, count), self.chunk[1] + count)
        self.chunk = chunk
        if chunk[1] >= self.z[1]:
            self._fold_chunk()

    def _fold_chunk(self) -> None:
        assert self.z is not None and self.chunk is not None
        (z, nz), (mean, nc) = self.z, self.chunk
        self.z = (self.combine(z, nz, mean, nc), nz + nc)
        self.chunk = None

    def result(self) -> Optional[tuple[Any, int]]:
        if self.chunk is not None:
            self._fold_chunk()
        return self.z

    def held(self) -> list[Any]:
        """The items the fold holds now (for memory accounting)."""
        return [x[0] for x in (self.z, self.chunk) if x is not None]


def make_fold(schedule: str, combine: Combine, average: Average) -> Union[TreeFold, StreamingFold]:
    """schedule: 'tree' or 'streaming' (validated by distopt.options.MLFOPOptions)."""
    if schedule == "tree":
        return TreeFold(combine)
    return StreamingFold(combine, average)
