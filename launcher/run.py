"""distopt's one training entry point.

    deepspeed --num_gpus 2 launcher/run.py --config configs/emu3_tiny_mlfop.yaml
    torchrun --nproc_per_node 2 launcher/run.py --config ...      mpiexec -n 2 python launcher/run.py --config ...
    python launcher/run.py --config ... --set schedule.steps=20   (one process)
    srun --mpi=none --ntasks-per-node=8 python launcher/run.py --config ...   (Slurm: ranks from srun, docs/cluster.md)

The config (launcher/config.py) picks model, data, optimizer {name, params}, batch, schedule,
logging, evaluation and checkpointing; it is validated before any work starts. The engine
(launcher/engines.py) is DeepSpeed at ZeRO stage 0 with the distopt optimizer, or PyTorch FSDP2. `train` reads as
its stages: set_up, then per step run_step, log_step, evaluate_and_sample and save.

SIGUSR1 / SIGTERM stop the run at the next step boundary with a checkpoint of that step
(launcher/preemption.py). Exit codes: 0 done, 1 an error, 75 stopped on a signal after that checkpoint,
76 stopped at once (second signal or checkpoint.stop_deadline) with an earlier checkpoint as the newest,
77 stopped but the Slurm job was requeued checkpoint.max_requeues times already.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from distopt import comm, deepspeed_glue
from distopt.checkpoint import AsyncCheckpointer, CheckpointError, complete_steps, load_checkpoint, save_checkpoint
from distopt.host import host_values
from distopt.protocols import RecordsLosses, TakesMicrosteps, comm_bytes_of, counters_of, stats_of
from launcher.cluster import launch_world_size, srun_env
from launcher.config import Config, ConfigError, load_config
from launcher.engines import Weights, build_engine, local_device
from launcher.memory import check_fits
from launcher.metrics import Logger, ModalityGradProbe, PhaseTimer, evaluate, memory_stats
from launcher.preemption import EXIT_NO_REQUEUE, StopSignals, requeue_count
from model_zoo import Data, build_data, build_image_tokenizer, build_model, build_vocab, layout_for
from model_zoo.config import DTYPES
from model_zoo.data import MicroBatchSampler
from model_zoo.images import caption_grid, render_grid
from model_zoo.lora import add_lora, has_lora, merged, save_adapter
from model_zoo.prepare import prepare_if_needed
from model_zoo.quality import PER_PROMPT, DigitJudge, generate_captioned, generate_digits
from model_zoo.unified import UnifiedModel


def lr_lambda(cfg: Config):
    warm, total = cfg.schedule.warmup_steps, cfg.schedule.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return 1.0

    return factor


def build_model_and_data(cfg: Config, rank: int, world: int) -> tuple[UnifiedModel, object, object, Data, Weights]:
    """(model, layout, image tokenizer, data, weights). Rank 0 first fits and caches the project's
    tokenizers (WordPiece, digits VQ) when they are not cached yet, and with data.prepare: auto prepares
    a pairs corpus that is missing or stale; the other ranks then load them. Under fsdp2 the model is
    built on the meta device (no rank holds it whole) and `weights` fills its shards from rank 0 once
    it is sharded; under deepspeed every rank builds it with its weights."""
    if rank == 0:
        build_vocab(cfg.data, cfg.model)
        if cfg.data.image_tokenizer == "digits_vq":
            build_image_tokenizer(cfg.data, cfg.model)
        prepare_if_needed(cfg.model, cfg.data)
    dist.barrier()
    vocab = build_vocab(cfg.data, cfg.model)
    sharded = cfg.engine == "fsdp2"
    model = build_model(cfg.model, vocab, meta=sharded)
    images = build_image_tokenizer(cfg.data, cfg.model, None if sharded else model)
    layout = layout_for(cfg.model, vocab, images.grid, model)
    data = build_data(cfg.data, layout, images, micro_batch_size=cfg.batch.micro_batch_size,
                      grad_accum=cfg.batch.grad_accum, rank=rank, world_size=world, seed=cfg.run.seed,
                      eval_batches=cfg.eval.batches, model=cfg.model, captions=cfg.eval.validation_captions)
    return model, layout, images, data, rank0_weights(cfg, vocab) if sharded else None


def rank0_weights(cfg: Config, vocab: Any) -> Weights:
    """Fills a sharded model from rank 0: rank 0 builds the model with its weights (a new one from the
    run's seed, or the checkpoint, in model.dtype), and every rank's shards receive their rows by
    broadcast (torch.distributed.checkpoint's set_model_state_dict). Only rank 0 ever holds the whole
    model, once, on the host: for a bf16 checkpoint, one bf16 copy per node."""
    def load(model: torch.nn.Module) -> None:
        state: dict = {}
        buffers: dict = {}
        if dist.get_rank() == 0:
            torch.manual_seed(cfg.run.seed)
            full = build_model(cfg.model, vocab)
            state = {k: v.to(DTYPES[cfg.model.dtype]) if v.is_floating_point() else v
                     for k, v in full.state_dict().items()}
            buffers = dict(full.named_buffers())
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # every buffer too: the state dict leaves out the non-persistent ones (rotary frequencies,
        # position ids), which to_empty left as garbage
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
            dist.broadcast(buffer, src=0)
    return load


def sample_grid(run: Run, step: int, write: bool) -> Optional[torch.Tensor]:
    """Generated images, PER_PROMPT per prompt, one row per prompt, each under its prompt: the digits,
    or eval.captions and the validation captions of a corpus (with classifier-free guidance when
    eval.guidance > 1)."""
    cfg, path = run.cfg, run.out / "samples" / f"step-{step + 1}.png"
    e = cfg.eval
    if cfg.data.source == "digits":
        pictures, digits = generate_digits(run.model, run.layout, run.images, PER_PROMPT, cfg.data.text_format,
                                           temperature=e.temperature, guidance=e.guidance)
        return render_grid(pictures, path, nrow=PER_PROMPT, labels=[str(int(d)) for d in digits]) if write else None
    if not run.captions:  # a corpus without caption text and no eval.captions: nothing to draw
        return None
    pictures = generate_captioned(run.model, run.layout, run.images, run.captions, PER_PROMPT,
                                  temperature=e.temperature, guidance=e.guidance)
    return caption_grid(pictures, run.captions, PER_PROMPT, path) if write else None


def export(model: UnifiedModel, out: Path, layout, family: str, rank: int) -> None:
    """The trained model for inference and for `model.pretrained` of a later run: <out>/model, the
    transformers class's save_pretrained with its tokenizer; a LoRA run also writes <out>/adapter in
    peft's format and exports the merged model. An FSDP2-sharded model is gathered first (a
    collective: every rank calls this; rank 0 writes)."""
    state = None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    if has_lora(model):
        save_adapter(model, out / "adapter")
        model = merged(model)
    model.save_pretrained(str(out / "model"), state_dict=state)
    layout.vocab.save(str(out / "model"), family)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = ap.parse_args(argv)
    stop = StopSignals().install()  # first: a signal during start-up stops the run at its first step boundary
    try:
        os.environ.update(srun_env(os.environ))  # tasks srun starts directly: ranks from Slurm (docs/cluster.md)
        # checked before the process group starts: DeepSpeed builds its communication op there (minutes on
        # a first launch), and a mistake must not wait for it
        world = launch_world_size(os.environ)
        cfg = load_config(args.config, world, args.set)
        deepspeed_glue.init_distributed()
        if dist.get_world_size() != world:  # a launcher whose world size the environment did not tell
            cfg = load_config(args.config, dist.get_world_size(), args.set)
        # the memory check asks the local device (a CUDA context), so only once the ranks know theirs
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        check_fits(cfg, dist.get_world_size(), local_device(), local_ranks)  # refuse before building anything
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    requeues = check_requeues(cfg, dist.get_rank())
    stop.configure(dist.get_rank(), cfg.checkpoint.stop_deadline, requeues < cfg.checkpoint.max_requeues)
    try:
        history = train(cfg, stop)
    except CheckpointError as e:  # every rank raises the same error (distopt.checkpoint agrees on it)
        comm.destroy_process_group()
        sys.exit(f"checkpoint error: {e}")
    comm.destroy_process_group()  # gloo's threads must stop before the interpreter exits
    if history.get("stopped_at") is not None:
        exit_after_stop(stop)


def exit_after_stop(stop: StopSignals) -> None:
    """The stop's exit code, without the interpreter's shutdown: that restores the default SIGTERM
    action, and `srun --kill-on-bad-exit` sends SIGTERM to the ranks still exiting once the first rank
    has left with a non-zero code; a rank killed there would report 143 instead of 75. Until os._exit,
    a late SIGTERM is a second signal, which exits with the same code (the checkpoint is complete)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(stop.exit_code())


def check_requeues(cfg: Config, rank: int) -> int:
    """Slurm requeues of this job so far (SLURM_RESTART_COUNT), logged on rank 0; beyond
    checkpoint.max_requeues the run refuses to start (the torchrun script requeues on its own signal,
    so the bound is also kept here)."""
    count, bound = requeue_count(os.environ), cfg.checkpoint.max_requeues
    if rank == 0 and "SLURM_JOB_ID" in os.environ:
        print(f"[distopt] Slurm job {os.environ['SLURM_JOB_ID']}: requeue {count} "
              f"(checkpoint.max_requeues: {bound})", file=sys.stderr)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if rank == 0 and restarts:
        print(f"[distopt] torchrun restarted the workers (restart {restarts}); resuming from the newest "
              "complete checkpoint", file=sys.stderr)
    if count > bound:
        if rank == 0:
            print(f"[distopt] the job was requeued {count} times, more than checkpoint.max_requeues {bound}: not "
                  "starting; resubmit it to continue from the newest complete checkpoint, or raise the bound",
                  file=sys.stderr)
        comm.destroy_process_group()
        sys.exit(EXIT_NO_REQUEUE)
    return count


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: Config
    rank: int
    world: int
    out: Path
    sampler: MicroBatchSampler
    model: UnifiedModel
    engine: Any
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    logger: Logger
    val_batches: list
    layout: Any
    images: Any
    judge: Optional[DigitJudge]
    captions: list[str] = field(default_factory=list)  # the sample grid's prompts (a corpus of pairs)
    start: int = 0
    progress: Any = None
    saver: Optional[AsyncCheckpointer] = None  # checkpoint.async: saves written in the background
    stop: Optional[StopSignals] = None
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "grad": [], "fop": [], "diverged": False})
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


@dataclass
class StepResult:
    losses: dict[str, float]          # mean per modality over the step's micro-steps
    seconds: dict[str, float]         # step, forward, backward, optimizer
    tokens_per_micro: int
    geometry: Optional[ModalityGradProbe]


def train(cfg: Config, stop: Optional[StopSignals] = None) -> dict:
    """One training run in an initialised process group; returns its history (per-step training losses,
    evaluations, text-vs-image gradient geometry, wall-clock, whether the loss diverged, and
    `stopped_at`: the step of a stop on a signal, after its checkpoint)."""
    run = set_up(cfg)
    run.stop = stop
    train_cpu = 0.0  # this process's CPU seconds in training steps (evaluations apart): benchmarks' time to target
    for step in range(run.start, cfg.schedule.steps):
        last = step == cfg.schedule.steps - 1
        log_now = (step + 1) % cfg.logging.every == 0 or last
        cpu = time.process_time()
        result = run_step(run, log_now and cfg.logging.grad_geometry)
        train_cpu += time.process_time() - cpu
        run.history["train"].append({"step": step, "seconds": time.perf_counter() - run.t_start,
                                     "train_cpu_seconds": train_cpu, **result.losses})
        finite, stopping = agree_at_boundary(result.losses, stop is not None and stop.requested, run.engine.device)
        if not finite:
            run.history["diverged"] = True
            break
        if log_now:
            log_step(run, step, result)
        if run.progress is not None:
            run.progress.update(1)
        if stopping and not last:
            return stop_at(run, step)
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or last):
            evaluate_and_sample(run, step)
        if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or last:
            save(run, step)
    return finish(run)


# -- stages ------------------------------------------------------------------------------------------


def set_up(cfg: Config) -> Run:
    """Data (rank 0 builds the cached VQ codebook and tokenizer first), model (+ LoRA), the engine with
    the optimizer, the LR schedule, resumption, logging and the evaluation set."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.run.seed)
    model, layout, images, data, weights = build_model_and_data(cfg, rank, world)
    if cfg.lora.enabled:
        add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.adapter)
    engine, opt = build_engine(model, {"name": cfg.optimizer.name, "params": cfg.optimizer.params}, engine=cfg.engine,
                               micro_batch_size=cfg.batch.micro_batch_size, grad_accum=cfg.batch.grad_accum,
                               max_grad_norm=cfg.optimizer.max_grad_norm, bf16=cfg.model.dtype == "bfloat16",
                               replicate=cfg.fsdp.replicate, deepspeed=cfg.deepspeed,
                               activation_checkpointing=cfg.model.activation_checkpointing, weights=weights)
    judge = None
    if cfg.eval.generated_digits and rank == 0:
        assert data.digits is not None  # validate: generated digits need data.source: digits
        judge = DigitJudge(*data.digits, images)
    logger = Logger(cfg.run.out_dir, cfg.logging.tensorboard and rank == 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    run = Run(cfg, rank, world, Path(cfg.run.out_dir), data.sampler, model, engine, opt, scheduler, logger,
              data.validation, layout, images, judge, captions=[*cfg.eval.captions, *data.captions])
    resume(run)
    if rank == 0 and cfg.logging.progress and sys.stderr.isatty():
        from tqdm import tqdm

        run.progress = tqdm(total=cfg.schedule.steps, initial=run.start, desc=cfg.run.name)
    return run


def resume(run: Run) -> None:
    """checkpoint.resume: 'auto' (the newest complete checkpoint of this run, if any), 'none' or a path."""
    choice = run.cfg.checkpoint.resume
    if choice == "none" or (choice == "auto" and not complete_steps(run.checkpoints)):
        return
    root = run.checkpoints if choice == "auto" else Path(choice)
    step = complete_steps(root)[-1] if choice == "auto" else None
    manifest = load_checkpoint(root, run.model, run.opt, step=step)
    run.sampler.load_state_dict(manifest["extra"]["sampler"])
    run.scheduler.load_state_dict(manifest["extra"]["scheduler"])
    run.start = manifest["step"] + 1
    if run.rank == 0:
        print(f"[distopt] resumed from {root} step {manifest['step']}", file=sys.stderr)


def run_step(run: Run, probe_geometry: bool) -> StepResult:
    """The K micro-steps of one optimizer step: forward, backward inside the micro-batch's modality
    (for the optimizer and the gradient probe), and engine.step(), which steps at the boundary. Losses
    stay on the device until the step is done: no host synchronisation between micro-steps."""
    engine, opt = run.engine, run.opt
    probe = ModalityGradProbe(run.model) if probe_geometry else None
    sums = torch.zeros(2, 2, dtype=torch.float64, device=engine.device)  # per kind: (sum of losses, micro-steps)
    timer = PhaseTimer(engine.device)
    in_backward = _optimizer_seconds(opt)
    tokens = 0
    with timer.phase("step"):
        for batch in run.sampler.next_step():
            batch = to_device(batch, engine.device, DTYPES[run.cfg.model.dtype])
            tokens = batch["input_ids"].numel()
            with timer.phase("forward"):
                result = engine(batch)
            with timer.phase("backward"), contextlib.ExitStack() as tagged:
                if isinstance(opt, TakesMicrosteps):
                    tagged.enter_context(opt.modality(batch["modality"]))
                if probe is not None:
                    tagged.enter_context(probe.modality(batch["modality"]))
                engine.backward(result["loss"])
            if isinstance(opt, RecordsLosses):  # GradNorm balances the modalities by their losses
                opt.record_loss(batch["modality"], result["loss"])
            for row, kind in enumerate(("text", "image")):
                seen = result[f"n_{kind}"] > 0
                sums[row] += torch.stack([torch.where(seen, result[f"{kind}_loss"].detach(), 0.0).double(),
                                          seen.double()])
            with timer.phase("optimizer"):
                engine.step()
        run.scheduler.step()
    seconds = timer.seconds()  # on a GPU: one synchronisation, at the end of the step
    # the optimizer's micro-step work (folds, reduce waits) runs inside backward: count it as optimizer time
    folded = _optimizer_seconds(opt) - in_backward
    seconds["backward"] -= folded
    seconds["optimizer"] += folded
    (text, n_text, image, n_image) = host_values(sums)  # the step's one read of its losses
    losses = {kind: total / n for kind, total, n in (("text", text, n_text), ("image", image, n_image)) if n}
    return StepResult(losses, seconds, tokens, probe)


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A collated batch on the engine's device (tensors already there stay as they are); floating
    inputs (pixels) in the model's dtype."""
    def move(v: Any) -> Any:
        if not torch.is_tensor(v):
            return v
        if v.device != device:
            v = v.to(device, non_blocking=True)
        return v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v

    return {k: move(v) for k, v in batch.items()}


def _optimizer_seconds(opt: torch.optim.Optimizer) -> float:
    return float(counters_of(opt).get("microstep_seconds", 0.0))


def agree_at_boundary(losses: dict[str, float], stop_requested: bool, device: torch.device) -> tuple[bool, bool]:
    """(every loss finite on every rank, a stop signal reached any rank), from one small all-reduce per
    step: every rank stops together on either (no rank is left waiting in a collective, none saves alone)."""
    flags = torch.tensor([float(not all(math.isfinite(v) for v in losses.values())), float(stop_requested)],
                         device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = host_values(flags)
    return not bad, bool(stop)


def log_step(run: Run, step: int, result: StepResult) -> None:
    """Scalars to TensorBoard (rank 0): losses, lr, times, throughput, memory, gradient geometry,
    optimizer counters, FOP statistics and bytes communicated."""
    cfg, opt = run.cfg, run.opt
    geometry = result.geometry.stats() if result.geometry is not None else {}  # a collective: every rank
    run.history["grad"].append({"step": step, **geometry})
    values = {f"loss/{k}": v for k, v in result.losses.items()}
    values.update({f"time/{k}_s": v for k, v in result.seconds.items()})
    values.update({"lr": opt.param_groups[0]["lr"], **memory_stats(run.engine.device),
                   "throughput/tokens_per_s": result.tokens_per_micro * cfg.batch.grad_accum * run.world
                   / result.seconds["step"], **geometry})
    values["data/skipped_records"] = float(run.sampler.skipped)
    values.update({f"optimizer/{k}": float(v) for k, v in counters_of(opt).items()})
    fop = stats_of(opt)
    run.history["fop"].append({"step": step, **{k: v for k, v in fop.items() if k.endswith("_mean")}})
    values.update({f"fop/{k}": v for k, v in fop.items()})
    values.update({f"comm/{k}_bytes": float(v) for k, v in comm_bytes_of(opt).items()})
    run.logger.scalars(step, values)
    if run.progress is None and run.rank == 0:
        print(f"step {step + 1}/{cfg.schedule.steps} " + " ".join(
            f"{k}={values[k]:.4f}" for k in ("loss/text", "loss/image") if k in values), file=sys.stderr)


def evaluate_and_sample(run: Run, step: int) -> None:
    """Validation losses, the digit judge's accuracy on generated images, and a PNG grid of samples."""
    cfg = run.cfg
    dtype = DTYPES[cfg.model.dtype]
    results = evaluate(run.model, [to_device(b, run.engine.device, dtype) for b in run.val_batches])
    # a forward pass of an FSDP2-sharded model is a collective: every rank samples (the same images)
    samples_here = run.rank == 0 or cfg.engine == "fsdp2"
    if cfg.eval.generated_digits and samples_here:
        pictures, digits = generate_digits(run.model, run.layout, run.images, cfg.eval.generated_digits,
                                           cfg.data.text_format, temperature=cfg.eval.temperature,
                                           guidance=cfg.eval.guidance)
        if run.judge is not None:
            results["val/generated_digit_accuracy"] = run.judge.accuracy(pictures, digits)
    run.history["val"].append({"step": step, "seconds": time.perf_counter() - run.t_start, **results})
    run.logger.scalars(step, results)
    if cfg.eval.samples_png and samples_here:
        grid = sample_grid(run, step, write=run.rank == 0)
        if grid is not None:
            run.logger.image("samples", step, grid)


def save(run: Run, step: int) -> None:
    """The checkpoint of `step`; with checkpoint.async, in the background once the previous one is written."""
    extra = {"sampler": run.sampler.state_dict(), "scheduler": run.scheduler.state_dict()}
    if run.cfg.checkpoint.async_:
        run.saver = run.saver or AsyncCheckpointer()
        run.saver.save(run.checkpoints, step, run.model, run.opt, keep_last=run.cfg.checkpoint.keep_last, extra=extra)
    else:
        save_checkpoint(run.checkpoints, step, run.model, run.opt, keep_last=run.cfg.checkpoint.keep_last, extra=extra)


def wait_for_saves(run: Run) -> None:
    """The background save in flight, published (every rank waits; its error is raised on every rank)."""
    if run.saver is not None:
        if run.saver.busy and run.rank == 0:
            print(f"[distopt] waiting for the checkpoint of step {run.saver.step}, written in the background",
                  file=sys.stderr)
        run.saver.close()
        run.saver = None


def stop_at(run: Run, step: int) -> dict:
    """A stop signal agreed at this step's boundary: the checkpoint of this step (after the one in
    flight), then the run ends without its evaluation and export; main() exits with the stop's code.
    The logs are flushed first and every rank marks its checkpoint complete before any rank leaves:
    the first rank to exit may get the others a SIGTERM (srun --kill-on-bad-exit), which then exits
    at once with the same code."""
    run.logger.close()
    if run.progress is not None:
        run.progress.close()
    save(run, step)
    wait_for_saves(run)
    if run.stop is not None:
        run.stop.checkpoint_complete = True
    if run.rank == 0:
        code = run.stop.exit_code() if run.stop is not None else 0
        print(f"[distopt] stopped on a signal at step {step + 1}/{run.cfg.schedule.steps}: checkpoint "
              f"{run.checkpoints / f'step-{step}'} written, exit code {code}; rerun the same command to continue "
              "(resume: auto)", file=sys.stderr)
    dist.barrier()
    run.history["stopped_at"] = step
    return run.history


def finish(run: Run) -> dict:
    wait_for_saves(run)
    export(run.model, run.out, run.layout, run.cfg.model.family, run.rank)
    if run.rank == 0:
        judge = run.judge
        run.history["judge_ceiling"] = judge.ceiling if judge is not None else None
        scored = [v for v in run.history["val"] if "val/generated_digit_accuracy" in v]
        if scored:
            assert judge is not None  # the accuracy is measured by the judge
            print(f"[distopt] generated-digit accuracy {scored[-1]['val/generated_digit_accuracy']:.3f} at step "
                  f"{scored[-1]['step'] + 1} (judge ceiling {judge.ceiling:.3f}, chance 0.100)", file=sys.stderr)
    run.logger.close()
    if run.progress is not None:
        run.progress.close()
    dist.barrier()
    return run.history


if __name__ == "__main__":
    main()
