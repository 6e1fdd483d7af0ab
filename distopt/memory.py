"""Memory per GPU of a run, planned on paper from parameter shapes (the model built on the meta device).

For P parameters in dtype s_p bytes, N ranks (the shard group under FSDP2), this rank's share of the
block plan (S owned elements, the state of its blocks, the slot W; docs/distributed.md), e the state's
element size (4; 8 for fp64 parameters), s_c the reduction dtype's and K micro-steps:

                   deepspeed (stage 0, replicated)          fsdp2 (parameters sharded)
    parameters     P s_p                                    its rows of every parameter (~P / N), in s_p
    gradients      P s_p (p.grad, freed at reductions)      the same rows (FSDP2's reduced shards)
    gathered       0                                        2 units s_c' (the largest FSDP unit, all-gathered
                                                            in compute dtype, twice while prefetching)
    masters        4 S (bf16 parameters only)               e S (the owner's copy of its blocks)
    SOAP state     e Sigma_owned (2 n + 2 Sigma_rotated d^2) the same
    fold window    e S (3 + [K not a power of two])         the same (G, the fold's z, rot(G), a waiting tail)
    communication  s_c (R W + min(B, 4) world c)             s_c (rows + S)  (one all-to-all's buffers)
    activations    the estimate below                       the same

Activations per micro-step, bf16, with SDPA/flash attention (no s^2 term; Korthikanti et al. 2022
without it): 34 T h bytes per layer (T tokens per micro-batch, h hidden), or 2 T h per layer plus one
layer's 34 T h with activation checkpointing, plus the logits T V (2 + 4) bytes (bf16 logits and
their fp32 copy for the loss). An estimate: real runs add allocator fragmentation and framework
buffers; keep ~10% free. R = 2 received shares while a reduction overlaps the next micro-step (FOP on,
K > 1), else 1. tests/test_fsdp2.py holds every component but the activations against the bytes a
CPU run actually holds at 1, 2 and 4 ranks, under both engines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from distopt.options import MLFOPOptions
from distopt.plan import Plan, PrecondDims, make_plan
from distopt.soap import state_dtype
from distopt.soap_optimizer import SOAP

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
        layers = self.layers
        body = (2 * self.tokens * self.hidden * layers + per_layer) if self.checkpointing else per_layer * layers
        return body + self.tokens * self.vocab * 6


@dataclass(frozen=True)
class Estimate:
    engine: str
    gpus: int
    parameters: int
    gradients: int
    gathered: int
    masters: int
    state: int
    window: int
    communication: int
    activations: int

    @property
    def total(self) -> int:
        return sum(v for _, v in self.rows())

    def rows(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("engine", "gpus")]


def plan_for(named: Iterable[tuple[str, torch.Tensor]], options: MLFOPOptions, world: int) -> Plan:
    """The block plan ML-FOP-SOAP would make for these (meta) parameters on `world` ranks."""
    named = list(named)
    soap = SOAP(named, **{**options.soap().__dict__, "verbose": False})
    params = [p for g in soap.param_groups for p in g["params"]]
    group = soap.param_groups[0]

    def precond(i: int, shape: tuple[int, ...]) -> PrecondDims:
        layout = soap.layout(params[i], group, shape)
        return tuple(zip(layout.precond_shape, layout.preconditioned, strict=True))

    shapes = [tuple(p.shape) for p in params]
    return make_plan(list(zip(soap.names, shapes, strict=True)), options.max_block, world, precond)


def _rows_share(p: torch.Tensor, world: int, rank: int) -> int:
    """Elements of p on `rank` when dim 0 is split as torch.chunk splits it (FSDP2)."""
    if p.dim() == 0:
        return p.numel() if rank == 0 else 0
    n, chunk = p.shape[0], math.ceil(p.shape[0] / world)
    rows = max(0, min((rank + 1) * chunk, n) - min(rank * chunk, n))
    return rows * (p.numel() // max(n, 1))


def estimate(named: Iterable[tuple[str, torch.Tensor]], options: MLFOPOptions, world: int, engine: str,
             activations: Activations, micro_steps: int = 1, largest_unit: int = 0,
             rank: Optional[int] = None) -> Estimate:
    """Per-GPU bytes on the fullest rank (or on `rank`). largest_unit: elements of the largest FSDP unit."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is invalid: choose one of {ENGINES}")
    named = list(named)
    plan = plan_for(named, options, world)
    params = [p for _, p in named]
    s_p = max(p.element_size() for p in params)
    e = max(state_dtype(p).itemsize for p in params)
    s_c = 8 if e == 8 else (2 if options.comm_dtype == "bf16" else 4)
    tail = micro_steps & (micro_steps - 1) != 0
    best = None
    for r in range(world) if rank is None else [rank]:
        owned = plan.owned(r)
        share = sum(b.numel for b in owned)
        common = dict(state=e * sum(b.state_numel for b in owned), window=e * share * (3 + tail) if options.fop else
                      e * share, activations=activations.bytes())
        if engine == "deepspeed":
            total = sum(p.numel() for p in params)
            width = max(1, int(options.bucket_mb * 2**20) // (s_c * world))
            buckets = min(math.ceil(plan.slot / width), 4)
            shares = 2 if options.fop and micro_steps > 1 else 1
            comm = s_c * (shares * plan.slot + buckets * world * min(width, plan.slot))
            est = Estimate(engine, world, total * s_p, total * s_p, 0, 4 * share if s_p < 4 else 0,
                           communication=comm if world > 1 else 0, **common)
        else:
            rows = sum(_rows_share(p, world, r) for p in params)
            comm = s_c * (rows + share)
            est = Estimate(engine, world, rows * s_p, rows * s_p, 2 * largest_unit * 2, e * share,
                           communication=comm, **common)
        if best is None or est.total > best.total:
            best = est
    assert best is not None, "world >= 1 ranks"
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
