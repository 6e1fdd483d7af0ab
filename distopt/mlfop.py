"""ML-FOP-SOAP: SOAP plus multi-level Fisher-Orthogonal Projection of the accumulation micro-steps.

Per optimizer step, with G the plain accumulated gradient (mean over ranks, summed over the K
micro-steps) and g_1..g_K its micro-step parts:

    c      = fold(g_1, ..., g_K)          FOP folds in SOAP's metric (distopt.fold, distopt.fop)
    G_fop  = K c                          back to the scale of G (FOP off, or equal g_k, gives G)
    eta*   = <G, G_fop>_{M^-1} / <G_fop, G_fop>_{M^-1}
    SOAP step with: Kronecker statistics from G, Adam moments from rot(G_fop), update scaled by eta*.

The metric M is SOAP's state before this step (eigenbasis Q, dvec = sqrt(v) + eps). Until v exists
(a block's first two steps) M is a scalar and FOP is the plain mean, so nothing is folded.

Parameters are cut into blocks (distopt.plan); each block is preconditioned on its own and owned by
one rank. When torch.distributed is initialised the optimizer shards itself: each micro-step's
gradient is reduced to the block owners asynchronously (distopt.comm) and folded there while the
next micro-step computes; at step() owners update their blocks and the parameters are all-gathered.
With one process the same code runs with no communication.

Levels set the granularity of (s, beta*, eta*): `layer` per parameter (its blocks' partial sums
added, across owners by one small fp64 all-reduce), `head` per attention-head slice, `global` one
set for the model. Pair sources: `microstep` folds the K micro-steps; `modality` folds the two
per-modality gradients handed in with `optimizer.modality(tag)`; `ranks` folds the even-rank
group's gradient with the odd-rank group's (FOP Algorithm 1). docs/algorithm.md lists every
interpretation with its option name and default.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Iterator, Mapping, Optional

import torch

from distopt.capture import MicrostepCapture
from distopt.comm import Comm
from distopt.fold import SCHEDULES, make_fold
from distopt.fop import BlockMetric, eta_coefficient, fop_coefficients, fop_combine
from distopt.plan import Block, make_plan
from distopt.soap import SOAP, Layout, make_layout, soap_update, state_dtype

PAIR_SOURCES = ("microstep", "modality", "ranks")
LEVELS = ("layer", "head", "global")
ETA_CONVENTIONS = ("mean", "sum", "none")
MODALITY_WEIGHTINGS = ("none", "fisher_norm")

Bundle = dict[int, torch.Tensor]  # one fold item per owned block (block index -> tensor)


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
    """What one accumulation window (the micro-steps of one optimizer step) holds on this rank."""

    metrics: dict[int, BlockMetric]                 # owned blocks whose metric exists
    fold: object = None
    plain: dict[int, torch.Tensor] = field(default_factory=dict)       # sum of reduced micro-gradients
    groups: dict[str, list] = field(default_factory=dict)              # tag -> [sum bundle, micro-steps]
    present: set[int] = field(default_factory=set)  # parameters that had a gradient on this rank
    microsteps: int = 0
    pending: Optional[tuple] = None                 # (PendingReduce, tag) still travelling


class MLFOPSOAP(SOAP):
    """SOAP + FOP folding of micro-steps, sharded over ranks. Takes every SOAP argument, plus:

    fop: False gives SOAP (bit-for-bit in one process).  pair_source: 'microstep' | 'modality' | 'ranks'.
    fold_schedule: 'streaming' | 'tree'.  level: 'layer' | 'head' | 'global'.
    head_splits: {name pattern: (num_heads, dim)} for level 'head' (see attention_head_splits).
    eta_convention: 'mean' (g_tot = g_avg) | 'sum' (g_tot = g1 + g2, the paper's literal eq. 17) | 'none'.
    modality_weighting: 'none' | 'fisher_norm' (global level with the modality source: each modality
    weighted by the inverse EMA of its natural-gradient norm, weights summing to 2).
    fop_tolerance: beta* = 0 when g_perp is negligible next to g_diff, or g_diff next to g_avg.
    capture: 'hooks' (micro-steps captured during backward) | 'manual' (call end_microstep()).
    max_block: cut sides longer than this into blocks (None: one block per parameter).
    max_grad_norm: clip the global norm of the accumulated gradient (applied to G and G_fop alike).
    process_group: the ranks to shard over (default: the world, when torch.distributed is initialised).
    bucket_mb: size of the reduction buckets.
    """

    COUNTERS = SOAP.COUNTERS + ("microsteps", "fop_folds", "fop_beta_guarded", "fop_metric_not_ready",
                                "fop_unpaired_steps", "skipped_nonfinite_steps")

    def __init__(self, params: Iterable, *, fop: bool = True, pair_source: str = "microstep",
                 fold_schedule: str = "streaming", level: str = "layer",
                 head_splits: Optional[Mapping[str, tuple[int, int]]] = None, eta_convention: str = "mean",
                 modality_weighting: str = "none", modality_weight_beta: float = 0.9,
                 fop_tolerance: float = 1e-5, capture: str = "hooks", max_block: Optional[int] = None,
                 max_grad_norm: Optional[float] = None, process_group=None, bucket_mb: float = 25.0,
                 **soap_kwargs):
        _choice("pair_source", pair_source, PAIR_SOURCES)
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
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} is invalid: must be > 0 (or None for no clipping)")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} is invalid: must be > 0")
        super().__init__(params, **soap_kwargs)
        self.comm = Comm(process_group, bucket_mb)
        if pair_source == "ranks" and self.comm.world < 2:
            raise ValueError("pair_source='ranks' folds the even-rank group's gradient with the odd-rank group's "
                             f"and needs at least 2 ranks (this run has {self.comm.world}); use 'microstep' or "
                             "'modality' in one process")
        self.options = dict(fop=fop, pair_source=pair_source, fold_schedule=fold_schedule, level=level,
                            eta_convention=eta_convention, modality_weighting=modality_weighting,
                            modality_weight_beta=modality_weight_beta, fop_tolerance=fop_tolerance,
                            max_grad_norm=max_grad_norm)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self.plan = make_plan([(self.routes[p].name or f"param{i}", tuple(p.shape),
                                self.layout(p, self._group_of[p]).preconditioned) for i, p in enumerate(self._params)],
                              max_block, self.comm.world)
        self.comm.verify_plan(self.plan.digest())
        self._owned = self.plan.owned(self.comm.rank)
        self._segments = self._plan_head_segments(head_splits or {}) if level == "head" else {}
        self._blocks = {b.index: b for b in self.plan.blocks}
        self._max_segments = max([heads for _, heads in self._segments.values()] + [1])
        self._needs_fold_sums = level == "global" or bool(self.plan.split_params())
        self._window: Optional[_Window] = None
        self.stats: dict[str, list] = {"beta": []}
        self.last_stats: dict[str, float] = {}  # |beta*| and eta* of the last step, over this rank's blocks
        sharded = self.comm.world > 1
        self._capture = MicrostepCapture(self._params, self._on_microstep, capture) if fop or sharded else None

    # -- set-up ------------------------------------------------------------------------------------

    def _plan_head_segments(self, head_splits: Mapping[str, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        if not head_splits:
            raise ValueError("level='head' needs head_splits={name pattern: (num_heads, dim)}, "
                             "e.g. distopt.attention_head_splits(num_heads, num_kv_heads)")
        segments = {}
        for i, p in enumerate(self._params):
            name = self.routes[p].name
            split = next((s for pat, s in head_splits.items() if name and fnmatchcase(name, pat)), None)
            if split is None:
                continue
            heads, dim = split
            blocks = self.plan.of_param(i)
            if (len(blocks) > 1 or self.layout(p, self._group_of[p]).precond_shape != tuple(p.shape)
                    or p.shape[dim] % heads):
                raise ValueError(f"head_splits: parameter {name!r} of shape {tuple(p.shape)} cannot be split into "
                                 f"{heads} heads along dim {dim} (needs one block, an unmerged layout and a "
                                 "divisible dim)")
            segments[blocks[0].index] = (dim, heads)
        if not segments:
            raise ValueError(f"level='head': head_splits {list(head_splits)} matched no parameter name "
                             "(pass named parameters, e.g. model.named_parameters())")
        return segments

    def block_layout(self, b: Block) -> Layout:
        group = self._group_of[self._params[b.param]]
        return make_layout(b.shape, soap_path=self.routes[self._params[b.param]].path == "soap",
                           max_precond_dim=group["max_precond_dim"], merge_dims=group["merge_dims"],
                           precondition_1d=group["precondition_1d"],
                           channels_last=group["data_format"] == "channels_last")

    def block_state(self, b: Block) -> dict:
        return self.state[self._params[b.param]].setdefault("blocks", {}).setdefault(b.ordinal, {})

    def _print_summary_once(self) -> None:
        if not self._summary_printed and self._verbose and self.comm.rank == 0 and self.comm.world > 1:
            rows = self.plan.summary()
            print("[distopt] block plan: " + "; ".join(
                f"rank {r['rank']}: {r['blocks']} blocks, {r['numel']} elements "
                f"({r['state_bytes'] / 2**20:.2f} MiB of state), cost {r['cost']:.3g}" for r in rows), file=sys.stderr)
        super()._print_summary_once()

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
        for b in self._owned:
            st = self.block_state(b)
            if self.options["fop"] and st.get("step", 0) >= 1:
                eps = self._group_of[self._params[b.param]]["eps"]
                metrics[b.index] = BlockMetric(st["Q"], st["exp_avg_sq"].sqrt() + eps, self._segments.get(b.index))
            elif self.options["fop"]:
                self.counters["fop_metric_not_ready"] += 1
        window = _Window(metrics)
        window.fold = make_fold(self.options["fold_schedule"], self._combine, _add, _scale, self._prepare)
        self.stats = {"beta": []}
        return window

    def _payload(self, b: Block, delta: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """A block's flat micro-gradient; with pair_source 'ranks', placed in its rank group's half."""
        flat = torch.zeros(b.numel, dtype=dtype) if delta is None else delta[b.slices].to(dtype).reshape(-1)
        if self.options["pair_source"] != "ranks":
            return flat
        halves = torch.zeros(2, b.numel, dtype=dtype)
        halves[self.comm.rank % 2] = flat
        return halves.reshape(-1)

    def _on_microstep(self, tag: Optional[str], deltas: dict[torch.Tensor, torch.Tensor]) -> None:
        if self.options["pair_source"] == "modality" and self.options["fop"] and tag is None:
            raise RuntimeError("pair_source='modality': run each backward inside `with optimizer.modality(tag):`")
        if self._window is None:
            self._window = self._open_window()
        w = self._window
        self._drain(w)
        dtype = self._comm_dtype()
        payloads = {b.index: self._payload(b, deltas.get(self._params[b.param]), dtype) for b in self.plan.blocks}
        w.present.update(i for i, p in enumerate(self._params) if p in deltas)
        width = 2 if self.options["pair_source"] == "ranks" else 1
        w.pending = (self.comm.reduce_to_owners(self.plan, payloads, width), tag)
        w.microsteps += 1
        self.counters["microsteps"] += 1

    def _comm_dtype(self) -> torch.dtype:
        dtype = torch.float32
        for p in self._params:
            dtype = torch.promote_types(dtype, state_dtype(p))
        return dtype

    def _drain(self, w: _Window) -> None:
        """Fold the micro-step whose reduction was in flight (owners only hold their blocks)."""
        if w.pending is None:
            return
        pending, tag = w.pending
        w.pending = None
        reduced = pending.wait()
        world = self.comm.world
        if self.options["pair_source"] == "ranks":
            n_even, n_odd = (world + 1) // 2, world // 2
            halves = {i: t.view(2, -1) for i, t in reduced.items()}
            parts = {"even": ({i: h[0] / n_even for i, h in halves.items()}, n_even),
                     "odd": ({i: h[1] / n_odd for i, h in halves.items()}, n_odd)}
            grads = {i: (h[0] + h[1]) / world for i, h in halves.items()}
        else:
            grads = {i: t / world if world > 1 else t for i, t in reduced.items()}
        for b in self._owned:
            g = self._to_layout(b, grads[b.index])
            w.plain[b.index] = g if b.index not in w.plain else w.plain[b.index] + g
        if not self.options["fop"]:
            return
        if self.options["pair_source"] == "microstep":
            w.fold.push(self._items(w, grads))
        elif self.options["pair_source"] == "modality":
            self._accumulate(w, tag, self._items(w, grads), 1)
        else:
            for name, (part, size) in parts.items():
                self._accumulate(w, name, self._items(w, part), size)

    def _to_layout(self, b: Block, flat: torch.Tensor) -> torch.Tensor:
        return self.block_layout(b).to_precond(flat.view(b.shape).to(state_dtype(self._params[b.param])))

    def _items(self, w: _Window, grads: dict[int, torch.Tensor]) -> Bundle:
        """Raw micro-gradients (preconditioning layout) of the blocks that fold."""
        return {i: self._to_layout(self._blocks[i], grads[i]) for i in w.metrics}

    def _prepare(self, items: Bundle) -> Bundle:
        """Raw gradients into the form folds measure (rotated into each block's eigenbasis)."""
        return {i: self._window.metrics[i].prepare(x) for i, x in items.items()}

    @staticmethod
    def _accumulate(w: _Window, tag: str, items: Bundle, size: int) -> None:
        """Per-tag sums; `size` is how many equal sub-batches one micro-step of this tag stands for."""
        if tag not in w.groups:
            w.groups[tag] = [items, 1, size]
        else:
            entry = w.groups[tag]
            entry[0], entry[1] = _add(entry[0], items), entry[1] + 1

    # -- FOP ---------------------------------------------------------------------------------------

    def _partial_table(self, local: dict[int, torch.Tensor], width: int) -> torch.Tensor:
        """Blocks' partials (n_segments, width) summed per parameter into a (params, segments, width)
        table; over ranks too when a parameter spans owners or the level is global."""
        table = torch.zeros(len(self._params), self._max_segments, width, dtype=torch.float64)
        for i, v in local.items():
            table[self._blocks[i].param, :v.shape[0]] += v
        return self.comm.all_reduce_sum(table) if self._needs_fold_sums else table

    def _lookup(self, table: torch.Tensor, i: int, n_segments: int) -> torch.Tensor:
        """The partials that decide block i's scalars: its parameter's, or the model's at the global level."""
        if self.options["level"] == "global":
            return table.sum((0, 1)).unsqueeze(0)
        return table[self._blocks[i].param, :n_segments]

    def _combine(self, b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        metrics = self._window.metrics
        a = {i: (n1 * b1[i] + n2 * b2[i]) / (n1 + n2) for i in b1}
        d = {i: b1[i] - b2[i] for i in b1}
        table = self._partial_table({i: metrics[i].partials(a[i], d[i]) for i in b1}, 5)
        out = {}
        for i in b1:
            s, beta, guarded = fop_coefficients(self._lookup(table, i, metrics[i].n_segments),
                                                self.options["fop_tolerance"])
            self.stats["beta"].append(beta.abs())
            self.counters["fop_beta_guarded"] += int(guarded.sum())
            out[i] = fop_combine(a[i], d[i], metrics[i].expand(s, a[i]), metrics[i].expand(beta, a[i]))
        self.counters["fop_folds"] += len(b1)
        return out

    def _weights(self, w: _Window, means: dict[str, Bundle]) -> list[float]:
        """fisher_norm: w_m proportional to 1 / EMA(||g_m||_{M^-1}), normalised so that w_text + w_image = 2."""
        if self.options["modality_weighting"] == "none":
            return [1.0, 1.0]
        ema = self.param_groups[0].setdefault("modality_norm_ema", {})
        beta = self.options["modality_weight_beta"]
        inverse = []
        for tag, mean in means.items():
            local = {i: w.metrics[i].eta_partials(x, x) for i, x in mean.items()}
            norm = float(self._partial_table(local, 2)[..., 1].sum()) ** 0.5
            ema[tag] = norm if tag not in ema else beta * ema[tag] + (1 - beta) * norm
            inverse.append(1.0 / max(ema[tag], 1e-30))
        return [2 * x / sum(inverse) for x in inverse]

    def _folded(self, w: _Window) -> Optional[Bundle]:
        """The folded gradient in the mean-per-micro-step scale, or None when nothing was paired."""
        if self.options["pair_source"] == "microstep":
            result = w.fold.result()
            return result[0] if result is not None and result[1] >= 2 else None
        if len(w.groups) > 2:
            raise RuntimeError(f"pair_source={self.options['pair_source']!r} folds two groups, got {sorted(w.groups)}")
        if len(w.groups) < 2:
            return None
        means = {tag: self._prepare(_scale(total, 1.0 / k)) for tag, (total, k, _) in w.groups.items()}
        weights = self._weights(w, means)
        (m1, m2), ((_, k1, n1), (_, k2, n2)) = means.values(), w.groups.values()
        return self._combine(_scale(m1, weights[0]), n1 * k1, _scale(m2, weights[1]), n2 * k2)

    # -- the step ----------------------------------------------------------------------------------

    def _update(self) -> None:
        if self._capture is None:  # one process, FOP off: plain SOAP on p.grad
            scale = self._clip_scale([p.grad for p in self._params if p.grad is not None])
            for b in self._owned:
                p = self._params[b.param]
                if p.grad is not None:
                    g = self._to_layout(b, p.grad[b.slices])
                    soap_update(self.block_state(b), p.data[b.slices], g * scale if scale != 1.0 else g,
                                self.block_layout(b), self._group_of[p], self.counters)
            return
        self._check_untouched()
        w = self._window
        self._capture.reset()
        if w is None:
            return
        try:
            self._step_window(w)
        finally:
            self._window = None

    def _step_window(self, w: _Window) -> None:
        self._drain(w)
        folded = self._folded(w) if self.options["fop"] else None
        if self.options["fop"] and folded is None:
            self.counters["fop_unpaired_steps"] += 1
        fop_items = {i: x * w.microsteps for i, x in folded.items()} if folded else {}
        present, scale, eta = self._boundary_sums(w, fop_items)
        if scale is None:
            self.counters["skipped_nonfinite_steps"] += 1
            return
        updated = {}
        for b in self._owned:
            p = self._params[b.param]
            if b.param not in present:
                continue
            view = p.data[b.slices]
            g = w.plain[b.index] * scale if scale != 1.0 else w.plain[b.index]
            moment, lr_scale = None, 1.0
            if b.index in fop_items:
                metric = w.metrics[b.index]
                moment = metric.finish(fop_items[b.index] * scale if scale != 1.0 else fop_items[b.index])
                lr_scale = metric.expand(eta[b.index], fop_items[b.index])
            soap_update(self.block_state(b), view, g, self.block_layout(b), self._group_of[p], self.counters,
                        moment, lr_scale)
            updated[b.index] = view
        self._gather(updated)
        self.last_stats = _summary(self.stats["beta"], list(eta.values()))

    def _clip_scale(self, grads: Optional[list[torch.Tensor]] = None, norm_sq: Optional[float] = None) -> float:
        """max_grad_norm / ||G|| when the global norm exceeds max_grad_norm, else 1."""
        max_norm = self.options["max_grad_norm"]
        if max_norm is None:
            return 1.0
        if norm_sq is None:
            norm_sq = sum(float(g.double().square().sum()) for g in grads)
        norm = norm_sq ** 0.5
        return max_norm / (norm + 1e-6) if norm > max_norm else 1.0

    def _check_untouched(self) -> None:
        for p in self._params:
            captured = self._capture.accumulated(p)
            if captured is not None and (p.grad is None or not _same(p.grad, captured)):
                raise RuntimeError("p.grad changed after the last backward (e.g. by clip_grad_norm_); MLFOPSOAP folds "
                                   "the captured micro-step gradients, so clip with MLFOPSOAP(max_grad_norm=...) "
                                   "instead")

    def _boundary_sums(self, w: _Window, fop_items: Bundle):
        """One fp64 all-reduce for: a non-finite flag, the squared global norm, which parameters had a
        gradient on some rank, and the eta* partials. Returns (present params, clip scale or None, eta)."""
        n, segs = len(self._params), self._max_segments
        vec = torch.zeros(2 + n + n * segs * 2, dtype=torch.float64)
        for i in w.present:
            vec[2 + i] = 1.0
        eta_local = {}
        for i, g in w.plain.items():
            sq = g.square().sum(dtype=torch.float64)
            vec[0] += float(not torch.isfinite(sq))
            vec[1] += sq
            if i in fop_items:
                vec[0] += float(not torch.isfinite(fop_items[i]).all())
                eta_local[i] = w.metrics[i].eta_partials(w.metrics[i].prepare(g), fop_items[i])
        table = vec[2 + n:].view(n, segs, 2)
        for i, v in eta_local.items():
            table[self._blocks[i].param, :v.shape[0]] += v
        vec = self.comm.all_reduce_sum(vec)
        if vec[0] > 0:
            return set(), None, {}
        present = {i for i in range(n) if vec[2 + i] > 0}
        scale = self._clip_scale(norm_sq=float(vec[1]))
        table = vec[2 + n:].view(n, segs, 2)
        factor = {"mean": 1.0, "sum": 2.0, "none": 0.0}[self.options["eta_convention"]]
        eta = {}
        for i, local in eta_local.items():
            partials = self._lookup(table, i, local.shape[0])
            eta[i] = eta_coefficient(partials) * factor if factor else torch.ones(local.shape[0], dtype=torch.float64)
        return present, scale, eta

    def _gather(self, updated: dict[int, torch.Tensor]) -> None:
        """Owners' new block values to every rank."""
        if self.comm.world == 1:
            return
        dtype = self._params[0].dtype
        for p in self._params:
            dtype = torch.promote_types(dtype, p.dtype)
        values = {b.index: self._params[b.param].data[b.slices] for b in self._owned}
        gathered = self.comm.all_gather_blocks(self.plan, values, dtype)
        for b in self.plan.blocks:
            if b.owner != self.comm.rank:
                self._params[b.param].data[b.slices].copy_(gathered[b.index].view(b.shape))

    def state_dict(self) -> dict:
        if self._window is not None:
            raise RuntimeError(f"state_dict() called mid-accumulation ({self._window.microsteps} micro-steps captured "
                               "since the last step()); save after step()")
        return super().state_dict()

    def close(self) -> None:
        """Remove the gradient hooks."""
        if self._capture is not None:
            self._capture.remove()


def _summary(betas: list[torch.Tensor], etas: list[torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, values in (("beta_abs", betas), ("eta", etas)):
        if values:
            flat = torch.cat([v.reshape(-1) for v in values]).double()
            out.update({f"{name}_mean": float(flat.mean()), f"{name}_min": float(flat.min()),
                        f"{name}_max": float(flat.max())})
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, counting NaN as equal to NaN (a NaN gradient is handled by the non-finite skip)."""
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def _add(b1: Bundle, b2: Bundle) -> Bundle:
    return {i: b1[i] + b2[i] for i in b1}


def _scale(b: Bundle, c: float) -> Bundle:
    return {i: x * c for i, x in b.items()}
