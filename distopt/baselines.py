"""Two-objective gradient rules (text loss, image loss) as baselines, over any base optimizer.

    PCGrad (Yu et al. 2020):  g1' = g1 - (g1.g2 / |g2|^2) g2 if g1.g2 < 0 (likewise g2'), update g1' + g2'
    MGDA (Desideri 2012; Sener & Koltun 2018), two tasks:
        alpha* = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1),  d = alpha* g1 + (1 - alpha*) g2   (alpha* = 1/2 if g1 = g2)
        the update is 2 d, so that identical gradients give g1 + g2, the summed gradient.

Each micro-step's backward runs inside `optimizer.modality(tag)`; the two per-modality gradients
(summed over micro-steps) are combined per the rule, written to p.grad, and the base optimizer steps.
`granularity`: 'global' (one vector of all parameters, as in the papers) or 'layer' (per parameter).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch

from distopt.capture import MicrostepCapture

RULES = ("pcgrad", "mgda")
GRANULARITIES = ("global", "layer")


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dtype=torch.float64)


def pcgrad_coefficients(g11: torch.Tensor, g12: torch.Tensor, g22: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the dot products, (c1, c2) with g1' = g1 - c1 g2 and g2' = g2 - c2 g1 (zero when no conflict)."""
    conflict = g12 < 0
    c1 = torch.where(conflict & (g22 > 0), g12 / g22.clamp_min(1e-300), torch.zeros_like(g12))
    c2 = torch.where(conflict & (g11 > 0), g12 / g11.clamp_min(1e-300), torch.zeros_like(g12))
    return c1, c2


def pcgrad(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """g1' + g2' with each gradient projected off the other's normal plane when they conflict."""
    c1, c2 = pcgrad_coefficients(_dot(g1, g1), _dot(g1, g2), _dot(g2, g2))
    return (1 - c2.to(g1.dtype)) * g1 + (1 - c1.to(g1.dtype)) * g2


def mgda_alpha(g11: torch.Tensor, g12: torch.Tensor, g22: torch.Tensor) -> torch.Tensor:
    """Minimiser of |alpha g1 + (1 - alpha) g2|^2 over [0, 1], from the dot products."""
    denom = g11 - 2 * g12 + g22  # |g1 - g2|^2
    alpha = (g22 - g12) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, alpha.clamp(0.0, 1.0), torch.full_like(denom, 0.5))


def mgda(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The min-norm convex combination d = alpha* g1 + (1 - alpha*) g2."""
    alpha = mgda_alpha(_dot(g1, g1), _dot(g1, g2), _dot(g2, g2)).to(g1.dtype)
    return alpha * g1 + (1 - alpha) * g2


class TwoObjective(torch.optim.Optimizer):
    """Combine two per-modality gradients by `rule`, then step `base` (any registry optimizer),
    built with the remaining keyword arguments.

    The wrapper shares the base optimizer's param_groups and state, so LR schedulers, state_dict()
    and load_state_dict() act on the base optimizer.
    """

    def __init__(self, params: Iterable, rule: str = "pcgrad", base: str = "adamw", granularity: str = "global",
                 capture: str = "hooks", **base_params):
        if rule not in RULES:
            raise ValueError(f"rule={rule!r} is invalid: choose one of {RULES}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is invalid: choose one of {GRANULARITIES}")
        from distopt.registry import build_optimizer  # the registry lists this class too

        self.base = build_optimizer({"name": base, "params": base_params}, params)
        super().__init__([p for g in self.base.param_groups for p in g["params"]], {})
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.rule, self.granularity = rule, granularity
        self._sums: dict[str, dict[torch.Tensor, torch.Tensor]] = {}
        params_list = [p for g in self.param_groups for p in g["params"]]
        self._capture = MicrostepCapture(params_list, self._on_microstep, capture)

    @contextlib.contextmanager
    def modality(self, tag: str) -> Iterator[None]:
        with self._capture.tagged(tag):
            yield

    def end_microstep(self, modality: Optional[str] = None) -> None:
        self._capture.end_microstep(modality)

    def _on_microstep(self, tag: Optional[str], deltas: dict[torch.Tensor, torch.Tensor]) -> None:
        if tag is None:
            raise RuntimeError(f"{self.rule}: run each backward inside `with optimizer.modality(tag):`")
        acc = self._sums.setdefault(tag, {})
        for p, g in deltas.items():
            acc[p] = g if p not in acc else acc[p] + g

    def _combined(self, g1: dict, g2: dict) -> dict[torch.Tensor, torch.Tensor]:
        params = [p for p in g1.keys() | g2.keys()]
        x = {p: g1.get(p, torch.zeros_like(p)) for p in params}
        y = {p: g2.get(p, torch.zeros_like(p)) for p in params}
        if self.granularity == "layer":
            return {p: self._apply(x[p], y[p]) for p in params}
        dots = [sum(_dot(a[p], b[p]) for p in params) for a, b in ((x, x), (x, y), (y, y))]
        if self.rule == "pcgrad":
            c1, c2 = pcgrad_coefficients(*dots)
            return {p: (1 - c2.to(p.dtype)) * x[p] + (1 - c1.to(p.dtype)) * y[p] for p in params}
        alpha = mgda_alpha(*dots)
        return {p: 2 * (alpha.to(p.dtype) * x[p] + (1 - alpha.to(p.dtype)) * y[p]) for p in params}

    def _apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pcgrad(x, y) if self.rule == "pcgrad" else 2 * mgda(x, y)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        if len(self._sums) > 2:
            raise RuntimeError(f"{self.rule} combines two modalities, got {sorted(self._sums)}")
        if len(self._sums) == 2:
            for p, g in self._combined(*self._sums.values()).items():
                p.grad = g.to(p.dtype)
        self._sums.clear()
        self._capture.reset()
        return self.base.step(closure)
