"""Parity of distopt.SOAP with the dense reference tests/dense_soap.py (equations in its docstring).

Each configuration runs 36 step() calls on several parameters (the first call only collects statistics,
so 35 updates) with precondition_frequency <= 6, i.e. at least 5 eigenbasis refreshes (QR of GG_i Q_i plus
re-sorting of v). Gradients are seeded random tensors with an anisotropic mixing along every dim (so the
Gram matrices have well separated, untied eigenvalues) and are written to p.grad directly.

What is compared is the PARAMETERS after every step, never Q: eigenvectors are only defined up to sign,
and the sign cancels in every update (m is re-rotated from the original basis, v is elementwise squared).

Rank-deficiency pitfall: the first call sets Q_i = eigh(GG_i) with GG_i = U_i U_i^T (1 - sb), whose rank is
at most prod(other dims). If d_i exceeds that, the null-space eigenvectors are arbitrary (they depend on the
LAPACK path and on rounding), and because later refreshes are a single QR power step GG_i Q_i from the old Q,
two correct implementations stay apart for the whole run. So every shape below is chosen such that EVERY
preconditioned dim of the (merged) shape satisfies d_i <= product of the other merged dims:
square matrices, one-sided matrices whose large side exceeds max_precond_dim (that side stays unrotated),
and conv weights whose merged shape is three-way, e.g. (4, 3, 3, 3) with merge_dims and max_precond_dim = 9
-> (4, 9, 3). (With max_precond_dim = 12 it merges to (12, 9), whose 12-side is rank deficient; for the same
reason precondition_1d is not covered here: a 1-D GG is rank one at the first call.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dense_soap import DenseSOAP, merged_shape
from distopt import SOAP

F64 = torch.float64
STEPS = 36

CONFIGS: dict[str, tuple[list[tuple[int, ...]], dict[str, Any]]] = {
    # defaults: shampoo_beta < 0 (-> betas[1]), weight decay 0.01, bias correction, no merge
    "square_defaults": ([(6, 6), (8,)], dict(lr=0.02, precondition_frequency=5)),
    # max_precond_dim below the large side: that side is not rotated; shampoo_beta >= 0; no weight decay
    "one_sided": ([(40, 6), (6, 40)],
                  dict(lr=0.01, betas=(0.9, 0.99), shampoo_beta=0.9, weight_decay=0.0, max_precond_dim=16,
                       precondition_frequency=4)),
    # merge_dims: (4,3,3,3) -> (4, 9, 3) via "emit c, restart at s"; (20,3,3) -> (20, 9) via "emit s"
    # (20 > 9 stays unrotated); normalize_grads on
    "merge_conv_normalized": ([(4, 3, 3, 3), (20, 3, 3), (5, 5), (7,)],
                              dict(lr=0.01, max_precond_dim=9, merge_dims=True, normalize_grads=True,
                                   weight_decay=0.05, precondition_frequency=5)),
    # unmerged 4-D conv weight, no bias correction, shampoo_beta in (0, 1), strong weight decay
    "conv_unmerged_no_bias_correction": ([(4, 3, 3, 3), (3,)],
                                         dict(lr=0.005, betas=(0.8, 0.9), shampoo_beta=0.5, weight_decay=0.1,
                                              correct_bias=False, precondition_frequency=6)),
    # shampoo_beta = 0 (GG = latest gradient only), normalized, no bias correction, 3-D tensor
    "sb_zero_3d": ([(5, 5, 4)], dict(lr=0.01, shampoo_beta=0.0, normalize_grads=True, correct_bias=False,
                                     precondition_frequency=3)),
    # channels_last (out, h, w, in) = (4, 3, 3, 2): permuted to (4, 2, 3, 3) -> merged (8, 3, 3)
    # (without the permutation it would merge to (4, 3, 6): other groups, so a different result)
    "channels_last_merge": ([(4, 3, 3, 2)], dict(lr=0.01, merge_dims=True, max_precond_dim=8,
                                                 data_format="channels_last", precondition_frequency=5)),
}


def test_merged_shapes_used_below():
    """The shapes the configurations rely on (and their rank condition), from the greedy merge rule."""
    assert merged_shape((4, 3, 3, 3), 9) == (4, 9, 3)
    assert merged_shape((20, 3, 3), 9) == (20, 9)
    assert merged_shape((4, 2, 3, 3), 8) == (8, 3, 3)
    assert merged_shape((4, 3, 3, 2), 8) == (4, 3, 6)
    assert merged_shape((4, 3, 3, 3), 12) == (12, 9)  # would be rank deficient on the 12-side
    assert merged_shape((4, 3, 3, 3), 1000) == (108,)
    for shapes, kw in CONFIGS.values():
        ref = DenseSOAP(shapes, **kw)
        for lay, active in zip(ref.layouts, ref.active, strict=True):
            total = 1
            for d in lay.work:
                total *= d
            for d, a in zip(lay.work, active, strict=True):
                assert not a or d * d <= total, (lay.shape, lay.work)
        assert STEPS - 1 >= 5 * kw["precondition_frequency"], "at least 5 refreshes"


def mixing(shape, gen):
    """Fixed per-dim matrices A_j = (random orthogonal) * diag(exp(2 u)), u ~ U(0, 1).

    Anisotropic with random (untied) scales, but cond(A_j) <= e^2: with plain randn matrices the Gram
    matrices are so ill-conditioned that even the float64-vs-float32 evaluation of the reference itself
    differs by ~5e-3, which would make the float32 comparison meaningless.
    """
    out = []
    for d in shape:
        q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))[0]
        out.append(q * torch.exp(2.0 * torch.rand(d, generator=gen, dtype=F64)))
    return out


def gradient(mix, gen):
    """G = Z x_1 A_1 x_2 A_2 ... with Z standard normal, written as one einsum over the original dims."""
    z = torch.randn(*[a.shape[0] for a in mix], generator=gen, dtype=F64)
    letters = "abcd"[: z.dim()]
    out = "".join(chr(ord(c) + 10) for c in letters)
    spec = letters + "," + ",".join(o + c for o, c in zip(out, letters, strict=True)) + "->" + out
    return torch.einsum(spec, z, *mix)


def run(name, dtype, rotate_ref=True):
    """Runs distopt.SOAP (params in `dtype`) and DenseSOAP (float64) on identical gradients.

    Returns the per-step relative errors ||p - p_ref|| / ||p_ref - p0|| (max over params), the final params,
    and the initial params.
    """
    shapes, kw = CONFIGS[name]
    gen = torch.Generator().manual_seed(1234 + len(name))
    p0 = [torch.randn(*s, generator=gen, dtype=F64) for s in shapes]
    mixes = [mixing(s, gen) for s in shapes]
    params = [torch.nn.Parameter(p.to(dtype).clone()) for p in p0]
    ref_params = [p.to(dtype).to(F64).clone() for p in p0]
    p0 = [p.clone() for p in ref_params]
    opt = SOAP(params, verbose=False, **kw)
    ref = DenseSOAP(shapes, rotate=rotate_ref, **kw)
    errs = []
    for step in range(STEPS):
        grads = [gradient(mix, gen).to(dtype) for mix in mixes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(ref_params, grads)
        if step == 0:
            for p, q in zip(params, p0, strict=True):
                assert torch.equal(p.detach().to(F64), q), "the first call must leave the parameters unchanged"
            continue
        errs.append(max(float((p.detach().to(F64) - r).norm() / (r - q).norm())
                        for p, r, q in zip(params, ref_params, p0, strict=True)))
    return errs, params, ref_params, p0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_parity_every_step(name):
    errs, *_ = run(name, F64)
    worst = max(errs)
    assert worst < 1e-9, f"{name}: step {errs.index(worst) + 1} relative error {worst:.3e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_parity_every_step(name):
    """float32 params (and float32 optimizer state in distopt) against the float64 reference.

    Tolerance 2e-4 relative to the displacement ||p_ref - p0||: float32 rounding (~6e-8) is amplified by
    the eigenvector conditioning ||GG_i|| / eigengap and by the Adam ratio m / sqrt(v) on small rotated
    coordinates, and accumulates over 35 updates. Measured: distopt's worst case is ~4e-5
    (merge_conv_normalized, step 2, when the displacement is still two updates; ~1e-5 at the end), and the
    reference itself evaluated in float32 is off from its float64 run by up to ~6e-5 on the same data, so
    this is rounding, not semantics; 2e-4 keeps a ~3x margin for other BLAS/LAPACK builds. Every semantic
    mutation tried on the reference (missing v permutation or re-sort, eigh instead of the QR step, m not
    re-rotated, statistics updated before the step, wrong bias correction, decay scaled by the step size,
    missing channels_last permutation) moves the parameters by >= 4e-2 of the displacement.
    """
    errs, *_ = run(name, torch.float32)
    worst = max(errs)
    assert worst < 2e-4, f"{name}: step {errs.index(worst) + 1} relative error {worst:.3e}"


@pytest.mark.parametrize("name", ["square_defaults", "merge_conv_normalized", "one_sided"])
def test_preconditioning_is_active(name):
    """distopt must differ clearly from the same reference with every Q_i = I (Adam) on rotated params."""
    _, params, adam_params, p0 = run(name, F64, rotate_ref=False)
    shapes, kw = CONFIGS[name]
    rotated = [k for k, active in enumerate(DenseSOAP(shapes, **kw).active) if any(active)]
    assert rotated
    for k in rotated:
        gap = float((params[k].detach() - adam_params[k]).norm() / (adam_params[k] - p0[k]).norm())
        assert gap > 0.05, f"{name}: param {k} {tuple(p0[k].shape)} is within {gap:.3e} of the Adam run"
