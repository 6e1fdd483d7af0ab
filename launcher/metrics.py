"""What the training loop measures and writes: TensorBoard scalars and images (rank 0), the
text-vs-image gradient geometry, evaluation, memory."""

from __future__ import annotations

import os
from typing import Iterable, Optional

import psutil
import torch


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
        """image: FloatTensor[H, W] in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.unsqueeze(0), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ModalityGradProbe:
    """This rank's gradient split by micro-batch modality during one optimizer step, for the
    text-vs-image cosine and norm ratio. Costs two gradient copies, so the loop uses it on log steps."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self.sums: dict[str, list[torch.Tensor]] = {}
        self._before: list[torch.Tensor] = []

    @torch.no_grad()
    def before_backward(self) -> None:
        self._before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def after_backward(self, modality: str) -> None:
        acc = self.sums.setdefault(modality, [torch.zeros_like(p) for p in self.params])
        for a, p, b in zip(acc, self.params, self._before):
            if p.grad is not None:
                a.add_(p.grad - b)

    def stats(self) -> dict[str, float]:
        if len(self.sums) != 2:
            return {}
        (_, g1), (_, g2) = sorted(self.sums.items())  # generation, understanding
        dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g1, g2))
        n1 = sum(float(a.double().square().sum()) for a in g1) ** 0.5
        n2 = sum(float(b.double().square().sum()) for b in g2) ** 0.5
        return {"grad/text_image_cosine": dot / max(n1 * n2, 1e-30),
                "grad/text_to_image_norm_ratio": n2 / max(n1, 1e-30)}


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


def memory_mib(device: Optional[torch.device] = None) -> float:
    """Peak accelerator memory on GPUs, resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20
