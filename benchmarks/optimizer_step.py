"""Optimizer cost of AdamW, SOAP and ML-FOP-SOAP on a transformer-shaped model, side by side in one run.

    python benchmarks/optimizer_step.py [--quick]

Model: a Llama decoder built from a config (6 layers, hidden 256, FFN 688, 4 heads, vocab 512),
fp32, K = 8 micro-steps of 4 x 128 tokens (4096 tokens per optimizer step), precondition_frequency
10, one process. Measured per optimizer step (medians over steps after warm-up; the optimizers are
interleaved step by step, so machine noise hits all of them alike):

- optimizer time: `step()`, plus for ML-FOP-SOAP the per-micro-step work its hooks do inside
  backward (capture, rotation into the eigenbasis, folds), timed by wrapping its micro-step
  callback. This is the number the paper's "< 15% folding overhead" is about.
- whole training step: K x (forward + backward) + step.
- optimizer state bytes (every tensor the optimizer holds).

Goals (issue 2): ML-FOP-SOAP optimizer time <= 1.15 x SOAP's; whole training step <= 1.3 x AdamW's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from distopt import MLFOPSOAP, SOAP

K = 8


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    def walk(v) -> int:
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0

    return walk(dict(opt.state))


class Runner:
    """One model + optimizer; `step()` runs K micro-steps and the optimizer step, timing both."""

    def __init__(self, name: str):
        self.name, self.model = name, make_model()
        named = list(self.model.named_parameters())
        hp = dict(lr=1e-3, weight_decay=0.01)
        if name == "AdamW":
            self.opt = torch.optim.AdamW([p for _, p in named], betas=(0.9, 0.95), **hp)
        elif name == "SOAP":
            self.opt = SOAP(named, precondition_frequency=10, verbose=False, **hp)
        else:
            self.opt = MLFOPSOAP(named, precondition_frequency=10, verbose=False, **hp)
            self._time_microsteps()
        self.micro_s = 0.0
        gen = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, 512, (4, 128), generator=gen) for _ in range(K)]
        self.opt_times, self.step_times = [], []

    def _time_microsteps(self) -> None:
        capture = self.opt._capture
        inner = capture.end_microstep

        def timed(*args, **kwargs):
            t = time.perf_counter()
            inner(*args, **kwargs)
            self.micro_s += time.perf_counter() - t

        capture.end_microstep = timed

    def step(self) -> None:
        self.micro_s = 0.0
        start = time.perf_counter()
        for tokens in self.data:
            (self.model(tokens, labels=tokens).loss / K).backward()
        t = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad()
        end = time.perf_counter()
        self.opt_times.append(end - t + self.micro_s)
        self.step_times.append(end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()
    steps, warmup = (12, 2) if args.quick else (32, 3)
    runners = [Runner(n) for n in ("AdamW", "SOAP", "ML-FOP-SOAP")]
    for _ in range(steps):
        for r in runners:
            r.step()
    med = {r.name: (statistics.median(r.opt_times[warmup:]), statistics.median(r.step_times[warmup:])) for r in runners}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), K={K}, 4096 tokens/step, {steps} steps, "
          f"median after {warmup} warm-up\n")
    print("| optimizer | optimizer s/step | x SOAP | training step s | x AdamW | state MiB |")
    print("|---|---|---|---|---|---|")
    for r in runners:
        o, s = med[r.name]
        print(f"| {r.name} | {o:.4f} | {o / med['SOAP'][0]:.2f} | {s:.3f} | {s / med['AdamW'][1]:.2f} | "
              f"{state_bytes(r.opt) / 2**20:.1f} |")
    mlfop = runners[2].opt
    print(f"\nML-FOP-SOAP counters: {dict((k, round(v, 3)) for k, v in mlfop.counters.items())}")


if __name__ == "__main__":
    main()
