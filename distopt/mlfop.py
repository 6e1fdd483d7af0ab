"""ML-FOP-SOAP: SOAP plus multi-level Fisher-Orthogonal Projection of the accumulation micro-steps.

Per optimizer step, with G the plain accumulated gradient (mean over ranks, summed over the K
micro-steps) and g_1..g_K its micro-step parts:

    c      = fold(g_1, ..., g_K)          FOP folds in SOAP's metric (distopt.fold, distopt.fop)
    G_fop  = K c                          back to the scale of G (FOP off, or equal g_k, gives G)
    eta*   = <G, G_fop>_{M^-1} / <G_fop, G_fop>_{M^-1}
    SOAP step with: Kronecker statistics from G, Adam moments from rot(G_fop), update scaled by eta*.

The metric M is SOAP's state before this step (eigenbasis Q, dvec = sqrt(v) + eps). Until v exists
(a block's first two steps) M is a scalar and FOP is the plain mean, so nothing is folded.

This class tells the story of one step; the rooms it walks through are distopt.capture (each
backward's gradients as autograd produces them), distopt.window (when they leave the rank, and what
one step's micro-steps leave on the owner), distopt.distributor (where reduced gradients come from
and updates go), distopt.levels (layer, head or global FOP scalars) and distopt.soap (the update).
Options: distopt.options.MLFOPOptions; docs/algorithm.md lists every interpretation with its option.

Low-precision parameters (bf16, fp16) get an fp32 master copy of each block, held by its owner with
the rest of the block's state; the owner updates the master and writes the rounded value back.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from fnmatch import fnmatchcase
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distopt.capture import MicrostepCapture
from distopt.distributor import Distributor, LocalDistributor, OwnerDistributor, check_vector, disagreement
from distopt.fop import BlockMetric, correction_partials
from distopt.fsdp2 import FSDP2Distributor
from distopt.levels import Bundle, Levels
from distopt.options import MLFOPOptions
from distopt.plan import Block
from distopt.soap import SOAP, Layout, soap_update, state_dtype
from distopt.window import KEEP, REDUCE, STASH, Schedule, Window

COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def attention_head_splits(num_heads: int, num_kv_heads: Optional[int] = None) -> dict[str, tuple[int, int]]:
    """`head_splits` for Llama/Qwen2-style attention: q/k/v split by output rows, o_proj by input columns."""
    kv = num_kv_heads or num_heads
    return {"*q_proj.weight": (num_heads, 0), "*k_proj.weight": (kv, 0),
            "*v_proj.weight": (kv, 0), "*o_proj.weight": (num_heads, 1)}


def make_distributor(params: Sequence[torch.Tensor], process_group: Optional[dist.ProcessGroup] = None,
                     bucket_mb: float = 25.0, comm_dtype: torch.dtype = torch.float32) -> Distributor:
    """The one place that decides how blocks are communicated: FSDP2-sharded parameters (DTensors) get
    the FSDP2 distributor (over their mesh); replicated parameters get owners over the group (default:
    the world) when torch.distributed is initialised with more than one rank; else one process."""
    sharded = [isinstance(p, DTensor) for p in params]
    if any(sharded):
        if not all(sharded):
            raise ValueError("some parameters are FSDP2-sharded (DTensor) and some are not: apply fully_shard to the "
                             "root module too, so that every parameter the optimizer gets is sharded")
        return FSDP2Distributor(list(params), comm_dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        return OwnerDistributor(process_group, bucket_mb, comm_dtype)
    return LocalDistributor()


def _code(text: str) -> int:
    """A small integer for a name (its square stays exact in fp64 sums over any number of ranks)."""
    return zlib.crc32(text.encode()) % 2**16


class MLFOPSOAP(SOAP):
    """SOAP + FOP folding of micro-steps, sharded over ranks. Takes every option of
    distopt.options.MLFOPOptions as a keyword argument, plus the runtime objects:

    process_group: the ranks to shard over (default: the world, when torch.distributed is initialised).
    distributor: how blocks are communicated (default: distopt.distributor.make_distributor).
    """

    Options = MLFOPOptions
    accepts_sharded_parameters = True
    COUNTERS = SOAP.COUNTERS + ("microsteps", "reductions", "microstep_seconds", "host_syncs", "fop_folds",
                                "fop_beta_guarded", "fop_metric_not_ready", "fop_unpaired_steps",
                                "skipped_nonfinite_steps")

    def __init__(self, params: Iterable, *, process_group=None, distributor: Optional[Distributor] = None,
                 **options):
        super().__init__(params, **options)
        o: MLFOPOptions = self.options
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"parameters live on several devices {sorted(map(str, devices))}; MLFOPSOAP shards "
                             "over ranks, one device per rank: move the model to one device first")
        comm_dtype = COMM_DTYPES[o.comm_dtype]
        if any(state_dtype(p) == torch.float64 for p in self._params):
            comm_dtype = torch.float64  # fp64 parameters reduce in fp64
        self.distributor = distributor or make_distributor(self._params, process_group, o.bucket_mb, comm_dtype)
        self.distributor.set_device(next(iter(devices)) if devices else torch.device("cpu"))
        o.check_world(self.distributor.world)
        if not self.distributor.replicated_params and o.fop and o.pair_source == "ranks":
            raise ValueError("pair_source='ranks' folds per-rank gradients, but FSDP2's reduce-scatter hands over the "
                             "mean over ranks; use 'microstep' or 'modality' with FSDP2-sharded parameters")
        sequence = f"{o.fop}|{o.pair_source}|{o.fold_schedule}|{o.level}|{[str(p.dtype) for p in self._params]}"
        self.plan = self.distributor.make_plan(
            [(self.routes[p].name or f"param{i}", tuple(p.shape)) for i, p in enumerate(self._params)],
            o.max_block, self._block_precond, sequence)
        self._blocks = {b.index: b for b in self.plan.blocks}
        segments = self._plan_head_segments(o.head_splits) if o.level == "head" else {}
        self.levels = Levels(self._blocks, len(self._params), segments, o.level, tolerance=o.fop_tolerance,
                             eta_convention=o.eta_convention, modality_weighting=o.modality_weighting,
                             modality_weight_beta=o.modality_weight_beta,
                             all_reduce_sum=self.distributor.all_reduce_sum,
                             needs_sums=o.level == "global" or bool(self.plan.split_params()),
                             counters=self.counters, device=self.distributor.device)
        self.schedule = Schedule(o.fop, o.pair_source, o.fold_schedule)
        self._window: Optional[Window] = None
        self._action, self._tag = KEEP, ""
        self._taken: set[int] = set()
        self._diagnostics: Optional[torch.Tensor] = None
        self._fetch_masters = False
        self.window_peak_bytes = 0
        self._capture = MicrostepCapture(self._params, self, o.capture)

    # -- set-up ------------------------------------------------------------------------------------

    def _block_precond(self, param: int, shape: tuple[int, ...]):
        """A block's own preconditioning dims (size, rotated), for the plan's cost and memory model."""
        p = self._params[param]
        layout = self.layout(p, self._group_of[p], shape)
        return tuple(zip(layout.precond_shape, layout.preconditioned))

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

    def _to_layout(self, b: Block, grad: torch.Tensor) -> torch.Tensor:
        return self.block_layout(b).to_precond(grad.reshape(b.shape).to(state_dtype(self._params[b.param])))

    # -- micro-steps (distopt.capture calls these as autograd produces gradients) ----------------

    @contextlib.contextmanager
    def modality(self, tag: str) -> Iterator[None]:
        """Micro-steps back-propagated inside this block belong to modality `tag` (pair_source='modality')."""
        with self._capture.tagged(tag):
            yield

    def end_microstep(self, modality: Optional[str] = None) -> None:
        """Mark the end of a micro-step when capture='manual' (frameworks that drive micro-steps)."""
        self._capture.end_microstep(modality)

    def microstep_begins(self, tag: Optional[str]) -> None:
        if self.options.pair_source == "modality" and self.options.fop and tag is None:
            raise RuntimeError("pair_source='modality': run each backward inside `with optimizer.modality(tag):`")
        w = self._window = self._window or self._open_window()
        k = w.microsteps + 1
        self._action, self._taken, self._tag = self.schedule.action(k), set(), tag or ""
        if self._action == REDUCE:
            self._open("chunk", k, k - w.last_reduced, self.distributor.world)

    def grad_ready(self, index: int, p: torch.Tensor) -> None:
        """A parameter's gradient of this micro-step is complete: keep it, send it, or stash it."""
        start = time.perf_counter()
        w = self._window
        w.present.add(index)
        self._taken.add(index)
        if self._action == REDUCE:
            self.distributor.add(index, p.grad)
            p.grad = None
        elif self._action == STASH:
            stash = w.stash.setdefault(self._tag, {})
            stash[index] = p.grad if index not in stash else stash[index].add_(p.grad)
            p.grad = None
        self.counters["microstep_seconds"] += time.perf_counter() - start

    def microstep_ends(self, tag: Optional[str]) -> None:
        """The backward ended: fold the reductions that arrived, then send the rest of this one."""
        start = time.perf_counter()
        w = self._window
        w.microsteps += 1
        self.counters["microsteps"] += 1
        if self._action == STASH:
            w.stash.setdefault(self._tag, {})
            w.stash_microsteps[self._tag] = w.stash_microsteps.get(self._tag, 0) + 1
        self._receive(w)
        if self._action == REDUCE:
            for i, p in enumerate(self._params):  # earlier kept micro-steps of parameters unused in this one
                if i not in self._taken and p.grad is not None:
                    self.distributor.add(i, p.grad)
                    p.grad = None
            self.distributor.close()
            w.last_reduced = w.microsteps
        self.counters["microstep_seconds"] += time.perf_counter() - start

    def _receive(self, w: Window) -> None:
        for piece in self.distributor.take():
            w.receive(piece)
            self.window_peak_bytes = max(self.window_peak_bytes, w.held_bytes())

    def _open(self, group: str, k: int, microsteps: int, ranks: int) -> None:
        self.distributor.open(group, microsteps, ranks, (k, microsteps, _code(group), 0, 0, 0))
        self.counters["reductions"] += 1

    def _open_window(self) -> Window:
        """The metric of every owned block whose SOAP state has a second moment (frozen for the window)."""
        metrics = {}
        for b in self.distributor.owned:
            st = self.block_state(b)
            if self.options.fop and st.get("step", 0) >= 1:
                eps = self._group_of[self._params[b.param]]["eps"]
                metrics[b.index] = BlockMetric(st["Q"], st["exp_avg_sq"].sqrt() + eps, self.levels.segments.get(b.index),
                                               damping=self.options.fop_damping)
            elif self.options.fop:
                self.counters["fop_metric_not_ready"] += 1
        self.levels.begin_window()
        return Window(metrics, self.levels, self.options.fold_schedule, self.options.fop, self.distributor.divisor,
                      self._to_layout, self._blocks)

    # -- the step ----------------------------------------------------------------------------------

    def _update(self) -> None:
        """Agree -> flush -> fold -> boundary sums -> SOAP on the owned blocks -> write the updates back."""
        w = self._window or self._open_window()
        self._window = None
        try:
            if not self._agree(w):
                return
            self._flush(w)
            self._receive(w)
            self._verify_reductions()
            self._step_window(w)
        finally:
            self._capture.reset()

    def _agree(self, w: Window) -> bool:
        """One small all-reduce, inspected on every rank alike (so every rank takes the same branch):
        equal micro-step counts and modality tags, no p.grad edited after the last backward, and
        gradients only where a backward produced them. False: nothing to do this step."""
        stray = [i for i, p in enumerate(self._params) if p.grad is not None] if not w.microsteps else []
        touched = self._capture.touched() if w.microsteps else []
        tags = "\0".join(sorted(w.stash))
        missing = 0 if self.distributor.replicated_params else sum("master" not in st for _, st in self.block_states())
        vector = check_vector((w.microsteps, _code(tags), w.last_reduced, len(touched), len(stray), missing),
                              self.distributor.device)
        summed = self.distributor.all_reduce_sum(vector).tolist()
        self.counters["host_syncs"] += 1
        differ = disagreement(summed[:7])
        if differ:
            what = ["micro-step counts", "modality tags", "reduction points"][differ[0]]
            raise RuntimeError(f"ranks disagree on the {what} of this step (this rank: {w.microsteps} micro-steps, "
                               f"tags {sorted(w.stash)}): every rank must run the same number of backward passes, "
                               "with the same modalities, between two step() calls")
        if summed[7]:
            names = [self.routes[self._params[i]].name or f"param{i}" for i in touched]
            raise RuntimeError(f"p.grad changed after the last backward (e.g. by clip_grad_norm_) on some rank "
                               f"(here: {names[:3]}); MLFOPSOAP consumes each micro-step's gradient as backward "
                               "produces it, so clip with MLFOPSOAP(max_grad_norm=...) instead")
        if summed[9] and self.options.fop:
            raise RuntimeError("step() found gradients that no backward produced (assigned to p.grad?): ML-FOP-SOAP "
                               "folds micro-steps, which it captures during backward; run loss.backward(), or use "
                               "capture='manual' and call end_microstep() after setting p.grad")
        self._fetch_masters = summed[11] > 0  # some owner has no master yet (a new run, or a resumed one)
        return bool(w.microsteps or summed[9])

    def _flush(self, w: Window) -> None:
        """What the schedule left for step(): the tail, each modality's stash, or the rank-parity groups."""
        world, rank, k = self.distributor.world, self.distributor.rank, w.microsteps
        if self.options.fop and self.options.pair_source == "modality":
            for tag in sorted(w.stash):
                self._open(tag, k, w.stash_microsteps[tag], world)
                for i in range(len(self._params)):
                    self.distributor.add(i, w.stash[tag].get(i))
                self.distributor.close()
            w.stash.clear()
        elif self.options.fop and self.options.pair_source == "ranks":
            for parity, name in ((0, "even"), (1, "odd")):
                self._open(name, k, k, (world + 1 - parity) // 2)
                for i, p in enumerate(self._params):
                    self.distributor.add(i, p.grad if rank % 2 == parity else None)
                self.distributor.close()
            self._drop_grads(w)
        elif self.schedule.tail(k) or not k:
            self._open("chunk", k, k - w.last_reduced, world)
            for i, p in enumerate(self._params):
                if p.grad is not None:
                    w.present.add(i)
                self.distributor.add(i, p.grad)
            self.distributor.close()
            self._drop_grads(w)

    def _drop_grads(self, w: Window) -> None:
        for i, p in enumerate(self._params):
            if p.grad is not None:
                w.present.add(i)
                p.grad = None

    def _verify_reductions(self) -> None:
        checks = self.distributor.checks()
        if not checks:
            return
        self.counters["host_syncs"] += 1
        for j, summed in enumerate(torch.stack(checks).tolist()):
            differ = disagreement(summed)
            if differ:
                what = ["micro-step index", "micro-step count", "group (modality tag)"][min(differ[0], 2)]
                raise RuntimeError(f"ranks disagree on the {what} of reduction #{j} of this step: every rank must run "
                                   "the same micro-steps, with the same modalities")

    def _step_window(self, w: Window) -> None:
        folded = w.folded() if self.options.fop else None
        self.window_peak_bytes = max(self.window_peak_bytes, w.held_bytes())
        if self.options.fop and folded is None:
            self.counters["fop_unpaired_steps"] += 1
        fop_items = {i: x * w.microsteps for i, x in folded.items()} if folded else {}
        present, scale = self._boundary_sums(w, fop_items)
        if scale is None:
            self.counters["skipped_nonfinite_steps"] += 1
            return
        if self._fetch_masters:  # parameters sharded elsewhere: their owners' fp32 masters, from the shards
            for b, master in self.distributor.fetch(self._params).items():
                self.block_state(self._blocks[b]).setdefault("master", master)
        for b in self.distributor.owned:
            if b.param in present:
                self._update_block(b, w, fop_items, scale)
        if self.distributor.replicated_params:
            self.distributor.write_back(self._params)
        else:
            self.distributor.write_back(self._params, {b.index: self.block_state(b)["master"]
                                                       for b in self.distributor.owned})
        self.levels.count_guarded()

    def _update_block(self, b: Block, w: Window, fop_items: Bundle, scale: float) -> None:
        """SOAP on one owned block, fed by FOP as `coupling` says (docs/algorithm.md sections 4, 4a):
        moments  m from rot(G_fop), v from rot(G_fop) ('folded') or rot(G) ('plain'), step x eta*
        update   m, v from G (SOAP's own state), plus gamma unrot(rot(G_fop - G) / (sqrt(v) + eps))."""
        p = self._params[b.param]
        st = self.block_state(b)
        if not self.distributor.replicated_params:  # FSDP2: the owner's master is the block
            view, target, low_precision = None, st["master"], False
        else:
            view = p.data[b.slices]
            low_precision = state_dtype(p) != p.dtype
            if low_precision and "master" not in st:
                st["master"] = view.to(state_dtype(p))  # the block's fp32 master copy, on its owner only
            target = st["master"] if low_precision else view
        o = self.options
        g = w.plain[b.index] * scale if scale != 1.0 else w.plain[b.index]
        extra = {}
        if b.index in fop_items:
            metric = w.metrics[b.index]
            g_fop = metric.finish(fop_items[b.index] * scale if scale != 1.0 else fop_items[b.index])
            if o.coupling == "moments":
                extra["moment_grad_rot"] = g_fop
                extra["lr_scale"] = metric.expand(self.levels.eta(b.index, metric.n_segments), fop_items[b.index])
                if o.second_moment == "plain":
                    extra["second_moment_rot"] = metric.finish(_scaled(w.plain_prepared[b.index], scale))
            elif o.fop_gamma:
                extra["extra_rot"] = o.fop_gamma * (g_fop - metric.finish(_scaled(w.plain_prepared[b.index], scale)))
        soap_update(st, target, g, self.block_layout(b), self._group_of[p], self.counters, **extra)
        if low_precision:
            view.copy_(target)

    def _clip_scale(self, norm_sq: float) -> float:
        """max_grad_norm / ||G|| when the global norm exceeds max_grad_norm, else 1."""
        max_norm = self.options.max_grad_norm
        if max_norm is None:
            return 1.0
        norm = norm_sq ** 0.5
        return max_norm / (norm + 1e-6) if norm > max_norm else 1.0

    def _boundary_sums(self, w: Window, fop_items: Bundle):
        """One fp64 all-reduce for: a non-finite flag, the squared global norm, which parameters had a
        gradient on some rank, and per parameter the FOP diagnostics (|beta*|, eta*, x of its top fold;
        ||G_fop - G||^2 and ||G||^2). Returns (present params, clip scale or None); the diagnostics
        stay on the device for stats()."""
        n = len(self._params)
        vec = torch.zeros(2 + n + 6 * n, dtype=torch.float64, device=self.distributor.device)
        if w.present:
            vec[2 + torch.tensor(sorted(w.present), device=vec.device)] = 1.0
        diagnostics = vec[2 + n:].view(n, 6)  # |beta*|, eta*, x, folded (each 1/blocks); ||G_fop - G||^2, ||G||^2
        for i, g in w.plain.items():
            sq = g.square().sum(dtype=torch.float64)
            vec[0] += (~torch.isfinite(sq)).double()
            vec[1] += sq
            if i in fop_items:
                b = self._blocks[i]
                vec[0] += (~torch.isfinite(fop_items[i]).all()).double()
                share = 1.0 / len(self.plan.of_param(b.param))
                diagnostics[b.param, :3] += self.levels.diagnostics(i) * share
                diagnostics[b.param, 3] += share
                diagnostics[b.param, 4:] += correction_partials(w.plain_prepared[i], fop_items[i])
        vec = self.distributor.all_reduce_sum(vec)
        head = vec[:2 + n].tolist()
        self.counters["host_syncs"] += 1
        self._diagnostics = diagnostics
        if head[0] > 0:
            return set(), None
        return {i for i in range(n) if head[2 + i] > 0}, self._clip_scale(head[1])

    # -- what others read --------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """FOP's diagnostics of the last step (docs/algorithm.md section 4a.3), equal on every rank: per
        layer (`<kind>/<parameter>`) and over layers (`<kind>_mean|min|max`), for |beta*|, eta*,
        x = D^2 / (A E) (the squared M^-1-cosine of the mean and the orthogonal part: FOP's effect is
        O(x)) and correction = ||G_fop - G|| / ||G||. A run whose x is ~0 cannot show an effect of FOP."""
        if self._diagnostics is None:
            return {}
        rows = self._diagnostics.tolist()
        out, columns = {}, {}
        for i, (beta, eta, x, folded, diff, total) in enumerate(rows):
            if folded < 0.5:
                continue
            name = self.routes[self._params[i]].name or f"param{i}"
            values = dict(beta_abs=beta, eta=eta, cosine_sq=x, correction=(diff / total) ** 0.5 if total > 0 else 0.0)
            for kind, value in values.items():
                out[f"{kind}/{name}"] = value
                columns.setdefault(kind, []).append(value)
        for kind, values in columns.items():
            out.update({f"{kind}_mean": sum(values) / len(values), f"{kind}_min": min(values), f"{kind}_max": max(values)})
        return out

    @property
    def in_window(self) -> bool:
        """True between the first micro-step of a step and the step() that ends it."""
        return self._window is not None

    def describe(self) -> str:
        return type(self).__name__

    def uses_master(self, b: Block) -> bool:
        """Whether the block's state holds an fp32 master: low-precision or sharded (FSDP2) parameters."""
        p = self._params[b.param]
        return not self.distributor.replicated_params or state_dtype(p) != p.dtype

    def block_device(self, b: Block) -> torch.device:
        return self._params[b.param].device

    def block_states(self) -> list[tuple[Block, dict]]:
        """The state of every block this rank owns (what a checkpoint saves)."""
        return [(b, self.block_state(b)) for b in self.distributor.owned]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the optimizer, by kind (sums of tensor sizes, not allocator figures):
        block state now (SOAP state; fp32 masters apart), the window's peak, the communication buffers' peak."""
        masters = sum(_nbytes(st.get("master")) for _, st in self.block_states())
        state = sum(_nbytes(st) for _, st in self.block_states()) - masters
        return {"state": state, "masters": masters, "window_peak": self.window_peak_bytes,
                "comm_peak": self.distributor.meter.peak["total"]}

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
        self._capture.remove()


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale if scale != 1.0 else x


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
