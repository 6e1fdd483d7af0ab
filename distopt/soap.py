"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (Vyas et al., arXiv 2409.11321).

For a parameter whose gradient G has (merged) shape d_1 x ... x d_k, with Q_i the eigenbasis of the
factor GG_i of every preconditioned dim i (identity for the others):

    rot(X)   = X x_1 Q_1^T ... x_k Q_k^T          (mode-i products; Q orthogonal)
    unrot(Y) = Y x_1 Q_1   ... x_k Q_k
    G'  = rot(G)
    m  <- b1 m + (1 - b1) G'                       m lives in the eigenbasis
    v  <- b2 v + (1 - b2) G'^2
    ss  = lr sqrt(1 - b2^t) / (1 - b1^t)           (lr when correct_bias is off)
    p  <- p - ss unrot(m / (sqrt(v) + eps));  p <- p - lr wd p
    GG_i <- sb GG_i + (1 - sb) G_(i) G_(i)^T       G_(i): mode-i unfolding; sb = shampoo_beta or b2
    every f steps: sort Q_i's columns by diag(Q_i^T GG_i Q_i) (v permuted alike), Q_i <- qr(GG_i Q_i).Q
                   and m is carried exactly into the new basis.

The first step() of a parameter only collects statistics (GG, then Q = eigh(GG)), so the current
gradient is never used in its own projection. This matches the reference soap.py; the functions
below are the pure tensor math; distopt.soap_optimizer.SOAP holds state and the torch.optim contract.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

Basis = list[Optional[torch.Tensor]]  # one orthogonal matrix per dim; None = identity (not rotated)
Counters = MutableMapping[str, float]  # named counts and seconds (eigh, QR, their failures and time)


def new_counters(names: Sequence[str]) -> Counters:
    """Counters of `names`, all 0 (a name not listed reads 0 too)."""
    return defaultdict(float, dict.fromkeys(names, 0))


class Tally(Protocol):
    """Counts that stay on the device (distopt.host.DeviceTally): a failed eigh or QR is found and
    counted without reading anything on the host, block after block."""

    def add(self, name: str, count: torch.Tensor) -> None: ...
Group = dict[str, Any]                 # a torch.optim param group: the hyper-parameters
State = dict[str, Any]                 # one tensor's (or block's) SOAP state


# ---------------------------------------------------------------------------------------------------
# Shapes


def merged_shape(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
    """Greedily merge consecutive dims while the product stays <= max_precond_dim (reference rule)."""
    out: list[int] = []
    run = 1
    for size in shape:
        if run * size > max_precond_dim:
            if run > 1:
                out.append(run)
                run = size
            else:
                out.append(size)
        else:
            run *= size
    if run > 1 or not out:
        out.append(run)
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """How a parameter is viewed for preconditioning: optional NHWC->NCHW permute, then a reshape."""

    shape: tuple[int, ...]
    channels_last: bool
    precond_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]  # per dim of precond_shape

    def to_precond(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(self.precond_shape)

    def from_precond(self, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            n, h, w, c = self.shape
            return y.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return y.reshape(self.shape)


def make_layout(shape: Sequence[int], *, soap_path: bool, max_precond_dim: int, merge_dims: bool,
                precondition_1d: bool, channels_last: bool) -> Layout:
    shape = tuple(shape)
    cl = channels_last and merge_dims and len(shape) == 4
    if merge_dims:
        base = (shape[0], shape[3], shape[1], shape[2]) if cl else shape
        pshape = merged_shape(base, max_precond_dim)
    else:
        pshape = shape if shape else (1,)
    rotated = soap_path and precondition_1d if len(shape) <= 1 else soap_path  # 1-D: Adam unless precondition_1d
    pre = tuple(rotated and d <= max_precond_dim for d in pshape)
    return Layout(shape, cl, pshape, pre)


# ---------------------------------------------------------------------------------------------------
# Pure tensor math


def rotate(x: torch.Tensor, basis: Basis) -> torch.Tensor:
    """rot(X) = X x_i Q_i^T for every dim; identity dims are only cycled to the back."""
    for q in basis:
        x = torch.tensordot(x, q, dims=([0], [0])) if q is not None else x.movedim(0, -1)
    return x


def unrotate(y: torch.Tensor, basis: Basis) -> torch.Tensor:
    """unrot(Y) = Y x_i Q_i, the inverse of rotate."""
    for q in basis:
        y = torch.tensordot(y, q, dims=([0], [1])) if q is not None else y.movedim(0, -1)
    return y


def mode_gram(g: torch.Tensor, dim: int) -> torch.Tensor:
    """G_(i) G_(i)^T: contract g with itself over every dim but `dim`."""
    other = [i for i in range(g.dim()) if i != dim]
    gram: torch.Tensor = torch.tensordot(g, g, dims=(other, other))
    return gram


def update_factors(factors: Basis, g: torch.Tensor, shampoo_beta: float) -> None:
    """GG_i <- sb GG_i + (1 - sb) G_(i) G_(i)^T in place, for every preconditioned dim."""
    for i, gg in enumerate(factors):
        if gg is not None:
            gg.lerp_(mode_gram(g, i), 1.0 - shampoo_beta)


def eigenbasis(gg: torch.Tensor, counters: Counters, tally: Tally) -> torch.Tensor:
    """Eigenvectors of GG with descending eigenvalues. An eigh that raises is retried in fp64 (as the
    reference does); a non-finite result is replaced by the identity (no rotation on that side until
    the next refresh) and counted as eigh_failed on the device."""
    counters["eigh"] += 1
    start = time.perf_counter()
    eye = torch.eye(gg.shape[0], dtype=gg.dtype, device=gg.device)
    basis = eye
    for attempt, dtype in enumerate((gg.dtype, torch.float64)):
        counters["eigh_fp64_retry"] += attempt
        try:
            _, vecs = torch.linalg.eigh(gg.to(dtype) + 1e-30 * eye.to(dtype))
        except RuntimeError:
            continue
        finite = torch.isfinite(vecs).all()
        tally.add("eigh_failed", (~finite).long())
        basis = torch.where(finite, vecs.flip(1).to(gg.dtype), eye)
        break
    else:
        counters["eigh_failed"] += 1  # both raised: no rotation on this side until the next refresh
    counters["eigh_seconds"] += time.perf_counter() - start
    return basis


def refresh_basis(factors: Basis, basis: Basis, v: torch.Tensor, counters: Counters,
                  tally: Tally) -> tuple[Basis, torch.Tensor]:
    """One power iteration + QR per dim: order Q's columns by the estimated eigenvalues
    diag(Q^T GG Q) (descending, v permuted along), then Q <- qr(GG Q).Q. A non-finite result keeps Q
    and v's order, decided on the device (counted as qr_failed there)."""
    start = time.perf_counter()
    new_basis: Basis = []
    for i, (gg, q) in enumerate(zip(factors, basis, strict=True)):
        if gg is None or q is None:
            new_basis.append(None)
            continue
        counters["qr"] += 1
        order = torch.argsort(torch.diagonal(q.T @ gg @ q), descending=True)
        q_new, _ = torch.linalg.qr(gg @ q[:, order])
        finite = torch.isfinite(q_new).all()
        tally.add("qr_failed", (~finite).long())
        v = torch.where(finite, v.index_select(i, order), v)
        new_basis.append(torch.where(finite, q_new, q))
    counters["qr_seconds"] += time.perf_counter() - start
    return new_basis, v


def soap_direction(m: torch.Tensor, v: torch.Tensor, eps: float, basis: Basis, normalize: bool) -> torch.Tensor:
    """unrot(m / (sqrt(v) + eps)), optionally scaled to unit RMS (normalize_grads)."""
    n = unrotate(m / (v.sqrt() + eps), basis)
    if normalize:
        n = n / (1e-30 + n.square().mean().sqrt())
    return n


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state is fp32 for low-precision params and keeps fp64 for fp64 params."""
    return torch.promote_types(param.dtype, torch.float32)


def shampoo_beta(group: Group) -> float:
    return float(group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1])


def soap_init(st: State, g: torch.Tensor, layout: Layout, group: Group, counters: Counters, tally: Tally) -> None:
    """First step of a tensor: statistics only (GG from g, then Q = eigh(GG)); the tensor is not changed."""
    st["step"] = 0
    st["exp_avg"] = torch.zeros_like(g)
    st["exp_avg_sq"] = torch.zeros_like(g)
    st["GG"] = [torch.zeros(d, d, dtype=g.dtype, device=g.device) if pre else None
                for d, pre in zip(layout.precond_shape, layout.preconditioned, strict=True)]
    update_factors(st["GG"], g, shampoo_beta(group))
    st["Q"] = [eigenbasis(gg, counters, tally) if gg is not None else None for gg in st["GG"]]


def soap_update(st: State, param: torch.Tensor, g: torch.Tensor, layout: Layout, group: Group, counters: Counters,
                tally: Tally, moment_grad_rot: Optional[torch.Tensor] = None, lr_scale: float | torch.Tensor = 1.0,
                second_moment_rot: Optional[torch.Tensor] = None, extra_rot: Optional[torch.Tensor] = None) -> None:
    """One SOAP step of `param` (a parameter or a view of one block) with gradient g (precond layout).

    `moment_grad_rot`, already in the eigenbasis, feeds Adam's moments instead of rot(g), and
    `second_moment_rot` feeds v alone; `lr_scale` multiplies the update (not the weight decay).
    `extra_rot` adds a term after Adam's normalisation, in the bias-corrected scale:
    p <- p - lr sqrt(1 - b2^t) [unrot(m / d) / (1 - b1^t) + unrot(extra_rot / d)],  d = sqrt(v) + eps.
    The statistics always use g.
    """
    if "step" not in st:
        soap_init(st, g, layout, group, counters, tally)
        return
    basis: Basis = st["Q"]
    g_rot = rotate(g, basis) if moment_grad_rot is None else moment_grad_rot
    v_rot = g_rot if second_moment_rot is None else second_moment_rot
    beta1, beta2 = group["betas"]
    st["step"] += 1
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.mul_(beta1).add_(g_rot, alpha=1.0 - beta1)
    v.mul_(beta2).add_(v_rot.square(), alpha=1.0 - beta2)
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size *= math.sqrt(1.0 - beta2 ** st["step"]) / (1.0 - beta1 ** st["step"])
    bias1 = (1.0 - beta1 ** st["step"]) if group["correct_bias"] else 1.0
    numerator = m if extra_rot is None else m + extra_rot * bias1
    direction = soap_direction(numerator, v, group["eps"], basis, group["normalize_grads"]) * lr_scale
    param.add_(layout.from_precond(direction).to(param.dtype), alpha=-step_size)
    if group["weight_decay"] > 0:
        param.add_(param, alpha=-group["lr"] * group["weight_decay"])
    update_factors(st["GG"], g, shampoo_beta(group))
    if st["step"] % group["precondition_frequency"] == 0 and any(q is not None for q in basis):
        m_orig = unrotate(st["exp_avg"], basis)
        st["Q"], st["exp_avg_sq"] = refresh_basis(st["GG"], basis, st["exp_avg_sq"], counters, tally)
        st["exp_avg"] = rotate(m_orig, st["Q"])
