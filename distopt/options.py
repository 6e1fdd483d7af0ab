"""Typed, validated options of every optimizer in the registry.

One dataclass per optimizer, checked once in `__post_init__`, so that a config is refused before any
work starts with the same message the constructor would give. Each error is an `OptionError` that
names its field (`field=value is invalid: rule`), which the launcher turns into
`config error: optimizer.params.<field>: ...`.

Per-group hyper-parameters (lr, betas, eps, weight_decay, ...) still live in torch's `param_groups`,
where LR schedulers and `load_state_dict` expect them; these classes only decide what is valid.
Runtime objects (a process group, a distributor) are constructor arguments, not options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class OptionError(ValueError):
    """An invalid optimizer option. `field` names it; `detail` is the message without the field, for
    callers that print their own path (the launcher: `optimizer.params.<field>: <detail>`)."""

    def __init__(self, field_name: str, message: str, detail: Optional[str] = None):
        super().__init__(message)
        self.field = field_name
        self.detail = detail or message


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise OptionError(name, f"{name}={value!r} is invalid: {rule}", f"{value!r} is invalid: {rule}")


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise OptionError(name, f"{name}={value!r} is invalid: choose one of {tuple(allowed)}",
                          f"{value!r}; choose one of {tuple(allowed)}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class AdamWOptions:
    """torch.optim.AdamW's arguments (the baseline)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    amsgrad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _check(_number(self.lr) and self.lr >= 0, "lr", self.lr, "must be a number >= 0")
        _check(len(self.betas) == 2 and all(_number(b) and 0.0 <= b < 1.0 for b in self.betas), "betas", self.betas,
               "need two values in [0, 1)")
        _check(_number(self.eps) and self.eps > 0, "eps", self.eps, "must be > 0")
        _check(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")


@dataclass(frozen=True)
class SOAPOptions:
    """SOAP's arguments, with the reference soap.py defaults; `adam_patterns`/`soap_patterns` route
    named parameters (distopt.routing)."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.95)
    shampoo_beta: float = -1
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    merge_dims: bool = False
    precondition_1d: bool = False
    normalize_grads: bool = False
    data_format: str = "channels_first"
    correct_bias: bool = True
    adam_patterns: Optional[tuple[str, ...]] = None
    soap_patterns: tuple[str, ...] = ()
    verbose: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.adam_patterns is not None:
            object.__setattr__(self, "adam_patterns", tuple(self.adam_patterns))
        object.__setattr__(self, "soap_patterns", tuple(self.soap_patterns))
        _check(_number(self.lr) and self.lr >= 0, "lr", self.lr, "must be >= 0")
        _check(len(self.betas) == 2 and all(_number(b) and 0.0 <= b < 1.0 for b in self.betas), "betas", self.betas,
               "need two values in [0, 1)")
        _check(_number(self.shampoo_beta) and self.shampoo_beta < 1.0, "shampoo_beta", self.shampoo_beta,
               "must be < 1 (negative means: use betas[1])")
        _check(_number(self.eps) and self.eps > 0, "eps", self.eps, "must be > 0")
        _check(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(isinstance(self.precondition_frequency, int) and self.precondition_frequency >= 1,
               "precondition_frequency", self.precondition_frequency, "must be an integer >= 1")
        _check(isinstance(self.max_precond_dim, int) and self.max_precond_dim >= 0, "max_precond_dim",
               self.max_precond_dim, "must be an integer >= 0 (0 disables rotation: plain Adam)")
        _check(self.data_format in ("channels_first", "channels_last"), "data_format", self.data_format,
               "choose 'channels_first' or 'channels_last'")

    def group_defaults(self) -> dict[str, Any]:
        """The per-group hyper-parameters torch.optim keeps in param_groups."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SOAPOptions)
                if f.name not in ("adam_patterns", "soap_patterns", "verbose")}


PAIR_SOURCES = ("microstep", "modality", "ranks")
FOLD_SCHEDULES = ("streaming", "tree")
LEVELS = ("layer", "head", "global")
ETA_CONVENTIONS = ("mean", "sum", "none")
MODALITY_WEIGHTINGS = ("none", "fisher_norm")
CAPTURE_MODES = ("hooks", "manual")
COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the dtype gradients are reduced in
SECOND_MOMENTS = ("folded", "plain")
COUPLINGS = ("moments", "update")


@dataclass(frozen=True)
class MLFOPOptions(SOAPOptions):
    """ML-FOP-SOAP: SOAP's options plus the FOP readings (docs/algorithm.md lists each with its rationale).

    fop: False gives SOAP (bit-for-bit in one process).  pair_source: what is folded.
    fold_schedule: how micro-steps are folded.  level: granularity of (s, beta*, eta*).
    head_splits: {name pattern: (num_heads, dim)} for level 'head' (see distopt.attention_head_splits).
    eta_convention: 'mean' (g_tot = g_avg) | 'sum' (the paper's literal 2 g_avg) | 'none' (eta* = 1).
    modality_weighting: 'fisher_norm' weights each modality by the inverse EMA of its natural-gradient
    norm (level 'global', pair_source 'modality').  fop_tolerance: beta* = 0 when g_perp is negligible.
    capture: 'hooks' (a micro-step is one backward) | 'manual' (call end_microstep()).
    max_block: cut sides longer than this into blocks.  max_grad_norm: clip the accumulated gradient's
    global norm.  bucket_mb: size of the reduction buckets.  comm_dtype: 'fp32' (default) or 'bf16',
    the dtype gradients are reduced in (fp64 parameters always reduce in fp64).
    fop_damping: lam, FOP's metric M + lam (tr M / n) I (0: undamped).  second_moment: 'folded' (v from G_fop) |
    'plain' (v from G).  coupling: 'moments' (FOP feeds Adam's moments, step x eta*) | 'update' (SOAP's
    own step plus fop_gamma times the preconditioned correction; needs eta_convention 'none').
    """

    fop: bool = True
    pair_source: str = "microstep"
    fold_schedule: str = "streaming"
    level: str = "layer"
    head_splits: Optional[Mapping[str, tuple[int, int]]] = None
    eta_convention: str = "mean"
    modality_weighting: str = "none"
    modality_weight_beta: float = 0.9
    fop_tolerance: float = 1e-5
    capture: str = "hooks"
    max_block: Optional[int] = None
    max_grad_norm: Optional[float] = None
    bucket_mb: float = 25.0
    comm_dtype: str = "fp32"
    fop_damping: float = 0.1
    second_moment: str = "folded"
    coupling: str = "moments"
    fop_gamma: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(isinstance(self.fop, bool), "fop", self.fop, "must be true or false")
        _choice("pair_source", self.pair_source, PAIR_SOURCES)
        _choice("fold_schedule", self.fold_schedule, FOLD_SCHEDULES)
        _choice("level", self.level, LEVELS)
        _choice("eta_convention", self.eta_convention, ETA_CONVENTIONS)
        _choice("modality_weighting", self.modality_weighting, MODALITY_WEIGHTINGS)
        _choice("capture", self.capture, CAPTURE_MODES)
        if self.modality_weighting != "none":
            _check(self.level == "global" and self.pair_source == "modality", "modality_weighting",
                   self.modality_weighting, "it weights a text fold against an image fold and needs level='global' "
                   "and pair_source='modality'")
        _check(_number(self.modality_weight_beta) and 0.0 <= self.modality_weight_beta < 1.0, "modality_weight_beta",
               self.modality_weight_beta, "must be in [0, 1)")
        _check(_number(self.fop_tolerance) and 0.0 <= self.fop_tolerance < 1.0, "fop_tolerance", self.fop_tolerance,
               "must be in [0, 1)")
        if self.level == "head":
            _check(bool(self.head_splits), "head_splits", self.head_splits,
                   "level='head' needs head_splits={name pattern: (num_heads, dim)}, "
                   "e.g. distopt.attention_head_splits(num_heads, num_kv_heads)")
        _check(self.max_block is None or (isinstance(self.max_block, int) and self.max_block >= 1), "max_block",
               self.max_block, "must be a positive integer or None")
        _check(self.max_grad_norm is None or (_number(self.max_grad_norm) and self.max_grad_norm > 0),
               "max_grad_norm", self.max_grad_norm, "must be > 0 (or None for no clipping)")
        _check(_number(self.bucket_mb) and self.bucket_mb > 0, "bucket_mb", self.bucket_mb, "must be > 0")
        _choice("comm_dtype", self.comm_dtype, tuple(COMM_DTYPES))
        _check(_number(self.fop_damping) and 0 <= self.fop_damping < float("inf"), "fop_damping", self.fop_damping,
               "must be a finite number >= 0 (0: undamped)")
        _choice("second_moment", self.second_moment, SECOND_MOMENTS)
        _choice("coupling", self.coupling, COUPLINGS)
        _check(_number(self.fop_gamma) and self.fop_gamma >= 0, "fop_gamma", self.fop_gamma, "must be >= 0")
        if self.coupling == "update":
            _check(self.eta_convention == "none", "eta_convention", self.eta_convention,
                   "coupling='update' applies FOP after Adam's normalisation, where eta* (fitted to the folded "
                   "gradient the step no longer follows) does not apply: set eta_convention='none'")
            _check(self.second_moment == "folded", "second_moment", self.second_moment,
                   "coupling='update' keeps SOAP's moments exactly SOAP's (v from G): leave second_moment at its "
                   "default")

    def check_world(self, world: int) -> None:
        """Checks that need the number of ranks."""
        if self.pair_source == "ranks" and world < 2:
            detail = (f"'ranks' needs at least 2 ranks (this run has {world}): it folds the even-rank group's "
                      "gradient with the odd-rank group's; use 'microstep' or 'modality' in one process")
            raise OptionError("pair_source", f"pair_source={detail}", detail)

    def soap(self) -> SOAPOptions:
        return SOAPOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SOAPOptions)})


RULES = ("sum", "pcgrad", "mgda", "pareto_lora", "gradnorm")
GRANULARITIES = ("layer", "global")


@dataclass(frozen=True)
class RuleOptions:
    """A two-objective rule over a base optimizer (distopt.rules); `base_options` are the base's own.
    modality_weights [w_text, w_image]: rule 'sum' only (None: [1, 1], vanilla); gradnorm_alpha
    (default 1.5) and gradnorm_lr (default 0.025): rule 'gradnorm' only."""

    rule: str = "pareto_lora"
    base: str = "adamw"
    granularity: str = "layer"
    capture: str = "hooks"
    max_grad_norm: Optional[float] = None
    modality_weights: Optional[tuple[float, float]] = None
    gradnorm_alpha: Optional[float] = None
    gradnorm_lr: Optional[float] = None
    base_options: Any = field(default=None)

    def __post_init__(self) -> None:
        _choice("rule", self.rule, RULES)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("capture", self.capture, CAPTURE_MODES)
        _check(self.max_grad_norm is None or (_number(self.max_grad_norm) and self.max_grad_norm > 0),
               "max_grad_norm", self.max_grad_norm, "must be > 0 (or None for no clipping)")
        if self.modality_weights is not None:
            weights = self.modality_weights
            _check(self.rule == "sum", "modality_weights", weights,
                   f"it is for rule 'sum' (the fixed-weight control), not {self.rule!r}; drop it or use sum")
            _check(isinstance(weights, (list, tuple)) and len(weights) == 2
                   and all(_number(w) and 0 < w < float("inf") for w in weights), "modality_weights", weights,
                   "give [w_text, w_image], two positive numbers ([1, 1] is vanilla)")
            object.__setattr__(self, "modality_weights", (float(weights[0]), float(weights[1])))
        for name in ("gradnorm_alpha", "gradnorm_lr"):
            value = getattr(self, name)
            _check(value is None or self.rule == "gradnorm", name, value,
                   f"it is for rule 'gradnorm', not {self.rule!r}; drop it")
        _check(self.gradnorm_alpha is None or (_number(self.gradnorm_alpha) and 0 <= self.gradnorm_alpha < 100),
               "gradnorm_alpha", self.gradnorm_alpha, "must be >= 0 (the paper uses 0.12 to 3)")
        _check(self.gradnorm_lr is None or (_number(self.gradnorm_lr) and 0 < self.gradnorm_lr < float("inf")),
               "gradnorm_lr", self.gradnorm_lr, "must be > 0")
        if isinstance(self.base_options, MLFOPOptions) and self.base_options.pair_source == "ranks":
            detail = (f"'ranks' under {self.rule}: the rule hands every rank the same reduced terms, so there is "
                      "no per-rank pair to fold; use 'modality' or 'microstep'")
            raise OptionError("pair_source", f"pair_source={detail}", detail)

    def check_world(self, world: int) -> None:
        if isinstance(self.base_options, MLFOPOptions):
            self.base_options.check_world(world)


def option_names(cls: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if f.name != "base_options")
