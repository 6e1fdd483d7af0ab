"""The prepared one-GPU check (scripts/gpu_check.sh): CUDA, an NCCL world of one, bf16 parameters.

1. The tiny Emu3 and Janus configs through the launcher's training loop (when DeepSpeed and datasets
   are importable; carry them as wheels), bf16, a few steps each.
2. A ~1B-parameter Llama-shaped model, K = 8 micro-steps of 4,096 tokens each, bf16 parameters and
   compute, for AdamW, SOAP (ML-FOP-SOAP with fop off and the same blocks, so the difference is FOP
   alone) and ML-FOP-SOAP side by side: median step time, peak allocated and reserved memory, the
   memory tool's estimate (launcher.memory) for the same run, and the loss at the first and last step
   on a synthetic Zipf-distributed token stream (whose loss falls as soon as the unigram statistics
   are learnt), checking that ML-FOP-SOAP's falls.

    python benchmarks/gpu_check.py --out runs/gpu_check            (a GPU; under 8 minutes on an H100)
    python benchmarks/gpu_check.py --device cpu --smoke --out DIR   (seconds, the CPU test of this script)

Writes <out>/gpu_check.json and <out>/gpu_check.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distopt import build_optimizer, comm  # noqa: E402
from distopt.options import MLFOPOptions  # noqa: E402
from distopt.protocols import counters_of  # noqa: E402
from launcher.memory import Activations, GiB, estimate  # noqa: E402

SIZES = {  # hidden, layers, heads, kv heads, ffn, vocab, tokens per micro-step, micro-steps, steps
    "1b": dict(hidden=2048, layers=20, heads=16, kv=8, ffn=5632, vocab=32000, tokens=4096, k=8, steps=6),
    "smoke": dict(hidden=64, layers=2, heads=4, kv=2, ffn=128, vocab=256, tokens=64, k=2, steps=4),
}
ARMS: dict[str, dict[str, Any]] = {
    "adamw": {"name": "adamw", "params": {"lr": 3e-4, "weight_decay": 0.1}},
    "soap": {"name": "mlfop_soap", "params": {"lr": 3e-3, "fop": False, "max_block": 2048, "verbose": False}},
    "mlfop_soap": {"name": "mlfop_soap", "params": {"lr": 3e-3, "max_block": 2048, "verbose": False}},
}


def init_world(device: torch.device) -> None:
    """A world of one: NCCL on a GPU, gloo on the CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def llama(size: dict, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["ffn"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv"], max_position_embeddings=size["tokens"],
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) types .to() unbound, self first


def zipf_tokens(size: dict, step: int, k: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + k)
    weights = 1.0 / torch.arange(1, size["vocab"] + 1, dtype=torch.float64)
    return torch.multinomial(weights, size["tokens"], replacement=True, generator=gen).view(1, -1).to(device)


def run_arm(name: str, size: dict, device: torch.device) -> dict:
    model = llama(size, device)
    opt = build_optimizer(ARMS[name], model.named_parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(size["steps"]):
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for k in range(size["k"]):
            ids = zipf_tokens(size, step, k, device)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / size["k"]).backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(total) / size["k"])
    row = dict(arm=name, step_s=statistics.median(times[2:]) if len(times) > 2 else times[-1],
               first_loss=losses[0], last_loss=losses[-1], steps=size["steps"], micro_steps=size["k"],
               tokens_per_micro_step=size["tokens"], params=sum(p.numel() for p in model.parameters()))
    if device.type == "cuda":
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GiB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB)
    if name != "adamw":
        options = MLFOPOptions(**ARMS[name]["params"])
        est = estimate(list(model.named_parameters()), options, 1, "deepspeed",
                       Activations(size["layers"], size["hidden"], size["vocab"], size["tokens"]),
                       micro_steps=size["k"])
        row["estimate_gib"] = est.total / GiB
        row["counters"] = {k: float(v) for k, v in counters_of(opt).items()
                           if k in ("eigh", "qr", "fop_folds", "reductions")}
    del opt, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def tiny_configs(device: torch.device, out: Path) -> list[dict]:
    """The shipped tiny configs through the launcher's loop (DeepSpeed stage 0, a world of one), bf16."""
    try:
        import datasets  # noqa: F401
        import deepspeed  # noqa: F401
    except ImportError as e:
        return [dict(config="tiny configs", skipped=f"{e.name} is not installed (carry it as a wheel)")]
    from launcher.config import load_config
    from launcher.run import train

    rows = []
    for name in ("emu3_tiny_mlfop", "janus_tiny_mlfop"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml", 1, [
            f"run.out_dir={out / name}", "checkpoint.resume=none", "schedule.steps=6", "schedule.warmup_steps=1",
            "logging.every=3", "eval.every=6", "eval.samples_png=false", "model.dtype=bfloat16",
            f"data.cache_dir={out / 'cache'}"])
        start = time.perf_counter()
        history = train(cfg)
        rows.append(dict(config=name, seconds=time.perf_counter() - start, first=history["train"][0],
                         last=history["train"][-1], diverged=history["diverged"]))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU test of this script)")
    ap.add_argument("--out", default="runs/gpu_check")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible (torch.cuda.is_available() is False); use --device cpu --smoke")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_world(device)
    size = SIZES["smoke" if args.smoke else "1b"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = dict(device=device_name, torch=torch.__version__, size=size,
                                  tiny=[] if args.smoke else tiny_configs(device, out),
                                  arms=[run_arm(name, size, device) for name in ARMS])
    mlfop = next(r for r in report["arms"] if r["arm"] == "mlfop_soap")
    report["mlfop_loss_falls"] = mlfop["last_loss"] < mlfop["first_loss"]
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    comm.destroy_process_group()
    if not report["mlfop_loss_falls"]:
        sys.exit(f"ML-FOP-SOAP's loss did not fall: {mlfop['first_loss']:.4f} -> {mlfop['last_loss']:.4f}")


def markdown(report: dict) -> str:
    size = report["size"]
    lines = [f"# GPU check on {report['device']} (torch {report['torch']})", "",
             f"Llama-shaped model, {report['arms'][0]['params'] / 1e9:.2f} B parameters in bf16, K = {size['k']} "
             f"micro-steps of {size['tokens']} tokens, {size['steps']} steps (median of steps 3+).", "",
             "| optimizer | step (s) | vs AdamW | peak allocated (GiB) | reserved (GiB) | estimate (GiB) "
             "| loss first | loss last |",
             "|---|---|---|---|---|---|---|---|"]
    base = report["arms"][0]["step_s"]
    for r in report["arms"]:
        lines.append(f"| {r['arm']} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | "
                     f"{r.get('peak_allocated_gib', float('nan')):.1f} | "
                     f"{r.get('peak_reserved_gib', float('nan')):.1f} | "
                     f"{r.get('estimate_gib', float('nan')):.1f} | {r['first_loss']:.3f} | {r['last_loss']:.3f} |")
    lines += ["", f"ML-FOP-SOAP's loss falls: {report['mlfop_loss_falls']}", ""]
    for t in report["tiny"]:
        lines.append(f"- {t['config']}: " + (t["skipped"] if "skipped" in t else
                                            f"{t['seconds']:.0f} s, losses {t['first']} -> {t['last']}"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
