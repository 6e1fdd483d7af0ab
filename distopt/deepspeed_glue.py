"""Run a distopt optimizer inside a DeepSpeed engine.

DeepSpeed runs at ZeRO stage 0 (launch, process groups, engine, gradient accumulation, LR
schedule) with our optimizer object. MLFOPSOAP owns gradient communication (reduce-to-owner per
micro-step, parameter all-gather), as do the two-objective rules (one all-reduce of the two modality
gradients per step), so for them the engine's backward all-reduce is switched off — the lever
DeepSpeed's 1-bit optimizers use — and clipping moves into the optimizer: DeepSpeed would clip by a
norm computed from each rank's local, unreduced p.grad. Only trainable parameters reach the
optimizer (LoRA freezes the base weights). The engine still scales the loss by
1 / gradient_accumulation_steps once, which is the scale every micro-step gradient arrives in.

Refused, with the reason and the fix: ZeRO stage >= 1 (it hands the optimizer flat 1-D partitions,
so no Kronecker factor can be formed), fp16 / bf16 engines (their loss scaler and fp32 master copy
rewrite gradients behind the optimizer's back; use `torch_autocast`), and an `optimizer` block next
to our object.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from distopt.registry import OWNS_GRADIENT_COMMUNICATION, build_optimizer


def prepare_config(ds_config: dict, optimizer_name: str) -> tuple[dict, Optional[float]]:
    """Validate a DeepSpeed config for a distopt optimizer; returns (config to use, clip norm to apply
    inside the optimizer or None)."""
    cfg = copy.deepcopy(ds_config)
    if "optimizer" in cfg:
        raise ValueError("DeepSpeed config: remove the 'optimizer' block; distopt passes its own optimizer object "
                         "(configure it under optimizer {name, params} in the distopt config)")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage:
        raise ValueError(f"DeepSpeed config: zero_optimization.stage={stage} is not supported: ZeRO stages >= 1 hand "
                         "the optimizer flat 1-D partitions, so SOAP's Kronecker factors cannot be formed. Use stage 0; "
                         "MLFOPSOAP shards its own state (factors, eigenbases, moments) across ranks")
    for precision in ("fp16", "bf16"):
        if cfg.get(precision, {}).get("enabled"):
            raise ValueError(f"DeepSpeed config: {precision}.enabled is not supported: its loss scaler / fp32 master "
                             "copy rewrites gradients behind the optimizer. Keep fp32 parameters and use "
                             "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} for low-precision compute")
    if optimizer_name not in OWNS_GRADIENT_COMMUNICATION:
        return cfg, None
    clip = cfg.get("gradient_clipping", 0.0) or None
    cfg["gradient_clipping"] = 0.0
    return cfg, clip


def initialize(model: torch.nn.Module, optimizer_spec: dict, ds_config: dict):
    """deepspeed.initialize with our optimizer; returns (engine, optimizer)."""
    import deepspeed

    deepspeed.init_distributed(auto_mpi_discovery=True)
    cfg, clip = prepare_config(ds_config, optimizer_spec["name"])
    spec = copy.deepcopy(optimizer_spec)
    if clip is not None:
        params = spec.setdefault("params", {})
        if params.get("max_grad_norm") not in (None, clip):
            raise ValueError(f"gradient clipping is set twice: DeepSpeed gradient_clipping={clip} and optimizer "
                             f"max_grad_norm={params['max_grad_norm']}; keep one")
        params["max_grad_norm"] = clip
    optimizer = build_optimizer(spec, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    if optimizer_spec["name"] in OWNS_GRADIENT_COMMUNICATION:
        engine.enable_backward_allreduce = False
    return engine, optimizer
