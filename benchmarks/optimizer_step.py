"""Optimizer cost of AdamW, SOAP and ML-FOP-SOAP on a transformer-shaped model, side by side in one run,
at 512, 2,048 and 8,192 tokens per micro-step.

    python benchmarks/optimizer_step.py [--quick]   writes benchmarks/results/optimizer-step[-quick].{md,json}

Model: a Llama decoder built from a config (6 layers, hidden 256, FFN 688, 4 heads, vocab 512),
fp32, K = 4 micro-steps of 4 sequences, precondition_frequency 10, one process. Measured per
optimizer step (medians over steps after warm-up; the optimizers are interleaved step by step, so
machine noise hits all of them alike):

- optimizer time: `step()`, plus for ML-FOP-SOAP the per-micro-step work its hooks do inside
  backward (hand-over, rotation into the eigenbasis, folds; its `microstep_seconds` counter). This is
  the number the paper's "< 15% folding overhead" is about.
- whole training step: K x (forward + backward) + step.
- optimizer state bytes (every tensor the optimizer holds).

The FOP cost is rotations of the folded pieces (m n (m + n) flops per matrix), fixed per step, while
forward and backward grow with the tokens: the overhead over SOAP falls as micro-batches grow.
Goal (issue 11): the whole step within 1.15 x SOAP's at 8,192 tokens per micro-step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

import repro
from distopt import MLFOPSOAP, SOAP
from distopt.protocols import counters_of
from distopt.state import tree_bytes

K = 4
TOKENS = (512, 2048, 8192)  # per micro-step: 4 sequences of 128, 512, 2048


def make_model(seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    return LlamaForCausalLM(cfg)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return tree_bytes(dict(opt.state))


class Runner:
    """One model + optimizer; `step()` runs K micro-steps and the optimizer step, timing both."""

    def __init__(self, name: str, tokens: int):
        seq = tokens // 4
        self.name, self.model = name, make_model(seq)
        named = list(self.model.named_parameters())
        hp: dict[str, Any] = dict(lr=1e-3, weight_decay=0.01)
        self.opt: torch.optim.Optimizer
        if name == "AdamW":
            self.opt = torch.optim.AdamW([p for _, p in named], betas=(0.9, 0.95), **hp)
        elif name == "SOAP":
            self.opt = SOAP(named, precondition_frequency=10, verbose=False, **hp)
        else:
            self.opt = MLFOPSOAP(named, precondition_frequency=10, verbose=False, **hp)
        gen = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, 512, (4, seq), generator=gen) for _ in range(K)]
        self.opt_times: list[float] = []
        self.step_times: list[float] = []

    def _microstep_seconds(self) -> float:
        return float(counters_of(self.opt).get("microstep_seconds", 0.0))

    def step(self) -> None:
        before = self._microstep_seconds()
        start = time.perf_counter()
        for tokens in self.data:
            (self.model(tokens, labels=tokens).loss / K).backward()
        t = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        end = time.perf_counter()
        self.opt_times.append(end - t + self._microstep_seconds() - before)
        self.step_times.append(end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()
    steps, warmup = (6, 2) if args.quick else (14, 3)
    rows = []
    for tokens in TOKENS:
        runners = [Runner(n, tokens) for n in ("AdamW", "SOAP", "ML-FOP-SOAP")]
        for _ in range(steps):
            for r in runners:
                r.step()
        med = {r.name: (statistics.median(r.opt_times[warmup:]), statistics.median(r.step_times[warmup:]))
               for r in runners}
        for r in runners:
            o, s = med[r.name]
            rows.append(dict(tokens=tokens, optimizer=r.name, opt_s=o, step_s=s, opt_x_soap=o / med["SOAP"][0],
                             step_x_soap=s / med["SOAP"][1], step_x_adamw=s / med["AdamW"][1],
                             state_mib=state_bytes(r.opt) / 2**20))
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), K={K}, {steps} steps, median after {warmup} warm-up")
    lines = [head, "", "| tokens/micro-step | optimizer | optimizer s/step | x SOAP | training step s | x SOAP "
             "| x AdamW | state MiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['tokens']} | {row['optimizer']} | {row['opt_s']:.4f} | {row['opt_x_soap']:.2f} | "
                     f"{row['step_s']:.3f} | {row['step_x_soap']:.2f} | {row['step_x_adamw']:.2f} | "
                     f"{row['state_mib']:.1f} |")
    table = "\n".join(lines) + "\n"
    name = "optimizer-step-quick" if args.quick else "optimizer-step"
    repro.write_results(name, "python benchmarks/optimizer_step.py" + (" --quick" if args.quick else ""), table, rows)
    print(table)


if __name__ == "__main__":
    main()
