"""The step's one fp64 all-reduce after the folds, and what it tells the step.

Per step, every rank sums into one small vector: a non-finite flag (G or G_fop), ||G||^2 (for
clipping), which parameters had a gradient on some rank, and per parameter FOP's diagnostics
(|beta*|, eta*, x of its top fold, averaged over its blocks; ||G_fop - G||^2 and ||G||^2). One
all-reduce, one host read of the head (flag, norm, presence); the diagnostics stay on the device
until `stats()` is asked for them (a logging step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from distopt.fop import BlockMetric, correction_partials
from distopt.host import host_values
from distopt.levels import Bundle, Levels
from distopt.plan import Plan


@dataclass(frozen=True)
class Outcome:
    finite: bool            # no rank saw a non-finite G or G_fop: the step may update
    norm_sq: float          # ||G||^2 over every parameter and rank
    present: set[int]       # parameters some rank had a gradient for


class Boundary:
    def __init__(self, plan: Plan, n_params: int, device: torch.device) -> None:
        self.plan, self.n_params, self.device = plan, n_params, device
        self.blocks_per_param = [len(plan.of_param(i)) for i in range(n_params)]
        self.diagnostics: Optional[torch.Tensor] = None  # (params, 6) of the last step, summed over ranks

    def reduce(self, plain: Bundle, metrics: dict[int, BlockMetric], fop_items: Bundle, present: set[int],
               levels: Levels, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Outcome:
        """The all-reduce (module docstring) and its head, read on the host (one synchronisation)."""
        n = self.n_params
        vec = torch.zeros(2 + n + 6 * n, dtype=torch.float64, device=self.device)
        if present:
            vec[2 + torch.tensor(sorted(present), device=vec.device)] = 1.0
        diagnostics = vec[2 + n:].view(n, 6)  # |beta*|, eta*, x, folded (each 1/blocks); ||G_fop - G||^2, ||G||^2
        for i, g in plain.items():
            sq = g.square().sum(dtype=torch.float64)
            vec[0] += (~torch.isfinite(sq)).double()
            vec[1] += sq
            if i in fop_items:
                b = self.plan.blocks[i]
                vec[0] += (~torch.isfinite(fop_items[i]).all()).double()
                share = 1.0 / self.blocks_per_param[b.param]
                diagnostics[b.param, :3] += levels.diagnostics(i) * share
                diagnostics[b.param, 3] += share
                diagnostics[b.param, 4:] += correction_partials(metrics[i].prepare(g), fop_items[i])
        vec = all_reduce_sum(vec)
        head = host_values(vec[:2 + n], stand_in=[0.0, 0.0] + [float(i in present) for i in range(n)])
        self.diagnostics = vec[2 + n:].view(n, 6)
        return Outcome(head[0] == 0, head[1], {i for i in range(n) if head[2 + i] > 0})

    def stats(self, names: Sequence[str]) -> dict[str, float]:
        """FOP's diagnostics of the last step (docs/algorithm.md section 4a.3), equal on every rank: per
        layer (`<kind>/<parameter>`) and over layers (`<kind>_mean|min|max`), for |beta*|, eta*,
        x = D^2 / (A E) (the squared M^-1-cosine of the mean and the orthogonal part: FOP's effect is
        O(x)) and correction = ||G_fop - G|| / ||G||. A run whose x is ~0 cannot show an effect of FOP."""
        if self.diagnostics is None:
            return {}
        rows = host_values(self.diagnostics)
        out: dict[str, float] = {}
        columns: dict[str, list[float]] = {}
        for i, name in enumerate(names):
            beta, eta, x, folded, diff, total = rows[6 * i:6 * i + 6]
            if folded < 0.5:
                continue
            row = dict(beta_abs=beta, eta=eta, cosine_sq=x, correction=(diff / total) ** 0.5 if total > 0 else 0.0)
            for kind, value in row.items():
                out[f"{kind}/{name}"] = value
                columns.setdefault(kind, []).append(value)
        for kind, column in columns.items():
            out.update({f"{kind}_mean": sum(column) / len(column), f"{kind}_min": min(column),
                        f"{kind}_max": max(column)})
        return out
