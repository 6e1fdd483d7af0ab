"""The interfaces other rooms rely on, declared (typing.Protocol, runtime-checkable) instead of
guessed with hasattr. This is the one module where the shape of an optimizer is asked about:
elsewhere, `isinstance(opt, Instrumented)` and friends.

    TakesMicrosteps   hand it tagged micro-steps: `with opt.modality(tag): loss.backward()`, or
                      `end_microstep(tag)` when a framework drives them (ML-FOP-SOAP, the rules)
    RecordsLosses     it balances modalities by their losses: `record_loss(tag, loss)` (the rules)
    Instrumented      what a training loop logs: counters, stats(), comm_bytes(); describe() names
                      it in a checkpoint; in_window is True mid-accumulation; close() removes hooks
    BlockSharded      its state is per block, each block on one owner rank (what checkpoint saves)
    Wrapper           a rule over a base optimizer that holds the state, with runtime state of its own
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union, runtime_checkable

import torch

if TYPE_CHECKING:
    from distopt.plan import Block, Plan


@runtime_checkable
class TakesMicrosteps(Protocol):
    def modality(self, tag: str) -> AbstractContextManager[None]: ...

    def end_microstep(self, modality: Optional[str] = None) -> None: ...

    @property
    def manual(self) -> bool:
        """Micro-steps end by end_microstep() calls (capture='manual'), not by each backward."""


@runtime_checkable
class RecordsLosses(Protocol):
    def record_loss(self, tag: str, loss: Union[float, torch.Tensor]) -> None: ...


@runtime_checkable
class Instrumented(Protocol):
    @property
    def counters(self) -> Mapping[str, float]: ...

    @property
    def in_window(self) -> bool: ...

    def stats(self) -> dict[str, float]: ...

    def comm_bytes(self) -> dict[str, int]: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


@runtime_checkable
class BlockSharded(Protocol):
    param_groups: list[dict[str, Any]]

    @property
    def plan(self) -> Plan: ...

    def block_states(self) -> list[tuple[Block, dict[str, Any]]]: ...

    def block_device(self, b: Block) -> torch.device: ...

    def keeps_master(self, b: Block) -> bool: ...

    def runtime_state(self) -> dict[str, Any]: ...

    def load_runtime_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Wrapper(Protocol):
    @property
    def base(self) -> torch.optim.Optimizer: ...

    def runtime_state(self) -> dict[str, Any]: ...

    def load_runtime_state(self, state: Optional[dict[str, Any]]) -> None: ...


def counters_of(opt: object) -> Mapping[str, float]:
    """An optimizer's counters (eigh, QR, folds, ...), or none for one that keeps none (torch's AdamW)."""
    return opt.counters if isinstance(opt, Instrumented) else {}


def stats_of(opt: object) -> dict[str, float]:
    return opt.stats() if isinstance(opt, Instrumented) else {}


def comm_bytes_of(opt: object) -> dict[str, int]:
    return opt.comm_bytes() if isinstance(opt, Instrumented) else {}


def describe(opt: object) -> str:
    return opt.describe() if isinstance(opt, Instrumented) else type(opt).__name__


def in_window(opt: object) -> bool:
    return opt.in_window if isinstance(opt, Instrumented) else False


def stateful(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: a rule's base, or the optimizer itself."""
    return opt.base if isinstance(opt, Wrapper) else opt
