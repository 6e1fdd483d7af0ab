"""One registry for every optimizer, built from what configs hold: {name, params}."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Mapping, Optional

import torch

from distopt.mlfop import MLFOPSOAP
from distopt.rules import RULES, TwoObjective
from distopt.soap import SOAP


def _two_objective(rule: str) -> Callable:
    def build(params, **kwargs):
        return TwoObjective(params, rule=rule, **kwargs)
    build.signature_of = TwoObjective
    return build


TWO_OBJECTIVE = set(RULES)  # "sum" (vanilla), "pcgrad", "mgda", "pareto_lora": each wraps a base optimizer
OPTIMIZERS: dict[str, Callable] = {
    "adamw": torch.optim.AdamW,
    "soap": SOAP,
    "mlfop_soap": MLFOPSOAP,
    **{rule: _two_objective(rule) for rule in RULES},
}
# These reduce gradients across ranks themselves and clip inside step(), so DeepSpeed must not.
OWNS_GRADIENT_COMMUNICATION = {"mlfop_soap"} | TWO_OBJECTIVE


def valid_arguments(name: str, params: Optional[Mapping] = None) -> list[str]:
    """Keyword arguments the optimizer `name` accepts (MLFOPSOAP: its own plus SOAP's; a two-objective
    rule: its own plus its base optimizer's, params["base"], AdamW by default). Raises ValueError for an
    unknown name or base."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name {name!r} is unknown: choose one of {sorted(OPTIMIZERS)}")
    if name in TWO_OBJECTIVE:
        base = (params or {}).get("base", "adamw")
        if base not in OPTIMIZERS or base in TWO_OBJECTIVE:
            raise ValueError(f"optimizer {name!r}: base={base!r} is invalid: choose one of "
                             f"{sorted(set(OPTIMIZERS) - TWO_OBJECTIVE)}")
        return sorted(set(_arguments(name)) | set(_arguments(base)))
    return _arguments(name)


def _arguments(name: str) -> list[str]:
    target = OPTIMIZERS[name]
    classes = [getattr(target, "signature_of", target)]
    if classes[0] is MLFOPSOAP:
        classes.append(SOAP)
    names = []
    for cls in classes:
        for arg in inspect.signature(cls.__init__).parameters.values():
            if arg.name not in ("self", "params", "rule") and arg.kind not in (arg.VAR_KEYWORD, arg.VAR_POSITIONAL):
                names.append(arg.name)
    return sorted(set(names))


def build_optimizer(spec: Mapping, params: Iterable) -> torch.optim.Optimizer:
    """Build from {"name": ..., "params": {...}}; params may be tensors or (name, tensor) pairs.

    An unknown name, key or argument is a ValueError that lists the valid ones.
    """
    unknown_keys = set(spec) - {"name", "params"}
    if unknown_keys or "name" not in spec:
        raise ValueError(f"optimizer spec needs keys 'name' and optionally 'params'; got {sorted(spec)}")
    name = spec["name"]
    kwargs = dict(spec.get("params") or {})
    valid = valid_arguments(name, kwargs)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise ValueError(f"optimizer {name!r} has no argument(s) {bad}: valid arguments are {valid}")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])  # YAML gives lists
    return OPTIMIZERS[name](params, **kwargs)
