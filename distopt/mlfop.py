"""ML-FOP-SOAP: SOAP plus multi-level Fisher-Orthogonal Projection of the accumulation micro-steps.

Per optimizer step, with G the plain accumulated gradient (mean over ranks, summed over the K
micro-steps) and g_1..g_K its micro-step parts:

    c      = fold(g_1, ..., g_K)          FOP folds in SOAP's metric (distopt.fold, distopt.fop)
    G_fop  = K c                          back to the scale of G (FOP off, or equal g_k, gives G)
    eta*   = <G, G_fop>_{M^-1} / <G_fop, G_fop>_{M^-1}
    SOAP step with: Kronecker statistics from G, Adam moments from rot(G_fop), update scaled by eta*.

The metric M is SOAP's state before this step (eigenbasis Q, dvec = sqrt(v) + eps). Until v exists
(a block's first two steps) M is a scalar and FOP is the plain mean, so nothing is folded.

This class composes the rooms one step walks through, each once and in this order:
    distopt.accumulate    micro-steps on this rank: keep, stash or hand to the distributor
    distopt.distributors  reduced gradients of the owned blocks; fp32 masters; the write-back
    distopt.window        the owner's G and folds   (distopt.fold, distopt.levels: FOP's scalars)
    distopt.boundary      one fp64 all-reduce: non-finite flag, ||G||^2, presence, diagnostics
    distopt.soap          the update of each owned block
Options: distopt.options.MLFOPOptions; docs/algorithm.md lists every interpretation with its option.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from distopt.accumulate import Accumulator, Schedule
from distopt.boundary import Boundary
from distopt.capture import MicrostepCapture
from distopt.clipping import clip_scale
from distopt.distributors import Distributor, make_distributor
from distopt.fop import BlockMetric
from distopt.levels import Bundle, Levels, head_segments
from distopt.options import MLFOPOptions
from distopt.plan import Block, Plan, PrecondDims
from distopt.soap import Layout, soap_update, state_dtype
from distopt.soap_optimizer import SOAP
from distopt.state import tree_bytes
from distopt.window import Window


class MLFOPSOAP(SOAP):
    """SOAP + FOP folding of micro-steps, sharded over ranks. Takes every option of
    distopt.options.MLFOPOptions (as keyword arguments, or as `options`), plus the runtime objects:

    process_group: the ranks to shard over (default: the world, when torch.distributed is initialised).
    distributor: how blocks are communicated (default: distopt.distributors.make_distributor).
    """

    Options: ClassVar[type[MLFOPOptions]] = MLFOPOptions
    options: MLFOPOptions
    accepts_sharded_parameters: ClassVar[bool] = True
    COUNTERS = SOAP.COUNTERS + ("microsteps", "reductions", "microstep_seconds", "host_syncs", "fop_folds",
                                "fop_beta_guarded", "fop_metric_not_ready", "fop_unpaired_steps",
                                "skipped_nonfinite_steps")

    def __init__(self, params: Iterable[Any], options: Optional[MLFOPOptions] = None, *,
                 process_group: Optional[dist.ProcessGroup] = None, distributor: Optional[Distributor] = None,
                 **kwargs: Any) -> None:
        super().__init__(params, options, **kwargs)
        o = self.options
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        names = self.names
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"parameters live on several devices {sorted(map(str, devices))}; MLFOPSOAP shards "
                             "over ranks, one device per rank: move the model to one device first")
        self.distributor = distributor or make_distributor(self._params, o, process_group)
        self.distributor.set_device(next(iter(devices)) if devices else torch.device("cpu"))
        o.check_world(self.distributor.world)
        self.distributor.check(o)
        sequence = f"{o.fop}|{o.pair_source}|{o.fold_schedule}|{o.level}|{[str(p.dtype) for p in self._params]}"
        self._plan = self.distributor.make_plan([(n, tuple(p.shape)) for n, p in zip(names, self._params, strict=True)],
                                                o.max_block, self._block_precond, sequence)
        self._blocks = {b.index: b for b in self._plan.blocks}
        segments = head_segments(o.head_splits, names, self._plan, self.block_layout) if o.level == "head" else {}
        self.levels = Levels(self._blocks, len(self._params), segments, o,
                             all_reduce_sum=self.distributor.all_reduce_sum,
                             needs_sums=o.level == "global" or bool(self._plan.split_params()),
                             counters=self.counters, tally=self.tally, device=self.distributor.device)
        self.accumulator = Accumulator(self._params, Schedule(o.fop, o.pair_source, o.fold_schedule), self.distributor,
                                       self.counters)
        self.boundary = Boundary(self._plan, len(self._params), self.distributor.device)
        self._window: Optional[Window] = None
        self.window_peak_bytes = 0
        self._capture = MicrostepCapture(self._params, self, o.capture)

    # -- blocks ------------------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        return self._plan

    def _block_precond(self, param: int, shape: tuple[int, ...]) -> PrecondDims:
        """A block's own preconditioning dims (size, rotated), for the plan's cost and memory model."""
        p = self._params[param]
        layout = self.layout(p, self._group_of[p], shape)
        return tuple(zip(layout.precond_shape, layout.preconditioned, strict=True))

    def block_layout(self, b: Block) -> Layout:
        p = self._params[b.param]
        return self.layout(p, self._group_of[p], b.shape)

    def block_state(self, b: Block) -> dict[str, Any]:
        state: dict[str, Any] = self.state[self._params[b.param]].setdefault("blocks", {}).setdefault(b.ordinal, {})
        return state

    def _to_layout(self, b: Block, grad: torch.Tensor) -> torch.Tensor:
        return self.block_layout(b).to_precond(grad.reshape(b.shape).to(state_dtype(self._params[b.param])))

    def _print_summary_once(self) -> None:
        if not self._summary_printed and self.options.verbose:
            self.distributor.describe_plan()
        super()._print_summary_once()

    # -- micro-steps (distopt.capture calls these as autograd produces gradients) ----------------

    @contextlib.contextmanager
    def modality(self, tag: str) -> Iterator[None]:
        """Micro-steps back-propagated inside this block belong to modality `tag` (pair_source='modality')."""
        with self._capture.tagged(tag):
            yield

    def end_microstep(self, modality: Optional[str] = None) -> None:
        """Mark the end of a micro-step when capture='manual' (frameworks that drive micro-steps)."""
        self._capture.end_microstep(modality)

    @property
    def manual(self) -> bool:
        return self.options.capture == "manual"

    def microstep_begins(self, tag: Optional[str]) -> None:
        if self.options.pair_source == "modality" and self.options.fop and tag is None:
            raise RuntimeError("pair_source='modality': run each backward inside `with optimizer.modality(tag):`")
        self.accumulator.begin(tag)

    def grad_ready(self, index: int, p: torch.Tensor) -> None:
        start = time.perf_counter()
        self.accumulator.add(index, p)
        self.counters["microstep_seconds"] += time.perf_counter() - start

    def microstep_ends(self, tag: Optional[str]) -> None:
        """The backward ended: the reductions that arrived go to the window, then the rest of this one leaves."""
        start = time.perf_counter()
        if self._window is None:  # opened here, on the default stream, not in a gradient hook
            self._window = self._open_window()
        self._receive(self._window)
        self.accumulator.end()
        self.counters["microstep_seconds"] += time.perf_counter() - start

    def _receive(self, window: Window) -> None:
        window.receive(self.distributor.take())
        self.window_peak_bytes = max(self.window_peak_bytes, window.peak_bytes + self.accumulator.held_bytes())

    def _open_window(self) -> Window:
        """The metric of every owned block whose SOAP state has a second moment (frozen for the window)."""
        metrics = {}
        for b in self.distributor.owned:
            st = self.block_state(b)
            if self.options.fop and st.get("step", 0) >= 1:
                eps = self._group_of[self._params[b.param]]["eps"]
                metrics[b.index] = BlockMetric(st["Q"], functools.partial(_dvec, st, eps),
                                               self.levels.segments.get(b.index), damping=self.options.fop_damping)
            elif self.options.fop:
                self.counters["fop_metric_not_ready"] += 1
        self.levels.begin_window()
        return Window(metrics, self.levels, self.options.fold_schedule, self.options.fop, self._to_layout,
                      self._blocks)

    # -- the step ----------------------------------------------------------------------------------

    def _update(self) -> None:
        """accumulate -> distributor -> window (folds, levels) -> boundary -> SOAP -> write back."""
        window = self._window or self._open_window()
        self._window = None
        try:
            acc = self.accumulator
            touched = [self.names[i] for i in self._capture.touched()] if acc.microsteps else []
            stray = sum(p.grad is not None for p in self._params) if not acc.microsteps else 0
            states = {b.index: st for b, st in self.block_states()}
            counts = acc.close(touched, stray, self.distributor.step_counts(states), self.options.fop)
            if counts is not None:
                self._receive(window)
                self._step(window, states, counts)
        finally:
            self.accumulator.reset()
            self._capture.reset()

    def _step(self, w: Window, states: dict[int, dict[str, Any]], counts: dict[str, float]) -> None:
        k = self.accumulator.microsteps
        folded = w.folded() if self.options.fop else None
        self.window_peak_bytes = max(self.window_peak_bytes, w.peak_bytes)
        if self.options.fop and folded is None:
            self.counters["fop_unpaired_steps"] += 1
        fop_items = {i: x.mul_(k) for i, x in folded.items()} if folded else {}  # the fold's own tensors
        outcome = self.boundary.reduce(w.plain, w.metrics, fop_items, self.accumulator.present, self.levels,
                                       self.distributor.all_reduce_sum)
        self.counters["host_syncs"] += 1
        if not outcome.finite:
            self.counters["skipped_nonfinite_steps"] += 1
            return
        scale = clip_scale(outcome.norm_sq, self.options.max_grad_norm)
        blocks = [b for b in self.distributor.owned if b.param in outcome.present]
        targets = self.distributor.targets(self._params, states, blocks, counts)
        for b in blocks:
            self._update_block(b, targets[b.index], w, fop_items, scale)
        self.distributor.write_back(self._params, states, blocks)
        if self.tally.flush(self.counters):  # guarded folds, failed eighs and QRs: one host read
            self.counters["host_syncs"] += 1

    def _update_block(self, b: Block, target: torch.Tensor, w: Window, fop_items: Bundle, scale: float) -> None:
        """SOAP on one owned block, fed by FOP as `coupling` says (docs/algorithm.md sections 4, 4a):
        moments  m from rot(G_fop), v from rot(G_fop) ('folded') or rot(G) ('plain'), step x eta*
        update   m, v from G (SOAP's own state), plus gamma unrot(rot(G_fop - G) / (sqrt(v) + eps))."""
        o = self.options
        g = _scaled(w.plain[b.index], scale)
        extra: dict[str, Any] = {}
        if b.index in fop_items:
            metric = w.metrics[b.index]
            g_fop = metric.finish(_scaled(fop_items[b.index], scale))
            if o.coupling == "moments":
                extra["moment_grad_rot"] = g_fop
                extra["lr_scale"] = metric.expand(self.levels.eta(b.index, metric.n_segments), fop_items[b.index])
                if o.second_moment == "plain":
                    extra["second_moment_rot"] = metric.finish(metric.prepare(g))
            elif o.fop_gamma:
                extra["extra_rot"] = o.fop_gamma * (g_fop - metric.finish(metric.prepare(g)))
        p = self._params[b.param]
        soap_update(self.block_state(b), target, g, self.block_layout(b),
                    self._group_of[p], self.counters, self.tally, **extra)

    # -- what others read (distopt.protocols) ------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return self.boundary.stats(self.names)

    def comm_bytes(self) -> dict[str, int]:
        return dict(self.distributor.sent)

    @property
    def in_window(self) -> bool:
        return self._window is not None

    def keeps_master(self, b: Block) -> bool:
        """Whether the block's state holds an fp32 master: low-precision or sharded (FSDP2) parameters."""
        return self.distributor.keeps_master(self._params[b.param])

    def block_device(self, b: Block) -> torch.device:
        device: torch.device = self._params[b.param].device
        return device

    def block_states(self) -> list[tuple[Block, dict[str, Any]]]:
        """The state of every block this rank owns (what a checkpoint saves)."""
        return [(b, self.block_state(b)) for b in self.distributor.owned]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the optimizer, by kind (sums of tensor sizes, not allocator figures):
        block state now (SOAP state; fp32 masters apart), the window's peak, the communication buffers' peak."""
        masters = sum(tree_bytes(st.get("master")) for _, st in self.block_states())
        state = sum(tree_bytes(st) for _, st in self.block_states()) - masters
        return {"state": state, "masters": masters, "window_peak": self.window_peak_bytes,
                "comm_peak": self.distributor.meter.peak["total"]}

    def runtime_state(self) -> dict[str, Any]:
        """State that is not per block: fisher_norm's running norms."""
        return {"modality_norm_ema": dict(self.levels.modality_norm_ema)}

    def load_runtime_state(self, state: dict[str, Any]) -> None:
        self.levels.modality_norm_ema = dict(state.get("modality_norm_ema", {}))

    def state_dict(self) -> dict[str, Any]:
        if self._window is not None:
            raise RuntimeError(f"state_dict() called mid-accumulation ({self.accumulator.microsteps} micro-steps "
                               "captured since the last step()); save after step()")
        return {**super().state_dict(), "runtime": self.runtime_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.load_runtime_state(state_dict.pop("runtime", {}))
        super().load_state_dict(state_dict)

    def close(self) -> None:
        """Remove the gradient hooks."""
        self._capture.remove()


def _dvec(state: dict[str, Any], eps: float) -> torch.Tensor:
    """sqrt(v) + eps of a block's SOAP state as it is now (before this step's update: the window's metric)."""
    dvec: torch.Tensor = state["exp_avg_sq"].sqrt() + eps
    return dvec


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale if scale != 1.0 else x


