"""Multi-process runs for the sharding tests: a small named model trained on a fixed global batch.

`train(config, rank, world)` is one rank's run; the same function with world = 1 and
`reference=True` is the single-process reference: it replays every rank's micro-batches itself
(W backward passes of loss / W per micro-step, or one tagged micro-step per rank for pair_source
'ranks', which the reference expresses as pair_source 'modality' with tags by rank parity).
With `rule`, the optimizer is a two-objective rule over `base` and micro-step k is tagged
"text" or "image" by its parity.
"""

from __future__ import annotations

import datetime
import os
import random
import traceback

import torch
import torch.distributed as dist

from distopt import MLFOPSOAP, build_optimizer
from distopt.checkpoint import load_checkpoint, save_checkpoint


def VOCAB(hidden: int) -> int:
    """More tokens than hidden units (an embedding output of lower rank would starve the factors), and
    a row count that max_block = 4 does not divide."""
    return 2 * hidden + 2


class Net(torch.nn.Module):
    """Rotated matrices are square (hidden x hidden), batches have >= hidden samples and the output is
    as wide as the hidden layers (the head's width bounds the rank of every upstream gradient), so
    every Kronecker factor is full rank: a rank-deficient factor has an arbitrary null-space
    eigenbasis, and round-off-level differences (sums over ranks in another order) would legitimately
    pick another one."""

    def __init__(self, dtype, hidden: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB(hidden), hidden, dtype=dtype)        # Adam path
        self.l1 = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.l2 = torch.nn.Linear(hidden, hidden, dtype=dtype)
        self.extra = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)      # used on even steps only
        self.head = torch.nn.Linear(hidden, hidden, dtype=dtype)                   # Adam path (output head)

    def forward(self, tokens, step):
        h = self.l2(torch.tanh(self.l1(self.embed(tokens).mean(1))))
        if step % 2 == 0:
            h = h + self.extra(torch.tanh(h))
        return self.head(h)


def batch(step, rank, k, dtype, width):
    gen = torch.Generator().manual_seed(1000 * step + 31 * rank + k)
    n = 12 if rank < 0 else 16
    return torch.randint(0, VOCAB(width), (n, 5), generator=gen), torch.randn(n, width, generator=gen, dtype=dtype)


def loss_of(model, step, rank, k, dtype, nan=False, world=None):
    """Per-rank batches by default; with `world`, rank's slice of one global micro-batch of 12 samples
    (the same global batch at every world size that divides 12)."""
    if world is None:
        tokens, y = batch(step, rank, k, dtype, model.head.out_features)
    else:
        tokens, y = batch(step, -1, k, dtype, model.head.out_features)
        share = 12 // world
        tokens, y = tokens[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    loss = ((model(tokens, step) - y) ** 2).mean()
    return loss * float("nan") if nan else loss


def build(config, dtype, world):
    torch.manual_seed(0)
    model = Net(dtype, config.get("hidden", 8))
    named = [(n, p) for n, p in model.named_parameters() if n in config.get("only", [n])]
    for n, p in model.named_parameters():
        p.requires_grad_(any(n == m for m, _ in named))
    if config.get("shuffle"):
        random.Random(7 + (dist.get_rank() if config.get("shuffle") == "per_rank" else 0)).shuffle(named)
    if config.get("no_reduce"):  # a backend without reduce: the comm layer must fall back
        def refuse(*args, **kwargs):
            raise RuntimeError("reduce is not supported by this backend")
        dist.reduce = refuse
    opts = dict(lr=0.02, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=2, verbose=False,
                max_block=config.get("max_block"), pair_source=config.get("pair_source", "microstep"),
                fop=config.get("fop", True), max_grad_norm=config.get("max_grad_norm"))
    if config.get("reference") and opts["pair_source"] == "ranks":
        opts["pair_source"] = "modality"
    if config.get("reference"):
        opts["capture"] = "manual"
    if config.get("rule"):
        return model, two_objective(config, named, opts)
    return model, MLFOPSOAP(named, **opts)


def two_objective(config, named, opts):
    """The rule over AdamW, SOAP or ML-FOP-SOAP with the options above (clipping moves to the rule)."""
    base, clip = config["base"], opts.pop("max_grad_norm")
    opts.pop("capture", None)
    if base == "adamw":
        opts = {k: opts[k] for k in ("lr", "betas", "weight_decay")}
    elif base == "soap":
        opts = {k: v for k, v in opts.items() if k not in ("max_block", "pair_source", "fop")}
    return build_optimizer({"name": config["rule"], "params": dict(base=base, max_grad_norm=clip, **opts,
                                                                   **config.get("rule_params", {}))}, named)


def train(config, rank, world):
    dtype = torch.float64 if config.get("fp64", True) else torch.float32
    model, opt = build(config, dtype, world)
    k_micro, data_world = config["K"], config["W"]
    history = []
    if config.get("load"):
        load_checkpoint(config["load"], model, opt)
    for step in range(config.get("start", 0), config.get("steps", 5)):
        for k in range(k_micro):
            if config.get("rule"):
                tag = "text" if k % 2 == 0 else "image"
                loss = loss_of(model, step, rank, k, dtype, world=world)
                opt.record_loss(tag, loss)  # every rule accepts it; GradNorm needs it
                with opt.modality(tag):
                    (loss / k_micro).backward()
            elif config.get("global_batch"):
                (loss_of(model, step, rank, k, dtype, world=world) / k_micro).backward()
            elif config.get("reference"):
                for r in range(data_world):
                    (loss_of(model, step, r, k, dtype, nan=(step, r) == config.get("nan_at")) / (k_micro * data_world)).backward()
                    if config.get("pair_source") == "ranks":
                        opt.end_microstep("even" if r % 2 == 0 else "odd")
                if config.get("pair_source") != "ranks":
                    opt.end_microstep()
            else:
                (loss_of(model, step, rank, k, dtype, nan=(step, rank) == config.get("nan_at")) / k_micro).backward()
        if config.get("die_at") == (step, rank):
            os._exit(17)
        opt.step()
        opt.zero_grad()
        history.append([p.detach().clone() for p in model.parameters()])
        if config.get("save_at") == step:
            save_checkpoint(config["save"], step, model, opt)
    if config.get("rule"):
        return dict(history=history, counters=dict(opt.counters), calls=dict(opt.comm.calls))
    return dict(history=history, counters=dict(opt.counters), sent=dict(opt.distributor.sent),
                calls=dict(opt.distributor.calls), owned=len(opt.distributor.owned),
                numel=sum(b.numel for b in opt.plan.blocks),
                max_owned=max(sum(b.numel for b in opt.plan.owned(r)) for r in range(world)))


def worker(rank, world, configs, out_dir):
    try:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        results = [train(c, rank, world) for c in configs]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_sharded(world, configs, out_dir):
    """Run configs on `world` spawned gloo ranks; returns one result list per rank."""
    os.makedirs(out_dir, exist_ok=True)
    torch.multiprocessing.spawn(worker, args=(world, configs, out_dir), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
