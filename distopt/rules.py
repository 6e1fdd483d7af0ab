"""Two-objective gradient rules for the text and image losses, over any base optimizer.

Each rule maps the two per-modality gradients g1, g2 of a group of parameters to one direction,
written in the mean convention (identical gradients g give g); the wrapper steps with twice that,
the scale of the summed loss. Every rule needs only the group's three dot products:

    sum (vanilla):  (g1 + g2) / 2
    PCGrad (Yu et al. 2020): g1' = g1 - (g1.g2/|g2|^2) g2 if g1.g2 < 0 (likewise g2');  (g1' + g2') / 2
    MGDA (Desideri 2012; Sener & Koltun 2018): alpha* = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1)
        (1/2 if g1 = g2);  alpha* g1 + (1 - alpha*) g2, the min-norm point of the segment
    Pareto-LoRA-style (our reading of arXiv 2606.17296, whose rule is not public): equalise the
        strengths (u_i = g_i / |g_i|), take the MGDA direction of u1, u2, rescale by the mean original
        norm: (|g1| + |g2|)/2 * (alpha* u1 + (1 - alpha*) u2). For two unit vectors alpha* = 1/2, so
        this is the mean norm times the mean unit direction.
    sum with modality_weights [w_text, w_image] (the fixed-weight control): (w_text g_text + w_image
        g_image) / 2, the gradient of the loss w_text L_text + w_image L_image; [1, 1] is vanilla.
    GradNorm (Chen et al. 2018): loss weights w_i (w_text + w_image = 2, initially 1 each) that this step
        uses, (w1 g1 + w2 g2) / 2, and then moves so that each task's weighted gradient norm tracks
        its relative training rate (`gradnorm_weights`). It needs the modality losses: the loop hands
        them over with `optimizer.record_loss(tag, loss)` once per micro-step.

A group that only one modality reaches (the other's gradient is 0: a head or encoder of one pathway,
or a step with one modality) follows that one at the vanilla scale, w = (1/2, 1/2), under every rule,
so the update is exactly that modality's gradient: MGDA's min-norm point would be 0 there and the
Pareto-LoRA-style rule has no second direction to equalise.

Tags: "text" or "understanding" is the text modality, "image" or "generation" the image one (what
modality_weights and GradNorm's weights refer to). Each micro-step's backward runs inside
`optimizer.modality(tag)`; the per-modality gradients (summed
over micro-steps) are averaged over ranks, combined per group, clipped, and handed to the base
optimizer. `granularity`: 'layer' (per module: a LoRA layer's A and B matrices form one group, as do
a module's weight and bias; the default, as in Pareto LoRA) or 'global' (one vector, as in the
PCGrad and MGDA papers). The wrapper owns gradient communication (DeepSpeed's backward all-reduce
is switched off, see deepspeed_glue): the rule needs the two modality gradients of the whole batch,
which one all-reduce of [g1; g2] per step provides.

With ML-FOP-SOAP as the base, the rule's two weighted terms 2 w1 g1 and 2 w2 g2 are handed over as
two micro-steps tagged with their modality: their sum is the rule's update and FOP folds the pair.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional, Union, overload

import torch

from distopt.capture import MicrostepCapture
from distopt.clipping import clip_scale
from distopt.comm import Checks, Comm, code
from distopt.host import host_values
from distopt.options import RULES, RuleOptions
from distopt.protocols import Instrumented, TakesMicrosteps, comm_bytes_of, counters_of, in_window, stats_of

MODALITY_TAGS = (("text", "understanding"), ("image", "generation"))  # index 0: text, 1: image


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dtype=torch.float64)


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of at least one tensor (Python's sum starts from the integer 0)."""
    return functools.reduce(torch.add, tensors)


def mgda_alpha(g11: torch.Tensor, g12: torch.Tensor, g22: torch.Tensor) -> torch.Tensor:
    """Minimiser of |alpha g1 + (1 - alpha) g2|^2 over [0, 1], from the dot products."""
    denom = g11 - 2 * g12 + g22  # |g1 - g2|^2
    alpha = (g22 - g12) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, alpha.clamp(0.0, 1.0), torch.full_like(denom, 0.5))


def gradnorm_weights(weights: torch.Tensor, norms: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor,
                     alpha: float, lr: float) -> torch.Tensor:
    """GradNorm's next loss weights (Chen et al. 2018, Algorithm 1) for T tasks, all tensors of shape (T,):
    `weights` w_i (summing to T), `norms` n_i = |grad L_i| (unweighted), `losses` L_i(t), `initial` L_i(0).

        G_i = w_i n_i            Gbar = mean_i G_i                    (weighted gradient norms)
        r_i = Lt_i / mean_j Lt_j, with Lt_i = L_i(t) / L_i(0)         (relative inverse training rate)
        L_grad = sum_i | G_i - Gbar r_i^alpha |                       (the target is held constant)
        dL_grad/dw_i = sign(G_i - Gbar r_i^alpha) n_i
        w_i <- w_i - lr dL_grad/dw_i / mean_j n_j,  then clamped to >= 1e-3 and rescaled to sum to T

    The paper steps w with its optimizer's rule; the gradient is in units of gradient norms, which
    move by orders of magnitude over training, so we divide it by the mean norm: lr is then a step
    in the weights' own units, whatever the loss scale. The clamp keeps a weight positive (a
    negative loss weight would ascend that loss)."""
    g = weights * norms
    target = g.mean() * ((losses / initial) / (losses / initial).mean()) ** alpha
    step = torch.sign(g - target) * norms / norms.mean().clamp_min(torch.finfo(norms.dtype).tiny)
    new = (weights - lr * step).clamp_min(1e-3)
    return new * (len(new) / new.sum())


def modality_index(tag: str, field: str) -> int:
    """0 for a text tag, 1 for an image tag (MODALITY_TAGS); `field` names the option that needs it."""
    for index, names in enumerate(MODALITY_TAGS):
        if tag in names:
            return index
    raise ValueError(f"{field}: modality tag {tag!r} is neither text {MODALITY_TAGS[0]} nor image "
                     f"{MODALITY_TAGS[1]}; tag micro-steps with one of those names")


def rule_weights(rule: str, g11: torch.Tensor, g12: torch.Tensor,
                 g22: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) with direction = w1 g1 + w2 g2 (mean convention), from the group's dot products; for the
    rules that need nothing else (GradNorm's weights are state, see TwoObjective)."""
    if rule not in RULES or rule == "gradnorm":
        raise ValueError(f"rule={rule!r} is invalid here: choose one of {[r for r in RULES if r != 'gradnorm']}")
    half = torch.full_like(g11, 0.5)
    if rule == "sum" or float(g11) == 0 or float(g22) == 0:  # one modality only: follow it, at the vanilla scale
        return half, half
    if rule == "pcgrad":
        conflict = g12 < 0
        c1 = torch.where(conflict, g12 / g22, torch.zeros_like(g12))  # g1' = g1 - c1 g2
        c2 = torch.where(conflict, g12 / g11, torch.zeros_like(g12))  # g2' = g2 - c2 g1
        return (1 - c2) / 2, (1 - c1) / 2
    if rule == "mgda":
        alpha = mgda_alpha(g11, g12, g22)
        return alpha, 1 - alpha
    n1, n2 = g11.sqrt(), g22.sqrt()  # pareto_lora: MGDA on the unit vectors u1, u2 gives alpha = 1/2
    mean = (n1 + n2) / 2
    return mean / (2 * n1), mean / (2 * n2)


def combine(rule: str, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The rule's direction for two gradients of one group (mean convention)."""
    w1, w2 = rule_weights(rule, _dot(g1, g1), _dot(g1, g2), _dot(g2, g2))
    return w1.to(g1.dtype) * g1 + w2.to(g1.dtype) * g2


def module_of(name: Optional[str], fallback: int) -> str:
    """Group key: the module a parameter belongs to; a LoRA layer's A and B share their base module."""
    if name is None:
        return f"#{fallback}"
    lora = re.match(r"(.*)\.lora_[AB]\b", name)
    return lora.group(1) if lora else name.rsplit(".", 1)[0]


class GradNorm:
    """GradNorm's runtime state: the loss weights per group (per tag) and the initial losses L_i(0);
    `weights` gives this step's pair, `step` moves them after the step used them (gradnorm_weights)."""

    def __init__(self, alpha: float, lr: float) -> None:
        self.alpha, self.lr = alpha, lr
        self.state: dict[str, dict[str, Any]] = {"initial_loss": {}, "weights": {}}

    def weights(self, key: str, tags: list[str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(like[0]) == 0 or float(like[1]) == 0:  # one modality only: follow it, at the vanilla scale
            return torch.full_like(like[0], 0.5), torch.full_like(like[0], 0.5)
        weights = self.state["weights"].get(key, {})
        w1, w2 = (weights.get(t, 1.0) / 2 for t in tags)
        return torch.full_like(like[0], w1), torch.full_like(like[0], w2)

    def step(self, tags: list[str], dots: dict[str, list[torch.Tensor]], losses: dict[str, float]) -> None:
        """Move every group's weights (groups both modalities reach)."""
        missing = [t for t in tags if t not in losses]
        if missing:
            raise RuntimeError(f"gradnorm: no loss recorded for modality {missing} this step; call "
                               "optimizer.record_loss(tag, loss) for every micro-step")
        for t in tags:
            self.state["initial_loss"].setdefault(t, losses[t])
        current = torch.tensor([losses[t] for t in tags], dtype=torch.float64)
        initial = torch.tensor([self.state["initial_loss"][t] for t in tags], dtype=torch.float64)
        initial = initial.clamp_min(torch.finfo(torch.float64).tiny)
        for key, (g11, _, g22) in dots.items():
            if float(g11) == 0 or float(g22) == 0:
                continue
            old = self.state["weights"].get(key, {})
            weights = torch.tensor([old.get(t, 1.0) for t in tags], dtype=torch.float64)
            norms = torch.stack([g11, g22]).to("cpu", torch.float64).sqrt()  # host scalars, as the weights
            new = gradnorm_weights(weights, norms, current, initial, self.alpha, self.lr)
            self.state["weights"][key] = dict(zip(tags, new.tolist(), strict=True))


class TwoObjective(torch.optim.Optimizer):
    """Combine two per-modality gradients by `rule`, then step `base`, a built optimizer (the registry
    builds it from the same config). Options: distopt.options.RuleOptions (rule, granularity, capture,
    max_grad_norm, which clips the combined gradient's global norm).

    modality_weights: [w_text, w_image] for rule 'sum' (None: [1, 1], vanilla). GradNorm:
    gradnorm_alpha (default 1.5), gradnorm_lr (default 0.025); its weights (per group: 'global' is the
    paper's one pair) and the initial losses L_i(0) are the rule's runtime state (`runtime_state()`,
    saved by state_dict() and by checkpoints). (All validated by distopt.options.RuleOptions.)

    The wrapper shares the base optimizer's param_groups and state, so LR schedulers, state_dict()
    and load_state_dict() act on the base optimizer. Layer groups come from parameter names (pass
    model.named_parameters()); unnamed tensors are each their own group. A base that takes tagged
    micro-steps (ML-FOP-SOAP with capture='manual') is handed the rule's two terms as two micro-steps.
    """

    def __init__(self, base: torch.optim.Optimizer, options: Optional[RuleOptions] = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError(f"pass either options= or keyword arguments, not both (got {sorted(kwargs)})")
        self.options = options if options is not None else RuleOptions(**kwargs)
        if isinstance(base, TakesMicrosteps) and not base.manual:
            raise ValueError("TwoObjective hands its base the rule's two terms as micro-steps: build the base "
                             "with capture='manual' (distopt.build_optimizer does)")
        self._base = base
        super().__init__([p for g in base.param_groups for p in g["params"]], {})
        self.param_groups = base.param_groups
        self.state = base.state
        self.rule, self.granularity, self.max_grad_norm = self.options.rule, self.options.granularity, \
            self.options.max_grad_norm
        self.modality_weights = self.options.modality_weights or (1.0, 1.0)
        self.gradnorm = GradNorm(1.5 if self.options.gradnorm_alpha is None else self.options.gradnorm_alpha,
                                 0.025 if self.options.gradnorm_lr is None else self.options.gradnorm_lr)
        self._params = [p for g in self.param_groups for p in g["params"]]
        names = [n for g in self.param_groups for n in (g.get("param_names") or [None] * len(g["params"]))]
        self._groups: dict[str, list[int]] = {}  # group key -> indices into self._params
        for i, n in enumerate(names):
            self._groups.setdefault("all" if self.granularity == "global" else module_of(n, i), []).append(i)
        self.comm = Comm()
        self._counts = {"steps_combined": 0, "steps_single_modality": 0}
        self.last_weights: dict[str, tuple[float, float]] = {}  # group -> (w1, w2) of the last combined step
        self._sums: dict[str, dict[torch.Tensor, torch.Tensor]] = {}
        self._tag: Optional[str] = None
        self._losses: dict[str, list[Any]] = {}  # tag -> [sum of recorded losses (a tensor), micro-steps] this step
        self._capture = MicrostepCapture(self._params, self, self.options.capture)

    @property
    def base(self) -> torch.optim.Optimizer:
        """The optimizer that steps and holds the state (built from the same config by the registry)."""
        return self._base

    @property
    def counters(self) -> Mapping[str, float]:
        """The wrapper's step counts and the base optimizer's counters (eigh, QR, folds...)."""
        return {**counters_of(self.base), **self._counts}

    def stats(self) -> dict[str, float]:
        """The base optimizer's (ML-FOP-SOAP: |beta*| and eta*), for logging."""
        return stats_of(self.base)

    def comm_bytes(self) -> dict[str, int]:
        """Bytes this rank handed to each kind of collective: the rule's all-reduce and the base's own."""
        out = dict(comm_bytes_of(self.base))
        for kind, n in self.comm.sent.items():
            out[kind] = out.get(kind, 0) + n
        return out

    @property
    def in_window(self) -> bool:
        return bool(self._sums) or in_window(self.base)

    @property
    def manual(self) -> bool:
        return self.options.capture == "manual"

    def describe(self) -> str:
        return f"TwoObjective({self.rule}, {self.granularity}, {type(self.base).__name__})"

    @contextlib.contextmanager
    def modality(self, tag: str) -> Iterator[None]:
        with self._capture.tagged(tag):
            yield

    def end_microstep(self, modality: Optional[str] = None) -> None:
        self._capture.end_microstep(modality)

    def record_loss(self, tag: str, loss: Union[float, torch.Tensor]) -> None:
        """This micro-step's loss of modality `tag` (GradNorm's L_i(t): the mean over the step's
        micro-steps of that modality and over ranks). Every rule accepts it, so the loop may always
        call it; only 'gradnorm' uses it. Kept on the device: no host synchronisation per micro-step."""
        value = loss.detach().double() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        finite = torch.isfinite(value)  # the loop stops on a non-finite loss; GradNorm must not divide by it first
        entry = self._losses.setdefault(tag, [0.0, 0.0])
        entry[0] = entry[0] + torch.where(finite, value, 0.0)
        entry[1] = entry[1] + finite.double()

    # capture sink: each micro-step's gradients go into its modality's sum (p.grad is consumed)

    def microstep_begins(self, tag: Optional[str]) -> None:
        if tag is None:
            raise RuntimeError(f"{self.rule}: run each backward inside `with optimizer.modality(tag):`")
        self._tag = tag

    def grad_ready(self, index: int, p: torch.Tensor) -> None:
        assert self._tag is not None and p.grad is not None
        acc = self._sums.setdefault(self._tag, {})
        acc[p] = p.grad if p not in acc else acc[p].add_(p.grad)
        p.grad = None

    def microstep_ends(self, tag: Optional[str]) -> None:
        pass

    def _reduced(self) -> tuple[dict[str, list[torch.Tensor]], list[bool], dict[str, float]]:
        """Per tag, every parameter's gradient averaged over ranks, whether any rank's backward reached
        it, and the mean recorded loss (absent when no rank recorded one): one all-reduce in the
        gradients' own precision (dot products are taken in fp64).
        Ranks must have seen the same tags (the layout depends on them): a checksum is compared first."""
        tags = sorted(self._sums)
        device = self._params[0].device
        if self.comm.world > 1:
            agreed = Checks(equal={"modalities": code("\0".join(tags))}).agree(self.comm.all_reduce_sum, device)
            if agreed.differ:
                raise RuntimeError(f"{self.rule}: ranks saw different modalities this step (this rank: {tags}); "
                                   "every rank must run the same modality in each micro-step")
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in self._params])
        present = torch.tensor([any(p in self._sums[t] for t in tags) for p in self._params], dtype=dtype,
                               device=device)
        losses = torch.stack([torch.as_tensor(x, dtype=dtype).to(device) for t in tags
                              for x in self._losses.get(t, [0.0, 0.0])])
        flat = torch.cat([self._sums[t].get(p, torch.zeros_like(p)).reshape(-1).to(dtype)
                          for t in tags for p in self._params] + [present, losses])
        if self.comm.world > 1:
            flat = self.comm.all_reduce_sum(flat) / self.comm.world
        out: dict[str, list[torch.Tensor]] = {}
        offset = 0
        for t in tags:
            out[t] = []
            for p in self._params:
                out[t].append(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        tail = host_values(flat[offset:])
        seen, pairs = [v > 0 for v in tail[:len(self._params)]], tail[len(self._params):]
        return out, seen, {t: pairs[2 * j] / pairs[2 * j + 1] for j, t in enumerate(tags) if pairs[2 * j + 1] > 0}

    def _terms(self, tags: list[str], g1: list[torch.Tensor], g2: list[torch.Tensor],
               losses: dict[str, float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The rule's two weighted terms 2 w1 g1 and 2 w2 g2 per parameter (their sum is the update)."""
        t1, t2 = list(g1), list(g2)
        self.last_weights = {}
        dots: dict[str, list[torch.Tensor]] = {}
        for key, members in self._groups.items():
            dots[key] = [_sum(_dot(a[i], b[i]) for i in members) for a, b in ((g1, g1), (g1, g2), (g2, g2))]
            w1, w2 = self._group_weights(key, tags, *dots[key])
            self.last_weights[key] = (float(w1), float(w2))
            for i in members:
                t1[i], t2[i] = 2 * w1 * g1[i], 2 * w2 * g2[i]
        if self.rule == "gradnorm":
            self.gradnorm.step(tags, dots, losses)
        return t1, t2

    def _group_weights(self, key: str, tags: list[str], g11: torch.Tensor, g12: torch.Tensor,
                       g22: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rule == "sum" and self.modality_weights != (1.0, 1.0):  # the loss w_text L_text + w_image L_image
            w1, w2 = (self.modality_weights[modality_index(t, "modality_weights")] / 2 for t in tags)
            return torch.full_like(g11, w1), torch.full_like(g11, w2)
        if self.rule != "gradnorm":
            return rule_weights(self.rule, g11, g12, g22)
        return self.gradnorm.weights(key, tags, torch.stack([g11, g22]))

    def runtime_state(self) -> dict[str, Any]:
        """State that lives between steps outside the base optimizer: GradNorm's weights and L_i(0)."""
        if self.rule != "gradnorm":
            return {}
        return {"gradnorm": {k: {kk: dict(vv) if isinstance(vv, dict) else vv for kk, vv in v.items()}
                             for k, v in self.gradnorm.state.items()}}

    def load_runtime_state(self, state: Optional[dict[str, Any]]) -> None:
        saved = (state or {}).get("gradnorm", {})
        self.gradnorm.state = {"initial_loss": dict(saved.get("initial_loss", {})),
                               "weights": {k: dict(v) for k, v in saved.get("weights", {}).items()}}

    def _clip(self, terms: list[list[torch.Tensor]]) -> None:
        if self.max_grad_norm is None:
            return
        norm_sq = host_values(_sum(_dot(s, s) for s in (_sum(parts) for parts in zip(*terms, strict=True))))[0]
        scale = clip_scale(norm_sq, self.max_grad_norm)
        if scale != 1.0:
            for parts in terms:
                for t in parts:
                    t.mul_(scale)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        if len(self._sums) > 2:
            raise RuntimeError(f"{self.rule} combines two modalities, got {sorted(self._sums)}")
        if not self._sums:
            raise RuntimeError(f"{self.rule}: step() without a captured backward; run each backward inside "
                               "`with optimizer.modality(tag):`")
        reduced, present, losses = self._reduced()
        tags = sorted(reduced)
        if len(tags) == 2:
            terms = list(self._terms(tags, reduced[tags[0]], reduced[tags[1]], losses))
            self._counts["steps_combined"] += 1
        else:  # one modality this step: nothing to combine, its gradient (times its fixed weight) is the update
            weight = self.modality_weights[modality_index(tags[0], "modality_weights")] \
                if self.modality_weights != (1.0, 1.0) else 1.0
            terms = [[g * weight for g in reduced[tags[0]]] if weight != 1.0 else reduced[tags[0]]]
            self._counts["steps_single_modality"] += 1
        self._clip(terms)
        self._sums.clear()
        self._losses.clear()
        self._capture.reset()
        if isinstance(self.base, TakesMicrosteps):  # each term is one tagged micro-step; their sum is the update
            for tag, parts in zip(tags, terms, strict=True):
                self._accumulate_grads(parts, present)
                self.base.end_microstep(tag)
        else:
            for parts in terms:
                self._accumulate_grads(parts, present)
        return self.base.step(closure)

    def _accumulate_grads(self, grads: list[torch.Tensor], present: list[bool]) -> None:
        """p.grad += g, as autograd would; p.grad stays None where no rank's backward reached p (so the
        base skips it, as it would without the wrapper)."""
        for p, g, seen in zip(self._params, grads, present, strict=True):
            if seen:
                g = g.to(p.dtype)
                p.grad = g.clone() if p.grad is None else p.grad + g

    def state_dict(self) -> dict[str, Any]:
        return {**self.base.state_dict(), "rule": self.runtime_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base loads; torch's loader replaces its param_groups and state, so share them again
        (an LR scheduler on the wrapper must keep reaching the base)."""
        state_dict = dict(state_dict)
        self.load_runtime_state(state_dict.pop("rule", {}))
        self.base.load_state_dict(state_dict)
        self.param_groups, self.state = self.base.param_groups, self.base.state

    def close(self) -> None:
        self._capture.remove()
        if isinstance(self.base, Instrumented):
            self.base.close()
