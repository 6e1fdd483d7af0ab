"""Sharded ML-FOP-SOAP at world sizes 1, 2, 4 (gloo on CPU), K = 1, 4, 8, fp32 and bf16 parameters,
side by side in one run, against the formulas of docs/distributed.md.

Per configuration, on the fullest rank:
- bytes held: optimizer state (SOAP state and fp32 masters), the fold window's peak, the
  communication buffers' peak (opt.memory_bytes(): sums of tensor sizes), gradients (p.grad at the
  end of a backward that keeps it) and parameters;
- bytes this rank hands to each kind of collective per optimizer step (opt.comm_bytes()), against
  the formula: reduce_scatter R * world * W * s_c with R = ceil(log2 K) + 1 reductions for the
  streaming fold, all_gather W * s_p (W the slot, s_c and s_p the element sizes);
- the time of a whole training step (K forward/backward + step) for the sharded optimizer and for a
  replicated one (every rank holds all state and computes every block; gradients all-reduced every
  micro-step, as DDP does without no_sync, so it folds the same global micro-gradients);
- the same under FSDP2 (fully_shard per decoder layer and root, DTensor parameters, the optimizer's
  all-to-all redistributions, distopt.fsdp2): bytes held, bytes handed to all_to_all against the
  formula (R + 1) * W * s_c per rank, and the step time next to the DeepSpeed-engine layout's.

    python benchmarks/sharding.py [--quick]      writes benchmarks/results/sharding[-quick].{md,json}

Model: a Llama-shaped decoder built from a config (hidden 256, 4 layers, vocab 1024), max_block 256,
micro-batches of 4 x 64 tokens per rank. With 2 CPU cores, 4 ranks oversubscribe the machine, so
their times measure contention as much as the optimizer: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import repro
from distopt import MLFOPSOAP, comm

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_and_data(rank: int, k: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) types .to() unbound, self first
    gen = torch.Generator().manual_seed(rank)
    return model, [torch.randint(0, 1024, (4, 64), generator=gen) for _ in range(k)]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def fully_shard_layers(model: LlamaForCausalLM, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run(rank: int, world: int, configs: list[tuple[int, str]], steps: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rdv", rank=rank, world_size=world)
    torch.set_num_threads(max(1, 2 // world))
    singles = [dist.new_group([r]) for r in range(world)]
    rows = []
    for k, dtype_name in configs:
        row = dict(k=k, dtype=dtype_name)
        for mode in ("sharded", "replicated", "fsdp2"):
            model, data = model_and_data(rank, k, DTYPES[dtype_name])
            opts: dict[str, Any] = dict(lr=1e-3, precondition_frequency=10, max_block=256, verbose=False)
            if mode == "replicated":
                opt = MLFOPSOAP(model.named_parameters(), capture="manual", process_group=singles[rank], **opts)
            else:
                if mode == "fsdp2":
                    fully_shard_layers(model, world)
                opt = MLFOPSOAP(model.named_parameters(), **opts)
            times, grad_bytes = [], 0
            for _ in range(steps):
                dist.barrier()
                start = time.perf_counter()
                for tokens in data:
                    (model(tokens, labels=tokens).loss / k).backward()
                    if mode == "replicated":
                        for p in model.parameters():
                            dist.all_reduce(p.grad)
                            p.grad.div_(world)
                        opt.end_microstep()
                    grad_bytes = max(grad_bytes, sum(local(p.grad).numel() * p.grad.element_size()
                                                     for p in model.parameters() if p.grad is not None))
                opt.step()
                opt.zero_grad()
                dist.barrier()
                times.append(time.perf_counter() - start)
            row[mode] = dict(time=statistics.median(times[2:]), memory=opt.memory_bytes(), grad_bytes=grad_bytes,
                             param_bytes=sum(local(p).numel() * p.element_size() for p in model.parameters()),
                             sent={kind: v / steps for kind, v in opt.comm_bytes().items()},
                             slot=opt.plan.slot, reductions=opt.counters["reductions"] / steps)
            opt.close()
        rows.append(row)
    torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    comm.destroy_process_group()


def formula(world: int, k: int, dtype: str, slot: int, local_elements: int) -> dict:
    """docs/distributed.md: bytes handed to each collective per rank and step (streaming fold, fp32
    reductions). DeepSpeed layout: R reduce-scatters of world slots, one all-gather of a slot. FSDP2: R
    all-to-alls of this rank's rows, one back in the parameters' dtype, plus the masters' one-off fetch
    (counted in the first step, so spread over the steps by the caller)."""
    reductions = math.ceil(math.log2(k)) + 1
    size = 2 if dtype == "bf16" else 4
    return {"reduce_scatter": reductions * world * slot * 4 if world > 1 else 0,  # one rank skips DeepSpeed's
            "all_gather": slot * size if world > 1 else 0,
            "all_to_all": (reductions * 4 + size) * local_elements}  # FSDP2's runs on one rank too (a copy)


KINDS = ("reduce_scatter", "all_gather", "all_reduce", "all_to_all")


def summarize(world: int, per_rank: list[list[dict]], steps: int) -> list[dict]:
    out = []
    for i, row in enumerate(per_rank[0]):
        entry = dict(world=world, k=row["k"], dtype=row["dtype"])
        for mode in ("sharded", "replicated", "fsdp2"):
            runs = [r[i][mode] for r in per_rank]
            fullest = max(runs, key=lambda s: sum(s["memory"].values()) + s["param_bytes"])
            local = fullest["param_bytes"] // (2 if row["dtype"] == "bf16" else 4)
            expected = formula(world, row["k"], row["dtype"], fullest["slot"], local)
            if mode == "fsdp2":
                expected["all_to_all"] += 4 * local / steps  # the masters' fetch, fp32 rows
            entry[mode] = dict(memory=fullest["memory"], params=fullest["param_bytes"], grads=fullest["grad_bytes"],
                               sent={kind: fullest["sent"].get(kind, 0.0) for kind in KINDS}, formula=expected,
                               reductions=fullest["reductions"], time=statistics.median(s["time"] for s in runs))
        out.append(entry)
    return out


def markdown(rows: list[dict], steps: int) -> str:
    mib = 2**20

    def held(m: dict) -> str:
        mem = m["memory"]
        return (f"{mem['state'] / mib:.2f} | {mem['masters'] / mib:.2f} | {mem['window_peak'] / mib:.2f} | "
                f"{mem['comm_peak'] / mib:.2f} | {m['grads'] / mib:.2f} | {m['params'] / mib:.2f}")

    def sent(m: dict, kind: str) -> str:
        return f"{m['sent'][kind] / mib:.2f} ({m['formula'][kind] / mib:.2f})"

    head = (f"torch {torch.__version__}, {os.cpu_count()} CPUs, steps={steps} (median after 2 warm-up); bytes per "
            "rank on the fullest rank; sent = MiB handed to each collective per rank and step (formula in "
            "parentheses); grads = p.grad bytes left after a backward (the optimizer takes them)")
    lines = [head, "",
             "## DeepSpeed-engine layout (replicated parameters, owner-sharded state) vs replicated state", "",
             "| ranks | K | dtype | state MiB | masters MiB | window MiB | comm MiB | grads MiB | params MiB |"
             " replicated state MiB | reductions/step | reduce-scatter | all-gather | all-reduce KiB |"
             " step s sharded | step s replicated | sharded/replicated |",
             "|" + "---|" * 17]
    for r in rows:
        s, rep = r["sharded"], r["replicated"]
        lines.append(f"| {r['world']} | {r['k']} | {r['dtype']} | {held(s)} | {rep['memory']['state'] / mib:.2f} | "
                     f"{s['reductions']:.0f} | {sent(s, 'reduce_scatter')} | {sent(s, 'all_gather')} | "
                     f"{s['sent']['all_reduce'] / 1024:.1f} | {s['time']:.3f} | {rep['time']:.3f} | "
                     f"{s['time'] / rep['time']:.2f} |")
    lines += ["", "## FSDP2 (fully_shard per layer and root: parameters, gradients and state sharded)", "",
              "| ranks | K | dtype | state MiB | masters MiB | window MiB | comm MiB | grads MiB | params MiB |"
              " all-to-all | all-reduce KiB | step s fsdp2 | step s sharded (DeepSpeed layout) | fsdp2/sharded |",
              "|" + "---|" * 14]
    for r in rows:
        f, s = r["fsdp2"], r["sharded"]
        lines.append(f"| {r['world']} | {r['k']} | {r['dtype']} | {held(f)} | {sent(f, 'all_to_all')} | "
                     f"{f['sent']['all_reduce'] / 1024:.1f} | {f['time']:.3f} | {s['time']:.3f} | "
                     f"{f['time'] / s['time']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    steps = 4 if args.quick else 8
    configs = [(k, dtype) for dtype in ("fp32", "bf16") for k in (1, 4, 8)]
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(run, args=(world, configs, steps, d), nprocs=world, join=True)
            rows += summarize(world, [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                                      for r in range(world)], steps)
    table = markdown(rows, steps)
    name = "sharding-quick" if args.quick else "sharding"
    repro.write_results(name, "python benchmarks/sharding.py" + (" --quick" if args.quick else ""), table, rows)
    print(table)


if __name__ == "__main__":
    main()
