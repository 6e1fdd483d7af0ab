"""What a step reads on the host, in one place: `host_values` (each call is one synchronisation on a
GPU; its callers count them) and `DeviceTally` (counts that stay on the device, block after block,
and are read once per step).

A fake or meta tensor (the dry run, launcher/dryrun.py) has no values: `host_values` reads a stand-in
the caller gives (what this rank knows on the host: its own check values, its own presence), or
zeros, which is what a healthy step holds in every flag the step reads (no disagreement, nothing
non-finite, no failure). Any other read of a device value on the step path (`.item()`,
`.tolist()`, `bool(t)`) fails under the dry run's FakeTensorMode, which is how the dry run finds them;
the reads through `host_values` are tallied per calling function in READS.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import MutableMapping, Sequence
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

READS: Counter[str] = Counter()  # host reads per calling function, for the dry run's count (a process-wide tally)


def host_values(t: torch.Tensor, stand_in: Optional[Sequence[float]] = None) -> list[float]:
    """`t`'s values on the host, flattened (one synchronisation on a GPU). A fake or meta tensor (the
    dry run) has none: `stand_in` is read instead, what this rank knows on the host of the same values
    (the dry run's one rank standing for every rank), or zeros."""
    caller = sys._getframe(1).f_code
    READS[f"{caller.co_filename.rsplit('/', 2)[-2]}/{caller.co_filename.rsplit('/', 1)[-1]}:{caller.co_name}"] += 1
    if isinstance(t, FakeTensor) or t.is_meta:
        return [float(x) for x in stand_in] if stand_in is not None else [0.0] * t.numel()
    return [float(x) for x in t.detach().reshape(-1).tolist()]


class DeviceTally:
    """Named counts accumulated on the device (failed eighs and QRs, guarded folds): `add` costs no
    synchronisation; `flush` reads every pending count at once into host counters."""

    def __init__(self) -> None:
        self.pending: dict[str, torch.Tensor] = {}

    def add(self, name: str, count: torch.Tensor) -> None:
        self.pending[name] = count if name not in self.pending else self.pending[name] + count

    def flush(self, counters: MutableMapping[str, float]) -> bool:
        """Add the pending counts to `counters`; True when there were any (a host read happened)."""
        if not self.pending:
            return False
        names = list(self.pending)
        values = host_values(torch.stack([self.pending[n].double().reshape(()) for n in names]))
        for name, value in zip(names, values, strict=True):
            counters[name] += value
        self.pending = {}
        return True
