"""How long a checkpoint stops training: synchronous saves against `checkpoint.async: true`, side by
side in one run, at the tiny Emu3 and at a ~100M-parameter shape, under both engines' layouts.

    python benchmarks/checkpoint_stall.py [--quick]   writes benchmarks/results/checkpoint-stall[-quick].{md,json}

One process (a gloo world of one), the launcher's own set_up / run_step / save (launcher/run.py) on
the digits data, ML-FOP-SOAP (its block state is what dominates a checkpoint), checkpoints into a
temporary directory with keep_last 1. Per shape and engine, saves alternate sync, async, sync, async
... after the same number of training steps, so machine noise hits both alike. Measured per save:

- sync: the seconds save() takes (staging nothing; torch.save, sha256 of every file, the manifest,
  the rename): the whole write stalls training.
- async: the seconds save() blocks (the staging copy, DCP's own staging for FSDP2 shards), plus the
  extra seconds of the training steps that run while the background thread writes (against the
  median step without a save in flight: on a CPU the thread competes with training for cores and
  memory bandwidth), plus whatever is left to wait at the next save (none here: steps run until it
  is done). `written after` is the background write's wall time from save() to the published step.

The stall ratio is async / sync per save, medians over the repetitions (after one uncounted save of
each kind: first-call costs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import repro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # model.overrides of the tiny Emu3 (its own vocabulary: the parameters are the decoder's)
    "tiny": {},
    "~100M": {"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 13, "num_attention_heads": 12,
              "num_key_value_heads": 12},
}
ENGINES = ("deepspeed", "fsdp2")


def build_run(shape: str, engine: str, out: Path, cache: str):
    from launcher.config import load_config
    from launcher.run import set_up

    overrides = SHAPES[shape]
    cfg = load_config(ROOT / "configs" / "emu3_tiny_mlfop.yaml", 1, [
        f"run.out_dir={out}", f"data.cache_dir={cache}", f"engine={engine}", "logging.tensorboard=false",
        "logging.progress=false", "eval.every=0", "checkpoint.every=0", "checkpoint.keep_last=1",
        "checkpoint.resume=none", "schedule.steps=1000", "batch.micro_batch_size=4", "batch.grad_accum=2",
        "model.overrides=" + "{" + ", ".join(f"{k}: {v}" for k, v in overrides.items()) + "}"])
    return set_up(cfg)


def step_seconds(run) -> float:
    from launcher.run import run_step

    t = time.perf_counter()
    run_step(run, False)
    return time.perf_counter() - t


def checkpoint_bytes(run) -> int:
    from distopt.checkpoint import complete_steps

    step = complete_steps(run.checkpoints)[-1]
    return sum(f.stat().st_size for f in (run.checkpoints / f"step-{step}").rglob("*") if f.is_file())


def measure(run, repeats: int, between: int) -> dict:
    """Alternating sync and async saves of the live run; per save the stall and the write's seconds."""
    from launcher.run import save, wait_for_saves

    baseline = [step_seconds(run) for _ in range(between)]
    for mode in (False, True):  # one save of each, not counted: first-call costs (lazy imports, thread start)
        run.cfg.checkpoint.async_ = mode
        save(run, 0)
        wait_for_saves(run)
    sync: list[float] = []
    background: list[dict[str, Any]] = []
    step = 1
    for _ in range(repeats):
        run.cfg.checkpoint.async_ = False
        t = time.perf_counter()
        save(run, step)
        sync.append(time.perf_counter() - t)
        baseline += [step_seconds(run) for _ in range(between)]
        step += 1
        run.cfg.checkpoint.async_ = True
        t = time.perf_counter()
        save(run, step)
        blocked = time.perf_counter() - t
        overlapped = []
        while run.saver.busy:
            overlapped.append(step_seconds(run))
        written = time.perf_counter() - t
        t = time.perf_counter()
        wait_for_saves(run)
        left = time.perf_counter() - t
        background.append(dict(blocked=blocked, overlapped_steps=overlapped, written=written + left, left=left))
        baseline += [step_seconds(run) for _ in range(between)]
        step += 1
    base = statistics.median(baseline)
    for b in background:
        b["interference"] = sum(s - base for s in b["overlapped_steps"])
        b["stall"] = b["blocked"] + b["interference"] + b["left"]
    def median(key):
        return statistics.median(key(b) for b in background)

    return dict(step_s=base, sync_stall_s=statistics.median(sync), async_blocked_s=median(lambda b: b["blocked"]),
                async_interference_s=median(lambda b: b["interference"]), async_stall_s=median(lambda b: b["stall"]),
                async_written_s=median(lambda b: b["written"]),
                overlapped_steps=median(lambda b: len(b["overlapped_steps"])), sync_all=sync, async_all=background,
                checkpoint_mib=checkpoint_bytes(run) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny shape only, 2 repetitions")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "distopt"), help="data cache (digits VQ, tokenizer)")
    args = ap.parse_args()
    repro.pin(1)
    repro.seed_all(0)
    from distopt import comm, deepspeed_glue

    deepspeed_glue.init_distributed()
    shapes, repeats, between = (["tiny"], 2, 2) if args.quick else (list(SHAPES), 3, 2)
    rows = []
    for shape in shapes:
        for engine in ENGINES:
            with tempfile.TemporaryDirectory(prefix="checkpoint-stall-") as out:
                run = build_run(shape, engine, Path(out), args.cache)
                params = sum(p.numel() for p in run.model.parameters())
                for _ in range(2):  # the first steps build SOAP's bases: the state a checkpoint then holds
                    step_seconds(run)
                result = measure(run, repeats, between)
                rows.append(dict(shape=shape, engine=engine, parameters=params, **result))
                print(rows[-1], file=sys.stderr)
                del run
    env = repro.environment(args.cache)
    head = (f"One process, {env['threads']} thread(s) for training, saves alternating sync / async, "
            f"{repeats} of each per row, {between} training steps between saves; medians. Stall = seconds "
            "training is held up per save (async: the blocking staging copy + the extra time of the steps "
            "that ran during the background write + any wait left). " + repro.describe(env))
    lines = [head, "", "| shape | engine | parameters | checkpoint MiB | step s | sync stall s | async blocked s | "
             "async interference s | async stall s | async / sync | background write s (steps overlapped) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['engine']} | {r['parameters'] / 1e6:.1f} M | {r['checkpoint_mib']:.0f} | "
                     f"{r['step_s']:.2f} | {r['sync_stall_s']:.3f} | {r['async_blocked_s']:.3f} | "
                     f"{r['async_interference_s']:.3f} | {r['async_stall_s']:.3f} | "
                     f"{r['async_stall_s'] / r['sync_stall_s']:.2f} | {r['async_written_s']:.2f} "
                     f"({r['overlapped_steps']:g}) |")
    table = "\n".join(lines) + "\n"
    name = "checkpoint-stall-quick" if args.quick else "checkpoint-stall"
    command = "python benchmarks/checkpoint_stall.py" + (" --quick" if args.quick else "") + (
        f" --cache {args.cache}" if args.cache != ap.get_default("cache") else "")
    repro.write_results(name, command, table, rows)
    print(table)
    comm.destroy_process_group()


if __name__ == "__main__":
    main()
