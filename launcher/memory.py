"""Plan a run's memory per GPU on paper, before building anything (distopt/memory.py gives the formula).

    python -m launcher.memory --config configs/emu3_8b_cluster.yaml --gpus 8 64 512 1024 [--engine fsdp2]
                              [--gpu-memory 80] [--set section.key=value ...]

The model is built on the meta device (no weights, no memory; its trainable parameters are planned,
the frozen VQ-VAE is left out): from the checkpoint's config.json when
`model.pretrained` names one, else from `model.size` (a cluster config's `<...>` placeholder is read as
"the published shape"). The block plan is the optimizer's own; activations come from the model's
shape, micro_batch_size and data.seq_len. The launcher runs the same estimate before it builds the
model and refuses a run that cannot fit, with the numbers and the fix.

The formula:
Memory per GPU of a run, planned on paper from parameter shapes (the model built on the meta device).

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
    fold window    e S 3 (FOP on, K > 1; 2 for K = 1; 1 off) the same (G, the fold's z, the chunk arriving)
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

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Optional

import torch

from distopt.distributors import rows_of
from distopt.options import MLFOPOptions, RuleOptions, SOAPOptions
from distopt.plan import Plan, PrecondDims, make_plan
from distopt.registry import parse_options
from distopt.soap import state_dtype
from distopt.soap_optimizer import SOAP
from launcher.config import Config, ConfigError, read_config
from launcher.engines import ENGINES, decoder_layers
from model_zoo.build import CONFIGS, FAMILIES, build_vocab, checkpoint_config
from model_zoo.config import is_placeholder
from model_zoo.unified import UnifiedModel

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
    rank: int
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
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("engine", "gpus", "rank")]


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
    """Elements of p on `rank` when dim 0 is split as FSDP2 splits it (distopt's rows_of)."""
    if p.dim() == 0:
        return p.numel() if rank == 0 else 0
    first, last = rows_of(p.shape[0], world, rank)
    return (last - first) * (p.numel() // max(p.shape[0], 1))


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
    best = None
    for r in range(world) if rank is None else [rank]:
        owned = plan.owned(r)
        share = sum(b.numel for b in owned)
        folding = 3 if micro_steps > 1 else 2  # G, the fold's z, the chunk arriving (K = 1: nothing arrives)
        common = dict(state=e * sum(b.state_numel for b in owned), window=e * share * folding if options.fop else
                      e * share, activations=activations.bytes())
        if engine == "deepspeed":
            total = sum(p.numel() for p in params)
            width = max(1, int(options.bucket_mb * 2**20) // (s_c * world))
            buckets = min(math.ceil(plan.slot / width), 4)
            shares = 2 if options.fop and micro_steps > 1 else 1
            comm = s_c * (shares * plan.slot + buckets * world * min(width, plan.slot))
            est = Estimate(engine, world, r, total * s_p, total * s_p, 0, 4 * share if s_p < 4 else 0,
                           communication=comm if world > 1 else 0, **common)
        else:
            rows = sum(_rows_share(p, world, r) for p in params)
            comm = s_c * (rows + share)
            est = Estimate(engine, world, r, rows * s_p, rows * s_p, 2 * largest_unit * 2, e * share,
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


def model_on_meta(cfg: Config) -> UnifiedModel:
    """The run's model with meta tensors: its parameters' names, shapes and dtypes, and nothing else."""
    m = cfg.model
    family = FAMILIES[m.family]
    if m.pretrained and not is_placeholder(m.pretrained):
        config = checkpoint_config(m.pretrained)
    else:
        size = m.size or "tiny"
        vocab = build_vocab(replace(cfg.data, text_tokenizer="wordpiece", image_tokenizer="digits_vq"),
                            replace(m, pretrained=None)) if size == "tiny" else None
        config = CONFIGS[m.family](size, vocab, m.overrides)
    with torch.device("meta"):
        return family(_hf(m.family)(config))


def _hf(family: str):
    from transformers import Emu3ForConditionalGeneration, JanusForConditionalGeneration

    return {"emu3": Emu3ForConditionalGeneration, "janus": JanusForConditionalGeneration}[family]


def optimizer_plan(cfg: Config, engine: str) -> tuple[MLFOPOptions, bool]:
    """The ML-FOP-SOAP options whose block plan holds about the run's optimizer state, and whether that
    state is sharded over the ranks. ML-FOP-SOAP (alone or under a rule) shards it. AdamW and SOAP hold
    all of it on every rank under deepspeed (ZeRO stage 0), and their rows under fsdp2 (where SOAP runs
    as MLFOPSOAP(fop=False)): unrotated (AdamW: max_precond_dim 0) ML-FOP-SOAP without FOP holds as much
    (AdamW under fsdp2 a little less: its state follows FSDP2's rows, not whole blocks on owners)."""
    options = parse_options(cfg.optimizer.name, cfg.optimizer.params)
    if isinstance(options, RuleOptions):
        options = options.base_options
    if isinstance(options, MLFOPOptions):
        return options, True
    soap = options.__dict__ if isinstance(options, SOAPOptions) else {"max_precond_dim": 0}
    return MLFOPOptions(**{**soap, "fop": False}), engine == "fsdp2"


def plan(cfg: Config, gpus: int, engine: Optional[str] = None, model: Optional[UnifiedModel] = None) -> Estimate:
    """Per-GPU bytes of `cfg` on `gpus` GPUs under `engine` (default: the config's)."""
    engine = engine or cfg.engine
    model = model or model_on_meta(cfg)
    if engine == "deepspeed" and cfg.model.dtype == "bfloat16":  # bf16 parameters (FSDP2 keeps fp32 shards)
        model = copy.deepcopy(model).to(torch.bfloat16)
    options, sharded = optimizer_plan(cfg, engine)
    text = model.text_config
    tokens = cfg.batch.micro_batch_size * (cfg.data.seq_len or 64)
    acts = Activations(text.num_hidden_layers, text.hidden_size, text.vocab_size, tokens,
                       checkpointing=cfg.model.activation_checkpointing)
    unit = max([sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)] + [0])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shard = gpus // cfg.fsdp.replicate if engine == "fsdp2" else gpus if sharded else 1
    return replace(estimate(named, options, shard, engine, acts, micro_steps=cfg.batch.grad_accum, largest_unit=unit),
                   gpus=gpus)


def fullest_rank(cfg: Config, gpus: int, engine: Optional[str] = None) -> int:
    """The rank whose planned bytes are the largest (the one a dry run plays): its shard of the
    parameters and its owned blocks together."""
    return plan(cfg, gpus, engine).rank


def available_bytes(device: torch.device, local_ranks: int) -> int:
    """What one rank may use: its GPU's memory, or the host's available memory shared by the node's ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().available // max(local_ranks, 1)


def check_fits(cfg: Config, world: int, device: torch.device, local_ranks: int) -> Estimate:
    """The launcher's check before it builds the model: a ConfigError with the numbers and the fix when
    the plan exceeds what the device offers."""
    est = plan(cfg, world)
    have = available_bytes(device, local_ranks)
    if est.total > 0.95 * have:
        parts = ", ".join(f"{name} {value / GiB:.1f}" for name, value in est.rows() if value)
        fixes = ["more GPUs (python -m launcher.memory --config ... --gpus N lists the plan per count)"]
        if cfg.engine != "fsdp2":
            fixes.append("engine: fsdp2 (parameters and gradients sharded too)")
        fixes.append("a smaller batch.micro_batch_size or data.seq_len, or model.activation_checkpointing: true")
        raise ConfigError(f"memory: this run needs about {est.total / GiB:.1f} GiB per {device.type} rank "
                          f"({parts} GiB) on {world} rank(s) under engine {cfg.engine}, but a rank has "
                          f"{have / GiB:.1f} GiB; use " + ", or ".join(fixes))
    return est


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, nargs="+", required=True)
    ap.add_argument("--engine", nargs="+", choices=ENGINES, default=None, help="default: the config's engine")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU, for the 'fits' column")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = read_config(args.config, args.set)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    model = model_on_meta(cfg)
    rows = [plan(cfg, n, engine, model) for engine in args.engine or [cfg.engine] for n in args.gpus]
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.config}: {params / 1e9:.2f} B parameters ({cfg.model.dtype}), micro-batch "
          f"{cfg.batch.micro_batch_size} x {cfg.data.seq_len} tokens, K = {cfg.batch.grad_accum}, activation "
          f"checkpointing {cfg.model.activation_checkpointing}; GiB per GPU on the fullest rank\n")
    print(format_table(rows, args.gpu_memory))


if __name__ == "__main__":
    main()
