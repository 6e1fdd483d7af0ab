"""Everything distopt knows about DeepSpeed, in one place.

What DeepSpeed does for us: launching and process-group discovery (the deepspeed launcher, torchrun,
mpirun through mpi4py), the engine at ZeRO stage 0 around our optimizer object, the 1 / K loss
scaling of gradient accumulation and the accumulation-boundary count that calls our `step()` once
per K micro-steps. What it does not do: the LR schedule (torch's LambdaLR, run by the launcher),
gradient communication and clipping for the optimizers that own them (ML-FOP-SOAP reduces to block
owners per micro-step; the two-objective rules all-reduce the two modality gradients once per step):
for those, the engine's backward all-reduce is switched off (the lever DeepSpeed's 1-bit optimizers
use) and `gradient_clipping` moves into the optimizer's `max_grad_norm`, because DeepSpeed would
clip by a norm computed from each rank's local, unreduced p.grad. Only trainable parameters reach
the optimizer (LoRA freezes the base weights).

Refused, with the reason and the fix: ZeRO stage >= 1 (it hands the optimizer flat 1-D partitions,
so no Kronecker factor can be formed), fp16 / bf16 engines (their loss scaler and fp32 master copy
rewrite gradients behind the optimizer's back; use `torch_autocast`), an `optimizer` block next to
our object, and clipping set twice.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from datetime import timedelta
from typing import Any, Optional

import torch

from distopt.registry import build_optimizer, owns_gradient_communication, split_clipping

LAUNCHER_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def init_distributed(timeout: Optional[timedelta] = None) -> None:
    """Start the process group. DeepSpeed's discovery covers the deepspeed launcher, torchrun and
    mpirun/mpiexec (mpi4py); a plain `python` run becomes a world of one on a free local port.
    timeout: the process group's; None is DeepSpeed's default, DEEPSPEED_TIMEOUT minutes (10 unless set)."""
    import deepspeed
    from deepspeed.constants import default_pg_timeout

    if not any(k in os.environ for k in LAUNCHER_RANK_VARIABLES):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    # DeepSpeed's MPI discovery overwrites MASTER_PORT with its `distributed_port` (29500 by default):
    # hand it the port the job chose, so that two mpirun jobs on one node do not collide
    deepspeed.init_distributed(auto_mpi_discovery=True, timeout=default_pg_timeout if timeout is None else timeout,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    _unlink_shared_memory_buffer()


def shared_memory_all_reduce() -> bool:
    """Whether DeepSpeed's CPU shared-memory all-reduce is up: its op was loaded (CPU accelerator) and
    the launcher said every rank is local (LOCAL_SIZE = world size). The same answer on every rank."""
    import torch.distributed as dist
    from deepspeed.comm import comm

    world = dist.get_world_size()
    loaded = getattr(comm.cdb, "shm_comm_op", None) is not None
    return world > 1 and loaded and os.environ.get("LOCAL_SIZE") == str(world)


def shared_memory_buffer(rank: int) -> str:
    """The POSIX shared-memory file DeepSpeed's CPU all-reduce maps for `rank` (its shm op's naming:
    uid, MASTER_ADDR, MASTER_PORT, rank)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shared_memory_buffer() -> None:
    """DeepSpeed's CPU accelerator starts a shared-memory all-reduce when all ranks are local (the
    deepspeed launcher sets LOCAL_SIZE = world size): each rank creates a 69 MB file in /dev/shm and
    maps its peers' files, and nothing ever unlinks them, so every run on a new port leaves
    world x 69 MB of RAM behind until reboot. Its initialize returns only after mapping every peer's
    file, so once all ranks pass the barrier each can unlink its own name: the mappings stay valid
    until the processes exit, and the kernel frees the memory then."""
    import torch.distributed as dist

    if not shared_memory_all_reduce():
        return  # the same answer on every rank: the barrier below is reached by all or by none
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shared_memory_buffer(dist.get_rank()))


def engine_config(micro_batch_size: int, grad_accum: int, world_size: int, max_grad_norm: Optional[float],
                  extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The DeepSpeed JSON of a run: stage 0, our optimizer object, the user's extra keys on top."""
    ds: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": grad_accum,
          "train_batch_size": micro_batch_size * grad_accum * world_size,
          "gradient_clipping": max_grad_norm or 0.0,
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    ds.update(extra or {})
    return ds


def prepare_config(ds_config: dict[str, Any], optimizer_name: str) -> tuple[dict[str, Any], Optional[float]]:
    """Validate a DeepSpeed config for a distopt optimizer; returns (config to use, clip norm to apply
    inside the optimizer or None)."""
    cfg = copy.deepcopy(ds_config)
    if "optimizer" in cfg:
        raise ValueError("DeepSpeed config: remove the 'optimizer' block; distopt passes its own optimizer object "
                         "(configure it under optimizer {name, params} in the distopt config)")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage:
        raise ValueError(f"DeepSpeed config: zero_optimization.stage={stage} is not supported: ZeRO stages >= 1 "
                         "hand the optimizer flat 1-D partitions, so SOAP's Kronecker factors cannot be formed. Use "
                         "stage 0; MLFOPSOAP shards its own state (factors, eigenbases, moments) across ranks")
    for precision in ("fp16", "bf16"):
        if cfg.get(precision, {}).get("enabled"):
            raise ValueError(f"DeepSpeed config: {precision}.enabled is not supported: its loss scaler / fp32 "
                             "master copy rewrites gradients behind the optimizer. Keep fp32 parameters and use "
                             "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} for low-precision "
                             "compute")
    clip, engine_clip = split_clipping(optimizer_name, cfg.get("gradient_clipping", 0.0) or None)
    cfg["gradient_clipping"] = engine_clip or 0.0
    return cfg, clip


def initialize(model: torch.nn.Module, optimizer_spec: dict[str, Any],
               ds_config: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
    """deepspeed.initialize with our optimizer (the process group must exist: init_distributed);
    returns (engine, optimizer)."""
    import deepspeed

    cfg, clip = prepare_config(ds_config, optimizer_spec["name"])
    spec = copy.deepcopy(optimizer_spec)
    if clip is not None:
        params = spec.setdefault("params", {})
        if params.get("max_grad_norm") not in (None, clip):
            raise ValueError(f"gradient clipping is set twice: DeepSpeed gradient_clipping={clip} and optimizer "
                             f"max_grad_norm={params['max_grad_norm']}; keep one")
        params["max_grad_norm"] = clip
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    built: list[torch.optim.Optimizer] = []

    def make(_params: Any) -> torch.optim.Optimizer:
        """DeepSpeed calls this once the engine has set its device and placed the model, so the optimizer's
        buffers and its first collective land on that device. It passes unnamed parameters; routing needs
        the names, which are those of the same (moved) parameter objects."""
        built.append(build_optimizer(spec, named))
        return built[0]

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make, model_parameters=[p for _, p in named],
                                           config=cfg)
    if owns_gradient_communication(optimizer_spec["name"]):
        engine.enable_backward_allreduce = False
    return engine, built[0]
