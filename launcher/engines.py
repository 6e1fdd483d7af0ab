"""The two engines a run can use (`engine:` in the config), behind the interface the training loop drives:
`engine(batch)`, `engine.backward(loss)`, `engine.step()` (steps the optimizer at the accumulation
boundary) and `engine.device`.

    deepspeed  DeepSpeed at ZeRO stage 0 with the distopt optimizer (distopt.deepspeed_glue): every rank
               holds the whole model; block owners hold the optimizer state.
    fsdp2      PyTorch FSDP2: `fully_shard` on the input embedding and every decoder layer (the classes
               transformers marks as never split), then the root, with a MixedPrecisionPolicy (fp32
               reduce-scatter); parameters, gradients and optimizer state all sharded. The model arrives
               on the meta device and is sharded before it holds any memory; the shards then receive
               rank 0's weights (`weights`). Parameters are in model.dtype (bf16: the block owners'
               masters are the only fp32 copy). The plain accumulation loop: FSDP2 reduce-scatters every
               backward and the optimizer redistributes the shards to block owners where its fold needs
               them (distopt.distributors.fsdp2). HSDP with `fsdp.replicate` > 1: shard within groups of
               world / replicate ranks, replicate across.

Activation checkpointing (`model.activation_checkpointing`) wraps each decoder layer's forward in
torch.utils.checkpoint with use_reentrant=False, which keeps one backward = one micro-step (a
reentrant checkpoint would run nested backward passes, and the optimizer would see each as one).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from distopt import build_optimizer, deepspeed_glue
from distopt.registry import split_clipping
from model_zoo.unified import UnifiedModel

ENGINES = ("deepspeed", "fsdp2")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated trainable blocks: modules of the classes its transformers models list in
    _no_split_modules, leaving out frozen ones (the VQ-VAE's blocks never run in training: as FSDP units
    or checkpointed regions they would only cost)."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules()
            if type(m).__name__ in names and any(p.requires_grad for p in m.parameters())]


def checkpoint_layers(model: torch.nn.Module) -> int:
    """Non-reentrant activation checkpointing on every decoder layer; returns how many were wrapped."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return len(layers)


class AccumulationLoop:
    """The plain accumulation loop over an FSDP2-sharded model."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int,
                 device: torch.device, clip: float | None = None):
        self.module, self.optimizer, self.grad_accum, self.device = model, optimizer, grad_accum, device
        self.clip = clip  # for optimizers that leave gradient communication to FSDP2 (AdamW): clip here
        self.microsteps = 0

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.microsteps += 1
        if self.microsteps % self.grad_accum == 0:
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def local_device() -> torch.device:
    """cuda:LOCAL_RANK where GPUs are visible, else the CPU."""
    if torch.cuda.is_available():
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def shard(model: UnifiedModel, world: int, replicate: int, device: torch.device) -> None:
    """fully_shard the input embedding (its own unit: gathered once at the start of forward and freed,
    rather than held with the root through every layer), every decoder layer, then the root, on a 1-D
    mesh or HSDP's (replicate, shard) mesh. Reductions in fp32 whatever the parameters' dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if replicate > 1:
        mesh = init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for unit in input_embeddings(model) + decoder_layers(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def input_embeddings(model: UnifiedModel) -> list[torch.nn.Module]:
    """The decoder's input embedding, unless the output head shares its weight (one unit must hold both)."""
    base = model.base()
    embedding = base.get_input_embeddings()
    head = base.get_output_embeddings()
    return [] if head is not None and head.weight is embedding.weight else [embedding]


def resolve(engine: str, spec: dict) -> dict:
    """The optimizer an engine builds for a config's {name, params}: the spec itself, except SOAP under
    FSDP2, which runs as MLFOPSOAP(fop=False) (the same update, its state sharded over the ranks by
    block: SOAP rotates whole matrices and FSDP2's parameters are row shards)."""
    spec = {"name": spec["name"], "params": dict(spec.get("params") or {})}
    if engine == "fsdp2" and spec["name"] == "soap":
        spec = {"name": "mlfop_soap", "params": {**spec["params"], "fop": False}}
    return spec


Weights = Optional[Callable[[torch.nn.Module], None]]  # fills a sharded model's parameters (None: leave them)


def build_engine(model: UnifiedModel, optimizer_spec: dict, *, engine: str, micro_batch_size: int,
                 grad_accum: int, max_grad_norm, bf16: bool, replicate: int = 1, deepspeed: dict | None = None,
                 activation_checkpointing: bool = False, weights: Weights = None,
                 device: Optional[torch.device] = None, materialize: Optional[AbstractContextManager[Any]] = None):
    """(engine, optimizer) for the model; the optimizer is built once parameters sit on their device.
    deepspeed: `model` holds its weights. fsdp2: `model` is on the meta device; it is sharded, then,
    inside `materialize` (the dry run's FakeTensorMode; default none), its shards are made on `device` (default: this
    rank's GPU, else the CPU) and `weights` fills them."""
    world = dist.get_world_size()
    if activation_checkpointing:
        checkpoint_layers(model)
    if engine == "deepspeed":
        if bf16:
            model.to(torch.bfloat16)  # bf16 parameters and compute; the owners keep fp32 masters
        ds_config = deepspeed_glue.engine_config(micro_batch_size, grad_accum, world, max_grad_norm, deepspeed)
        return deepspeed_glue.initialize(model, optimizer_spec, ds_config)
    device = device or local_device()
    if bf16:
        model.to(torch.bfloat16)  # on meta: the shards are bf16; the owners' fp32 masters are the only fp32 copy
    shard(model, world, replicate, device)
    with contextlib.nullcontext() if materialize is None else materialize:
        model.to_empty(device=device)
        if weights is not None:
            weights(model)
    spec = resolve(engine, optimizer_spec)
    optimizer_clip, engine_clip = split_clipping(spec["name"], max_grad_norm or None)
    if optimizer_clip:
        spec["params"]["max_grad_norm"] = optimizer_clip
    optimizer = build_optimizer(spec, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return AccumulationLoop(model, optimizer, grad_accum, device, engine_clip), optimizer
