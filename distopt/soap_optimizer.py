"""SOAP as a torch.optim.Optimizer: the reference semantics of nikhilvyas/SOAP soap.py over
distopt.soap's math, for tensors or (name, tensor) pairs.

One difference when parameters are named (e.g. ``model.named_parameters()``): names enable routing
(distopt.routing), so parameters matching ``adam_patterns`` (embeddings, output heads) take the Adam
path unless they match ``soap_patterns``; the reference would rotate their smaller side. Unnamed
tensors follow the reference exactly. 1-D parameters take Adam unless precondition_1d.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Optional, overload

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distopt.host import DeviceTally
from distopt.options import SOAPOptions
from distopt.routing import ParamRoute, route_parameters, routing_summary
from distopt.soap import Counters, Layout, make_layout, new_counters, soap_update, state_dtype
from distopt.state import tree_to


class SOAP(torch.optim.Optimizer):
    """SOAP (module docstring). Options: distopt.options.SOAPOptions, as keyword arguments (torch.optim's
    way) or as one typed `options` object (the registry's)."""

    Options: ClassVar[type[SOAPOptions]] = SOAPOptions
    COUNTERS: ClassVar[tuple[str, ...]] = ("eigh", "eigh_fp64_retry", "eigh_failed", "eigh_seconds", "qr",
                                           "qr_failed", "qr_seconds")
    accepts_sharded_parameters: ClassVar[bool] = False  # MLFOPSOAP's distributor gathers blocks of FSDP2's rows

    def __init__(self, params: Iterable[Any], options: Optional[SOAPOptions] = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError(f"pass either options= or keyword arguments, not both (got {sorted(kwargs)})")
        self.options = options if options is not None else self.Options(**kwargs)
        if not isinstance(self.options, self.Options):
            raise TypeError(f"options: a {self.Options.__name__} is needed, got {type(self.options).__name__}")
        super().__init__(params, self.options.group_defaults())
        if not self.accepts_sharded_parameters and any(isinstance(p, DTensor) for g in self.param_groups
                                                       for p in g["params"]):
            raise ValueError(f"{type(self).__name__} rotates whole matrices and these parameters are FSDP2 shards "
                             "(DTensor): use MLFOPSOAP(params, fop=False), the same update with its state sharded "
                             "over the ranks")
        self.routes: dict[torch.Tensor, ParamRoute] = route_parameters(
            self.param_groups, adam_patterns=self.options.adam_patterns, soap_patterns=self.options.soap_patterns)
        self.counters: Counters = new_counters(self.COUNTERS)
        self.tally = DeviceTally()  # failed eighs and QRs, counted on the device and read once per step
        self._summary_printed = False

    # -- layout and routing ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Every parameter's name in optimizer order (`param<i>` for an unnamed tensor)."""
        params = [p for g in self.param_groups for p in g["params"]]
        return [self.routes[p].name or f"param{i}" for i, p in enumerate(params)]

    def layout(self, p: torch.Tensor, group: dict[str, Any], shape: Optional[Sequence[int]] = None) -> Layout:
        """How `p` (or a block of it with `shape`) is viewed for preconditioning, from its group's options."""
        return make_layout(p.shape if shape is None else shape, soap_path=self.routes[p].path == "soap",
                           max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                           precondition_1d=group["precondition_1d"],
                           channels_last=group["data_format"] == "channels_last")

    def routing_summary(self) -> dict[str, dict[str, int]]:
        """Counts and bytes per path ('soap' rotates at least one dim, 'adam' rotates none)."""
        layouts = {p: self.layout(p, g) for g in self.param_groups for p in g["params"]}
        return routing_summary(self.routes, layouts)

    def _print_summary_once(self) -> None:
        if self._summary_printed or not self.options.verbose:
            return
        self._summary_printed = True
        if dist.is_available() and dist.is_initialized() and dist.get_rank():
            return
        s = self.routing_summary()
        print(f"[distopt] {type(self).__name__} routing: " + ", ".join(
            f"{k}: {v['count']} params, {v['numel']} elements ({v['bytes'] / 2**20:.2f} MiB)" for k, v in s.items()),
            file=sys.stderr)

    # -- the step ----------------------------------------------------------------------------------

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._print_summary_once()
        self._update()
        return loss

    def _update(self) -> None:
        """Apply one step to every parameter with a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    layout = self.layout(p, group)
                    soap_update(self.state[p], p, layout.to_precond(p.grad.to(state_dtype(p))), layout, group,
                                self.counters, self.tally)
        self.tally.flush(self.counters)

    # -- what a training loop reads (distopt.protocols.Instrumented) ----------------------------------

    def stats(self) -> dict[str, float]:
        """Per-step diagnostics for logging (SOAP has none; ML-FOP-SOAP reports FOP's)."""
        return {}

    def comm_bytes(self) -> dict[str, int]:
        """Bytes this rank handed to each kind of collective (SOAP communicates nothing)."""
        return {}

    def describe(self) -> str:
        """What a checkpoint's manifest records, so that a run resumes only into the same kind of optimizer."""
        return type(self).__name__

    @property
    def in_window(self) -> bool:
        """True between the first micro-step of a step and the step() that ends it (never, here)."""
        return False

    def close(self) -> None:
        """Release hooks (SOAP registers none)."""

    # -- torch.optim contract ----------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load hyper-parameters and state without torch's cast of state tensors to the parameter dtype:
        our state is fp32 (or fp64) whatever the parameter dtype, so resuming stays bit-identical."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params, strict=True):
            if idx in state_dict["state"]:
                self.state[p] = tree_to(state_dict["state"][idx], p.device)
