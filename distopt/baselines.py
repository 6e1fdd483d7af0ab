"""Two-objective gradient rules (text loss, image loss) as baselines, over any base optimizer.

Each rule maps the two per-modality gradients of a group of parameters to one direction, written in
the mean convention (identical gradients g give g); the wrapper steps with twice that, the scale of
the summed loss. Every rule needs only the group's three dot products g1.g1, g1.g2, g2.g2:

    PCGrad (Yu et al. 2020): g1' = g1 - (g1.g2/|g2|^2) g2 if g1.g2 < 0 (likewise g2');  (g1' + g2') / 2
    MGDA (Desideri 2012; Sener & Koltun 2018): alpha* = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)
        (1/2 if g1 = g2);  alpha* g1 + (1 - alpha*) g2, the min-norm point of the segment
    Pareto-LoRA-style (our reading of arXiv 2606.17296, whose rule is not public): equalise the
        strengths (u_i = g_i / |g_i|), take the MGDA direction of u1, u2, rescale by the mean original
        norm: (|g1| + |g2|)/2 * (alpha* u1 + (1 - alpha*) u2); a zero gradient gives the other one.
        (For two unit vectors alpha* = 1/2, so this is the mean norm times the mean unit direction.)

Each micro-step's backward runs inside `optimizer.modality(tag)`; the per-modality gradients
(summed over micro-steps) are combined, written to p.grad, and the base optimizer steps.
`granularity`: 'global' (one vector of all parameters, as in the papers) or 'layer' (per module:
a LoRA layer's A and B matrices form one group, as do a module's weight and bias).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Optional

import torch

from distopt.capture import MicrostepCapture

RULES = ("pcgrad", "mgda", "pareto_lora")
GRANULARITIES = ("global", "layer")


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dtype=torch.float64)


def mgda_alpha(g11: torch.Tensor, g12: torch.Tensor, g22: torch.Tensor) -> torch.Tensor:
    """Minimiser of |alpha g1 + (1 - alpha) g2|^2 over [0, 1], from the dot products."""
    denom = g11 - 2 * g12 + g22  # |g1 - g2|^2
    alpha = (g22 - g12) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, alpha.clamp(0.0, 1.0), torch.full_like(denom, 0.5))


def rule_weights(rule: str, g11: torch.Tensor, g12: torch.Tensor, g22: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) with direction = w1 g1 + w2 g2 (mean convention), from the group's dot products."""
    if rule == "pcgrad":
        conflict = g12 < 0
        c1 = torch.where(conflict & (g22 > 0), g12 / g22.clamp_min(1e-300), torch.zeros_like(g12))  # g1' = g1 - c1 g2
        c2 = torch.where(conflict & (g11 > 0), g12 / g11.clamp_min(1e-300), torch.zeros_like(g12))  # g2' = g2 - c2 g1
        return (1 - c2) / 2, (1 - c1) / 2
    if rule == "mgda":
        alpha = mgda_alpha(g11, g12, g22)
        return alpha, 1 - alpha
    if rule == "pareto_lora":
        n1, n2 = g11.sqrt(), g22.sqrt()
        if float(n1) == 0 or float(n2) == 0:
            return (n1 > 0).double(), (n2 > 0).double()
        one = torch.ones_like(g11)
        alpha = mgda_alpha(one, g12 / (n1 * n2), one)
        mean = (n1 + n2) / 2
        return mean * alpha / n1, mean * (1 - alpha) / n2
    raise ValueError(f"rule={rule!r} is invalid: choose one of {RULES}")


def combine(rule: str, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The rule's direction for two gradients of one group (mean convention)."""
    w1, w2 = rule_weights(rule, _dot(g1, g1), _dot(g1, g2), _dot(g2, g2))
    return w1.to(g1.dtype) * g1 + w2.to(g1.dtype) * g2


def _module_of(name: Optional[str], fallback: int) -> str:
    """Group key: the module a parameter belongs to; a LoRA layer's A and B share their base module."""
    if name is None:
        return f"#{fallback}"
    lora = re.match(r"(.*)\.lora_[AB]\b", name)
    return lora.group(1) if lora else name.rsplit(".", 1)[0]


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
        self._module = {p: _module_of(name, i) for g in self.param_groups
                        for i, (name, p) in enumerate(zip(g.get("param_names") or [None] * len(g["params"]), g["params"]))}
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
        """2 x the rule's direction (the scale of the summed loss), per group of parameters."""
        params = list(g1.keys() | g2.keys())
        x = {p: g1.get(p, torch.zeros_like(p)) for p in params}
        y = {p: g2.get(p, torch.zeros_like(p)) for p in params}
        groups: dict[str, list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault("all" if self.granularity == "global" else self._module[p], []).append(p)
        out = {}
        for members in groups.values():
            dots = [sum(_dot(a[p], b[p]) for p in members) for a, b in ((x, x), (x, y), (y, y))]
            w1, w2 = rule_weights(self.rule, *dots)
            for p in members:
                out[p] = 2 * (w1.to(p.dtype) * x[p] + w2.to(p.dtype) * y[p])
        return out

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
