"""Memory per GPU of a run, planned on paper from parameter shapes (the model built on the meta device).

For P parameters in dtype s_p bytes, N ranks, and this rank's share of the block plan (S owned
elements, state_numel of its blocks, slot W, docs/distributed.md):

                   deepspeed (stage 0, owner runtime)      fsdp2 (parameters sharded, owner runtime)
    parameters     P s_p                                   4 P / N  (fp32 shards, the masters) + 2 units s_p
    gradients      P s_p  (p.grad, freed at reductions)    4 P / N  (fp32 reduced shards) + 1 unit s_p
    masters        4 S    (bf16 parameters only)           4 S      (the owner's copy of its blocks)
    SOAP state     4 Sigma_owned (2 n + 2 Sigma_rotated d^2) the same
    fold window    e (2 S + S)  (G, z, a tail)             the same
    communication  s_c (2 W + 4 world c)                   s_c 2 S  (all-to-all send and receive)
    activations    the estimate below                      the same

"unit" is the largest FSDP unit (a decoder layer), gathered for forward and backward. Activations per
micro-step, bf16, with SDPA/flash attention (no s^2 term; Korthikanti et al. 2022 without it):
34 T h bytes per layer (T tokens per micro-batch, h hidden), or 2 T h per layer plus one layer's 34 T h
with activation checkpointing, plus the logits T V (2 + 4) bytes (bf16 logits and their fp32 copy
for the loss). An estimate: real runs add allocator fragmentation and framework buffers (budget ~10%).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from distopt.options import MLFOPOptions
from distopt.plan import Plan, make_plan
from distopt.soap import SOAP, state_dtype

ENGINES = ("deepspeed", "fsdp2")
GiB = 2**30


@dataclass(frozen=True)
class Activations:
    """What the activation estimate needs from the model and the batch."""

    layers: int
    hidden: int
    vocab: int
    tokens: int                    # tokens per micro-batch (micro_batch_size x sequence length)
    checkpointing: bool = False

    def bytes(self) -> int:
        per_layer = 34 * self.tokens * self.hidden
        body = (2 * self.tokens * self.hidden * self.layers + per_layer) if self.checkpointing else per_layer * self.layers
        return body + self.tokens * self.vocab * 6


@dataclass(frozen=True)
class Estimate:
    engine: str
    gpus: int
    parameters: int
    gradients: int
    masters: int
    state: int
    window: int
    communication: int
    activations: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("engine", "gpus"))

    def rows(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("engine", "gpus")]


def plan_for(named: Iterable[tuple[str, torch.Tensor]], options: MLFOPOptions, world: int) -> tuple[Plan, SOAP]:
    """The block plan ML-FOP-SOAP would make for these (meta) parameters on `world` ranks."""
    named = list(named)
    soap = SOAP(named, **options.soap().__dict__ | {"verbose": False})
    params = [p for g in soap.param_groups for p in g["params"]]
    group = soap.param_groups[0]

    def precond(i, shape):
        layout = soap.layout(params[i], group, shape)
        return tuple(zip(layout.precond_shape, layout.preconditioned))

    names = [soap.routes[p].name or f"param{i}" for i, p in enumerate(params)]
    return make_plan(list(zip(names, [tuple(p.shape) for p in params])), options.max_block, world, precond), soap


def estimate(named: Iterable[tuple[str, torch.Tensor]], options: MLFOPOptions, world: int, engine: str,
             activations: Activations, largest_unit: int = 0, rank: Optional[int] = None) -> Estimate:
    """Per-GPU bytes on the fullest rank (or on `rank`). largest_unit: elements of the largest FSDP unit."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is invalid: choose one of {ENGINES}")
    named = list(named)
    plan, _ = plan_for(named, options, world)
    params = [p for _, p in named]
    total = sum(p.numel() for p in params)
    s_p = max(p.element_size() for p in params)
    s_e = max(torch.tensor([], dtype=state_dtype(p)).element_size() for p in params)
    s_c = 8 if s_e == 8 else (2 if options.comm_dtype == "bf16" else 4)
    low_precision = s_p < 4
    ranks = range(world) if rank is None else [rank]
    best = None
    for r in ranks:
        owned = plan.owned(r)
        share = sum(b.numel for b in owned)
        state = 4 * sum(b.state_numel for b in owned) * (s_e // 4)
        window = s_e * 3 * share
        if engine == "deepspeed":
            width = max(1, int(options.bucket_mb * 2**20) // (s_c * world))
            buckets = min(math.ceil(plan.slot / width), 4)
            comm = s_c * (2 * plan.slot + buckets * world * min(width, plan.slot)) if world > 1 else 0
            est = Estimate(engine, world, total * s_p, total * s_p, 4 * share if low_precision else 0, state, window,
                           comm, activations.bytes())
        else:
            est = Estimate(engine, world, 4 * math.ceil(total / world) + 2 * largest_unit * s_p,
                           4 * math.ceil(total / world) + largest_unit * s_p, 4 * share, state, window,
                           s_c * 2 * share if world > 1 else 0, activations.bytes())
        if best is None or est.total > best.total:
            best = est
    return best


def format_table(estimates: list[Estimate], gpu_gib: float) -> str:
    """A markdown table of estimates in GiB, with whether each fits a GPU of `gpu_gib`."""
    names = [name for name, _ in estimates[0].rows()]
    lines = ["| engine | GPUs | " + " | ".join(names) + " | total | fits |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for e in estimates:
        values = " | ".join(f"{v / GiB:.1f}" for _, v in e.rows())
        lines.append(f"| {e.engine} | {e.gpus} | {values} | {e.total / GiB:.1f} | "
                     f"{'yes' if e.total <= gpu_gib * GiB else 'no'} |")
    return "\n".join(lines)
