"""Multi-process runs for the sharding tests: a small named model trained on a fixed global batch.

`train(config, rank, world)` is one rank's run; the same function with world = 1 and
`reference=True` is the single-process reference: it replays every rank's micro-batches itself
(W backward passes of loss / W per micro-step, or one tagged micro-step per rank for pair_source
'ranks', which the reference expresses as pair_source 'modality' with tags by rank parity).
With `rule`, the optimizer is a two-objective rule over `base` and micro-step k is tagged
"text" or "image" by its parity. With `save_async`, the checkpoint at `save_at` is written by an
AsyncCheckpointer whose file writes wait until the next optimizer step has changed the parameters
and the state (a synchronous save would wait for ever: it fails after 60 s instead).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import random
import threading
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import distopt.checkpoint
from distopt import MLFOPSOAP, build_optimizer, comm
from distopt.checkpoint import AsyncCheckpointer, load_checkpoint, save_checkpoint


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

    shadows: list[tuple[torch.nn.Parameter, torch.nn.Parameter]]  # bf16 reference runs only (hasattr tells)

    def __init__(self, dtype, hidden: int = 8):
        super().__init__()
        kw = dict(dtype=dtype, device="cpu")  # explicit: the placement test makes 'meta' the default device
        self.embed = torch.nn.Embedding(VOCAB(hidden), hidden, **kw)        # Adam path
        self.l1 = torch.nn.Linear(hidden, hidden, **kw)
        self.l2 = torch.nn.Linear(hidden, hidden, **kw)
        self.extra = torch.nn.Linear(hidden, hidden, bias=False, **kw)      # used on even steps only
        self.head = torch.nn.Linear(hidden, hidden, **kw)                   # Adam path (output head)

    def forward(self, tokens, step):
        h = self.l2(torch.tanh(self.l1(self.embed(tokens).mean(1))))
        if step % 2 == 0:
            h = h + self.extra(torch.tanh(h))
        return self.head(h)


def batch(step, rank, k, dtype, width):
    gen = torch.Generator().manual_seed(1000 * step + 31 * rank + k)
    n = 12 if rank < 0 else 16
    return (torch.randint(0, VOCAB(width), (n, 5), generator=gen, device="cpu"),
            torch.randn(n, width, generator=gen, dtype=dtype, device="cpu"))


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


def shard(model, config, world):
    """FSDP2 as PyTorch documents it: fully_shard every layer, then the root; HSDP on a (2, world / 2) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if config["fsdp"] == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    for layer in (model.embed, model.l1, model.l2, model.extra, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def tag_of(config, k):
    """pair_source 'modality': micro-steps alternate text and image."""
    return ("text" if k % 2 == 0 else "image") if config.get("pair_source") == "modality" else None


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(p):
    """A parameter's whole value (gathered from the shards under FSDP2: a collective)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()


def build(config, dtype, world):
    torch.manual_seed(0)
    model = Net(dtype, config.get("hidden", 8))
    if config.get("fsdp") and not config.get("reference"):
        shard(model, config, world)
    named = [(n, p) for n, p in model.named_parameters() if n in config.get("only", [n])]
    for n, p in model.named_parameters():
        p.requires_grad_(any(n == m for m, _ in named))
    if config.get("shuffle"):
        random.Random(7 + (dist.get_rank() if config.get("shuffle") == "per_rank" else 0)).shuffle(named)
    if config.get("fail_at") is not None and dist.get_rank() == 1:  # rank 1's n-th reduce-scatter raises
        calls, original = [0], dist.reduce_scatter_single

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == config["fail_at"]:
                raise RuntimeError("injected failure")
            return original(*args, **kwargs)
        dist.reduce_scatter_single = failing
    opts = dict(lr=0.02, betas=(0.9, 0.95), weight_decay=0.01, precondition_frequency=2, verbose=False,
                max_block=config.get("max_block"), pair_source=config.get("pair_source", "microstep"),
                fop=config.get("fop", True), max_grad_norm=config.get("max_grad_norm"),
                fold_schedule=config.get("schedule", "streaming"), bucket_mb=config.get("bucket_mb", 25.0),
                level=config.get("level", "layer"))
    if config.get("reference") and opts["pair_source"] == "ranks":
        opts["pair_source"] = "modality"
    if config.get("reference"):
        opts["capture"] = "manual"
    if config.get("rule"):
        return model, two_objective(config, named, opts)
    if config.get("reference") and dtype == torch.bfloat16:  # fp32 shadows play the owners' fp32 masters
        model.shadows = [(p, torch.nn.Parameter(p.detach().float().clone())) for _, p in named]
        named = [(n, s) for (n, _), (_, s) in zip(named, model.shadows, strict=True)]
    return model, MLFOPSOAP(named, **opts)


def masters_of(model, opt):
    """fp32 masters by block: the owners' (bf16 parameters), or the reference's fp32 shadows."""
    if hasattr(model, "shadows"):
        return {f"{b.name}#{b.ordinal}": opt._params[b.param].detach()[b.slices].clone() for b in opt.plan.blocks}
    return {f"{b.name}#{b.ordinal}": st["master"].clone() for b, st in opt.block_states() if "master" in st}


def backward(model, loss):
    """loss.backward(); a bf16 reference then moves each rank's bf16 gradient into its fp32 shadow, where
    the ranks' gradients are summed in fp32 as the sharded run's reduction does."""
    loss.backward()
    for p, shadow in getattr(model, "shadows", []):
        if p.grad is not None:
            shadow.grad = p.grad.float() if shadow.grad is None else shadow.grad + p.grad.float()
            p.grad = None


def two_objective(config, named, opts):
    """The rule over AdamW, SOAP or ML-FOP-SOAP with the options above (clipping moves to the rule)."""
    base, clip = config["base"], opts.pop("max_grad_norm")
    opts.pop("capture", None)
    if base == "adamw":
        opts = {k: opts[k] for k in ("lr", "betas", "weight_decay")}
    elif base == "soap":
        opts = {k: v for k, v in opts.items() if k not in ("max_block", "pair_source", "fop", "fold_schedule",
                                                             "bucket_mb", "level")}
    return build_optimizer({"name": config["rule"], "params": dict(base=base, max_grad_norm=clip, **opts,
                                                                   **config.get("rule_params", {}))}, named)


def train(config, rank, world):
    """One rank's run. meta_default: every tensor created without a device lands on 'meta', where
    mixing it with the CPU parameters (or handing it to gloo) fails: a device-placement check."""
    if config.get("meta_default"):
        with torch.device("meta"):
            return _train(config, rank, world)
    return _train(config, rank, world)


def _train(config, rank, world):
    dtype = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}[config.get("dtype", "fp64")]
    model, opt = build(config, dtype, world)
    initial = {p: full(p).float() for p in model.parameters()} if dtype == torch.bfloat16 else {}
    k_micro, data_world = config["K"] + (rank if config.get("uneven_k") else 0), config["W"]
    history, first_masters, grad_bytes, saver = [], None, 0, None
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
                    backward(model, loss_of(model, step, r, k, dtype, nan=(step, r) == config.get("nan_at"))
                             / (k_micro * data_world))
                    if config.get("pair_source") == "ranks":
                        opt.end_microstep("even" if r % 2 == 0 else "odd")
                if config.get("pair_source") != "ranks":
                    opt.end_microstep(tag_of(config, k))
            else:
                with opt.modality(tag_of(config, k)) if tag_of(config, k) else contextlib.nullcontext():
                    loss = loss_of(model, step, rank, k, dtype, nan=(step, rank) == config.get("nan_at"))
                    (loss / k_micro).backward()
        if config.get("bytes") and step == 0:  # fop off keeps p.grad until step(): the gradients' bytes
            grad_bytes = sum(_local(p.grad).numel() * p.grad.element_size() for p in model.parameters()
                             if p.grad is not None)
        if config.get("die_at") == (step, rank):
            os._exit(17)
        opt.step()
        opt.zero_grad()
        for p, shadow in getattr(model, "shadows", []):
            p.data.copy_(shadow.data)
        if step == 1 and not config.get("rule"):  # the first update: the forwards used the same bf16 parameters
            first_masters = masters_of(model, opt)
        history.append([full(p) for p in model.parameters()])
        if saver is not None:  # one step after the background save began: let its writes go on
            saver.stepped.set()
            saver.close()
            saver = None
        if config.get("save_at") == step and config.get("save_async"):
            saver = _gated_saver()
            saver.save(config["save"], step, model, opt)
        elif config.get("save_at") == step:
            save_checkpoint(config["save"], step, model, opt)
    if saver is not None:
        saver.stepped.set()
        saver.close()
    if config.get("rule"):
        return dict(history=history, counters=dict(opt.counters), calls=dict(opt.comm.calls))
    if hasattr(model, "shadows"):
        initial = {shadow: initial[p] for p, shadow in model.shadows}
    initial_masters = {f"{b.name}#{b.ordinal}": initial[opt._params[b.param]][b.slices] for b in opt.plan.blocks
                       if opt._params[b.param] in initial}
    return dict(history=history, counters=dict(opt.counters), sent=dict(opt.distributor.sent),
                calls=dict(opt.distributor.calls), owned=len(opt.distributor.owned),
                numel=sum(b.numel for b in opt.plan.blocks), slot=opt.plan.slot,
                masters=masters_of(model, opt),
                first_masters=first_masters if config.get("steps", 5) > 1 else None,
                initial_masters=initial_masters, memory=opt.memory_bytes(),
                bytes=dict(params=sum(_local(p).numel() * p.element_size() for p in model.parameters()),
                           grads=grad_bytes, state=opt.memory_bytes()["state"]),
                state_numel=sum(b.state_numel for b in opt.distributor.owned),
                owned_numel=sum(b.numel for b in opt.distributor.owned))


class _GatedSaver(AsyncCheckpointer):
    """An AsyncCheckpointer whose file writes (distopt.checkpoint._write) wait for `stepped`."""

    def __init__(self) -> None:
        super().__init__()
        self.stepped = threading.Event()
        self._ungated = distopt.checkpoint._write
        distopt.checkpoint._write = self._gated  # this worker process only; restored by close()

    def _gated(self, path, obj):
        if threading.current_thread() is threading.main_thread() or not self.stepped.wait(60):
            raise RuntimeError("the background save wrote on the training thread, or before the next step")
        return self._ungated(path, obj)

    def close(self) -> None:
        try:
            super().close()
        finally:
            distopt.checkpoint._write = self._ungated


def _gated_saver() -> _GatedSaver:
    return _GatedSaver()


def worker(rank, world, configs, out_dir):
    faulthandler.enable(all_threads=True)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        results = [train(c, rank, world) for c in configs]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        comm.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_sharded(world, configs, out_dir):
    """Run configs on `world` spawned gloo ranks; returns one result list per rank."""
    os.makedirs(out_dir, exist_ok=True)
    torch.multiprocessing.spawn(worker, args=(world, configs, out_dir), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def run_failing(world, configs, out_dir, timeout=120):
    """Run configs on `world` gloo ranks that are expected to fail, without killing the survivors when
    the first one dies (as spawn would): returns (exit codes, error text per rank, seconds taken)."""
    import time

    os.makedirs(out_dir, exist_ok=True)
    context = torch.multiprocessing.get_context("spawn")
    procs = [context.Process(target=worker, args=(r, world, configs, out_dir)) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, timeout - (time.monotonic() - start)))
    seconds = time.monotonic() - start
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world):
        path = os.path.join(out_dir, f"error{r}.txt")
        errors.append(Path(path).read_text() if os.path.exists(path) else "")
    return [p.exitcode for p in procs], errors, seconds
