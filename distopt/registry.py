"""One registry for every optimizer, built from what configs hold: {name, params}.

Each name has an options dataclass (distopt.options) that validates `params` before anything is
built, so the launcher refuses a bad config with the same message the constructor would give.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from distopt.mlfop import MLFOPSOAP
from distopt.options import RULES, AdamWOptions, MLFOPOptions, OptionError, RuleOptions, SOAPOptions, option_names
from distopt.rules import TwoObjective
from distopt.soap_optimizer import SOAP


@dataclass(frozen=True)
class Entry:
    options: type
    build: Callable[..., torch.optim.Optimizer]  # build(params, options, process_group)
    owns_gradient_communication: bool = False     # reduces gradients across ranks itself, clips inside step()


def _adamw(params: Iterable[Any], options: AdamWOptions,
           process_group: Optional[dist.ProcessGroup] = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **dataclasses.asdict(options))


def _soap(params: Iterable[Any], options: SOAPOptions,
          process_group: Optional[dist.ProcessGroup] = None) -> torch.optim.Optimizer:
    return SOAP(params, options)


def _mlfop(params: Iterable[Any], options: MLFOPOptions,
           process_group: Optional[dist.ProcessGroup] = None) -> torch.optim.Optimizer:
    return MLFOPSOAP(params, options, process_group=process_group)


def _rule(params: Iterable[Any], options: RuleOptions,
          process_group: Optional[dist.ProcessGroup] = None) -> torch.optim.Optimizer:
    base_options = options.base_options
    if isinstance(base_options, MLFOPOptions):  # the wrapper hands it the rule's two terms as micro-steps
        base_options = dataclasses.replace(base_options, capture="manual")
    base = OPTIMIZERS[options.base].build(params, base_options, process_group)
    return TwoObjective(base, options)


OPTIMIZERS: dict[str, Entry] = {
    "adamw": Entry(AdamWOptions, _adamw),
    "soap": Entry(SOAPOptions, _soap),
    "mlfop_soap": Entry(MLFOPOptions, _mlfop, owns_gradient_communication=True),
    # "sum" (vanilla), "pcgrad", "mgda", "pareto_lora": each wraps a base optimizer
    **{rule: Entry(RuleOptions, _rule, owns_gradient_communication=True) for rule in RULES},
}
TWO_OBJECTIVE = set(RULES)
BASES = sorted(set(OPTIMIZERS) - TWO_OBJECTIVE)


def _check_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise OptionError("name", f"optimizer name {name!r} is unknown: choose one of {sorted(OPTIMIZERS)}")


def _base_name(name: str, params: Optional[Mapping[str, Any]]) -> str:
    base = str((params or {}).get("base", "adamw"))
    if base not in BASES:
        raise OptionError("base", f"optimizer {name!r}: base={base!r} is invalid: choose one of {BASES}")
    return base


def valid_arguments(name: str, params: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Keyword arguments the optimizer `name` accepts (a two-objective rule: its own plus its base
    optimizer's, params["base"], AdamW by default). Raises OptionError for an unknown name or base."""
    _check_name(name)
    own = option_names(OPTIMIZERS[name].options)
    if name in TWO_OBJECTIVE:  # the rule is the name; the base's own options are valid too
        return sorted(set(own) - {"rule"} | set(option_names(OPTIMIZERS[_base_name(name, params)].options)))
    return own


def parse_options(name: str, params: Optional[Mapping[str, Any]] = None) -> Any:
    """The validated options object of optimizer `name` from a config's params; every mistake is an
    OptionError naming its field."""
    kwargs = dict(params or {})
    valid = valid_arguments(name, kwargs)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise OptionError(bad[0], f"optimizer {name!r} has no argument(s) {bad}: valid arguments are {valid}")
    if name not in TWO_OBJECTIVE:
        return OPTIMIZERS[name].options(**kwargs)
    base = _base_name(name, kwargs)
    own = {k: kwargs.pop(k) for k in option_names(RuleOptions) if k in kwargs}  # capture, max_grad_norm: the rule's
    base_options = OPTIMIZERS[base].options(**{k: v for k, v in kwargs.items() if k in option_names(
        OPTIMIZERS[base].options)})
    return RuleOptions(rule=name, **own, base_options=base_options)


def owns_gradient_communication(name: str) -> bool:
    _check_name(name)
    return OPTIMIZERS[name].owns_gradient_communication


def split_clipping(name: str, max_norm: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """Who clips at `max_norm`: (the optimizer, the engine). An optimizer that owns gradient
    communication clips inside step(), on the reduced gradient (an engine would clip by each rank's
    local, unreduced norm, or find p.grad already consumed); any other leaves it to the engine."""
    return (max_norm, None) if owns_gradient_communication(name) else (None, max_norm)


def build_optimizer(spec: Mapping[str, Any], params: Iterable[Any],
                    process_group: Optional[dist.ProcessGroup] = None) -> torch.optim.Optimizer:
    """Build from {"name": ..., "params": {...}}; params may be tensors or (name, tensor) pairs.

    An unknown name, key or argument is a ValueError (OptionError) that names it and lists the valid ones.
    """
    unknown_keys = set(spec) - {"name", "params"}
    if unknown_keys or "name" not in spec:
        raise ValueError(f"optimizer spec needs keys 'name' and optionally 'params'; got {sorted(spec)}")
    options = parse_options(spec["name"], spec.get("params"))
    return OPTIMIZERS[spec["name"]].build(params, options, process_group)
