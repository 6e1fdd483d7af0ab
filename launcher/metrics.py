"""What the training loop measures and writes: TensorBoard scalars and images (rank 0), the
text-vs-image gradient geometry, evaluation, memory."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import psutil
import torch
import torch.distributed as dist

from distopt.rules import module_of
from model_zoo.data import MODALITIES


class Logger:
    """TensorBoard on rank 0; every other rank (or tensorboard: false) writes nothing."""

    def __init__(self, out_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def image(self, tag: str, step: int, image: torch.Tensor) -> None:
        """image: FloatTensor[H, W] or [C, H, W] (C 1 or 3) in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image if image.dim() == 3 else image.unsqueeze(0), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ModalityGradProbe:
    """This step's gradient split by micro-batch modality (MODALITIES: text, image), averaged over ranks,
    and the text-vs-image cosine and norm ratio: globally and per layer (a module; a LoRA layer's A and B
    together).

    Each backward's gradient is caught by a tensor hook on the tensor each module computes with, before
    autograd accumulates it: the parameter itself under the deepspeed engine, FSDP2's unsharded copy
    (which FSDP2 swaps into the module for its forward) under fsdp2, registered by a forward pre-hook so
    both engines take the same path. What the engine or the optimizer do with p.grad afterwards
    (all-reduce, reduce-scatter, consume) does not matter. Costs two copies of each rank's gradient and
    one all-reduce per parameter, so the loop uses it on log steps only (logging.grad_geometry turns it
    off for models whose gradient does not fit twice); every rank must call stats()."""

    def __init__(self, model: torch.nn.Module):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.layers = {n: module_of(n, i).replace("base_model.model.", "") for i, n in enumerate(self.names)}
        self.like = {n: (p.shape, p.device) for n, p in model.named_parameters() if p.requires_grad}
        self.sums: dict[Optional[str], dict[str, torch.Tensor]] = {}  # None: a backward outside modality()
        self.tag: Optional[str] = None
        self._hooked: set[int] = set()
        self._handles = []
        wanted = set(self.names)
        for prefix, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False) if _join(prefix, n) in wanted]
            if own:
                self._handles.append(module.register_forward_pre_hook(functools.partial(self._watch, prefix, own)))

    def _watch(self, prefix: str, names: list[str], module: torch.nn.Module, args) -> None:
        for name in names:
            tensor = getattr(module, name)
            if id(tensor) not in self._hooked:  # a recomputed forward (activation checkpointing) sees it again
                self._hooked.add(id(tensor))
                self._handles.append(tensor.register_hook(functools.partial(self._add, _join(prefix, name))))

    @contextlib.contextmanager
    def modality(self, tag: str) -> Iterator[None]:
        """Context for one micro-step's backward of modality `tag`."""
        previous, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = previous

    def _add(self, name: str, grad: torch.Tensor) -> None:
        acc = self.sums.setdefault(self.tag, {})
        acc[name] = grad.detach().clone() if name not in acc else acc[name] + grad.detach()

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        for h in self._handles:
            h.remove()
        if set(self.sums) != set(MODALITIES):
            return {}
        world = dist.get_world_size() if dist.is_initialized() else 1
        per_layer: dict[str, torch.Tensor] = {}
        for name in self.names:  # one parameter at a time: no flat copy of the whole gradient
            shape, device = self.like[name]
            pair = torch.stack([self.sums[m].get(name, torch.zeros(shape, device=device)).double().reshape(-1)
                                for m in MODALITIES])
            if world > 1:
                dist.all_reduce(pair)
                pair /= world
            t, i = pair
            dots = torch.stack([t @ t, t @ i, i @ i]).cpu()
            layer = self.layers[name]
            per_layer[layer] = dots if layer not in per_layer else per_layer[layer] + dots
        total = sum(per_layer.values())
        assert isinstance(total, torch.Tensor)  # not sum()'s 0: the model has parameters
        out = _geometry("grad", total)
        for layer, dots in per_layer.items():
            out.update(_geometry("layer_grad", dots, layer))
        return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _geometry(prefix: str, dots: torch.Tensor, layer: Optional[str] = None) -> dict[str, float]:
    """Cosine, norm ratio |g_text| / |g_image| and both norms from (t.t, t.i, i.i)."""
    tt, ti, ii = (float(x) for x in dots)
    nt, ni = tt ** 0.5, ii ** 0.5
    values = {"cosine": ti / max(nt * ni, 1e-30), "norm_ratio": nt / max(ni, 1e-30), "text_norm": nt, "image_norm": ni}
    return {f"{prefix}/{k}" + (f"/{layer}" if layer else ""): v for k, v in values.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Validation loss per modality (token-weighted) and the token accuracies the model reports."""
    model.eval()
    totals: dict[str, float] = {}
    for batch in batches:
        out = model(batch)
        for kind, n_key in (("text", "n_text"), ("image", "n_image")):
            n = float(out[n_key])
            if n > 0:
                totals[f"{kind}_loss"] = totals.get(f"{kind}_loss", 0.0) + float(out[f"{kind}_loss"]) * n
                totals[f"{kind}_correct"] = totals.get(f"{kind}_correct", 0.0) + float(out[f"{kind}_correct"])
                totals[f"{kind}_n"] = totals.get(f"{kind}_n", 0.0) + n
    model.train()
    result = {}
    for kind, name in (("text", "caption"), ("image", "image_token")):
        n = totals.get(f"{kind}_n", 0.0)
        if n:
            result[f"val/{kind}_loss"] = totals[f"{kind}_loss"] / n
            result[f"val/{name}_accuracy"] = totals[f"{kind}_correct"] / n
    return result


class PhaseTimer:
    """Seconds per phase of one step (phases may repeat: their times add up). On a GPU each phase is
    timed by CUDA events on the current stream, read once at the end of the step (`seconds()`: one
    synchronisation), so the split measures the device's work, not the time to launch it; on the CPU
    by perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda" and torch.cuda.is_available()  # (a fake CUDA device: the dry run)
        # (name, start, end): perf_counter seconds, or torch.cuda.Event where self.cuda
        self.spans: list[tuple[str, Any, Any]] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self._now()
        try:
            yield
        finally:
            self.spans.append((name, start, self._now()))

    def seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        for name, start, end in self.spans:
            took = start.elapsed_time(end) / 1000 if self.cuda else end - start
            out[name] = out.get(name, 0.0) + took
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    """This rank's memory: on a GPU the CUDA allocator's peak allocated and reserved bytes, on the
    CPU the process's resident set size."""
    if device.type == "cuda":
        return {"memory/rank0_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "memory/rank0_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"memory/rank0_mib": psutil.Process().memory_info().rss / 2**20}
