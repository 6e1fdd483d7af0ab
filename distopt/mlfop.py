"""ML-FOP-SOAP: SOAP plus multi-level Fisher-Orthogonal Projection of the accumulation micro-steps.

Per optimizer step, with G the plain accumulated gradient (mean over ranks, summed over the K
micro-steps) and g_1..g_K its micro-step parts:

    c      = fold(g_1, ..., g_K)          FOP folds in SOAP's metric (distopt.fold, distopt.fop)
    G_fop  = K c                          back to the scale of G (FOP off, or equal g_k, gives G)
    eta*   = <G, G_fop>_{M^-1} / <G_fop, G_fop>_{M^-1}
    SOAP step with: Kronecker statistics from G, Adam moments from rot(G_fop), update scaled by eta*.

The metric M is SOAP's state before this step (eigenbasis Q, dvec = sqrt(v) + eps). Until v exists
(a block's first two steps) M is a scalar and FOP is the plain mean, so nothing is folded.

This class tells the story of one step; the rooms it walks through are distopt.window (the
micro-steps of one step), distopt.distributor (where reduced gradients come from and updates go),
distopt.levels (layer, head or global FOP scalars) and distopt.soap (the update). Options:
distopt.options.MLFOPOptions; docs/algorithm.md lists every interpretation with its option name.
"""

from __future__ import annotations

import contextlib
import time
from fnmatch import fnmatchcase
from typing import Iterable, Iterator, Mapping, Optional

import torch

from distopt.capture import MicrostepCapture
from distopt.distributor import Distributor, make_distributor
from distopt.fop import BlockMetric
from distopt.levels import Bundle, Levels
from distopt.options import MLFOPOptions
from distopt.plan import Block
from distopt.soap import SOAP, Layout, soap_update, state_dtype
from distopt.window import Window, WindowSpec


def attention_head_splits(num_heads: int, num_kv_heads: Optional[int] = None) -> dict[str, tuple[int, int]]:
    """`head_splits` for Llama/Qwen2-style attention: q/k/v split by output rows, o_proj by input columns."""
    kv = num_kv_heads or num_heads
    return {"*q_proj.weight": (num_heads, 0), "*k_proj.weight": (kv, 0),
            "*v_proj.weight": (kv, 0), "*o_proj.weight": (num_heads, 1)}


class MLFOPSOAP(SOAP):
    """SOAP + FOP folding of micro-steps, sharded over ranks. Takes every option of
    distopt.options.MLFOPOptions as a keyword argument, plus the runtime objects:

    process_group: the ranks to shard over (default: the world, when torch.distributed is initialised).
    distributor: how blocks are communicated (default: distopt.distributor.make_distributor).
    """

    Options = MLFOPOptions
    COUNTERS = SOAP.COUNTERS + ("microsteps", "microstep_seconds", "fop_folds", "fop_beta_guarded",
                                "fop_metric_not_ready", "fop_unpaired_steps", "skipped_nonfinite_steps")

    def __init__(self, params: Iterable, *, process_group=None, distributor: Optional[Distributor] = None,
                 **options):
        super().__init__(params, **options)
        o: MLFOPOptions = self.options
        self.distributor = distributor or make_distributor(process_group, o.bucket_mb)
        o.check_world(self.distributor.world)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self.plan = self.distributor.make_plan(
            [(self.routes[p].name or f"param{i}", tuple(p.shape)) for i, p in enumerate(self._params)],
            o.max_block, self._block_rotations)
        self._blocks = {b.index: b for b in self.plan.blocks}
        segments = self._plan_head_segments(o.head_splits) if o.level == "head" else {}
        self.levels = Levels(self._blocks, len(self._params), segments, o.level, tolerance=o.fop_tolerance,
                             eta_convention=o.eta_convention, modality_weighting=o.modality_weighting,
                             modality_weight_beta=o.modality_weight_beta,
                             all_reduce_sum=self.distributor.all_reduce_sum,
                             needs_sums=o.level == "global" or bool(self.plan.split_params()),
                             counters=self.counters)
        self._spec = WindowSpec(self._params, self._blocks, self.distributor, self._to_layout, o.pair_source,
                                o.fold_schedule, o.fop, self._comm_dtype())
        self._window: Optional[Window] = None
        self._stats: dict[str, float] = {}
        sharded = self.distributor.world > 1
        self._capture = MicrostepCapture(self._params, self._on_microstep, o.capture) if o.fop or sharded else None

    # -- set-up ------------------------------------------------------------------------------------

    def _block_rotations(self, param: int, shape: tuple[int, ...]) -> tuple[bool, ...]:
        """Which dims of a block's own preconditioning layout are rotated (the plan's cost model)."""
        p = self._params[param]
        return self.layout(p, self._group_of[p], shape).preconditioned

    def _plan_head_segments(self, head_splits: Mapping[str, tuple[int, int]]) -> dict[int, tuple[int, int]]:
        segments = {}
        for i, p in enumerate(self._params):
            name = self.routes[p].name
            split = next((s for pat, s in head_splits.items() if name and fnmatchcase(name, pat)), None)
            if split is None:
                continue
            heads, dim = split
            blocks = self.plan.of_param(i)
            if len(blocks) > 1 or self.block_layout(blocks[0]).precond_shape != tuple(p.shape) or p.shape[dim] % heads:
                raise ValueError(f"head_splits: parameter {name!r} of shape {tuple(p.shape)} cannot be split into "
                                 f"{heads} heads along dim {dim} (needs one block, an unmerged layout and a "
                                 "divisible dim)")
            segments[blocks[0].index] = (dim, heads)
        if not segments:
            raise ValueError(f"level='head': head_splits {list(head_splits)} matched no parameter name "
                             "(pass named parameters, e.g. model.named_parameters())")
        return segments

    def block_layout(self, b: Block) -> Layout:
        p = self._params[b.param]
        return self.layout(p, self._group_of[p], b.shape)

    def block_state(self, b: Block) -> dict:
        return self.state[self._params[b.param]].setdefault("blocks", {}).setdefault(b.ordinal, {})

    def _print_summary_once(self) -> None:
        if not self._summary_printed and self._verbose:
            self.distributor.describe_plan()
        super()._print_summary_once()

    def _to_layout(self, b: Block, flat: torch.Tensor) -> torch.Tensor:
        return self.block_layout(b).to_precond(flat.view(b.shape).to(state_dtype(self._params[b.param])))

    def _comm_dtype(self) -> torch.dtype:
        dtype = torch.float32
        for p in self._params:
            dtype = torch.promote_types(dtype, state_dtype(p))
        return dtype

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

    def _on_microstep(self, tag: Optional[str], deltas: dict[torch.Tensor, torch.Tensor]) -> None:
        if self.options.pair_source == "modality" and self.options.fop and tag is None:
            raise RuntimeError("pair_source='modality': run each backward inside `with optimizer.modality(tag):`")
        start = time.perf_counter()
        if self._window is None:
            self._window = self._open_window()
        self._window.add(tag, deltas)
        self.counters["microsteps"] += 1
        self.counters["microstep_seconds"] += time.perf_counter() - start

    def _open_window(self) -> Window:
        """The metric of every owned block whose SOAP state has a second moment (frozen for the window)."""
        metrics = {}
        for b in self.distributor.owned:
            st = self.block_state(b)
            if self.options.fop and st.get("step", 0) >= 1:
                eps = self._group_of[self._params[b.param]]["eps"]
                metrics[b.index] = BlockMetric(st["Q"], st["exp_avg_sq"].sqrt() + eps, self.levels.segments.get(b.index))
            elif self.options.fop:
                self.counters["fop_metric_not_ready"] += 1
        self.levels.betas = []
        return Window(self._spec, metrics, self.levels)

    # -- the step ----------------------------------------------------------------------------------

    def _update(self) -> None:
        if self._capture is None:  # one process, FOP off: plain SOAP on p.grad
            self._soap_on_grads()
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

    def _soap_on_grads(self) -> None:
        scale = self._clip_scale(sum(float(p.grad.double().square().sum()) for p in self._params if p.grad is not None))
        for b in self.distributor.owned:
            p = self._params[b.param]
            if p.grad is not None:
                g = self._to_layout(b, p.grad[b.slices])
                soap_update(self.block_state(b), p.data[b.slices], g * scale if scale != 1.0 else g,
                            self.block_layout(b), self._group_of[p], self.counters)

    def _step_window(self, w: Window) -> None:
        """Drain -> fold -> boundary sums -> SOAP on the owned blocks -> write the updates back."""
        w.drain()
        folded = w.folded() if self.options.fop else None
        if self.options.fop and folded is None:
            self.counters["fop_unpaired_steps"] += 1
        fop_items = {i: x * w.microsteps for i, x in folded.items()} if folded else {}
        present, scale, eta = self._boundary_sums(w, fop_items)
        if scale is None:
            self.counters["skipped_nonfinite_steps"] += 1
            return
        updated = {}
        for b in self.distributor.owned:
            if b.param not in present:
                continue
            updated[b.index] = self._update_block(b, w, fop_items, scale, eta)
        self.distributor.write_back(self._params, updated)
        self._stats = self.levels.take_stats(list(eta.values()))

    def _update_block(self, b: Block, w: Window, fop_items: Bundle, scale: float, eta: dict) -> torch.Tensor:
        p = self._params[b.param]
        view = p.data[b.slices]
        g = w.plain[b.index] * scale if scale != 1.0 else w.plain[b.index]
        moment, lr_scale = None, 1.0
        if b.index in fop_items:
            metric = w.metrics[b.index]
            moment = metric.finish(fop_items[b.index] * scale if scale != 1.0 else fop_items[b.index])
            lr_scale = metric.expand(eta[b.index], fop_items[b.index])
        soap_update(self.block_state(b), view, g, self.block_layout(b), self._group_of[p], self.counters,
                    moment, lr_scale)
        return view

    def _clip_scale(self, norm_sq: float) -> float:
        """max_grad_norm / ||G|| when the global norm exceeds max_grad_norm, else 1."""
        max_norm = self.options.max_grad_norm
        if max_norm is None:
            return 1.0
        norm = norm_sq ** 0.5
        return max_norm / (norm + 1e-6) if norm > max_norm else 1.0

    def _check_untouched(self) -> None:
        for p in self._params:
            captured = self._capture.accumulated(p)
            if captured is not None and (p.grad is None or not _same(p.grad, captured)):
                raise RuntimeError("p.grad changed after the last backward (e.g. by clip_grad_norm_); MLFOPSOAP folds "
                                   "the captured micro-step gradients, so clip with MLFOPSOAP(max_grad_norm=...) "
                                   "instead")

    def _boundary_sums(self, w: Window, fop_items: Bundle):
        """One fp64 all-reduce for: a non-finite flag, the squared global norm, which parameters had a
        gradient on some rank, and the eta* partials. Returns (present params, clip scale or None, eta)."""
        n, segs = len(self._params), self.levels.max_segments
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
        self.levels.add_into(vec[2 + n:].view(n, segs, 2), eta_local)
        vec = self.distributor.all_reduce_sum(vec)
        if vec[0] > 0:
            return set(), None, {}
        present = {i for i in range(n) if vec[2 + i] > 0}
        scale = self._clip_scale(float(vec[1]))
        return present, scale, self.levels.eta(vec[2 + n:].view(n, segs, 2), eta_local)

    # -- what others read --------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """|beta*| and eta* (mean, min, max) of the last step, over this rank's blocks."""
        return dict(self._stats)

    @property
    def in_window(self) -> bool:
        """True between the first micro-step of a step and the step() that ends it."""
        return self._window is not None

    def describe(self) -> str:
        return type(self).__name__

    def block_states(self) -> list[tuple[Block, dict]]:
        """The state of every block this rank owns (what a checkpoint saves)."""
        return [(b, self.block_state(b)) for b in self.distributor.owned]

    def runtime_state(self) -> dict:
        """State that is not per block: fisher_norm's running norms."""
        return {"modality_norm_ema": dict(self.levels.modality_norm_ema)}

    def load_runtime_state(self, state: dict) -> None:
        self.levels.modality_norm_ema = dict(state.get("modality_norm_ema", {}))

    def state_dict(self) -> dict:
        if self._window is not None:
            raise RuntimeError(f"state_dict() called mid-accumulation ({self._window.microsteps} micro-steps captured "
                               "since the last step()); save after step()")
        return {**super().state_dict(), "runtime": self.runtime_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.load_runtime_state(state_dict.pop("runtime", {}))
        super().load_state_dict(state_dict)

    def close(self) -> None:
        """Remove the gradient hooks."""
        if self._capture is not None:
            self._capture.remove()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, counting NaN as equal to NaN (a NaN gradient is handled by the non-finite skip)."""
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
