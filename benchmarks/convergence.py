"""Does FOP make SOAP better? AdamW, SOAP, the ML-FOP-SOAP variants, the fixed-modality-weight control
and GradNorm on the tiny Emu3-style and Janus-style models (configs/*_tiny_mlfop.yaml), one process.

    python benchmarks/convergence.py --smoke       # seconds: every arm, tiny shapes, 2 steps (the test's mode)
    python benchmarks/convergence.py --quick       # minutes: a coarse look, one model family
    python benchmarks/convergence.py               # hours, resolves a 10% effect; run it in the background
    python benchmarks/convergence.py --estimate    # the full mode's runtime, from short measured runs
    python benchmarks/convergence.py --mode noise  # hours: global batch 128 as 4 x 32, 16 x 8, 64 x 2 (K x micro)
    python benchmarks/convergence.py --mode noclip # hours: no clipping at 16 x 8, where does each arm stop converging
    python benchmarks/convergence.py --mode damping  # hours: fop_damping of the modality pair at 16 x 8

Method, per arm and global batch size (micro-batch of about 16 documents in 8 packed rows, x K
accumulation steps; training batches are fresh augmented views of the 1,617 training digits, so a
large batch is not the data set):
1. its own learning-rate sweep on a sqrt(2) grid (seed 0, the sweep family): the initial points, then
   one more point beyond an edge while the best lr is at that edge (bracketing), then points above
   while every lr above the best still converges (the stability edge: where the method stops
   converging), up to a cap. A run converges when it does not diverge and its last training loss is
   below 0.8 x its first;
2. the best lr (lowest final validation loss, both modalities) rerun with more seeds, on every model
   family (the sweep's own seed-0 run is reused);
3. per modality: steps to a target validation loss (AdamW's mean final loss at that family and batch,
   so "steps to target" reads as sample efficiency against AdamW) with a 95% Student-t interval over
   seeds, final losses with their 95% intervals, the lr at which the method stops converging and the
   width of its converging lr range (max/min converging lr).
Arms are rows of ARMS; an ML-FOP-SOAP variant is one dict of optimizer options in MLFOP_VARIANTS.
A mode (MODES) fixes the protocol's sizes, its arms, the batch layouts (K x micro-batch), clipping and
the convergence criterion; `reuse` takes another mode's stored runs of identical settings (the
damping sweep's lambda = 0.1 at 16 x 8 is the noise axis' run). The tables add wall-clock: the CPU
seconds of one thread in the training steps, medians over seeds, and the time to the image target.

Every finished run is appended to benchmarks/results/convergence[-mode].json at once (atomic write)
and the markdown and plots are rewritten from it, so a killed run resumes where it stopped: rerun the
same command (runs already in the JSON are skipped; the JSON refuses other settings). Processes that share
one --out split the work by --arm and --batch (each takes its share; the JSON holds the union), e.g.
    nohup python benchmarks/convergence.py --batch 2 &
    nohup python benchmarks/convergence.py --batch 16 --arm AdamW --arm SOAP &
Reproducible (benchmarks/repro.py): fixed threads, deterministic kernels, seeds, versions in the output.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

import repro

ROOT = Path(__file__).resolve().parents[1]
SQRT2 = 2 ** 0.5
SOAP_PARAMS = dict(weight_decay=0.01, precondition_frequency=10, verbose=False)
# name -> ML-FOP-SOAP options on top of SOAP's (add a variant here by name; docs/algorithm.md lists the options)
# (the readings the fidelity review and the last benchmark singled out; docs/algorithm.md 4a gives each).
# Each names its fop_damping: the default became 0.1 on this benchmark's result, and the stored runs
# (keyed by arm name) ran with the values written here.
MLFOP_VARIANTS: dict[str, dict] = {
    "ML-FOP-SOAP": {"fop_damping": 0.0},
    "ML-FOP-SOAP, modality pair": {"pair_source": "modality", "fop_damping": 0.0},
    "ML-FOP-SOAP, modality pair, damping 0.1": {"pair_source": "modality", "fop_damping": 0.1},
    "ML-FOP-SOAP, modality pair, plain v, damping 0.1": {"pair_source": "modality", "second_moment": "plain",
                                                          "fop_damping": 0.1},
    "ML-FOP-SOAP, modality pair, update coupling": {"pair_source": "modality", "coupling": "update",
                                                     "eta_convention": "none", "fop_gamma": 1.0, "fop_damping": 0.0},
    # the library's default (microstep pairs, damping 0.1), and the damping sweep of the modality pair
    "ML-FOP-SOAP, damping 0.1": {"fop_damping": 0.1},
    **{f"ML-FOP-SOAP, modality pair, damping {lam:g}": {"pair_source": "modality", "fop_damping": lam}
       for lam in (0.01, 0.03, 0.3, 1.0)},
}
FULL_ARMS = ("AdamW", "SOAP", "ML-FOP-SOAP", "ML-FOP-SOAP, modality pair", "ML-FOP-SOAP, modality pair, damping 0.1",
             "ML-FOP-SOAP, modality pair, plain v, damping 0.1", "ML-FOP-SOAP, modality pair, update coupling",
             "sum, weights [0.5, 1] (SOAP)", "GradNorm (SOAP)")
NOISE_ARMS = ("AdamW", "SOAP", "ML-FOP-SOAP, damping 0.1", "ML-FOP-SOAP, modality pair, damping 0.1")
DAMPING_ARMS = tuple(f"ML-FOP-SOAP, modality pair, damping {lam:g}" for lam in (0.01, 0.03, 0.1, 0.3, 1.0))
ARMS: dict[str, tuple[str, dict]] = {
    "AdamW": ("adamw", dict(weight_decay=0.01, betas=[0.9, 0.95])),
    "SOAP": ("soap", SOAP_PARAMS),
    **{name: ("mlfop_soap", {**SOAP_PARAMS, **options}) for name, options in MLFOP_VARIANTS.items()},
    # FOP against plain reweighting: the weaker modality (image) up-weighted by a constant
    "sum, weights [0.5, 1] (SOAP)": ("sum", dict(base="soap", modality_weights=[0.5, 1.0], **SOAP_PARAMS)),
    "GradNorm (SOAP)": ("gradnorm", dict(base="soap", granularity="global", **SOAP_PARAMS)),
}


@dataclass(frozen=True)
class Mode:
    steps: int
    warmup: int
    micro: int
    ks: tuple[int, ...]              # grad_accum of each global batch size
    lr_center: float
    points: int                      # initial sweep points, sqrt(2) apart around lr_center
    max_points: int                  # cap on sweep points per arm and batch (bracketing + stability edge)
    seeds: int
    families: tuple[str, ...]        # the first is the sweep family
    eval_every: int
    eval_batches: int
    arms: tuple[str, ...]            # rows of ARMS
    overrides: dict = field(default_factory=dict)  # model shape
    micros: tuple[int, ...] = ()     # micro-batch per K, in the order of ks (empty: `micro` for every K)
    max_grad_norm: Optional[float] = 1.0   # clipping of every arm (None: none)
    converge_ratio: float = 0.8      # a run converges when its last training loss < this x its first
    reuse: tuple[str, ...] = ()      # modes whose stored runs of identical settings are taken, not rerun

    @property
    def arm_names(self) -> list[str]:
        return list(self.arms)

    def micro_of(self, k: int) -> int:
        return self.micros[self.ks.index(k)] if self.micros else self.micro

    def label(self, k: int) -> str:
        """A batch as the tables name it: the global batch, or K x micro when every K has the same one."""
        return f"{k}×{self.micro_of(k)}" if self.micros else str(self.micro * k)

    def run_settings(self, k: int) -> dict:
        """What one run at K depends on besides (family, arm, lr, seed): equal settings, equal runs."""
        return dict(steps=self.steps, warmup=self.warmup, micro=self.micro_of(k), k=k, eval_every=self.eval_every,
                    eval_batches=self.eval_batches, overrides=dict(self.overrides), max_grad_norm=self.max_grad_norm)


MODES = {
    # one arm per kind of optimizer (the other ML-FOP-SOAP variants differ only in options, which the
    # test builds without training); the sweep's decisions are tested on their own
    "smoke": Mode(steps=2, warmup=1, micro=4, ks=(2, 4), lr_center=1e-2, points=1, max_points=1, seeds=1,
                  families=("emu3", "janus"), eval_every=1, eval_batches=1,
                  overrides=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1),
                  arms=("AdamW", "SOAP", "ML-FOP-SOAP", "sum, weights [0.5, 1] (SOAP)", "GradNorm (SOAP)")),
    "quick": Mode(steps=40, warmup=3, micro=8, ks=(2, 8), lr_center=1e-2, points=3, max_points=4, seeds=2,
                  families=("emu3",), eval_every=5, eval_batches=4, arms=FULL_ARMS),
    "full": Mode(steps=300, warmup=10, micro=8, ks=(2, 16), lr_center=1e-2, points=5, max_points=10, seeds=5,
                 families=("emu3", "janus"), eval_every=5, eval_batches=8, arms=FULL_ARMS),
    # FOP where its signal should be strongest: global batch 128 as K x micro-batch, noisier as K grows
    "noise": Mode(steps=300, warmup=10, micro=8, ks=(4, 16, 64), micros=(32, 8, 2), lr_center=1e-2, points=4,
                  max_points=6, seeds=5, families=("emu3", "janus"), eval_every=5, eval_batches=8, arms=NOISE_ARMS),
    # no clipping at 16 x 8: where does each arm stop converging (ends above its initial loss)?
    # (trimmed to the sweep: seed 0 only, the question being the converging lr range)
    "noclip": Mode(steps=300, warmup=10, micro=8, ks=(16,), micros=(8,), lr_center=1e-2, points=4, max_points=9,
                   seeds=1, families=("emu3",), eval_every=5, eval_batches=8, max_grad_norm=None, converge_ratio=1.0,
                   arms=NOISE_ARMS + ("ML-FOP-SOAP", "ML-FOP-SOAP, modality pair")),
    # fop_damping of the modality pair at 16 x 8, each lambda at its own best lr
    "damping": Mode(steps=300, warmup=10, micro=8, ks=(16,), micros=(8,), lr_center=1e-2, points=4, max_points=7,
                    seeds=3, families=("emu3", "janus"), eval_every=5, eval_batches=8, arms=DAMPING_ARMS,
                    reuse=("noise",)),
}


# -- the sweep ---------------------------------------------------------------------------------------

def lr_at(center: float, index: int) -> float:
    """The sqrt(2) grid: center * 2^(index/2), rounded so that JSON keys are stable."""
    return float(f"{center * SQRT2 ** index:.4g}")


def grid_index(mode: Mode, lr: float) -> int:
    return round(2 * math.log2(lr / mode.lr_center))


def initial_indices(points: int) -> list[int]:
    """`points` grid indices centred on 0 (an even count leans low)."""
    return list(range(-(points // 2), points - points // 2))


def next_index(tried: dict[int, tuple[float, bool]], max_points: int) -> Optional[int]:
    """The next sweep point after the initial ones, from {grid index: (final val loss, converged)}
    (inf for a diverged run): bracket the best (one step past an edge that holds the best), then find
    the stability edge (one step above the highest while every lr above the best converges). None when
    both are settled or the cap is reached."""
    if len(tried) >= max_points:
        return None
    best = min(tried, key=lambda i: (tried[i][0], i))
    if best == min(tried):
        return best - 1
    if best == max(tried):
        return best + 1
    if all(tried[i][1] for i in tried if i > best):
        return max(tried) + 1
    return None


def converging_range(tried: dict[int, tuple[float, bool]]) -> tuple[Optional[int], Optional[int]]:
    """(lowest, highest) index of the contiguous converging run of grid points around the best."""
    best = min(tried, key=lambda i: (tried[i][0], i))
    if not tried[best][1]:
        return None, None
    lo = hi = best
    while lo - 1 in tried and tried[lo - 1][1]:
        lo -= 1
    while hi + 1 in tried and tried[hi + 1][1]:
        hi += 1
    return lo, hi


# -- statistics --------------------------------------------------------------------------------------

def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval); half-width NaN for one value."""
    from scipy.stats import t

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], digits: int = 3) -> str:
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return "–"
    mean, half = interval(good)
    text = f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")
    return text if len(good) == len(values) else f"{text} ({len(good)}/{len(values)})"


def final_val(run: dict) -> float:
    if run.get("failed") or run["diverged"] or not run["val"]:
        return math.inf
    return (run["val"][-1][1] + run["val"][-1][2]) / 2


def steps_to(run: dict, column: int, target: float) -> float:
    """First evaluated step (1-based) whose loss is <= target; NaN if never."""
    for row in run["val"]:
        if row[column] <= target:
            return row[0] + 1
    return math.nan


def time_to(run: dict, column: int, target: float) -> float:
    """CPU seconds of training (evaluations apart) up to the first evaluation whose loss is <= target;
    NaN if never, or for a run stored before this was recorded."""
    for row, cpu in zip(run["val"], run.get("val_train_cpu") or [], strict=False):  # older runs: no CPU times
        if row[column] <= target:
            return math.nan if cpu is None else cpu
    return math.nan


def median(values: list[float]) -> float:
    good = [v for v in values if math.isfinite(v)]
    return statistics.median(good) if good else math.nan


def fmt_median(values: list[float], digits: int = 1) -> str:
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return "–"
    text = f"{statistics.median(good):.{digits}f}"
    return text if len(good) == len(values) else f"{text} ({len(good)}/{len(values)})"


# -- runs --------------------------------------------------------------------------------------------

def key(family: str, arm: str, k: int, lr: float, seed: int) -> str:
    return f"{family}|{arm}|K{k}|lr{lr:g}|seed{seed}"


def run_config(mode: Mode, family: str, arm: str, k: int, lr: float, seed: int, cache: str, out_dir: str):
    """The launcher config of one run (validated)."""
    from launcher.config import Config, _build, validate

    name, params = ARMS[arm]
    data = yaml.safe_load((ROOT / "configs" / f"{family}_tiny_mlfop.yaml").read_text())
    data.update(run={"name": arm, "out_dir": out_dir, "seed": seed},
                optimizer={"name": name, "params": {**copy.deepcopy(params), "lr": lr},
                           "max_grad_norm": mode.max_grad_norm},
                schedule={"steps": mode.steps, "warmup_steps": mode.warmup, "lr_schedule": "cosine"},
                logging={"every": mode.eval_every or mode.steps, "tensorboard": False, "progress": False},
                eval={"every": mode.eval_every, "batches": mode.eval_batches, "samples_png": False},
                checkpoint={"every": 0, "resume": "none"},
                batch={"micro_batch_size": mode.micro_of(k), "grad_accum": k})
    data["model"]["overrides"] = dict(mode.overrides)
    data["data"]["cache_dir"] = cache
    return validate(_build(Config, data, ""), 1)


def train_run(mode: Mode, family: str, arm: str, k: int, lr: float, seed: int, cache: str, out_dir: str) -> dict:
    """One training run through the launcher; its history reduced to what the tables need."""
    from launcher.run import train

    cfg = run_config(mode, family, arm, k, lr, seed, cache, out_dir)
    repro.seed_all(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    h = train(cfg)
    cosines = [g["grad/cosine"] for g in h["grad"] if "grad/cosine" in g]
    train_cpu = {t["step"]: t["train_cpu_seconds"] for t in h["train"]}
    return {"diverged": h["diverged"], "failed": None,
            "val": [[v["step"], v["val/text_loss"], v["val/image_loss"]] for v in h["val"]],
            # CPU seconds of the training steps up to each evaluation (evaluations apart): time to target
            "val_train_cpu": [train_cpu.get(v["step"]) for v in h["val"]],
            "step_cpu_seconds": h["train"][-1]["train_cpu_seconds"] / len(h["train"]) if h["train"] else None,
            "train_first": [h["train"][0].get("text"), h["train"][0].get("image")],
            "train_last": [h["train"][-1].get("text"), h["train"][-1].get("image")],
            "grad_cosine": statistics.mean(cosines) if cosines else None,
            **fop_means(h),
            "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def fop_means(h: dict) -> dict:
    """FOP's size (docs/algorithm.md 4a.3) averaged over the logged steps, None for arms without FOP:
    a run whose correction and x are ~0 cannot show an effect of FOP."""
    out = {}
    for kind in ("correction", "cosine_sq", "eta", "beta_abs"):
        rows = [f[f"{kind}_mean"] for f in h["fop"] if f"{kind}_mean" in f]
        out[f"fop_{kind}"] = statistics.mean(rows) if rows else None
    return out


def _number(x) -> float:
    return math.nan if x is None else x


def converged(run: dict, ratio: float = 0.8) -> bool:
    """Not diverged, and the last training loss (both modalities) below `ratio` x the first."""
    if run.get("failed") or run["diverged"]:
        return False
    first, last = sum(map(_number, run["train_first"])), sum(map(_number, run["train_last"]))
    return last < ratio * first


def finite_or_none(value):
    """JSON without NaN or Infinity (strict parsers refuse them): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class Store:
    """The results JSON: settings, the environments it was (re)started in, and every finished run.
    Several processes may share one file (each runs its own --arm/--batch share): every save takes a
    lock, takes in the runs the others wrote, and writes the union."""

    def __init__(self, path: Path, settings: dict, env: dict):
        self.path = path
        settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
        if path.exists():
            self.data = json.loads(path.read_text())
            if self.data["settings"] != settings:
                raise SystemExit(f"{path} holds results of other settings ({self.data['settings']}); "
                                 "delete it or pass another --out to start afresh")
        else:
            self.data = {"settings": settings, "environments": [], "runs": {}}
        if env not in self.data["environments"]:
            self.data["environments"].append(env)
        self.save()

    @property
    def runs(self) -> dict:
        return self.data["runs"]

    def add(self, run_key: str, record: dict) -> None:
        self.runs[run_key] = record
        self.save()

    def save(self) -> None:
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                other = json.loads(self.path.read_text())
                self.runs.update({k: v for k, v in other["runs"].items() if k not in self.runs})
                self.data["environments"] += [e for e in other["environments"] if e not in self.data["environments"]]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(finite_or_none(self.data), indent=1, allow_nan=False))
            os.replace(tmp, self.path)


# -- the benchmark -----------------------------------------------------------------------------------

Runner = Callable[[str, str, int, float, int], dict]


def sweep(mode: Mode, arm: str, k: int, run: Runner) -> dict[int, dict]:
    """The arm's lr sweep at batch K on the sweep family (seed 0): {grid index: run}. Stops at the first
    failed run (an error, not a divergence: the arm cannot run in this setting)."""
    family, results = mode.families[0], {}
    queue = initial_indices(mode.points)
    while queue:
        index = queue.pop(0)
        results[index] = run(family, arm, k, lr_at(mode.lr_center, index), 0)
        if results[index].get("failed"):
            return results
        if not queue:
            nxt = next_index({i: (final_val(r), converged(r, mode.converge_ratio)) for i, r in results.items()},
                             mode.max_points)
            queue = [] if nxt is None else [nxt]
    return results


def best_index(results: dict[int, dict]) -> int:
    return min(results, key=lambda i: (final_val(results[i]), i))


def benchmark(mode: Mode, run: Runner, on_batch_done: Callable[[], None],
              arms: Optional[list[str]] = None, ks: Optional[list[int]] = None) -> None:
    """Every arm's sweep and seeds (or the `arms` x `ks` share of them), batch size by batch size, in
    a fixed order (so a resumed benchmark takes the same decisions): run(family, arm, k, lr, seed)
    returns a stored record."""
    for k in ks or mode.ks:
        for arm in arms or mode.arm_names:
            results = sweep(mode, arm, k, run)
            if any(r.get("failed") for r in results.values()):
                continue
            lr = lr_at(mode.lr_center, best_index(results))
            for family in mode.families:
                for seed in range(mode.seeds):
                    run(family, arm, k, lr, seed)
        on_batch_done()


def report(mode_name: str, mode: Mode, data: dict, seconds: Optional[float]) -> tuple[str, dict]:
    """Markdown and the summary dict from the stored runs (partial results render as far as they go)."""
    runs = data["runs"]

    def get(family, arm, k, lr, seed):
        return runs.get(key(family, arm, k, lr, seed))

    sweep_family = mode.families[0]
    summary: dict = {"arms": {}}
    for k in mode.ks:
        for arm in mode.arm_names:
            tried = {grid_index(mode, r["lr"]): r for r in runs.values()
                     if (r["family"], r["arm"], r["k"], r["seed"]) == (sweep_family, arm, k, 0)}
            if not tried:
                continue
            entry = summary["arms"].setdefault(arm, {})[f"K{k}"] = {}
            failed = next((r["failed"] for r in tried.values() if r.get("failed")), None)
            if failed:
                entry["failed"] = failed
                continue
            best = best_index(tried)
            ok = {i: converged(r, mode.converge_ratio) for i, r in tried.items()}
            lo, hi = converging_range({i: (final_val(r), ok[i]) for i, r in tried.items()})
            bounds = (lo, hi) if lo is not None and hi is not None else None
            above = sorted(i for i in tried if i > best and not ok[i])
            entry.update(best_lr=lr_at(mode.lr_center, best),
                         sweep={f"{lr_at(mode.lr_center, i):g}": {"final_val": final_val(r), "converged": ok[i]}
                                for i, r in sorted(tried.items())},
                         converging=[lr_at(mode.lr_center, i) for i in bounds] if bounds else None,
                         lo_bounded=lo is not None and lo == min(tried), hi_bounded=hi is not None and hi == max(tried),
                         stops_converging_at=lr_at(mode.lr_center, above[0]) if above else None)
            for family in mode.families:
                seeds = [get(family, arm, k, entry["best_lr"], s) for s in range(mode.seeds)]
                entry[family] = {"runs": [r for r in seeds if r is not None]}
    targets = {}
    for family in mode.families:
        for k in mode.ks:
            adamw = summary["arms"].get("AdamW", {}).get(f"K{k}", {}).get(family, {}).get("runs", [])
            for name, column in (("text", 1), ("image", 2)):
                finals = [r["val"][-1][column] for r in adamw if not r["diverged"] and r["val"]]
                targets[family, k, name] = statistics.mean(finals) if finals else math.nan
    summary["targets"] = {f"{f}|K{k}|{m}": v for (f, k, m), v in targets.items()}

    command = "python benchmarks/convergence.py" + {"smoke": " --smoke", "quick": " --quick", "full": ""}.get(
        mode_name, f" --mode {mode_name}")
    done = sum(1 for r in runs.values())
    batches = (f"micro-batch {mode.micro}, global batches {[mode.micro * k for k in mode.ks]}" if not mode.micros else
               f"global batch {mode.micro_of(mode.ks[0]) * mode.ks[0]} as K x micro-batch "
               f"{', '.join(mode.label(k) for k in mode.ks)}")
    clipping = (f"gradient clipping at {mode.max_grad_norm:g}" if mode.max_grad_norm is not None else
                "**no gradient clipping**")
    lines = [f"# Convergence at CPU scale ({mode_name})", "",
             f"Command: `{command}`" + (f" ({seconds:.0f} s this session)" if seconds is not None else "")
             + f"; {done} runs. Tiny {' and '.join(mode.families)} models on digits, {mode.steps} steps, cosine LR "
             f"(warm-up {mode.warmup}), {batches}, {clipping}; a run converges when its last training loss is below "
             f"{mode.converge_ratio:g} x its first; "
             f"per arm its own lr sweep on a sqrt(2) grid ({mode.points} points around {mode.lr_center:g}, extended "
             f"to bracket the best and find where it stops converging, at most {mode.max_points}) on "
             f"{sweep_family}, then {mode.seeds} seed(s) at its best lr on {', '.join(mode.families)}. Targets: "
             "AdamW's mean final validation loss per modality at the same family and batch. Mean ± 95% "
             "Student-t interval over seeds; (n/m): only n of m runs reached the target or stayed finite (or "
             "recorded it). FOP columns (ML-FOP-SOAP arms): the correction's relative size, x = the squared "
             "M⁻¹-cosine of the mean and the orthogonal part (FOP's effect is O(x)) and η*, layer means averaged "
             "over the logged steps; near 0 (η* near 1) FOP cannot show an effect. Wall-clock columns: CPU seconds "
             "of one thread in the training steps (evaluations apart), each arm in the same one-process layout; "
             "step time and time to the image target are medians over seeds (steps to target x step time is "
             "what a user pays).", ""]
    lines += [repro.describe(env) for env in data["environments"]]
    if len(data["environments"]) > 1:
        lines.append("(Resumed under more than one environment: compare the runs with care.)")
    lines += ["", "## Stability (lr sweep, seed 0, " + sweep_family + ")", "",
              "| arm | batch | best lr | converging lrs | width | stops converging at "
              "| sweep (lr: final val, x = no convergence) |",
              "|---|---|---|---|---|---|---|"]
    for k in mode.ks:
        for arm in mode.arm_names:
            entry = summary["arms"].get(arm, {}).get(f"K{k}")
            if entry is None:
                continue
            if "failed" in entry:
                lines.append(f"| {arm} | {mode.label(k)} | failed: {entry['failed']} | | | | |")
                continue
            conv = entry["converging"]
            width = "–" if conv is None else (("≥ " if entry["lo_bounded"] or entry["hi_bounded"] else "")
                                             + f"×{conv[1] / conv[0]:.2g}")
            stop = "none converges" if conv is None else format(entry["stops_converging_at"], "g") \
                if entry["stops_converging_at"] else f"> {max(float(x) for x in entry['sweep']):g}"
            cells = ", ".join(f"{lr}: {v['final_val']:.3f}{'' if v['converged'] else ' x'}"
                              for lr, v in entry["sweep"].items())
            lines.append(f"| {arm} | {mode.label(k)} | {entry['best_lr']:g} | "
                         f"{'–' if conv is None else f'{conv[0]:g}–{conv[1]:g}'} | {width} | {stop} | {cells} |")
    for family in mode.families:
        lines += ["", f"## {family}: steps to target and final losses at each arm's best lr", "",
                  "| arm | batch | best lr | steps to text target | steps to image target | image steps vs SOAP | "
                  "step (CPU s) | CPU s to image target | image time vs SOAP | "
                  "final val text | final val image | diverged | text-image grad cosine | "
                  "FOP correction ‖G_fop−G‖/‖G‖ | FOP x (cos²) | η* |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in mode.ks:
            soap_runs = summary["arms"].get("SOAP", {}).get(f"K{k}", {}).get(family, {}).get("runs", [])
            soap_image = [steps_to(r, 2, targets[family, k, "image"]) for r in soap_runs]
            soap_mean = statistics.mean([s for s in soap_image if math.isfinite(s)] or [math.nan])
            soap_time = median([time_to(r, 2, targets[family, k, "image"]) for r in soap_runs])
            for arm in mode.arm_names:
                entry = summary["arms"].get(arm, {}).get(f"K{k}")
                if entry is None or "failed" in entry or not entry.get(family, {}).get("runs"):
                    continue
                rs = entry[family]["runs"]
                text = [steps_to(r, 1, targets[family, k, "text"]) for r in rs]
                image = [steps_to(r, 2, targets[family, k, "image"]) for r in rs]
                good = [s for s in image if math.isfinite(s)]
                ratio = statistics.mean(good) / soap_mean if good and math.isfinite(soap_mean) else math.nan
                times = [time_to(r, 2, targets[family, k, "image"]) for r in rs]
                step_cpu = [_number(r.get("step_cpu_seconds")) for r in rs]
                time_ratio = median(times) / soap_time if math.isfinite(soap_time) else math.nan
                entry[family].update(steps_to_text=text, steps_to_image=image, seconds_to_image=times,
                                     step_cpu_seconds=step_cpu)
                lines.append(
                    f"| {arm} | {mode.label(k)} | {entry['best_lr']:g} | {fmt(text, 1)} | {fmt(image, 1)} | "
                    f"{'–' if math.isnan(ratio) else f'×{ratio:.2f}'} | {fmt_median(step_cpu, 3)} | "
                    f"{fmt_median(times)} | {'–' if math.isnan(time_ratio) else f'×{time_ratio:.2f}'} | "
                    f"{fmt([r['val'][-1][1] if r['val'] and not r['diverged'] else math.inf for r in rs])} | "
                    f"{fmt([r['val'][-1][2] if r['val'] and not r['diverged'] else math.inf for r in rs])} | "
                    f"{sum(r['diverged'] for r in rs)}/{len(rs)} | {fmt([_number(r['grad_cosine']) for r in rs])} | "
                    + " | ".join(fmt([_number(r.get(f"fop_{kind}")) for r in rs], 4)
                                 for kind in ("correction", "cosine_sq", "eta")) + " |")
    return "\n".join(lines) + "\n", summary


def color(arm: str) -> str:
    """One colour per arm in every panel, whichever arms a panel has."""
    return f"C{list(ARMS).index(arm) % 10}"


def plot(out: Path, suffix: str, mode: Mode, summary: dict) -> None:
    """Validation curves at each arm's best lr (mean over seeds) and final loss against lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(family, k) for family in mode.families for k in mode.ks]
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 3.6 * len(rows)), squeeze=False)
    for (family, k), pair in zip(rows, axes, strict=True):
        for arm, entries in summary["arms"].items():
            rs = entries.get(f"K{k}", {}).get(family, {}).get("runs", [])
            rs = [r for r in rs if r["val"] and not r["diverged"]]
            if not rs:
                continue
            n = min(len(r["val"]) for r in rs)
            for ax, column, name in ((pair[0], 1, "text"), (pair[1], 2, "image")):
                ax.plot([rs[0]["val"][i][0] + 1 for i in range(n)],
                        [statistics.mean(r["val"][i][column] for r in rs) for i in range(n)], label=arm,
                        color=color(arm))
                ax.set_title(f"{family}, batch {mode.label(k)}: validation {name} loss")
        for ax in pair:
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"convergence-curves{suffix}.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, len(mode.ks), figsize=(6.5 * len(mode.ks), 4), squeeze=False)
    for ax, k in zip(axes[0], mode.ks, strict=True):
        for arm, entries in summary["arms"].items():
            sweep_points = entries.get(f"K{k}", {}).get("sweep", {})
            if sweep_points:
                lrs = [float(x) for x in sweep_points]
                ax.plot(lrs, [min(v["final_val"], 20.0) for v in sweep_points.values()], marker="o", label=arm,
                        color=color(arm))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss (mean of modalities; 20 = diverged)")
        ax.set_title(f"lr sweep, {mode.families[0]}, batch {mode.label(k)}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"convergence-sweep{suffix}.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--smoke", action="store_true", help="seconds: every arm on tiny shapes (for the test)")
    which.add_argument("--quick", action="store_true", help="minutes: a coarse look")
    which.add_argument("--mode", choices=list(MODES), help="a mode by name (default: full)")
    ap.add_argument("--estimate", action="store_true", help="print the mode's runtime from short runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (part of what the table depends on)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "distopt"), help="VQ codebook and tokenizer cache")
    ap.add_argument("--arm", action="append", choices=list(ARMS), metavar="ARM",
                    help="run only this arm (repeatable): processes sharing one --out split the work")
    ap.add_argument("--batch", action="append", type=int, metavar="K",
                    help="run only this grad_accum K of the mode's (repeatable)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown, plots and the JSON's summary from the stored runs; train nothing")
    args = ap.parse_args()
    repro.pin(args.threads)
    from distopt.deepspeed_glue import init_distributed

    init_distributed()
    mode_name = "smoke" if args.smoke else "quick" if args.quick else args.mode or "full"
    mode = MODES[mode_name]
    if args.estimate:
        estimate(mode_name, args.cache)
        return
    bad = [k for k in args.batch or [] if k not in mode.ks]
    if bad or any(a not in mode.arm_names for a in args.arm or []):
        raise SystemExit(f"--batch takes the {mode_name} mode's grad_accum values {list(mode.ks)} and --arm its "
                         f"arms {mode.arm_names}; got --batch {args.batch} --arm {args.arm}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if mode_name == "full" else f"-{mode_name}"
    if args.report_only:
        path = out / f"convergence{suffix}.json"
        data = json.loads(path.read_text())
        text, data["summary"] = report(mode_name, mode, data, None)
        path.write_text(json.dumps(finite_or_none(data), indent=1, allow_nan=False))
        (out / f"convergence{suffix}.md").write_text(text)
        plot(out, suffix, mode, data["summary"])
        print(text)
        return
    env = repro.environment(args.cache)
    store = Store(out / f"convergence{suffix}.json", {"mode": mode_name, **asdict(mode), "threads": args.threads}, env)
    reusable = reused_runs(mode, out, args.threads)
    t0 = time.perf_counter()

    def render(plots: bool) -> None:
        """The markdown and the JSON's summary after every run; the plots after every batch size."""
        text, summary = report(mode_name, mode, store.data, time.perf_counter() - t0)
        store.data["summary"] = summary
        store.save()
        (out / f"convergence{suffix}.md").write_text(text)
        if plots:
            plot(out, suffix, mode, summary)

    with tempfile.TemporaryDirectory() as tmp:
        def run(family: str, arm: str, k: int, lr: float, seed: int) -> dict:
            run_key = key(family, arm, k, lr, seed)
            if run_key not in store.runs and run_key in reusable:
                store.add(run_key, reusable[run_key])
                render(plots=False)
            if run_key not in store.runs:
                try:
                    record = train_run(mode, family, arm, k, lr, seed, args.cache, f"{tmp}/run")
                except (RuntimeError, ValueError) as e:  # the arm cannot run here: recorded, the others go on
                    traceback.print_exc()
                    record = {"diverged": False, "failed": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                              "val": [], "train_first": [], "train_last": [], "grad_cosine": None}
                record.update(family=family, arm=arm, k=k, lr=lr, seed=seed)
                store.add(run_key, record)
                render(plots=False)
                print(f"[convergence] {run_key}: final val {final_val(record):.4f}"
                      + (f" FAILED {record['failed']}" if record["failed"] else ""), file=sys.stderr, flush=True)
            return store.runs[run_key]

        benchmark(mode, run, lambda: render(plots=True), args.arm, args.batch)
    print((out / f"convergence{suffix}.md").read_text())


def reused_runs(mode: Mode, out: Path, threads: int) -> dict[str, dict]:
    """Stored runs of the modes `mode.reuse` names whose settings at their K equal this mode's (the
    same run: same family, arm, lr, seed, steps, batch layout, clipping, evaluation and threads)."""
    found = {}
    for other_name in mode.reuse:
        other, path = MODES[other_name], out / f"convergence-{other_name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if data["settings"].get("threads") != threads:
            continue
        for run_key, record in data["runs"].items():
            k = record["k"]
            if k in mode.ks and k in other.ks and other.run_settings(k) == mode.run_settings(k):
                found[run_key] = {**record, "reused_from": other_name}
    return found


def estimate(mode_name: str, cache: str) -> None:
    """The mode's runtime on one core (the benchmark uses one thread): per arm, family and batch,
    the CPU seconds per training step from two short runs (2 and 6 steps, no evaluation), the
    per-run overhead, and one evaluation's cost; then the mode's run count (sweep points between
    the initial grid and the cap). CPU time, not wall time, so that a loaded machine does not inflate it.
    Runs another mode would lend (`reuse`) are counted as if they ran."""
    import torch

    mode = MODES[mode_name]
    short = Mode(**{**asdict(mode), "eval_every": 0, "overrides": {}})
    per_run: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in mode.families:
            for k in mode.ks:
                for arm in mode.arm_names:
                    try:
                        costs = [_timed_run(replace_steps(short, steps), family, arm, k, cache, tmp)
                                 for steps in (2, 6)]
                    except (RuntimeError, ValueError) as e:
                        print(f"[estimate] {arm} cannot run ({e}); counted at the fixed-weight arm's cost "
                              "(the same wrapper over SOAP)", file=sys.stderr, flush=True)
                        continue
                    step = (costs[1] - costs[0]) / 4
                    per_run[family, arm, k] = (costs[0] - 2 * step, step)
                    print(f"[estimate] {family} {arm} batch {mode.label(k)}: {step:.3f} CPU s/step, "
                          f"{costs[0] - 2 * step:.2f} s overhead", file=sys.stderr, flush=True)
        evals = {family: _eval_cost(family, mode, cache) for family in mode.families}
    proxy = "sum, weights [0.5, 1] (SOAP)"
    n_evals = mode.steps // mode.eval_every
    low = high = 0.0
    for k in mode.ks:
        for arm in mode.arm_names:
            for family in mode.families:
                overhead, step = per_run.get((family, arm, k)) or per_run[family, proxy, k]
                one = overhead + mode.steps * step + n_evals * evals[family]
                seeds = mode.seeds - (1 if family == mode.families[0] else 0)
                sweeps = (mode.points, mode.max_points) if family == mode.families[0] else (0, 0)
                low += one * (sweeps[0] + seeds)
                high += one * (sweeps[1] + seeds)
    print(f"Mode {mode_name} ({len(mode.arm_names)} arms, batches {[mode.label(k) for k in mode.ks]}, "
          f"{mode.steps} steps, sweeps of "
          f"{mode.points}-{mode.max_points} points on {mode.families[0]}, {mode.seeds} seeds on {mode.families}): "
          f"{low / 3600:.1f} to {high / 3600:.1f} hours of one core (torch {torch.__version__}, 1 thread); "
          f"one evaluation: " + ", ".join(f"{f} {e:.2f} s" for f, e in evals.items()))


def replace_steps(mode: Mode, steps: int) -> Mode:
    return Mode(**{**asdict(mode), "steps": steps, "warmup": 1})


def _timed_run(mode: Mode, family: str, arm: str, k: int, cache: str, tmp: str) -> float:
    return train_run(mode, family, arm, k, 1e-2, 0, cache, f"{tmp}/est")["cpu_seconds"]


def _eval_cost(family: str, mode: Mode, cache: str) -> float:
    """CPU seconds of one evaluation (mode.eval_batches batches per modality) of the family's tiny model."""
    from launcher.config import Config, _build, validate
    from launcher.metrics import evaluate
    from launcher.run import build_model_and_data

    data = yaml.safe_load((ROOT / "configs" / f"{family}_tiny_mlfop.yaml").read_text())
    data["data"]["cache_dir"] = cache
    data["batch"] = {"micro_batch_size": mode.micro, "grad_accum": 2}
    data["eval"] = {"batches": mode.eval_batches}
    cfg = validate(_build(Config, data, ""), 1)
    model, _, _, loaded, _ = build_model_and_data(cfg, 0, 1)
    evaluate(model, loaded.validation)  # warm-up
    start = time.process_time()
    evaluate(model, loaded.validation)
    return time.process_time() - start


if __name__ == "__main__":
    main()
