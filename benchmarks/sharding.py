"""Sharded vs replicated ML-FOP-SOAP at world sizes 1, 2, 4 (gloo on CPU), side by side in one run.

Per world size N:
- optimizer-state bytes on the fullest rank, against the goal 1.15 * total / N + largest block
  (the largest block's fp32 m and v), and what a replicated optimizer keeps on every rank;
- bytes one rank puts into collectives per optimizer step, against the formula
  K * (all blocks' gradient bytes) [reduce-to-owner, every micro-step] + (largest rank share)
  [its slot of the parameter all-gather]; the small fp64 all-reduce is the difference;
- the time of a whole training step (K forward/backward + step) for the sharded optimizer and for a
  replicated one (every rank holds all state and computes every block; gradients all-reduced per
  micro-step so that it folds the same global micro-gradients).

    python benchmarks/sharding.py [--quick]

Model: a transformer-shaped Llama decoder built from a config (hidden 256, 4 layers, vocab 1024),
fp32, max_block 256, K = 4 micro-steps of 4 x 64 tokens per rank. With 2 CPU cores, 4 ranks
oversubscribe the machine, so their times measure contention as much as the optimizer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distopt import MLFOPSOAP

K = 4


def model_and_data(rank: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, 1024, (4, 64), generator=gen) for _ in range(K)]
    return model, data


def state_bytes(opt) -> int:
    total = 0

    def walk(v):
        nonlocal total
        if torch.is_tensor(v):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(dict(opt.state))
    return total


def run(rank: int, world: int, steps: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rdv", rank=rank, world_size=world)
    torch.set_num_threads(max(1, 2 // world))
    singles = [dist.new_group([r]) for r in range(world)]
    rows = {}
    for mode in ("sharded", "replicated"):
        model, data = model_and_data(rank)
        opts = dict(lr=1e-3, precondition_frequency=10, max_block=256, verbose=False)
        if mode == "sharded":
            opt = MLFOPSOAP(model.named_parameters(), **opts)
        else:
            opt = MLFOPSOAP(model.named_parameters(), capture="manual", process_group=singles[rank], **opts)
        times = []
        for step in range(steps):
            dist.barrier()
            start = time.perf_counter()
            for tokens in data:
                (model(tokens, labels=tokens).loss / K).backward()
                if mode == "replicated":
                    for p in model.parameters():
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
                    opt.end_microstep()
            opt.step()
            opt.zero_grad()
            dist.barrier()
            times.append(time.perf_counter() - start)
        sent_per_step = sum(opt.distributor.sent.values()) / steps
        rows[mode] = dict(time=statistics.median(times[2:]), state=state_bytes(opt), sent=sent_per_step,
                          blocks=[(b.numel, b.owner) for b in opt.plan.blocks])
    torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def summarize(world: int, per_rank: list[dict]) -> dict:
    sharded = [r["sharded"] for r in per_rank]
    blocks = sharded[0]["blocks"]
    total_state = sum(r["state"] for r in sharded)
    largest_block_state = max(n for n, _ in blocks) * 4 * 2  # fp32 m and v of the largest block
    share = [sum(n for n, o in blocks if o == r) for r in range(world)]
    bytes_fp32 = 4
    formula = (K * sum(n for n, _ in blocks) + max(share)) * bytes_fp32 if world > 1 else 0
    return dict(world=world,
                state_max=max(r["state"] for r in sharded), state_goal=1.15 * total_state / world + largest_block_state,
                state_replicated=per_rank[0]["replicated"]["state"],
                sent=statistics.mean(r["sent"] for r in sharded), formula=formula,
                t_sharded=statistics.median(r["time"] for r in sharded),
                t_replicated=statistics.median(r["replicated"]["time"] for r in per_rank))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    steps = 4 if args.quick else 8
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(run, args=(world, steps, d), nprocs=world, join=True)
            rows.append(summarize(world, [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                                          for r in range(world)]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, K={K}, steps={steps} (median after 2 warm-up)\n")
    print("| ranks | state bytes/rank (max) | goal 1.15*total/N+largest | replicated state/rank | "
          "bytes sent/step/rank | formula K*reduce+all-gather | sent/formula | step s sharded | step s replicated |"
          " sharded/replicated |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["sent"] / r["formula"] if r["formula"] else float("nan")
        print(f"| {r['world']} | {r['state_max'] / 2**20:.2f} MiB | {r['state_goal'] / 2**20:.2f} MiB | "
              f"{r['state_replicated'] / 2**20:.2f} MiB | {r['sent'] / 2**20:.2f} MiB | {r['formula'] / 2**20:.2f} MiB | "
              f"{ratio:.3f} | {r['t_sharded']:.3f} | {r['t_replicated']:.3f} | {r['t_sharded'] / r['t_replicated']:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
