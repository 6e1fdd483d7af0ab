"""Does Pareto-LoRA-style gradient integration improve image quality over vanilla LoRA at CPU scale?

    python benchmarks/pareto_lora.py --quick      # about 8 minutes on 2 cores
    python benchmarks/pareto_lora.py              # longer pretraining and tuning, more seeds
    python benchmarks/pareto_lora.py --quick --pretrained runs/x/model   # reuse a pretrained model

Reproducible (benchmarks/repro.py): the same command on the same code writes the same table (only the
seconds differ): fixed threads (--threads), deterministic kernels, every generator seeded, and the
versions, commit and the cached tokenizer's and codebook's content hashes printed with it.

One run, one process: pretrain the tiny Emu3 model on captioned digits (configs/emu3_tiny_adamw.yaml,
plain captions), then LoRA-tune it (configs/emu3_tiny_lora.yaml: rank 8 on every decoder linear) on the
instruct format (new instructions and answers, loss on the response only) with each gradient rule over
AdamW, several seeds each (LoRA initialisation and batch order; the data split and VQ codebook stay fixed):
sum (vanilla LoRA), PCGrad, MGDA, Pareto-LoRA-style (all per LoRA layer), and ML-FOP-SOAP with its modality
pair source (SOAP's base, so it differs in more than the rule). Measured on held-out digits:
- image quality: image-token NLL of the held-out pairs, and the digit judge's accuracy on images generated
  from instructions (model_zoo/quality.py; its ceiling is its accuracy on VQ reconstructions);
- text quality: answer NLL and answer-token accuracy;
- the motivation: per LoRA layer, |g_text| / |g_image| and their cosine, averaged over the tuning steps
  of vanilla LoRA.
Writes benchmarks/results/pareto-lora[-quick].md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import yaml

import repro

ROOT = Path(__file__).resolve().parents[1]
ADAMW = dict(base="adamw", lr=3e-3, weight_decay=0.0, betas=[0.9, 0.95])
RULES = {
    "sum (vanilla LoRA)": ("sum", ADAMW),
    "PCGrad": ("pcgrad", ADAMW),
    "MGDA": ("mgda", ADAMW),
    "Pareto-LoRA-style": ("pareto_lora", ADAMW),
    "ML-FOP-SOAP, modality pairs": ("mlfop_soap", dict(lr=3e-3, pair_source="modality", precondition_frequency=10,
                                                       verbose=False)),
}
METRICS = [("val/generated_digit_accuracy", "generated-digit accuracy", True),
           ("val/image_loss", "image NLL", False), ("val/text_loss", "answer NLL", False),
           ("val/caption_accuracy", "answer-token accuracy", True)]


def train(config: str, updates: dict, cache: str) -> dict:
    from launcher.config import Config, _build, validate
    from launcher.run import train as run

    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    for section, values in updates.items():
        data[section] = {**data.get(section, {}), **values}
    data["data"]["cache_dir"] = cache
    repro.seed_all(data["run"]["seed"])
    return run(validate(_build(Config, data, ""), 1))


def untuned(path: str, per_digit: int, cache: str) -> dict[str, dict[str, float]]:
    """The pretrained model before tuning, on the validation digits, in both text formats."""
    from launcher.metrics import evaluate
    from model_zoo import build_data, build_image_tokenizer, build_model, build_vocab, layout_for
    from model_zoo.config import DataConfig, ModelConfig
    from model_zoo.quality import DigitJudge, generate_digits

    m = ModelConfig(family="emu3", pretrained=path)
    out = {}
    for text_format in ("plain", "instruct"):
        d = DataConfig(cache_dir=cache, text_format=text_format)
        vocab = build_vocab(d, m)
        model = build_model(m, vocab)
        images = build_image_tokenizer(d, m, model)
        layout = layout_for(m, vocab, images.grid, model)
        data = build_data(d, layout, images, micro_batch_size=8, grad_accum=2, eval_batches=8)
        out[text_format] = evaluate(model, data.validation)
        pictures, digits = generate_digits(model, layout, images, per_digit, text_format)
        assert data.digits is not None  # data.source: digits
        out[text_format]["val/generated_digit_accuracy"] = DigitJudge(*data.digits, images).accuracy(pictures, digits)
    return out


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--pretrained", help="an exported <out_dir>/model of emu3_tiny_adamw.yaml to start from")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (part of what the table depends on)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "distopt"), help="VQ codebook and tokenizer cache")
    args = ap.parse_args()
    repro.pin(args.threads)
    pre_steps, steps, seeds, per_digit = (1000, 200, [0, 1, 2], 30) if args.quick else (3000, 400, [0, 1, 2, 3, 4], 50)
    from distopt.deepspeed_glue import init_distributed

    init_distributed()
    env = repro.environment(args.cache)
    print(repro.describe(env), flush=True)
    t0 = time.perf_counter()
    quiet = dict(tensorboard=False, progress=False)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.pretrained
        if base is None:
            train("emu3_tiny_adamw.yaml", dict(
                run=dict(out_dir=f"{tmp}/pretrain"), schedule=dict(steps=pre_steps, warmup_steps=5),
                logging=dict(every=pre_steps, **quiet), eval=dict(every=0, samples_png=False),
                checkpoint=dict(every=0, resume="none")), args.cache)
            base = f"{tmp}/pretrain/model"
        before = untuned(base, per_digit, args.cache)
        for label, (name, params) in RULES.items():
            results[label] = [train("emu3_tiny_lora.yaml", dict(
                run=dict(out_dir=f"{tmp}/lora", seed=seed), model=dict(pretrained=base),
                optimizer=dict(name=name, params=params), schedule=dict(steps=steps, warmup_steps=2),
                logging=dict(every=1, **quiet),
                eval=dict(every=steps, batches=8, samples_png=False, generated_digits=per_digit),
                checkpoint=dict(every=0, resume="none")), args.cache) for seed in seeds]
            print(f"{label}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    report = render(before, results, args, pre_steps, steps, seeds, per_digit, time.perf_counter() - t0, env)
    out = Path(args.out) / f"pareto-lora{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


def render(before, results, args, pre_steps, steps, seeds, per_digit, seconds, env) -> str:
    command = "python benchmarks/pareto_lora.py" + (" --quick" if args.quick else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    base = f"pretraining {pre_steps} steps (plain captions, AdamW, batch 64)"
    if args.pretrained:
        command += f" --pretrained {args.pretrained}"
        base = f"the pretrained model {args.pretrained}"
    ceiling = results["sum (vanilla LoRA)"][0]["judge_ceiling"]
    lines = ["# Pareto LoRA at CPU scale\n",
             f"`{command}` ({seconds:.0f} s, 2 cores): {base}, then LoRA r=8 on every decoder linear, "
             f"{steps} steps on the instruct format, seeds {seeds}; {10 * per_digit} generated images per evaluation. "
             "Mean ± sd over seeds.\n",
             repro.describe(env) + "\n",
             f"Digit judge ceiling (its accuracy on VQ reconstructions of held-out digits): {ceiling:.3f}; "
             "chance 0.100.\n",
             "| rule | " + " | ".join(m[1] for m in METRICS) + " | accuracy vs vanilla |",
             "|---" * (len(METRICS) + 2) + "|"]
    for text_format, values in before.items():
        lines.append(f"| before tuning, {text_format} format | " + " | ".join(f"{values[k]:.3f}" for k, _, _ in METRICS)
                     + " | |")
    vanilla = statistics.mean(h["val"][-1]["val/generated_digit_accuracy"] for h in results["sum (vanilla LoRA)"])
    for label, runs in results.items():
        cells = [mean_sd([h["val"][-1][key] for h in runs]) for key, _, _ in METRICS]
        acc = statistics.mean(h["val"][-1]["val/generated_digit_accuracy"] for h in runs)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * (acc - vanilla) / max(vanilla, 1e-9):+.1f}% |")
    steps_logged = [g for h in results["sum (vanilla LoRA)"] for g in h["grad"]]
    ratios, cosines = ({k.split("/", 2)[2]: statistics.mean(g[k] for g in steps_logged)
                        for k in steps_logged[0] if k.startswith(f"layer_grad/{kind}/")}
                       for kind in ("norm_ratio", "cosine"))
    lines += ["", f"Per LoRA layer, mean over the {len(steps_logged)} tuning steps of vanilla LoRA (all seeds): "
              f"|g_text| / |g_image| from {min(ratios.values()):.2f} to {max(ratios.values()):.2f} "
              f"(median {statistics.median(ratios.values()):.2f}), cosine from {min(cosines.values()):.3f} "
              f"to {max(cosines.values()):.3f}.", "",
              "| LoRA layer | norm ratio text/image | cosine |", "|---|---|---|"]
    lines += [f"| {layer.replace('hf.model.text_model.', '')} | {ratio:.2f} | {cosines[layer]:.3f} |"
              for layer, ratio in ratios.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
