"""A cluster in one process: the launcher's own set-up and step code at the true shapes and world size.

    python -m launcher.dryrun --config configs/emu3_8b_cluster.yaml --gpus 8 64 1024 [--engine fsdp2 deepspeed]
                              [--json] [--steps 3] [--set section.key=value ...]

One process plays one rank (the fullest by the block plan) of an N-rank job on torch's fake process
group (`backend="fake"`: every collective returns at once, with the right shapes). The model is built
on the meta device exactly as the launcher builds it (launcher.memory.model_on_meta), then everything
runs under FakeTensorMode, where tensors have shapes, dtypes and devices but no values and no memory:
the engine (FSDP2's fully_shard per unit, activation checkpointing), the optimizer (ML-FOP-SOAP's
distributor, folds, SOAP, write-back) and `launcher.run.run_step` for `--steps` optimizer steps of K
micro-steps each, on synthetic micro-batches of the configured shape. Measured, not computed:

    peak bytes       torch's FSDPMemTracker (its categories: sharded and unsharded parameters and
                     gradients, activations, temporaries, all-gather / reduce-scatter buffers, optimizer
                     state, inputs) at the rank's high-water mark, and which phase reached it
    distopt's own    the optimizer's accounting: SOAP state, fp32 masters, the window's and the
                     communication buffers' peaks (MLFOPSOAP.memory_bytes)
    collectives      every c10d call of the last step: kind, count, bytes in, process group size
    host syncs       every read of a device value on the host: through distopt.host (counted) or
                     anywhere else (impossible under FakeTensorMode: it raises, naming the site)
    off the device   with a fake CUDA device: every tensor the step creates on the CPU (an audit pass
                     of the same code with two decoder layers, replicated, as FSDP2 needs a real GPU)

What it cannot see: time (nothing runs), NCCL's and CUDA's own buffers and the allocator's
fragmentation (docs/distributed.md gives the margins the fit check adds), and DeepSpeed's engine
object, which cannot hold fake tensors: `--engine deepspeed` runs the same replicated model and
optimizer in the launcher's plain accumulation loop (DeepSpeed at ZeRO stage 0 adds no buffers of its
own for a client optimizer that owns gradient communication).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPModMemStats
from torch.utils._python_dispatch import TorchDispatchMode

from distopt import MLFOPSOAP, comm, host
from distopt.protocols import TakesMicrosteps
from launcher.config import Config, ConfigError, read_config
from launcher.engines import ENGINES, AccumulationLoop, build_engine, checkpoint_layers, resolve
from launcher.memory import fullest_rank, model_on_meta
from model_zoo.config import DTYPES
from model_zoo.unified import UnifiedModel

GiB = 2**30


# -- measuring ---------------------------------------------------------------------------------------


class Collectives(TorchDispatchMode):
    """Every collective dispatched, by (kind, process-group size): calls and bytes, as torch's own
    collective tracker sizes them (torch.distributed._tools.fake_collectives.CollectiveOp)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[tuple[str, int], list[int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        from torch.distributed._tools.fake_collectives import CollectiveOp, collective_ops, non_functional_collectives

        out = func(*args, **(kwargs or {}))
        if func in collective_ops and func in non_functional_collectives:
            kind = func.__name__.split(".")[0].strip("_")
            size = CollectiveOp.get_process_group(func, args).size()
            entry = self.seen.setdefault((kind, size), [0, 0])
            entry[0] += 1
            entry[1] += CollectiveOp.get_comm_tensor_size(func, out, args, kwargs or {})
        return out

    def take(self) -> list[dict[str, Any]]:
        rows = [dict(kind=k, group_size=g, calls=c, bytes=b) for (k, g), (c, b) in sorted(self.seen.items())]
        self.seen = {}
        return rows


@dataclass
class Phase:
    """Where the run is: step s (1-based), micro-step k, and forward / backward / optimizer."""

    step: int = 0
    microstep: int = 0
    name: str = "set-up"

    def __str__(self) -> str:
        return f"step {self.step}, micro-step {self.microstep}, {self.name}" if self.step else self.name


class Observed:
    """The engine the loop drives, seen from outside: which phase raised the tracker's peak, and the
    host reads made inside micro-steps (the engine itself is the launcher's)."""

    def __init__(self, engine: AccumulationLoop, tracker: Any) -> None:
        self.engine, self.tracker = engine, tracker
        self.phase, self.peak_at, self.peak = Phase(), "set-up", 0
        self.microstep_reads = 0

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _during(self, name: str, fn: Any, *args: Any) -> Any:
        self.phase.name = name
        reads = sum(host.READS.values())
        out = fn(*args)
        if name != "optimizer step":
            self.microstep_reads += sum(host.READS.values()) - reads
        peak = _peak(self.tracker)
        if peak > self.peak:
            self.peak, self.peak_at = peak, str(self.phase)
        return out

    def __call__(self, batch: dict) -> Any:
        self.phase.microstep += 1
        return self._during("forward", self.engine, batch)

    def backward(self, loss: torch.Tensor) -> None:
        self._during("backward", self.engine.backward, loss)
        self.tracker.reset_mod_stats()  # the trackers follow one forward per iteration unless told otherwise

    def step(self) -> None:
        boundary = self.phase.microstep % self.engine.grad_accum == 0
        self._during("optimizer step" if boundary else "end of micro-step", self.engine.step)


def _peak(tracker: Any) -> int:
    snapshot = tracker.get_tracker_snapshot("peak")
    return max((d.get("Total", 0) for d in snapshot.values()), default=0)


def _components(tracker: Any) -> dict[str, int]:
    """The tracker's categories at the rank's peak."""
    snapshot = tracker.get_tracker_snapshot("peak")
    device = max(snapshot, key=lambda d: snapshot[d].get("Total", 0))
    return {str(getattr(k, "value", k)): int(v) for k, v in snapshot[device].items() if v}


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Report:
    gpus: int
    engine: str
    rank: int
    peak_bytes: int
    peak_at: str
    components: dict[str, int]
    distopt: dict[str, int]
    collectives: list[dict[str, Any]]
    host_syncs_per_microstep: float
    host_syncs_per_step: float
    host_reads: dict[str, float]
    off_device_tensors: list[str]
    seconds: float
    steps: int = 3
    microsteps: int = 0
    notes: list[str] = field(default_factory=list)


class SyntheticBatches:
    """Micro-batches of the configured shape (micro_batch_size x data.seq_len tokens) made on the
    device, alternating modality as the data pipeline's modality-pure micro-batches do; the values do
    not matter here. A Janus understanding micro-batch holds documents of one image (its placeholders)
    and a 64-token caption."""

    def __init__(self, cfg: Config, model: Any, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg, model, device
        self.k = cfg.batch.grad_accum  # micro-steps per step

    def next_step(self) -> Iterator[dict[str, Any]]:
        for k in range(self.k):
            yield self.batch("text" if k % 2 == 0 else "image")

    def batch(self, modality: str) -> dict[str, Any]:
        cfg, d = self.cfg, self.device
        b, t = cfg.batch.micro_batch_size, cfg.data.seq_len or 64
        ids = torch.randint(0, self.model.text_config.vocab_size, (b, t), device=d)
        task = "understanding" if modality == "text" else "generation"
        batch: dict[str, Any] = {"input_ids": ids, "labels": ids.clone(), "modality": modality, "task": task,
                                 "position_ids": torch.arange(t, device=d).repeat(b, 1),
                                 "pixel_values": torch.zeros(0, device=d)}
        if cfg.model.family == "janus" and task == "understanding":
            config = self.model.base().config
            per_image, doc = config.vision_config.num_image_tokens, config.vision_config.num_image_tokens + 64
            docs = max(1, t // doc)
            within = torch.arange(t, device=d)
            placeholder = (within < docs * doc) & (within % doc < per_image)
            batch["input_ids"] = torch.where(placeholder, config.image_token_id, ids)
            side, channels = config.vision_config.image_size, config.vision_config.num_channels
            batch["pixel_values"] = torch.zeros(b * docs, channels, side, side, device=d)
        return batch


def gpu_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                  is_causal: Optional[bool] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention as a GPU runs it, for the dry run's fake CPU device: with a mask (packed
    documents) PyTorch picks the memory-efficient kernel, without one flash attention; both keep the
    output and its log-sum-exp, never the s x s scores that SDPA's math path (what a CPU would take)
    holds. This calls the memory-efficient kernel's own op, whose fake implementation gives exactly its
    outputs; the mask becomes the additive bias the kernel takes, as SDPA makes it."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bias = None
    if attention_mask is not None:
        bias = attention_mask if attention_mask.dtype != torch.bool else \
            torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(~attention_mask, float("-inf"))
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and bias is None
    out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout, causal,
                                                                 scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def _with_gpu_attention(model: UnifiedModel) -> UnifiedModel:
    from transformers import AttentionInterface

    AttentionInterface.register("distopt_dry_run", gpu_attention)
    model.base().set_attn_implementation("distopt_dry_run")
    return model


def dry_run(cfg: Config, gpus: int, engine_name: str, steps: int = 3, audit: bool = True,
            warmup_microsteps: Optional[int] = 2) -> Report:
    """One rank of a `gpus`-rank job (see the module docstring). The steps before the last run
    `warmup_microsteps` micro-steps each (None: K): they only build SOAP's state (statistics, then v),
    whose shapes do not depend on K; the last step, the first that folds, runs all K and is the one
    whose collectives and host reads are reported (the peak is watched throughout)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from launcher.run import Run, run_step

    start = time.perf_counter()
    cfg.engine = engine_name
    rank = fullest_rank(cfg, gpus)
    dist.init_process_group("fake", rank=rank, world_size=gpus, store=FakeStore())
    gc.disable()  # what a finished step leaves must be freed by reference counting alone (no cycles)
    try:
        model = _with_gpu_attention(model_on_meta(cfg))
        notes: list[str] = []
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        engine, opt = _engine(cfg, model, engine_name, fake)  # meshes are made outside fake mode
        with fake:
            tracker = _tracker(model, opt, engine_name)
            collectives = Collectives()
            observed = Observed(engine, tracker)
            sampler = SyntheticBatches(cfg, model, engine.device)
            # run_step writes nothing: no output folder and no logger
            run = Run(cfg, rank, gpus, None, sampler, model, observed, opt,  # type: ignore[arg-type]
                      torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None,  # type: ignore[arg-type]
                      [], None, None, None)
            per_step: list[dict[str, Any]] = []
            with tracker, collectives:
                for s in range(1, steps + 1):
                    k = cfg.batch.grad_accum if s == steps or warmup_microsteps is None else \
                        min(warmup_microsteps, cfg.batch.grad_accum)
                    sampler.k = engine.grad_accum = k
                    engine.microsteps = 0  # the loop counts micro-steps to its boundary from here
                    observed.phase = Phase(s)
                    host.READS.clear()
                    observed.microstep_reads = 0
                    run_step(run, probe_geometry=False)
                    per_step.append(dict(collectives=collectives.take(), reads=dict(host.READS),
                                         microstep_reads=observed.microstep_reads))
            components = _components(tracker)
            distopt_bytes = opt.memory_bytes() if isinstance(opt, MLFOPSOAP) else {}
        last = per_step[-1]
        report = Report(gpus, engine_name, rank, observed.peak, observed.peak_at, components, distopt_bytes,
                        last["collectives"], last["microstep_reads"] / cfg.batch.grad_accum,
                        float(sum(last["reads"].values())), {k: float(v) for k, v in last["reads"].items()},
                        off_device_tensors=[], seconds=0.0, steps=steps, microsteps=cfg.batch.grad_accum,
                        notes=notes)
        del run, observed, engine, opt, model
    finally:
        gc.enable()
        comm.destroy_process_group()
    if audit:
        report.off_device_tensors = off_device_audit(cfg, gpus, rank, engine_name)
    report.seconds = time.perf_counter() - start
    return report


def _engine(cfg: Config, model: UnifiedModel, engine_name: str,
            fake: FakeTensorMode) -> tuple[Any, torch.optim.Optimizer]:
    """The launcher's engine over the meta model (fsdp2), or its replicated stand-in for DeepSpeed's."""
    spec = {"name": cfg.optimizer.name, "params": dict(cfg.optimizer.params, verbose=False)}
    bf16 = cfg.model.dtype == "bfloat16"
    if engine_name == "fsdp2":
        return build_engine(model, spec, engine="fsdp2", micro_batch_size=cfg.batch.micro_batch_size,
                            grad_accum=cfg.batch.grad_accum, max_grad_norm=cfg.optimizer.max_grad_norm, bf16=bf16,
                            replicate=cfg.fsdp.replicate, activation_checkpointing=cfg.model.activation_checkpointing,
                            weights=None, device=torch.device("cpu"), materialize=fake)
    return replicated_loop(cfg, model, spec, torch.device("cpu"), fake)


def replicated_loop(cfg: Config, model: torch.nn.Module, spec: dict, device: torch.device,
                    fake: FakeTensorMode) -> tuple[AccumulationLoop, torch.optim.Optimizer]:
    """DeepSpeed at ZeRO stage 0 with distopt's optimizer, as the dry run can hold it: every rank the
    whole model (in model.dtype), the optimizer owning gradient communication and clipping, the loss
    scaled by 1 / K, the optimizer stepped at the accumulation boundary."""
    from distopt import build_optimizer
    from distopt.registry import split_clipping

    if cfg.model.activation_checkpointing:
        checkpoint_layers(model)
    model.to(DTYPES[cfg.model.dtype])
    with fake:
        model.to_empty(device=device)
    spec = resolve("deepspeed", spec)
    optimizer_clip, engine_clip = split_clipping(spec["name"], cfg.optimizer.max_grad_norm or None)
    if optimizer_clip:
        spec["params"]["max_grad_norm"] = optimizer_clip
    opt = build_optimizer(spec, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return AccumulationLoop(model, opt, cfg.batch.grad_accum, device, engine_clip), opt


class UnitsMaySitOut(FSDPMemTracker):
    """torch's FSDPMemTracker, for a model with a unit that sits out some micro-steps' forward (Janus's
    vision encoder on generation micro-batches): FSDP2's final backward callback still runs that
    unit's post-backward, where the tracker expects statistics its pre-forward would have made
    (KeyError in torch 2.13). Its statistics begin there instead; every byte is tracked as before."""

    def _fsdp_param_group_post_backward(self, fsdp_mod: Any, orig: Any) -> Any:
        inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

        def tolerant(*args: Any, **kwargs: Any) -> None:
            if fsdp_mod not in self.memory_tracking:
                name = self._mod_tracker.get_known_fqn(fsdp_mod) or type(fsdp_mod).__name__
                self.memory_tracking[fsdp_mod] = _FSDPModMemStats(name)
            inner(*args, **kwargs)

        return tolerant


def _tracker(model: torch.nn.Module, opt: torch.optim.Optimizer, engine_name: str) -> Any:
    """torch's trackers: FSDPMemTracker for FSDP2, MemTracker for replicated parameters. MemTracker
    hooks every parameter of a module for its gradient, which raises for a frozen one; the frozen
    VQ-VAE never takes part in forward, so it is marked trainable for the tracker's sake (no gradient
    reaches it, and the optimizer, already built, does not hold it)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    if engine_name == "fsdp2":
        return UnitsMaySitOut(mod=model, optm=opt)
    for p in model.parameters():
        p.requires_grad_(True)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    return tracker


def off_device_audit(cfg: Config, gpus: int, rank: int, engine_name: str) -> list[str]:
    """distopt's step with its parameters on the meta device, with every op output created anywhere else
    (on the CPU: a tensor made without the device of the tensor it serves) recorded by the project
    frame that created it: the optimizer's micro-steps and steps over the model's trainable parameters
    (two decoder layers) with the configured engine's distributor (DTensor shards for fsdp2, replicated
    parameters for deepspeed). Gradients are handed over as capture='manual' frameworks do, through the
    same accumulation, distributor and SOAP code. (A fake CUDA device would say the same, but on a CPU
    build of torch a fake CUDA tensor fails in autograd, indexing and transformers' mask helpers alike.)
    The model's forward and backward are checked for host reads (the main pass); its device placement
    is left to the CPU tests of the models."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from distopt import build_optimizer

    small = _two_layers(cfg)
    dist.init_process_group("fake", rank=rank, world_size=gpus, store=FakeStore())
    try:
        model = model_on_meta(small).to(DTYPES[small.model.dtype])
        named = _audit_parameters(model, engine_name, gpus)
        spec = resolve(engine_name, {"name": small.optimizer.name,
                                     "params": dict(small.optimizer.params, verbose=False, capture="manual")})
        opt = build_optimizer(spec, named)
        with OffDevice() as audit:
            for _ in range(3):
                for k in range(small.batch.grad_accum):
                    for _, p in named:
                        p.grad = torch.ones_like(p) if p.grad is None else p.grad + torch.ones_like(p)
                    assert isinstance(opt, TakesMicrosteps), f"{small.optimizer.name} takes micro-steps"
                    opt.end_microstep("text" if k % 2 == 0 else "image")
                opt.step()
        return sorted(audit.sites)
    finally:
        comm.destroy_process_group()


def _audit_parameters(model: torch.nn.Module, engine_name: str, gpus: int) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters as the engine hands them to the optimizer: replicated tensors, or (fsdp2)
    DTensors holding this rank's rows (FSDP2's split), all on the meta device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from distopt.distributors import rows_of

    named: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if engine_name != "fsdp2":
        return named
    mesh, rank = init_device_mesh("cpu", (gpus,)), dist.get_rank()
    out: list[tuple[str, torch.Tensor]] = []
    for n, p in named:
        first, last = rows_of(p.shape[0], gpus, rank)
        local = torch.empty((last - first,) + tuple(p.shape[1:]), dtype=p.dtype, device="meta")
        out.append((n, torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], shape=p.shape,
                                                             stride=p.stride()))))
    return out


def _two_layers(cfg: Config) -> Config:
    import copy

    small = copy.deepcopy(cfg)
    small.model.overrides = {**small.model.overrides, "num_hidden_layers": 2}
    return small


class OffDevice(TorchDispatchMode):
    """Op outputs off the meta device while the step runs on it, by the innermost project frame."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (list, tuple)) else [out]
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in outputs):
            self.sites.add(_project_frame(str(func)))
        return out


def _project_frame(what: str) -> str:
    for frame in reversed(traceback.extract_stack()):
        if any(f"/{d}/" in frame.filename for d in ("distopt", "launcher", "model_zoo")) and \
                "dryrun.py" not in frame.filename:
            return f"{frame.filename.split('/')[-2]}/{frame.filename.split('/')[-1]}:{frame.lineno} {what}"
    return f"(outside the project) {what}"


# -- output ------------------------------------------------------------------------------------------


def table(reports: list[Report]) -> str:
    lines = ["| GPUs | engine | rank | peak GiB | at | " + " | ".join(_columns(reports))
             + " | host syncs / micro-step | host syncs / step | off-device tensors |",
             "|---|---|---|---|---|" + "---|" * len(_columns(reports)) + "---|---|---|"]
    for r in reports:
        cells = " | ".join(f"{r.components.get(c, 0) / GiB:.2f}" for c in _columns(reports))
        lines.append(f"| {r.gpus} | {r.engine} | {r.rank} | {r.peak_bytes / GiB:.2f} | {r.peak_at} | {cells} | "
                     f"{r.host_syncs_per_microstep:g} | {r.host_syncs_per_step:g} | {len(r.off_device_tensors)} |")
    return "\n".join(lines)


def _columns(reports: list[Report]) -> list[str]:
    seen: list[str] = []
    for r in reports:
        seen += [k for k in r.components if k not in seen and k != "Total"]
    return seen


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, nargs="+", required=True)
    ap.add_argument("--engine", nargs="+", choices=ENGINES, default=None, help="default: the config's engine")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (the third is the first that folds)")
    ap.add_argument("--warmup-microsteps", type=int, default=2,
                    help="micro-steps of the steps before the last (they build SOAP's state); 0: K, as the last")
    ap.add_argument("--no-audit", action="store_true", help="skip the fake-CUDA pass that finds CPU tensors")
    ap.add_argument("--json", action="store_true", help="one JSON object per line and per GPU count")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = read_config(args.config, args.set)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    reports = []
    for engine_name in args.engine or [cfg.engine]:
        for n in args.gpus:
            report = dry_run(read_config(args.config, args.set), n, engine_name, args.steps, not args.no_audit,
                             args.warmup_microsteps or None)
            reports.append(report)
            if args.json:
                print(json.dumps(asdict(report)), flush=True)
    if not args.json:
        print(table(reports))


if __name__ == "__main__":
    main()
