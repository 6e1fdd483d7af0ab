"""Gradient clipping: one rule for every optimizer and engine that clips in distopt.

The global norm ||G|| is over every parameter's accumulated gradient (averaged over ranks); when it
exceeds max_norm the gradient is scaled by max_norm / (||G|| + 1e-6), as torch.nn.utils.clip_grad_norm_
does. Who clips is the launcher's choice (launcher/engines.resolve): an optimizer that owns gradient
communication clips inside step(), on the reduced gradient; otherwise the engine does.
"""

from __future__ import annotations

from typing import Optional


def clip_scale(norm_sq: float, max_norm: Optional[float]) -> float:
    """What to multiply the gradient by: max_norm / (||G|| + 1e-6) when ||G|| > max_norm, else 1."""
    if max_norm is None:
        return 1.0
    norm = norm_sq ** 0.5
    return max_norm / (norm + 1e-6) if norm > max_norm else 1.0
