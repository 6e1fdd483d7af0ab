"""Dense re-derivations used as independent references by the tests.

Everything here works on flat float64 vectors with explicit matrices M and M^-1, written from the
equations in research/algorithms.md section 1b, without the rotated-space shortcuts of distopt.fop.
"""

from __future__ import annotations

import torch


def random_spd(n: int, gen: torch.Generator, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random SPD matrix M = Q diag(dvec) Q^T with its factors (float64)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    dvec = torch.exp(spread * torch.rand(n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(dvec) @ q.T, q, dvec


def kron_metric(qs: list[torch.Tensor], dvec: torch.Tensor) -> torch.Tensor:
    """M on row-major vec(X) for a metric that is diagonal (dvec) after X -> X x_1 Q_1^T x_2 Q_2^T ..."""
    rot = qs[0].T
    for q in qs[1:]:
        rot = torch.kron(rot, q.T)
    return rot.T @ torch.diag(dvec.reshape(-1)) @ rot


def fop(g1: torch.Tensor, g2: torch.Tensor, m: torch.Tensor, n1: int = 1, n2: int = 1,
        tol: float = 1e-5) -> tuple[torch.Tensor, float, float]:
    """FOP combine of two flat gradients with counts: returns (c, s, beta)."""
    minv = torch.linalg.inv(m)
    a = (n1 * g1 + n2 * g2) / (n1 + n2)
    d = g1 - g2
    s = float(d @ m @ a / (a @ m @ a)) if float(a @ m @ a) > 0 else 0.0
    p = d - s * a
    big_e = float(p @ minv @ p)
    dd, aa = float(d @ minv @ d), float(a @ minv @ a)
    beta = float(a @ minv @ p) / big_e if big_e > tol * dd and dd > tol * aa else 0.0
    return a + beta * p, s, beta


def eta(g_tot: torch.Tensor, c: torch.Tensor, m: torch.Tensor) -> float:
    minv = torch.linalg.inv(m)
    return float(g_tot @ minv @ c / (c @ minv @ c))


def fold_tree(gs: list[torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    """Binary-counter folding written recursively: split K into its largest power-of-two prefix."""
    return fold_tree_top(gs, m)[0] if len(gs) > 1 else gs[0]


def fold_tree_top(gs: list[torch.Tensor], m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_tree's result c and the count-weighted average a of the two items its last fold paired."""
    k = 1
    while 2 * k < len(gs):
        k *= 2
    head, tail = fold_tree(gs[:k], m), fold_tree(gs[k:], m)
    n1, n2 = k, len(gs) - k
    return fop(head, tail, m, n1, n2)[0], (n1 * head + n2 * tail) / (n1 + n2)


def fold_streaming(gs: list[torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    """z_j = FOP(z_{j-1}, mean of the next equal-count chunk); a short last chunk is count-weighted."""
    return fold_streaming_top(gs, m)[0] if len(gs) > 1 else gs[0]


def fold_streaming_top(gs: list[torch.Tensor], m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_streaming's result c and the count-weighted average a of its last fold."""
    z, nz, i = gs[0], 1, 1
    while i < len(gs):
        chunk = sum(gs[i:i + nz], torch.zeros_like(z)) / len(gs[i:i + nz])
        nc = len(gs[i:i + nz])
        a = (nz * z + nc * chunk) / (nz + nc)
        z = fop(z, chunk, m, nz, nc)[0]
        nz, i = nz + nc, i + nc
    return z, a
