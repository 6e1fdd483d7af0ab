"""Per-micro-step gradient capture for a standard accumulation loop (K backward calls, then step()).

`p.grad` keeps accumulating as autograd leaves it, so user code that reads or clips it before
`step()` still works; the micro-step's own gradient is the difference to the previous snapshot.
In `hooks` mode a post-accumulate-grad hook on each parameter queues one end-of-backward callback
(as DDP does), so a micro-step is exactly one backward pass and the user's loop needs no extra
call. In `manual` mode a framework that drives micro-steps itself calls `end_microstep()`.
An optional tag (e.g. the modality of the loss being back-propagated) travels with each micro-step.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterable, Iterator, Optional, Protocol, runtime_checkable

import torch

Sink = Callable[[Optional[str], dict[torch.Tensor, torch.Tensor]], None]


@runtime_checkable
class TakesMicrosteps(Protocol):
    """An optimizer that can be handed tagged micro-steps by whoever drives them (capture='manual')."""

    def end_microstep(self, modality: Optional[str] = None) -> None: ...


class MicrostepCapture:
    """mode: 'hooks' (a micro-step is one backward) or 'manual' (the caller calls end_microstep)."""

    def __init__(self, params: Iterable[torch.Tensor], sink: Sink, mode: str = "hooks"):
        self.params = list(params)
        self.sink = sink
        self.tag: Optional[str] = None
        self._snapshot: dict[torch.Tensor, torch.Tensor] = {}
        self._queued = False
        self._handles = []
        if mode == "hooks":
            ref = weakref.ref(self)
            for p in self.params:
                self._handles.append(p.register_post_accumulate_grad_hook(lambda _p, ref=ref: ref()._on_grad()))

    def _on_grad(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self.end_microstep()

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        """Micro-steps ended inside this block carry `tag`."""
        previous, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = previous

    @torch.no_grad()
    def end_microstep(self, tag: Optional[str] = None) -> None:
        """Hand the gradient each parameter gained since the last micro-step to the sink."""
        deltas: dict[torch.Tensor, torch.Tensor] = {}
        for p in self.params:
            if p.grad is None:
                continue
            prev = self._snapshot.get(p)
            deltas[p] = p.grad.clone() if prev is None else p.grad - prev
            if prev is None:
                self._snapshot[p] = p.grad.clone()
            else:
                prev.copy_(p.grad)
        self.sink(tag if tag is not None else self.tag, deltas)

    def accumulated(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The gradient as it stood after the last captured micro-step."""
        return self._snapshot.get(p)

    def reset(self) -> None:
        """Start a new accumulation window (called by the optimizer's step())."""
        self._snapshot.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
