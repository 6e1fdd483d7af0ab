"""FOP scalars at the three levels: per layer, per attention head, or one set for the model.

Every FOP scalar (s, beta*, eta*) is a ratio of inner products, and inner products are sums over
elements (distopt.fop). A level is therefore only a way of summing the blocks' partials before the
ratios are formed:

    layer   partials of one parameter's blocks summed (its blocks may live on several owners)
    head    partials of one attention-head slice of q/k/v (rows) or o_proj (columns)
    global  all partials summed: FOP on the concatenation of every block, block-diagonal metric

A table of shape (parameters, segments, width) holds the sums; when a parameter spans owners or the
level is global it is completed by one small fp64 all-reduce, the only communication here.
Head slices come from `head_splits` ({name pattern: (heads, dim)}; `attention_head_splits` writes
them for Llama/Qwen2-style attention), planned per block by `head_segments`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Optional

import torch

from distopt.fop import BlockMetric, cosine_sq, fold_eta, fop_coefficients, fop_combine
from distopt.host import host_values
from distopt.options import MLFOPOptions
from distopt.plan import Block, Plan
from distopt.soap import Counters, Layout, Tally

Bundle = dict[int, torch.Tensor]  # one item per owned block (block index -> tensor)
AllReduce = Callable[[torch.Tensor], torch.Tensor]

ETA_FACTORS = {"mean": 1.0, "sum": 2.0, "none": 0.0}


def attention_head_splits(num_heads: int, num_kv_heads: Optional[int] = None) -> dict[str, tuple[int, int]]:
    """`head_splits` for Llama/Qwen2-style attention: q/k/v split by output rows, o_proj by input columns."""
    kv = num_kv_heads or num_heads
    return {"*q_proj.weight": (num_heads, 0), "*k_proj.weight": (kv, 0),
            "*v_proj.weight": (kv, 0), "*o_proj.weight": (num_heads, 1)}


def head_segments(head_splits: Optional[Mapping[str, tuple[int, int]]], names: Sequence[str], plan: Plan,
                  layout: Callable[[Block], Layout]) -> dict[int, tuple[int, int]]:
    """Block index -> (dim, heads) for every parameter a `head_splits` pattern names."""
    segments = {}
    for i, name in enumerate(names):
        split = next((s for pat, s in (head_splits or {}).items() if fnmatchcase(name, pat)), None)
        if split is None:
            continue
        heads, dim = split
        blocks = plan.of_param(i)
        shape = blocks[0].shape
        if len(blocks) > 1 or layout(blocks[0]).precond_shape != shape or shape[dim] % heads:
            raise ValueError(f"head_splits: parameter {name!r} of shape {shape} cannot be split into "
                             f"{heads} heads along dim {dim} (needs one block, an unmerged layout and a "
                             "divisible dim)")
        segments[blocks[0].index] = (dim, heads)
    if not segments:
        raise ValueError(f"level='head': head_splits {list(head_splits or {})} matched no parameter name "
                         "(pass named parameters, e.g. model.named_parameters())")
    return segments


class Levels:
    def __init__(self, blocks: dict[int, Block], n_params: int, segments: dict[int, tuple[int, int]],
                 options: MLFOPOptions, *, all_reduce_sum: AllReduce, needs_sums: bool, counters: Counters,
                 tally: Tally, device: torch.device) -> None:
        self.blocks, self.n_params, self.level = blocks, n_params, options.level
        self.segments = segments
        self.max_segments = max([heads for _, heads in segments.values()] + [1])
        self.tolerance, self.eta_convention = options.fop_tolerance, options.eta_convention
        self.modality_weighting, self.modality_weight_beta = options.modality_weighting, options.modality_weight_beta
        self.all_reduce_sum, self.needs_sums, self.counters, self.tally = all_reduce_sum, needs_sums, counters, tally
        self.device = device
        self.modality_norm_ema: dict[str, float] = {}  # fisher_norm's running natural-gradient norms
        self.top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (partials, beta*) of its last fold

    def begin_window(self) -> None:
        self.top = {}

    # -- tables ------------------------------------------------------------------------------------

    def table(self, local: dict[int, torch.Tensor], width: int) -> torch.Tensor:
        """Blocks' partials (n_segments, width) summed per parameter into a (params, segments, width)
        table; over ranks too when a parameter spans owners or the level is global."""
        table = torch.zeros(self.n_params, self.max_segments, width, dtype=torch.float64, device=self.device)
        self.add_into(table, local)
        return self.all_reduce_sum(table) if self.needs_sums else table

    def add_into(self, table: torch.Tensor, local: dict[int, torch.Tensor]) -> None:
        for i, v in local.items():
            table[self.blocks[i].param, :v.shape[0]] += v

    def lookup(self, table: torch.Tensor, i: int, n_segments: int) -> torch.Tensor:
        """The partials that decide block i's scalars: its parameter's, or the model's at the global level."""
        if self.level == "global":
            return table.sum((0, 1)).unsqueeze(0)
        return table[self.blocks[i].param, :n_segments]

    # -- folds -------------------------------------------------------------------------------------

    def combine(self, metrics: dict[int, BlockMetric], b1: Bundle, n1: int, b2: Bundle, n2: int) -> Bundle:
        """One FOP fold of two equal-count bundles: c = a + beta* (d - s a) with the level's scalars.

        Block by block, in two passes (the partials, summed at the level; then c): a and d exist for one
        block at a time, and c is written into b1's tensors, which the folds own (b1 is returned)."""
        table = self.table({i: metrics[i].partials(*_average_and_difference(b1[i], n1, b2[i], n2)) for i in b1}, 5)
        for i in b1:
            a, d = _average_and_difference(b1[i], n1, b2[i], n2)
            partials = self.lookup(table, i, metrics[i].n_segments)
            s, beta, guarded = fop_coefficients(partials, self.tolerance)
            self.top[i] = (partials, beta)  # the last fold a block takes part in is the top-level fold
            self.tally.add("fop_beta_guarded", guarded.sum())
            b1[i].copy_(fop_combine(a, d, metrics[i].expand(s, a), metrics[i].expand(beta, a)))
        self.counters["fop_folds"] += len(b1)
        return b1

    def modality_weights(self, metrics: dict[int, BlockMetric], means: dict[str, Bundle]) -> list[float]:
        """fisher_norm: w_m proportional to 1 / EMA(||g_m||_{M^-1}), normalised so that w_text + w_image = 2."""
        if self.modality_weighting == "none":
            return [1.0, 1.0]
        beta = self.modality_weight_beta
        inverse = []
        for tag, mean in means.items():
            local = {i: metrics[i].eta_partials(x, x) for i, x in mean.items()}
            norm = host_values(self.table(local, 2)[..., 1].sum())[0] ** 0.5  # at step(): a host sync, counted
            self.counters["host_syncs"] += 1
            ema = self.modality_norm_ema
            ema[tag] = norm if tag not in ema else beta * ema[tag] + (1 - beta) * norm
            inverse.append(1.0 / max(ema[tag], 1e-30))
        return [2 * x / sum(inverse) for x in inverse]

    # -- eta* and what a step reports ---------------------------------------------------------------

    def eta(self, i: int, n_segments: int) -> torch.Tensor:
        """eta* of block i (per segment) in the configured convention: the top-level fold's, measured
        against that fold's own average, so in [1/2, 1] ('mean') for every K and schedule
        (distopt.fop.fold_eta); 1 where the block did not fold."""
        factor = ETA_FACTORS[self.eta_convention]
        if not factor or i not in self.top:
            return torch.ones(n_segments, dtype=torch.float64, device=self.device)
        return fold_eta(*self.top[i]) * factor

    def diagnostics(self, i: int) -> torch.Tensor:
        """[|beta*|, eta*, x = D^2 / (A E)] of block i's top fold, averaged over its segments."""
        partials, beta = self.top[i]
        return torch.stack([beta.abs().mean(), self.eta(i, beta.numel()).mean(), cosine_sq(partials).mean()])


def _average_and_difference(x1: torch.Tensor, n1: int, x2: torch.Tensor, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a = (n1 x1 + n2 x2) / (n1 + n2) and d = x1 - x2."""
    return (n1 * x1 + n2 * x2) / (n1 + n2), x1 - x2
