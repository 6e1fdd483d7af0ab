"""Plan a run's memory per GPU on paper, before building anything (distopt/memory.py gives the formula).

    python -m launcher.memory --config configs/emu3_8b_cluster.yaml --gpus 8 64 512 1024 [--engine fsdp2]
                              [--gpu-memory 80] [--set section.key=value ...]

The model is built on the meta device (no weights, no memory; its trainable parameters are planned,
the frozen VQ-VAE is left out): from the checkpoint's config.json when
`model.pretrained` names one, else from `model.size` (a cluster config's `<...>` placeholder is read as
"the published shape"). The block plan is the optimizer's own; activations come from the model's
shape, micro_batch_size and data.seq_len. The launcher runs the same estimate before it builds the
model and refuses a run that cannot fit, with the numbers and the fix.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from typing import Optional

import torch

from distopt.memory import ENGINES, GiB, Activations, Estimate, estimate, format_table
from distopt.options import MLFOPOptions, RuleOptions, SOAPOptions
from distopt.registry import parse_options
from launcher.config import Config, ConfigError, read_config
from launcher.engines import decoder_layers
from model_zoo.build import CONFIGS, FAMILIES, build_vocab, checkpoint_config
from model_zoo.config import is_placeholder


def model_on_meta(cfg: Config) -> torch.nn.Module:
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


def plan(cfg: Config, gpus: int, engine: Optional[str] = None, model: Optional[torch.nn.Module] = None) -> Estimate:
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
