"""Do the ML-FOP-SOAP paper's claims hold at CPU scale? AdamW, SOAP, ML-FOP-SOAP and its ablations
on the tiny Emu3-style model (configs/emu3_tiny_*.yaml), one process, in one run.

    python benchmarks/convergence.py --quick      # < 10 minutes on 2 cores
    python benchmarks/convergence.py              # more steps, batch sizes, learning rates and seeds

For every optimizer and global batch size (micro-batch of about 16 documents in 8 packed rows, x K
accumulation steps; training batches are fresh augmented views of the 1,617 training digits, so a
large batch is not the data set):
1. a learning-rate sweep (seed 0): the width of the converging range (runs that neither diverge
   nor fail to reach 0.8 x their first loss) is the stability measure;
2. the best learning rate (lowest final validation loss, both modalities) rerun with several seeds;
3. steps and seconds to reach a target validation loss per modality (the target: AdamW's final
   validation loss at that batch size, so "steps to target" reads as sample efficiency against AdamW),
   final losses (mean and spread over seeds), divergence, and the text-vs-image gradient cosine.
Writes benchmarks/results/convergence[-quick].md and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "emu3_tiny_mlfop.yaml"
MLFOP = dict(weight_decay=0.01, precondition_frequency=10, verbose=False)
VARIANTS = {
    "AdamW": ("adamw", dict(weight_decay=0.01, betas=[0.9, 0.95])),
    "SOAP": ("soap", dict(weight_decay=0.01, precondition_frequency=10, verbose=False)),
    "ML-FOP-SOAP": ("mlfop_soap", MLFOP),
    "FOP off": ("mlfop_soap", {**MLFOP, "fop": False}),
    "level head": ("mlfop_soap", {**MLFOP, "level": "head", "head_splits": {"*q_proj.weight": [4, 0],
                                                                            "*k_proj.weight": [2, 0],
                                                                            "*v_proj.weight": [2, 0],
                                                                            "*o_proj.weight": [4, 1]}}),
    "level global": ("mlfop_soap", {**MLFOP, "level": "global"}),
    "pair modality (one fold)": ("mlfop_soap", {**MLFOP, "pair_source": "modality"}),
    "tree folds": ("mlfop_soap", {**MLFOP, "fold_schedule": "tree"}),
    "eta sum": ("mlfop_soap", {**MLFOP, "eta_convention": "sum"}),
}
MAIN = ("AdamW", "SOAP", "ML-FOP-SOAP")


def run(variant: str, lr: float, k: int, seed: int, steps: int, out: Path) -> dict:
    from launcher.config import _build, Config, validate
    from launcher.run import train

    name, params = VARIANTS[variant]
    data = yaml.safe_load(CONFIG.read_text())
    data.update(run={"name": variant, "out_dir": str(out), "seed": seed},
                optimizer={"name": name, "params": {**copy.deepcopy(params), "lr": lr}, "max_grad_norm": 1.0},
                schedule={"steps": steps, "warmup_steps": 2, "lr_schedule": "cosine"},
                logging={"every": 5, "tensorboard": False, "progress": False},
                eval={"every": 5, "batches": 2, "samples_png": False},
                checkpoint={"every": 0, "resume": "none"})
    data["batch"] = {"micro_batch_size": 8, "grad_accum": k}  # 8 rows of 64 packed tokens: about 16 documents
    data["data"]["cache_dir"] = str(ROOT / ".cache" / "distopt")
    return train(validate(_build(Config, data, ""), 1))


def final_val(h: dict) -> float:
    if h["diverged"] or not h["val"]:
        return math.inf
    last = h["val"][-1]
    return (last["val/text_loss"] + last["val/image_loss"]) / 2


def converged(h: dict) -> bool:
    first = h["train"][0]
    return not h["diverged"] and (h["train"][-1]["text"] + h["train"][-1]["image"]) < 0.8 * (first["text"] + first["image"])


def to_target(h: dict, key: str, target: float) -> tuple[float, float]:
    for v in h["val"]:
        if v[key] <= target:
            return v["step"] + 1, v["seconds"]
    return math.nan, math.nan


def fmt(values: list[float]) -> str:
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return "–"
    if len(good) == 1:
        return f"{good[0]:.3f}"
    return f"{statistics.mean(good):.3f} ± {statistics.stdev(good):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.quick:
        steps, ks, lrs, seeds = 30, [2, 8], [1e-3, 3e-3, 1e-2, 3e-2], [0, 1]
    else:
        steps, ks, lrs, seeds = 80, [2, 8, 32], [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], [0, 1, 2]
    ablation_k = ks[-1]
    from launcher.run import init_distributed

    init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    t0 = time.perf_counter()
    sweeps: dict = {}
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            for variant in MAIN:
                sweeps[variant, k] = {lr: run(variant, lr, k, 0, steps, Path(tmp) / "r") for lr in lrs}
                lr = min(lrs, key=lambda x: final_val(sweeps[variant, k][x]))
                best[variant, k] = (lr, [sweeps[variant, k][lr]] + [run(variant, lr, k, s, steps, Path(tmp) / "r")
                                                                    for s in seeds[1:]])
        lr_ablation = best["ML-FOP-SOAP", ablation_k][0]
        ablations = {v: [run(v, lr_ablation, ablation_k, s, steps, Path(tmp) / "r") for s in seeds]
                     for v in VARIANTS if v not in MAIN}
    lines = [f"# Convergence at CPU scale{' (quick)' if args.quick else ''}", "",
             f"Command: `python benchmarks/convergence.py{' --quick' if args.quick else ''}` "
             f"({time.perf_counter() - t0:.0f} s). Tiny Emu3-style model on digits, {steps} steps, cosine LR, "
             f"micro-batch of about 16 documents (8 packed rows), learning rates {lrs}, seeds {seeds}; "
             "targets = AdamW's final validation loss per modality at the same batch. Mean ± standard deviation "
             "over seeds.", "",
             "| optimizer | batch | best lr | converging lrs | diverged | final val text | final val image | "
             "steps to text target | steps to image target | s to image target | text-image grad cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    steps_to = {}
    for k in ks:
        targets = {key: statistics.mean(h["val"][-1][key] for h in best["AdamW", k][1] if not h["diverged"])
                   for key in ("val/text_loss", "val/image_loss")}
        for variant in MAIN:
            lr, hs = best[variant, k]
            text_steps = [to_target(h, "val/text_loss", targets["val/text_loss"])[0] for h in hs]
            image = [to_target(h, "val/image_loss", targets["val/image_loss"]) for h in hs]
            steps_to[variant, k] = statistics.mean([s for s, _ in image]) if all(
                math.isfinite(s) for s, _ in image) else math.nan
            cos = [statistics.mean(g["grad/cosine"] for g in h["grad"] if "grad/cosine" in g)
                   for h in hs if h["grad"]]
            width = sum(converged(h) for h in sweeps[variant, k].values())
            lines.append(
                f"| {variant} | {16 * k} | {lr:g} | {width}/{len(lrs)} | "
                f"{sum(h['diverged'] for h in sweeps[variant, k].values())} | "
                f"{fmt([h['val'][-1]['val/text_loss'] for h in hs])} | {fmt([h['val'][-1]['val/image_loss'] for h in hs])} | "
                f"{fmt(text_steps)} | {fmt([s for s, _ in image])} | {fmt([t for _, t in image])} | {fmt(cos)} |")
    lines += ["", f"## Ablations (batch {16 * ablation_k}, lr {lr_ablation:g}, ML-FOP-SOAP's best)", "",
              "| variant | final val text | final val image | diverged |", "|---|---|---|---|"]
    for variant, hs in [("ML-FOP-SOAP", best["ML-FOP-SOAP", ablation_k][1])] + list(ablations.items()):
        lines.append(f"| {variant} | {fmt([h['val'][-1]['val/text_loss'] for h in hs if h['val']])} | "
                     f"{fmt([h['val'][-1]['val/image_loss'] for h in hs if h['val']])} | "
                     f"{sum(h['diverged'] for h in hs)} |")
    (out / f"convergence{suffix}.md").write_text("\n".join(lines) + "\n")
    plot(out, suffix, best, ks, steps_to)
    print("\n".join(lines))


def plot(out: Path, suffix: str, best: dict, ks: list[int], steps_to: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = ks[-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for variant in MAIN:
        h = best[variant, k][1][0]
        for ax, key in zip(axes[:2], ("text", "image")):
            ax.plot([r["step"] + 1 for r in h["train"]], [r[key] for r in h["train"]], label=variant)
            ax.set_title(f"train {key} loss, batch {16 * k}")
        axes[2].plot([g["step"] + 1 for g in h["grad"]], [g.get("grad/cosine", math.nan) for g in h["grad"]],
                     label=variant)
    axes[2].set_title("text-vs-image gradient cosine")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"convergence-curves{suffix}.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for variant in MAIN:
        ax.plot([16 * k for k in ks], [steps_to[variant, k] for k in ks], marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel("steps to AdamW's final image val loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"convergence-steps{suffix}.png")


if __name__ == "__main__":
    main()
