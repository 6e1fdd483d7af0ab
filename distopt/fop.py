"""Fisher-Orthogonal Projection (Lu & Armour, arXiv 2508.13898) in SOAP's metric.

For two gradients g1, g2 of one block, with counts n1, n2 (equal in FOP's two-sub-batch setting):

    a      = (n1 g1 + n2 g2) / (n1 + n2)            d = g1 - g2
    s      = <d, a>_M / <a, a>_M                     p = d - s a          (so <a, p>_M = 0)
    D      = <a, p>_{M^-1}                           E = <p, p>_{M^-1}
    beta*  = D / E                                   c = a + beta* p      (the combined gradient)
    eta*   = <g_tot, c>_{M^-1} / <c, c>_{M^-1}

The metric is SOAP's own preconditioner, taken from the state before this step: with eigenbasis Q
and dvec = sqrt(v) + eps,  <x, y>_M = sum rot(x) rot(y) dvec  and  <x, y>_{M^-1} = sum rot(x) rot(y) / dvec.
(sqrt(v) + eps equals SOAP's effective sqrt(v_hat) + eps_hat up to the factor sqrt(1 - b2^t), and
every FOP scalar is invariant to M -> cM.)

Every scalar derives from five inner products of a and d, the *partials*
    [<a,a>_M, <d,a>_M, <a,a>_{M^-1}, <a,d>_{M^-1}, <d,d>_{M^-1}],
which are sums over elements: a block split over several places (head slices, rank-owned blocks,
the whole model at the global level) sums its partials before forming s and beta. With
A = <a,a>_{M^-1}:  D = <a,d>_{M^-1} - s A  and  E = <d,d>_{M^-1} - 2 s <a,d>_{M^-1} + s^2 A.

Damping (`BlockMetric(damping=lam)`): dvec -> dvec + lam mean(dvec), i.e. M -> M + lam (tr M / n) I, the
FOP paper's F + lam I with lam relative to the metric's average eigenvalue (docs/algorithm.md).

Also here, for the optimizer to call (docs/algorithm.md section 2 derives each):
    fold_eta            eta* with g_tot = the top-level fold's own a: in [1/2, 1] for every K and schedule
    cosine_sq           x = D^2 / (A E), the squared M^-1-cosine of a and p (FOP's effect is O(x))
    correction_partials [||G_fop - G||^2, ||G||^2], summed over blocks and ranks into ||G_fop - G|| / ||G||
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Optional, Union

import torch

from distopt.soap import Basis, rotate

N_PARTIALS = 5


def fop_partials(a: torch.Tensor, d: torch.Tensor, dvec: torch.Tensor) -> torch.Tensor:
    """The five inner products of (rotated) a and d, accumulated in fp64; shape (5,)."""
    ad = a * d
    aa = a * a
    f64 = torch.float64
    return torch.stack([
        (aa * dvec).sum(dtype=f64), (ad * dvec).sum(dtype=f64),
        (aa / dvec).sum(dtype=f64), (ad / dvec).sum(dtype=f64), (d * d / dvec).sum(dtype=f64),
    ])


def projection_terms(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, A, D, E) from partials (..., 5): s = <d,a>_M / <a,a>_M (0 where <a,a>_M = 0), A = <a,a>_{M^-1},
    D = <a,p>_{M^-1} = <a,d>_{M^-1} - s A, E = <p,p>_{M^-1} = <d,d>_{M^-1} - 2 s <a,d>_{M^-1} + s^2 A."""
    aa_m, da_m, aa_i, ad_i, dd_i = partials.unbind(-1)
    s = torch.where(aa_m > 0, da_m / aa_m.clamp_min(torch.finfo(aa_m.dtype).tiny), torch.zeros_like(aa_m))
    return s, aa_i, ad_i - s * aa_i, dd_i - 2 * s * ad_i + s * s * aa_i


def fop_coefficients(partials: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, beta*, guarded) from partials of shape (..., 5).

    beta* p = (<a,p> / <p,p>) p does not shrink with p: it is a's M^-1-projection onto p's direction,
    so when p is round-off its direction is noise. Hence beta* = 0 (guarded) where g_diff is
    negligible next to g_avg (<d,d>_{M^-1} <= tolerance <a,a>_{M^-1}: identical gradients) or g_perp
    next to g_diff (E <= tolerance <d,d>_{M^-1}: parallel gradients). s = 0 where <a,a>_M = 0.
    """
    s, aa_i, big_d, big_e = projection_terms(partials)
    dd_i = partials[..., 4]
    guarded = (big_e <= tolerance * dd_i) | (dd_i <= tolerance * aa_i)
    beta = torch.where(guarded, torch.zeros_like(big_e), big_d / torch.where(guarded, torch.ones_like(big_e), big_e))
    return s, beta, guarded


def fop_combine(a: torch.Tensor, d: torch.Tensor, s: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """c = a + beta (d - s a)."""
    c: torch.Tensor = a + beta * (d - s * a)
    return c


def eta_partials(g: torch.Tensor, c: torch.Tensor, dvec: torch.Tensor) -> torch.Tensor:
    """[<g, c>_{M^-1}, <c, c>_{M^-1}] of rotated g, c; shape (2,)."""
    return torch.stack([(g * c / dvec).sum(dtype=torch.float64), (c * c / dvec).sum(dtype=torch.float64)])


def _ratio(num: torch.Tensor, den: torch.Tensor, where_zero: float) -> torch.Tensor:
    """num / den, and `where_zero` where den <= 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(den, where_zero))


def fold_eta(partials: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """eta* of the fold that produced c (pass the top-level fold's partials and beta*), measured
    against that fold's own average a (g_tot = a):

        eta* = <a, c>_{M^-1} / <c, c>_{M^-1} = (A + beta D) / (A + 2 beta D + beta^2 E)
             = (1 + x) / (1 + 3 x)  for beta = D / E,  x = D^2 / (A E) in [0, 1]  (Cauchy-Schwarz)

    so eta* is in [1/2, 1] for every K and fold schedule, 1 where beta* = 0 (guarded) or a = 0.
    The plain mean g_bar differs from the top fold's a by the lower levels' corrections when K >= 3,
    and <g_bar, c> / <c, c> is then unbounded (docs/algorithm.md section 2); for K = 2 and for the
    one-fold pair sources (modality, ranks) a = g_bar and the two agree. Multiply by 2 for the
    `sum` convention. Shape (...,)."""
    _, big_a, big_d, big_e = projection_terms(partials)
    return _ratio(big_a + beta * big_d, big_a + 2 * beta * big_d + beta * beta * big_e, 1.0)


def cosine_sq(partials: torch.Tensor) -> torch.Tensor:
    """x = D^2 / (A E) = cos^2 of the M^-1-angle between a and p, in [0, 1]; 0 where A E = 0.
    FOP's whole effect is of order x: ||beta* p||^2_{M^-1} = x A and eta* = (1 + x) / (1 + 3 x), so a
    run whose x is ~0 everywhere cannot show an effect of FOP (a null test)."""
    _, big_a, big_d, big_e = projection_terms(partials)
    return _ratio(big_d * big_d, big_a * big_e, 0.0).clamp(0.0, 1.0)


def correction_partials(g: torch.Tensor, g_fop: torch.Tensor) -> torch.Tensor:
    """[||g_fop - g||^2, ||g||^2] (fp64, shape (2,)) of one block, in any orthonormal basis (rotated or
    not: Euclidean norms do not change); sums over blocks, slices and ranks like the partials."""
    diff = g_fop - g
    return torch.stack([(diff * diff).sum(dtype=torch.float64), (g * g).sum(dtype=torch.float64)])


class BlockMetric:
    """SOAP's metric for one parameter, frozen for one accumulation window; `damping` lam gives
    dvec + lam mean(dvec) (0: the undamped metric, bit for bit).

    With `segments=None` the block is whole (layer or global level): fold items are kept rotated, so
    each micro-gradient is rotated once and every fold is elementwise. With `segments=(dim, n)` the
    block is split into n equal slices along `dim` of the preconditioning layout (attention heads):
    each slice's inner products use the metric restricted to that slice, <x_h, y_h>_M = pad(x_h)^T M
    pad(y_h), so items stay unrotated and each slice is rotated zero-padded when measured.

    `dvec` is the diagonal sqrt(v) + eps in the eigenbasis, or a function that computes it when a fold
    asks (the optimizer passes one over SOAP's live v, which changes only after the window's last
    fold: the window then holds no copy of the metric's size).
    """

    def __init__(self, basis: Basis, dvec: Union[torch.Tensor, Callable[[], torch.Tensor]],
                 segments: Optional[tuple[int, int]] = None, damping: float = 0.0) -> None:
        if not (damping >= 0 and damping < float("inf")):
            raise ValueError(f"fop_damping={damping!r} is invalid: must be a finite number >= 0 (0: undamped)")
        self.basis = basis
        self._dvec = dvec if callable(dvec) else (lambda: dvec)
        # plus lam mean(dvec): M + lam (tr M / n) I, for M and M^-1 alike
        self._shift = damping * self._dvec().mean() if damping else None
        self.segments = segments

    @property
    def dvec(self) -> torch.Tensor:
        """The (damped) diagonal of the metric, computed now."""
        dvec = self._dvec()
        return dvec + self._shift if self._shift is not None else dvec

    @property
    def n_segments(self) -> int:
        return 1 if self.segments is None else self.segments[1]

    def prepare(self, g: torch.Tensor) -> torch.Tensor:
        """A micro-gradient (preconditioning layout) as a fold item."""
        return rotate(g, self.basis) if self.segments is None else g

    def finish(self, item: torch.Tensor) -> torch.Tensor:
        """A fold item in the eigenbasis, ready for Adam's moments."""
        return item if self.segments is None else rotate(item, self.basis)

    def _slices(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each head's slice of x, zero-padded to x's shape and rotated."""
        assert self.segments is not None
        dim, n = self.segments
        for chunk_index, chunk in enumerate(x.chunk(n, dim)):
            padded = torch.zeros_like(x)
            padded.narrow(dim, chunk_index * chunk.shape[dim], chunk.shape[dim]).copy_(chunk)
            yield rotate(padded, self.basis)

    def partials(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Fold partials, shape (n_segments, 5)."""
        if self.segments is None:
            return fop_partials(a, d, self.dvec).unsqueeze(0)
        dvec = self.dvec
        pairs = zip(self._slices(a), self._slices(d), strict=True)
        return torch.stack([fop_partials(ra, rd, dvec) for ra, rd in pairs])

    def eta_partials(self, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """eta partials of two fold items (the plain gradient and the combined one); (n_segments, 2)."""
        if self.segments is None:
            return eta_partials(g, c, self.dvec).unsqueeze(0)
        dvec = self.dvec
        pairs = zip(self._slices(g), self._slices(c), strict=True)
        return torch.stack([eta_partials(rg, rc, dvec) for rg, rc in pairs])

    def expand(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-segment values (n_segments,) as a tensor broadcastable against `like` (layout space)."""
        if self.segments is None:
            return values.reshape(()).to(like.dtype)
        dim, n = self.segments
        shape = [1] * like.dim()
        shape[dim] = like.shape[dim]
        return values.to(like.dtype).repeat_interleave(like.shape[dim] // n).reshape(shape)
