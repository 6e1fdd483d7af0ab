"""What makes the tiny Emu3 draw recognisable digits? The settings of configs/demo.yaml, one at a time.

    python benchmarks/demo_quality.py            # about 5 minutes (320 s measured, one process)

One run, one process, the same global batch as `make demo` (16 packed rows x 4 micro-steps): starting
from configs/emu3_tiny_mlfop.yaml, each variant adds one of the demo's settings (caption dropout with
guided sampling, lr 0.01, plain digits instead of augmented views; then more steps). For each trained
model, measured on held-out digits:
- the digit judge's accuracy (model_zoo/quality.py) on 20 generated images per digit, at temperature
  0.7 and guidance 1, 3, 5;
- the image NLL per code of the validation generation documents with their own caption, with an
  empty caption and with a caption naming another digit: how much of the digit the model carries.
Writes benchmarks/results/demo-quality.md and .json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from distopt.deepspeed_glue import init_distributed

ROOT = Path(__file__).resolve().parents[1]
CFG = {"data": {"caption_dropout": 0.1}}
VARIANTS: list[tuple[str, int, dict[str, Any]]] = [  # (label, steps, config updates)
    ("emu3_tiny_mlfop.yaml (augmented views, lr 0.003)", 400, {}),
    ("+ 10% of generation captions dropped", 400, CFG),
    ("+ lr 0.01", 400, {**CFG, "optimizer": {"params": {"lr": 0.01}}}),
    ("+ plain digits (augment: false), 250 steps = configs/demo.yaml", 250,
     {"data": {"caption_dropout": 0.1, "augment": False}, "optimizer": {"params": {"lr": 0.01}}}),
    ("+ plain digits, 400 steps", 400,
     {"data": {"caption_dropout": 0.1, "augment": False}, "optimizer": {"params": {"lr": 0.01}}}),
]
GUIDANCE = (1.0, 3.0, 5.0)


def train(updates: dict, steps: int, out: str) -> dict:
    from launcher.config import Config, _build, validate
    from launcher.run import train as run

    data = yaml.safe_load((ROOT / "configs" / "emu3_tiny_mlfop.yaml").read_text())
    for section, values in updates.items():
        merged = {**data.get(section, {}), **values}
        if section == "optimizer":
            merged["params"] = {**data["optimizer"]["params"], **values.get("params", {})}
        data[section] = merged
    data["data"]["cache_dir"] = str(ROOT / ".cache" / "distopt")
    data.update(run={"name": "demo-quality", "out_dir": out, "seed": 0},
                batch={"micro_batch_size": 16, "grad_accum": 4},  # one process: make demo's 2 ranks x 8 rows
                schedule={"steps": steps, "warmup_steps": 5, "lr_schedule": "cosine"},
                logging={"every": steps, "tensorboard": False, "progress": False},
                eval={"every": 0, "batches": 1, "samples_png": False}, checkpoint={"every": 0, "resume": "none"})
    return run(validate(_build(Config, data, ""), 1))


@torch.no_grad()
def measure(model_dir: str) -> dict:
    from model_zoo import build_data, build_image_tokenizer, build_model, build_vocab, layout_for
    from model_zoo.config import DataConfig, ModelConfig
    from model_zoo.data import Doc, collate
    from model_zoo.digits import caption
    from model_zoo.quality import DigitJudge, generate_digits

    m, d = ModelConfig(family="emu3", pretrained=model_dir), DataConfig(cache_dir=str(ROOT / ".cache" / "distopt"))
    vocab = build_vocab(d, m)
    model = build_model(m, vocab).eval()
    images = build_image_tokenizer(d, m, model)
    layout = layout_for(m, vocab, images.grid, model)
    data = build_data(d, layout, images, micro_batch_size=8, grad_accum=2)
    assert data.digits is not None  # data.source: digits
    judge = DigitJudge(*data.digits, images)
    out = {"judge_ceiling": judge.ceiling}
    for g in GUIDANCE:
        pictures, digits = generate_digits(model, layout, images, 20, temperature=0.7, guidance=g)
        out[f"accuracy_g{g:g}"] = judge.accuracy(pictures, digits)
    val = data.digits[1]
    codes = images.encode(torch.tensor(val["image"]).reshape(-1, 1, 8, 8)).tolist()

    def nll(caption_of) -> float:
        docs = [Doc(*layout.document("generation", caption_of(d, i), c, True))
                for i, (d, c) in enumerate(zip(val["digit"], codes, strict=True))]
        outs = [model(collate([docs[i:i + 2]], 64, vocab.pad, "generation")) for i in range(0, len(docs), 2)]
        return sum(float(o["image_loss"]) * int(o["n_image"]) for o in outs) / sum(int(o["n_image"]) for o in outs)

    out["nll_own_caption"] = nll(lambda d, i: vocab.text(caption(d, 5000 + i)))
    out["nll_empty_caption"] = nll(lambda d, i: [])
    out["nll_other_digit"] = nll(lambda d, i: vocab.text(caption((d + 3) % 10, 5000 + i)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    init_distributed()
    t0, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for label, steps, updates in VARIANTS:
            start = time.perf_counter()
            history = train(updates, steps, f"{tmp}/run")
            rows.append({"variant": label, "steps": steps, "train_seconds": time.perf_counter() - start,
                         "final_train_loss": history["train"][-1], **measure(f"{tmp}/run/model")})
            print(json.dumps(rows[-1]), flush=True)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo-quality.json").write_text(json.dumps({"command": "python benchmarks/demo_quality.py",
                                                       "seconds": seconds, "rows": rows}, indent=1))
    lines = ["# What makes the tiny Emu3 draw recognisable digits", "",
             f"`python benchmarks/demo_quality.py` ({seconds:.0f} s, one process, 2-core CPU machine). Generated-digit "
             f"accuracy of the digit judge on 20 images per digit at temperature 0.7 (ceiling "
             f"{rows[0]['judge_ceiling']:.3f}, chance 0.100), and the image NLL per code of the held-out digits "
             "with their own caption, an empty one, and one naming another digit.", "",
             "| variant | steps | guidance 1 | guidance 3 | guidance 5 | NLL own | NLL empty | NLL other digit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps']} | "
                     + " | ".join(f"{r[f'accuracy_g{g:g}']:.3f}" for g in GUIDANCE)
                     + f" | {r['nll_own_caption']:.3f} | {r['nll_empty_caption']:.3f} | {r['nll_other_digit']:.3f} |")
    (out / "demo-quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
