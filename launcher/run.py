"""distopt's one training entry point.

    deepspeed --num_gpus 2 launcher/run.py --config configs/emu3_tiny_mlfop.yaml
    torchrun --nproc_per_node 2 launcher/run.py --config ...      mpiexec -n 2 python launcher/run.py --config ...
    python launcher/run.py --config ... --set schedule.steps=20   (one process)

The config (launcher/config.py) picks model, data, optimizer {name, params}, batch, schedule,
logging, evaluation and checkpointing; it is validated before any work starts. The engine is
DeepSpeed at ZeRO stage 0 with the distopt optimizer (distopt/deepspeed_glue.py).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distopt import deepspeed_glue
from distopt.checkpoint import complete_steps, load_checkpoint, save_checkpoint
from launcher.config import Config, ConfigError, load_config
from launcher.metrics import Logger, ModalityGradProbe, evaluate, memory_mib
from model_zoo import Data, build_data, build_image_tokenizer, build_model, build_vocab, layout_for
from model_zoo.images import render_grid
from model_zoo.lora import add_lora, has_lora, merged, save_adapter
from model_zoo.quality import DigitJudge, generate_digits


def init_distributed() -> None:
    """DeepSpeed's discovery covers the deepspeed launcher, torchrun and mpirun/mpiexec (mpi4py);
    a plain `python` run becomes a world of one on a free local port."""
    import deepspeed

    if not any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    deepspeed.init_distributed(auto_mpi_discovery=True, timeout=timedelta(minutes=10))


def lr_lambda(cfg: Config):
    warm, total = cfg.schedule.warmup_steps, cfg.schedule.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return 1.0

    return factor


def build_model_and_data(cfg: Config, rank: int, world: int) -> tuple[torch.nn.Module, object, object, Data]:
    """(model, layout, image tokenizer, data). Rank 0 first fits and caches the project's tokenizers
    (WordPiece, digits VQ) when they are not cached yet; the other ranks then load them."""
    if rank == 0:
        build_vocab(cfg.data, cfg.model)
        if cfg.data.image_tokenizer == "digits_vq":
            build_image_tokenizer(cfg.data, cfg.model)
    dist.barrier()
    vocab = build_vocab(cfg.data, cfg.model)
    model = build_model(cfg.model, vocab)
    images = build_image_tokenizer(cfg.data, cfg.model, model)
    layout = layout_for(cfg.model, vocab, images.grid, model)
    data = build_data(cfg.data, layout, images, micro_batch_size=cfg.batch.micro_batch_size,
                      grad_accum=cfg.batch.grad_accum, rank=rank, world_size=world, seed=cfg.run.seed,
                      eval_batches=cfg.eval.batches)
    return model, layout, images, data


def sample_grid(model: torch.nn.Module, layout, images, cfg: Config, step: int, out: Path) -> torch.Tensor:
    """Four generated images per digit, one row per digit, each labelled with the digit asked for."""
    pictures, digits = generate_digits(model, layout, images, 4, cfg.data.text_format,
                                       temperature=cfg.eval.temperature, guidance=cfg.eval.guidance)
    labels = [str(int(d)) for d in digits]
    return render_grid(pictures, out / "samples" / f"step-{step + 1}.png", nrow=4, labels=labels)


def export(model: torch.nn.Module, out: Path, layout, family: str) -> None:
    """The trained model for inference and for `model.pretrained` of a later run: <out>/model, the
    transformers class's save_pretrained with its tokenizer; a LoRA run also writes <out>/adapter in
    peft's format and exports the merged model."""
    if has_lora(model):
        save_adapter(model, out / "adapter")
        model = merged(model)
    model.save_pretrained(str(out / "model"))
    layout.vocab.save(str(out / "model"), family)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = ap.parse_args(argv)
    try:
        init_distributed()
        cfg = load_config(args.config, dist.get_world_size(), args.set)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    train(cfg)
    dist.destroy_process_group()  # gloo's threads must stop before the interpreter exits


def train(cfg: Config) -> dict:
    """One training run in an initialised process group; returns its history (per-step training losses,
    evaluations, text-vs-image gradient geometry, wall-clock, whether the loss diverged)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.run.seed)
    out = Path(cfg.run.out_dir)
    ckpt_root = out / "checkpoints"

    model, layout, images, data = build_model_and_data(cfg, rank, world)
    sampler = data.sampler
    if cfg.lora.enabled:
        add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.adapter)
    engine, opt = deepspeed_glue.initialize(model, {"name": cfg.optimizer.name, "params": cfg.optimizer.params},
                                            cfg.deepspeed_json(world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = 0
    resume = cfg.checkpoint.resume
    if resume != "none" and (resume != "auto" or complete_steps(ckpt_root)):
        root = ckpt_root if resume == "auto" else Path(resume)
        step = complete_steps(root)[-1] if resume == "auto" else None
        manifest = load_checkpoint(root, model, opt, step=step)
        sampler.load_state_dict(manifest["extra"]["sampler"])
        scheduler.load_state_dict(manifest["extra"]["scheduler"])
        start = manifest["step"] + 1
        if rank == 0:
            print(f"[distopt] resumed from {root} step {manifest['step']}", file=sys.stderr)
    logger = Logger(str(out), cfg.logging.tensorboard and rank == 0)
    progress = None
    if rank == 0 and cfg.logging.progress and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=cfg.schedule.steps, initial=start, desc=cfg.run.name)
    val_batches = data.validation
    judge = DigitJudge(*data.digits, images) if cfg.eval.generated_digits and rank == 0 else None
    tokens_per_micro = None
    history: dict = {"train": [], "val": [], "grad": [], "diverged": False}
    t_start = time.perf_counter()

    for step in range(start, cfg.schedule.steps):
        log_now = (step + 1) % cfg.logging.every == 0 or step == cfg.schedule.steps - 1
        probe = ModalityGradProbe(model.named_parameters()) if log_now else None
        losses: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        t_fwd = t_bwd = 0.0
        for batch in sampler.next_step():
            tokens_per_micro = int(batch["input_ids"].numel())
            t = time.perf_counter()
            result = engine(batch)
            t_fwd += time.perf_counter() - t
            t = time.perf_counter()
            with contextlib.ExitStack() as tagged:  # the micro-step's modality, for the optimizer and the probe
                for owner in (opt, probe):
                    if hasattr(owner, "modality"):
                        tagged.enter_context(owner.modality(batch["modality"]))
                engine.backward(result["loss"])
            t_bwd += time.perf_counter() - t
            for kind in ("text", "image"):
                if float(result[f"n_{kind}"]) > 0:
                    losses.setdefault(kind, []).append(float(result[f"{kind}_loss"].detach()))
            t = time.perf_counter()
            engine.step()
        t_opt = time.perf_counter() - t
        scheduler.step()
        step_time = time.perf_counter() - t0
        means = {k: sum(v) / len(v) for k, v in losses.items()}
        history["train"].append({"step": step, "seconds": time.perf_counter() - t_start, **means})
        finite = torch.tensor([float(all(math.isfinite(v) for v in means.values()))])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together (no rank left in a collective)
        if not finite.item():
            history["diverged"] = True
            break
        if log_now:
            geometry = probe.stats()  # a collective: every rank
            history["grad"].append({"step": step, **geometry})
            values = {f"loss/{k}": v for k, v in means.items()}
            values.update({"lr": opt.param_groups[0]["lr"], "time/step_s": step_time, "time/forward_s": t_fwd,
                           "time/backward_s": t_bwd, "time/optimizer_s": t_opt,
                           "throughput/tokens_per_s": tokens_per_micro * cfg.batch.grad_accum * world / step_time,
                           "memory/rank0_mib": memory_mib(), **geometry})
            values["data/skipped_records"] = float(sampler.skipped)
            counters = getattr(opt, "counters", {})
            values.update({f"optimizer/{k}": float(v) for k, v in counters.items()})
            values.update({f"fop/{k}": v for k, v in getattr(opt, "last_stats", {}).items()})
            values.update({f"comm/{k}_bytes": float(v) for k, v in getattr(getattr(opt, "comm", None), "sent", {}).items()})
            logger.scalars(step, values)
            if progress is None and rank == 0:
                print(f"step {step + 1}/{cfg.schedule.steps} " + " ".join(
                    f"{k}={values[k]:.4f}" for k in ("loss/text", "loss/image") if k in values), file=sys.stderr)
        if progress is not None:
            progress.update(1)
        last = step == cfg.schedule.steps - 1
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or last):
            results = evaluate(model, val_batches)
            if judge is not None:
                pictures, digits = generate_digits(model, layout, images, cfg.eval.generated_digits, cfg.data.text_format,
                                                   temperature=cfg.eval.temperature, guidance=cfg.eval.guidance)
                results["val/generated_digit_accuracy"] = judge.accuracy(pictures, digits)
            history["val"].append({"step": step, "seconds": time.perf_counter() - t_start, **results})
            logger.scalars(step, results)
            if cfg.eval.samples_png and rank == 0:
                logger.image("samples", step, sample_grid(model, layout, images, cfg, step, out))
        if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or last:
            save_checkpoint(ckpt_root, step, model, opt,
                            extra={"sampler": sampler.state_dict(), "scheduler": scheduler.state_dict()})
    if rank == 0:
        export(model, out, layout, cfg.model.family)
        history["judge_ceiling"] = judge.ceiling if judge is not None else None
        scored = [v for v in history["val"] if "val/generated_digit_accuracy" in v]
        if scored:
            print(f"[distopt] generated-digit accuracy {scored[-1]['val/generated_digit_accuracy']:.3f} at step "
                  f"{scored[-1]['step'] + 1} (judge ceiling {judge.ceiling:.3f}, chance 0.100)", file=sys.stderr)
    logger.close()
    if progress is not None:
        progress.close()
    dist.barrier()
    return history


if __name__ == "__main__":
    main()
