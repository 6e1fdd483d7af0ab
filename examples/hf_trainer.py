"""Train a tiny transformers Emu3ForConditionalGeneration with Hugging Face's Trainer and distopt's
ML-FOP-SOAP, in one process.

    python examples/hf_trainer.py --steps 40 --grad-accum 4 --out runs/hf_trainer

Trainer runs the loop (gradient accumulation, LR schedule, logging); the optimizer is handed in with
`Trainer(optimizers=(distopt.MLFOPSOAP(...), scheduler))`. ML-FOP-SOAP captures each of Trainer's
micro-step backward passes with its own hooks and folds the `--grad-accum` micro-step gradients with
FOP at the accumulation boundary, where Trainer calls `optimizer.step()`; nothing in Trainer changes.
Two settings matter: Trainer's own clipping is off (`max_grad_norm=0`; ML-FOP-SOAP clips the folded
gradient itself, it consumes the micro-step gradients that Trainer would read from `p.grad`), and
`compute_loss` hands the model model_zoo's micro-batch dict (interleaved understanding and generation
micro-batches of captioned digits, so the first fold level pairs a text gradient with an image one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distopt  # noqa: E402
from model_zoo import build_data, build_image_tokenizer, build_model, build_vocab, layout_for  # noqa: E402
from model_zoo.config import DataConfig, ModelConfig  # noqa: E402


class MicroBatches(IterableDataset):
    """model_zoo's sampler as the stream Trainer's DataLoader reads, one micro-batch per item."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        while True:
            yield self.sampler.next_micro_batch()


class UnifiedTrainer(Trainer):
    """Trainer whose loss is the unified model's own (text and image tokens, Emu3's vision weight)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs)
        return (out["loss"], out) if return_outputs else out["loss"]


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    """Trains; returns (Trainer's log history, the optimizer's counters)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4, help="rows of 64 packed tokens per micro-batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="runs/hf_trainer")
    ap.add_argument("--cache-dir", default=".cache/distopt")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    m, d = ModelConfig(family="emu3", size="tiny"), DataConfig(cache_dir=args.cache_dir)
    vocab = build_vocab(d, m)
    model = build_model(m, vocab)
    images = build_image_tokenizer(d, m, model)
    data = build_data(d, layout_for(m, vocab, images.grid, model), images, micro_batch_size=args.micro_batch,
                      grad_accum=args.grad_accum)
    optimizer = distopt.MLFOPSOAP([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=0.01, precondition_frequency=5, max_grad_norm=1.0, verbose=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, gradient_accumulation_steps=args.grad_accum,
                                 per_device_train_batch_size=1, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
                                 report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                                 remove_unused_columns=False)
    trainer = UnifiedTrainer(model=model, args=training, train_dataset=MicroBatches(data.sampler),
                             data_collator=lambda items: items[0], optimizers=(optimizer, scheduler))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps; FOP folds "
          f"{optimizer.counters['fop_folds']}", file=sys.stderr)
    return trainer.state.log_history, dict(optimizer.counters)


if __name__ == "__main__":
    main()
