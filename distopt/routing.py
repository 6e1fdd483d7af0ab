"""Which parameters SOAP preconditions and which take plain Adam.

Matrices (and conv kernels, reshaped by merge_dims) take the SOAP path. Embeddings and output heads
take Adam by default: their vocabulary side is huge and rarely worth a factor; name patterns
(fnmatch syntax, matched against the parameter name) change that. 1-D parameters follow SOAP's own
``precondition_1d`` switch. Without names (plain tensors), only shapes decide, as in reference SOAP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from distopt.soap import Layout

DEFAULT_ADAM_PATTERNS = ("*embed*", "*wte*", "*wpe*", "*head.weight")


@dataclass(frozen=True)
class ParamRoute:
    name: Optional[str]
    path: str  # "soap" or "adam"
    reason: str


def _matches(name: Optional[str], patterns: Sequence[str]) -> bool:
    return name is not None and any(fnmatchcase(name, pat) for pat in patterns)


def route_parameters(param_groups: list[dict[str, Any]], adam_patterns: Optional[Sequence[str]] = None,
                     soap_patterns: Sequence[str] = ()) -> dict[torch.Tensor, ParamRoute]:
    """Decide each parameter's path from its name and shape only (deterministic on every rank)."""
    adam_patterns = DEFAULT_ADAM_PATTERNS if adam_patterns is None else tuple(adam_patterns)
    routes: dict[torch.Tensor, ParamRoute] = {}
    for group in param_groups:
        names = group.get("param_names") or [None] * len(group["params"])
        for name, p in zip(names, group["params"], strict=True):
            if _matches(name, soap_patterns):
                routes[p] = ParamRoute(name, "soap", "soap_patterns")
            elif p.dim() >= 2 and _matches(name, adam_patterns):
                routes[p] = ParamRoute(name, "adam", "adam_patterns")
            else:
                routes[p] = ParamRoute(name, "soap", "shape")
    return routes


def routing_summary(routes: dict[torch.Tensor, ParamRoute],
                    layouts: dict[torch.Tensor, Layout]) -> dict[str, dict[str, int]]:
    """Counts, elements and bytes per effective path: 'soap' if at least one dim is rotated."""
    out = {"soap": dict(count=0, numel=0, bytes=0), "adam": dict(count=0, numel=0, bytes=0)}
    for p in routes:
        row = out["soap" if any(layouts[p].preconditioned) else "adam"]
        row["count"] += 1
        row["numel"] += p.numel()
        row["bytes"] += p.numel() * p.element_size()
    return out
