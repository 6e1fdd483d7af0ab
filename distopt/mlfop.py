"""ML-FOP-SOAP: SOAP plus multi-level Fisher-Orthogonal Projection of the accumulation micro-steps.

Per optimizer step, with G the plain accumulated gradient and g_1..g_K its micro-step parts:

    z, n   = fold(g_1, ..., g_K)          FOP folds in SOAP's metric (distopt.fold, distopt.fop)
    G_fop  = n z                          back to the scale of G (FOP off, or equal g_k, gives G)
    eta*   = <G, G_fop>_{M^-1} / <G_fop, G_fop>_{M^-1}
    SOAP step with: Kronecker statistics from G, Adam moments from rot(G_fop), update scaled by eta*.

The metric M is SOAP's state before this step (eigenbasis Q, dvec = sqrt(v) + eps). Until v exists
(a parameter's first two steps) M is a scalar and FOP is the plain mean, so nothing is folded.
The level sets the granularity of (s, beta*, eta*): `layer` per parameter, `head` per attention
head slice (`head_splits`), `global` one set for the whole model. Pair sources: `microstep` folds
the K micro-steps; `modality` folds the two per-modality gradients handed in with
`optimizer.modality(tag)`; `ranks` (even/odd rank groups) belongs to the sharded runtime.
docs/algorithm.md lists every interpretation with its option name and default.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from distopt.capture import MicrostepCapture
from distopt.fold import SCHEDULES, make_fold
from distopt.fop import BlockMetric, eta_coefficient, fop_coefficients, fop_combine
from distopt.soap import SOAP, state_dtype

PAIR_SOURCES = ("microstep", "modality", "ranks")
LEVELS = ("layer", "head", "global")
ETA_CONVENTIONS = ("mean", "sum", "none")
MODALITY_WEIGHTINGS = ("none", "fisher_norm")

Bundle = dict[torch.Tensor, torch.Tensor]  # one fold item per parameter


def attention_head_splits(num_heads: int, num_kv_heads: Optional[int] = None) -> dict[str, tuple[int, int]]:
    """`head_splits` for Llama/Qwen2-style attention: q/k/v split by output rows, o_proj by input columns."""
    kv = num_kv_heads or num_heads
    return {"*q_proj.weight": (num_heads, 0), "*k_proj.weight": (kv, 0),
            "*v_proj.weight": (kv, 0), "*o_proj.weight": (num_heads, 1)}


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: choose one of {allowed}")


@dataclass
class _Window:
    """What one accumulation window (the micro-steps of one optimizer step) holds."""

    metrics: dict[torch.Tensor, BlockMetric]
    fold: object = None
    tag_sums: dict[str, Bundle] = field(default_factory=dict)


class MLFOPSOAP(SOAP):
    """SOAP + FOP folding of micro-steps. Takes every SOAP argument, plus the FOP options below.

    fop: False gives bit-for-bit SOAP.  pair_source: 'microstep' | 'modality' | 'ranks'.
    fold_schedule: 'tree' | 'streaming'.  level: 'layer' | 'head' | 'global'.
    head_splits: {name pattern: (num_heads, dim)} for level 'head' (see attention_head_splits).
    eta_convention: 'mean' (g_tot = g_avg) | 'sum' (g_tot = g1 + g2, the paper's literal eq. 17) | 'none'.
    modality_weighting: 'none' | 'fisher_norm' (global level with the modality source: each modality
    weighted by the inverse EMA of its natural-gradient norm, weights summing to 2).
    fop_tolerance: beta* = 0 when g_perp is negligible next to g_diff, or g_diff next to g_avg (squared
    M^-1 norms, relative; see distopt.fop.fop_coefficients).
    capture: 'hooks' (per-micro-step gradients captured during backward) | 'manual' (call end_microstep()).
    """

    def __init__(self, params: Iterable, *, fop: bool = True, pair_source: str = "microstep",
                 fold_schedule: str = "tree", level: str = "layer",
                 head_splits: Optional[Mapping[str, tuple[int, int]]] = None, eta_convention: str = "mean",
                 modality_weighting: str = "none", modality_weight_beta: float = 0.9,
                 fop_tolerance: float = 1e-5, capture: str = "hooks", **soap_kwargs):
        _choice("pair_source", pair_source, PAIR_SOURCES)
        if pair_source == "ranks":
            raise ValueError("pair_source='ranks' pairs even/odd rank groups (FOP Algorithm 1) and needs the "
                             "sharded runtime, which this version does not have; use 'microstep' or 'modality'")
        _choice("fold_schedule", fold_schedule, SCHEDULES)
        _choice("level", level, LEVELS)
        _choice("eta_convention", eta_convention, ETA_CONVENTIONS)
        _choice("modality_weighting", modality_weighting, MODALITY_WEIGHTINGS)
        if modality_weighting != "none" and (level != "global" or pair_source != "modality"):
            raise ValueError(f"modality_weighting={modality_weighting!r} weights a text fold against an image fold "
                             "and needs level='global' and pair_source='modality'")
        if not 0.0 <= modality_weight_beta < 1.0:
            raise ValueError(f"modality_weight_beta={modality_weight_beta!r} is invalid: must be in [0, 1)")
        if not 0.0 <= fop_tolerance < 1.0:
            raise ValueError(f"fop_tolerance={fop_tolerance!r} is invalid: must be in [0, 1)")
        super().__init__(params, **soap_kwargs)
        self.options = dict(fop=fop, pair_source=pair_source, fold_schedule=fold_schedule, level=level,
                            eta_convention=eta_convention, modality_weighting=modality_weighting,
                            modality_weight_beta=modality_weight_beta, fop_tolerance=fop_tolerance)
        self._segments = self._plan_head_segments(head_splits or {}) if level == "head" else {}
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._window: Optional[_Window] = None
        self._capture = MicrostepCapture(self._group_of, self._on_microstep, capture) if fop else None

    # -- set-up ------------------------------------------------------------------------------------

    def _plan_head_segments(self, head_splits: Mapping[str, tuple[int, int]]) -> dict[torch.Tensor, tuple[int, int]]:
        if not head_splits:
            raise ValueError("level='head' needs head_splits={name pattern: (num_heads, dim)}, "
                             "e.g. distopt.attention_head_splits(num_heads, num_kv_heads)")
        segments = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = self.routes[p].name
                split = next((s for pat, s in head_splits.items() if name and fnmatchcase(name, pat)), None)
                if split is None:
                    continue
                heads, dim = split
                if self.layout(p, group).precond_shape != tuple(p.shape) or p.shape[dim] % heads:
                    raise ValueError(f"head_splits: parameter {name!r} of shape {tuple(p.shape)} cannot be split into "
                                     f"{heads} heads along dim {dim} (needs an unmerged layout and a divisible dim)")
                segments[p] = (dim, heads)
        if not segments:
            raise ValueError(f"level='head': head_splits {list(head_splits)} matched no parameter name "
                             "(pass named parameters, e.g. model.named_parameters())")
        return segments

    # -- micro-steps -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def modality(self, tag: str) -> Iterator[None]:
        """Micro-steps back-propagated inside this block belong to modality `tag` (pair_source='modality')."""
        if self._capture is None:
            yield
            return
        with self._capture.tagged(tag):
            yield

    def end_microstep(self, modality: Optional[str] = None) -> None:
        """Mark the end of a micro-step when capture='manual' (frameworks that drive micro-steps)."""
        if self._capture is not None:
            self._capture.end_microstep(modality)

    def _open_window(self) -> _Window:
        metrics = {}
        for p, group in self._group_of.items():
            st = self.state.get(p, {})
            if st.get("step", 0) >= 1:
                metrics[p] = BlockMetric(st["Q"], st["exp_avg_sq"].sqrt() + group["eps"], self._segments.get(p))
            else:
                self.counters["fop_metric_not_ready"] += 1
        window = _Window(metrics)
        window.fold = make_fold(self.options["fold_schedule"], self._combine_bundles(metrics), _add, _scale)
        return window

    def _on_microstep(self, tag: Optional[str], deltas: dict[torch.Tensor, torch.Tensor]) -> None:
        if self._window is None:
            self._window = self._open_window()
        self.counters["microsteps"] += 1
        w = self._window
        items = {}
        for p, metric in w.metrics.items():
            layout = self.layout(p, self._group_of[p])
            delta = deltas.get(p)
            g = torch.zeros(layout.precond_shape, dtype=state_dtype(p), device=p.device) if delta is None \
                else layout.to_precond(delta.to(state_dtype(p)))
            items[p] = metric.prepare(g)
        if self.options["pair_source"] == "microstep":
            w.fold.push(items)
            return
        if tag is None:
            raise RuntimeError("pair_source='modality': run each backward inside `with optimizer.modality(tag):`")
        w.tag_sums[tag] = items if tag not in w.tag_sums else _add(w.tag_sums[tag], items)

    # -- FOP ---------------------------------------------------------------------------------------

    def _aggregate(self, per_param: dict[torch.Tensor, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Sum partials over the whole model at the global level; otherwise each block keeps its own."""
        if self.options["level"] != "global" or not per_param:
            return per_param
        total = torch.stack([v.sum(0) for v in per_param.values()]).sum(0, keepdim=True)
        return {p: total for p in per_param}

    def _combine_bundles(self, metrics: dict[torch.Tensor, BlockMetric]) -> Callable:
        tol = self.options["fop_tolerance"]

        def combine(b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
            a = {p: (n1 * b1[p] + n2 * b2[p]) / (n1 + n2) for p in b1}
            d = {p: b1[p] - b2[p] for p in b1}
            partials = self._aggregate({p: metrics[p].partials(a[p], d[p]) for p in b1})
            out = {}
            for p in b1:
                s, beta, guarded = fop_coefficients(partials[p], tol)
                self.counters["fop_beta_guarded"] += int(guarded.sum())
                out[p] = fop_combine(a[p], d[p], metrics[p].expand(s, a[p]), metrics[p].expand(beta, a[p]))
            self.counters["fop_folds"] += len(b1)
            return out

        return combine

    def _weighted_modalities(self, sums: dict[str, Bundle], metrics: dict[torch.Tensor, BlockMetric]) -> list[Bundle]:
        """fisher_norm: w_m proportional to 1 / EMA(||g_m||_{M^-1}), normalised so that w_text + w_image = 2."""
        bundles = list(sums.values())
        if self.options["modality_weighting"] == "none":
            return bundles
        ema = self.param_groups[0].setdefault("modality_norm_ema", {})
        beta = self.options["modality_weight_beta"]
        inverse = []
        for tag, b in sums.items():
            norm = float(sum(metrics[p].eta_partials(x, x)[:, 1].sum() for p, x in b.items())) ** 0.5
            ema[tag] = norm if tag not in ema else beta * ema[tag] + (1 - beta) * norm
            inverse.append(1.0 / max(ema[tag], 1e-30))
        weights = [2 * w / sum(inverse) for w in inverse]
        return [_scale(b, w) for b, w in zip(bundles, weights)]

    def _folded(self, w: _Window) -> Optional[tuple[Bundle, int]]:
        if self.options["pair_source"] == "microstep":
            return w.fold.result()
        if len(w.tag_sums) > 2:
            raise RuntimeError(f"pair_source='modality' folds two modalities, got {sorted(w.tag_sums)}")
        if len(w.tag_sums) < 2:
            return None
        first, second = self._weighted_modalities(w.tag_sums, w.metrics)
        return self._combine_bundles(w.metrics)(first, 1, second, 1), 2

    def _corrected(self) -> dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter: (rot(G_fop) for Adam's moments, eta* as an update multiplier)."""
        w, self._window = self._window, None
        folded = self._folded(w) if w is not None else None
        if folded is None or folded[1] < 2:
            self.counters["fop_unpaired_steps"] += 1
            return {}
        z, n = folded
        fop_items, plain_items = {}, {}
        for p, metric in w.metrics.items():
            if p.grad is None:
                continue
            layout = self.layout(p, self._group_of[p])
            g = layout.to_precond(p.grad.to(state_dtype(p)))
            fop_items[p] = z[p] * (n * _user_scale(g, self._capture.accumulated(p), layout))
            plain_items[p] = metric.prepare(g)
        eta = self._aggregate({p: w.metrics[p].eta_partials(plain_items[p], fop_items[p]) for p in fop_items})
        factor = {"mean": 1.0, "sum": 2.0, "none": 0.0}[self.options["eta_convention"]]
        out = {}
        for p, item in fop_items.items():
            e = eta_coefficient(eta[p]) * factor if factor else torch.ones(w.metrics[p].n_segments, dtype=torch.float64)
            out[p] = (w.metrics[p].finish(item), w.metrics[p].expand(e, item))
        return out

    # -- the step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._print_summary_once()
        corrected = self._corrected() if self._capture is not None else {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in corrected:
                    moment_grad, eta = corrected[p]
                    self._step_param(p, group, moment_grad_rot=moment_grad, lr_scale=eta)
                else:
                    self._step_param(p, group)
        if self._capture is not None:
            self._capture.reset()
        return loss

    def state_dict(self) -> dict:
        if self._window is not None:
            raise RuntimeError(f"state_dict() called mid-accumulation ({self._capture.microsteps} micro-steps captured "
                               "since the last step()); save after step()")
        return super().state_dict()

    def close(self) -> None:
        """Remove the gradient hooks (the optimizer is unusable for FOP afterwards)."""
        if self._capture is not None:
            self._capture.remove()


def _add(b1: Bundle, b2: Bundle) -> Bundle:
    return {p: b1[p] + b2[p] for p in b1}


def _scale(b: Bundle, c: float) -> Bundle:
    return {p: x * c for p, x in b.items()}


def _user_scale(g: torch.Tensor, captured: Optional[torch.Tensor], layout) -> float:
    """<G, S> / <S, S> for the gradient G at step() and S as captured: exactly 1 when untouched, and the
    factor of a uniform rescale (gradient clipping) applied to p.grad after the last micro-step."""
    if captured is None:
        return 1.0
    s = layout.to_precond(captured.to(g.dtype))
    ss = float((s * s).sum(dtype=torch.float64))
    return float((g * s).sum(dtype=torch.float64)) / ss if ss > 0 else 1.0
