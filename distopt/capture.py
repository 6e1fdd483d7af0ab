"""Micro-step capture for a standard accumulation loop (K backward calls, then step()).

In `hooks` mode a post-accumulate-grad hook on each parameter tells the sink, as autograd finishes
each gradient, that `p.grad` is ready (so the sink can send it on its way while the rest of the
backward still runs), and the first hook of a backward queues one end-of-backward callback (as DDP
does): a micro-step is exactly one backward pass and the user's loop needs no extra call. In
`manual` mode a framework that drives micro-steps itself sets `p.grad` (accumulating, as autograd
would) and calls `end_microstep()`. An optional tag (the modality of the loss being
back-propagated) travels with each micro-step.

The sink may consume `p.grad` (set it to None) once it has taken it; `p.grad` then holds only what
accumulated since. `touched()` reports a `p.grad` changed after the last backward (an in-place edit
bumps the tensor's version counter; an assignment replaces the object), at no memory cost.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Protocol

import torch


class CaptureSink(Protocol):
    """Who receives the gradients: told when a micro-step begins, when each p.grad is ready (it may
    take p.grad and set it to None), and when the micro-step ends."""

    def microstep_begins(self, tag: Optional[str]) -> None: ...

    def grad_ready(self, index: int, p: torch.Tensor) -> None: ...

    def microstep_ends(self, tag: Optional[str]) -> None: ...


class MicrostepCapture:
    """mode: 'hooks' (a micro-step is one backward) or 'manual' (the caller calls end_microstep)."""

    def __init__(self, params: Iterable[torch.Tensor], sink: CaptureSink, mode: str = "hooks"):
        self.params = list(params)
        self.sink = sink
        self.tag: Optional[str] = None
        self._in_backward = False
        self._versions: dict[int, tuple[int, int]] = {}  # param index -> (id, version) of p.grad after a backward
        self._handles: list[Any] = []
        if mode == "hooks":
            ref = weakref.ref(self)

            def hook(p: torch.Tensor, i: int) -> None:
                capture = ref()
                if capture is not None:
                    capture._on_grad(i, p)

            for i, p in enumerate(self.params):
                self._handles.append(p.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                    functools.partial(hook, i=i)))

    def _on_grad(self, index: int, p: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            self.sink.microstep_begins(self.tag)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self.sink.grad_ready(index, p)

    def _end_of_backward(self) -> None:
        self._in_backward = False
        self._finish(self.tag)

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
        """Manual mode: the gradients set since the last micro-step form one micro-step."""
        tag = tag if tag is not None else self.tag
        self.sink.microstep_begins(tag)
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.sink.grad_ready(i, p)
        self._finish(tag)

    def _finish(self, tag: Optional[str]) -> None:
        self.sink.microstep_ends(tag)
        self._versions = {i: (id(p.grad), p.grad._version) for i, p in enumerate(self.params) if p.grad is not None}

    def touched(self) -> list[int]:
        """Parameters whose p.grad changed after the last captured micro-step."""
        out = []
        for i, p in enumerate(self.params):
            seen = self._versions.get(i)
            now = None if p.grad is None else (id(p.grad), p.grad._version)
            if now != seen:
                out.append(i)
        return out

    def reset(self) -> None:
        """Start a new accumulation window (called by the optimizer's step())."""
        self._versions = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
