"""One process: every block is owned here; a 'reduction' hands p.grad's blocks over as views."""

from __future__ import annotations

from typing import Optional

import torch

from distopt.comm import Checks
from distopt.distributors.base import Distributor
from distopt.plan import Piece


class LocalDistributor(Distributor):
    def __init__(self) -> None:
        super().__init__()
        self._open: Optional[Piece] = None
        self._done: list[Piece] = []

    def open(self, group: str, microsteps: int, ranks: int, check: Checks) -> None:
        self._open = Piece(group, microsteps, 1, 1, {})

    def add(self, param: int, grad: Optional[torch.Tensor]) -> None:
        assert self._open is not None, "add() outside a reduction: open() first"
        if grad is not None:
            for b in self._blocks_of[param]:
                self._open.grads[b.index] = grad[b.slices]

    def close(self) -> None:
        assert self._open is not None, "close() outside a reduction: open() first"
        for b in self.owned:  # parameters without a gradient this time count as zeros
            if b.index not in self._open.grads:
                self._open.grads[b.index] = torch.zeros(b.shape, device=self.device)
        self._done.append(self._open)
        self._open = None

    def take(self) -> list[Piece]:
        done, self._done = self._done, []
        return done
