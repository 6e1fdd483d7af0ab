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
the whole model at the global level) sums its partials before forming s and beta.
"""

from __future__ import annotations

from typing import Optional

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


def fop_coefficients(partials: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, beta*, guarded) from partials of shape (..., 5).

    beta* p = (<a,p> / <p,p>) p does not shrink with p: it is a's M^-1-projection onto p's direction,
    so when p is round-off its direction is noise. Hence beta* = 0 (guarded) where g_diff is
    negligible next to g_avg (<d,d>_{M^-1} <= tolerance <a,a>_{M^-1}: identical gradients) or g_perp
    next to g_diff (E <= tolerance <d,d>_{M^-1}: parallel gradients). s = 0 where <a,a>_M = 0.
    """
    aa_m, da_m, aa_i, ad_i, dd_i = partials.unbind(-1)
    s = torch.where(aa_m > 0, da_m / aa_m.clamp_min(torch.finfo(aa_m.dtype).tiny), torch.zeros_like(aa_m))
    big_d = ad_i - s * aa_i                      # <a, p>_{M^-1}
    big_e = dd_i - 2 * s * ad_i + s * s * aa_i   # <p, p>_{M^-1}
    guarded = (big_e <= tolerance * dd_i) | (dd_i <= tolerance * aa_i)
    beta = torch.where(guarded, torch.zeros_like(big_e), big_d / torch.where(guarded, torch.ones_like(big_e), big_e))
    return s, beta, guarded


def fop_combine(a: torch.Tensor, d: torch.Tensor, s, beta) -> torch.Tensor:
    """c = a + beta (d - s a)."""
    return a + beta * (d - s * a)


def eta_partials(g: torch.Tensor, c: torch.Tensor, dvec: torch.Tensor) -> torch.Tensor:
    """[<g, c>_{M^-1}, <c, c>_{M^-1}] of rotated g, c; shape (2,)."""
    return torch.stack([(g * c / dvec).sum(dtype=torch.float64), (c * c / dvec).sum(dtype=torch.float64)])


def eta_coefficient(partials: torch.Tensor) -> torch.Tensor:
    """eta* = <g, c>_{M^-1} / <c, c>_{M^-1}; 1 where c = 0."""
    gc, cc = partials.unbind(-1)
    return torch.where(cc > 0, gc / torch.where(cc > 0, cc, torch.ones_like(cc)), torch.ones_like(cc))


class BlockMetric:
    """SOAP's metric for one parameter, frozen for one accumulation window.

    With `segments=None` the block is whole (layer or global level): fold items are kept rotated, so
    each micro-gradient is rotated once and every fold is elementwise. With `segments=(dim, n)` the
    block is split into n equal slices along `dim` of the preconditioning layout (attention heads):
    each slice's inner products use the metric restricted to that slice, <x_h, y_h>_M = pad(x_h)^T M
    pad(y_h), so items stay unrotated and each slice is rotated zero-padded when measured.
    """

    def __init__(self, basis: Basis, dvec: torch.Tensor, segments: Optional[tuple[int, int]] = None):
        self.basis = basis
        self.dvec = dvec  # sqrt(v) + eps in the eigenbasis
        self.segments = segments

    @property
    def n_segments(self) -> int:
        return 1 if self.segments is None else self.segments[1]

    def prepare(self, g: torch.Tensor) -> torch.Tensor:
        """A micro-gradient (preconditioning layout) as a fold item."""
        return rotate(g, self.basis) if self.segments is None else g

    def finish(self, item: torch.Tensor) -> torch.Tensor:
        """A fold item in the eigenbasis, ready for Adam's moments."""
        return item if self.segments is None else rotate(item, self.basis)

    def _slices(self, x: torch.Tensor):
        dim, n = self.segments
        for chunk_index, chunk in enumerate(x.chunk(n, dim)):
            padded = torch.zeros_like(x)
            padded.narrow(dim, chunk_index * chunk.shape[dim], chunk.shape[dim]).copy_(chunk)
            yield rotate(padded, self.basis)

    def partials(self, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Fold partials, shape (n_segments, 5)."""
        if self.segments is None:
            return fop_partials(a, d, self.dvec).unsqueeze(0)
        return torch.stack([fop_partials(ra, rd, self.dvec) for ra, rd in zip(self._slices(a), self._slices(d))])

    def eta_partials(self, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """eta partials of two fold items (the plain gradient and the combined one); (n_segments, 2)."""
        if self.segments is None:
            return eta_partials(g, c, self.dvec).unsqueeze(0)
        return torch.stack([eta_partials(rg, rc, self.dvec) for rg, rc in zip(self._slices(g), self._slices(c))])

    def expand(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-segment values (n_segments,) as a tensor broadcastable against `like` (layout space)."""
        if self.segments is None:
            return values.reshape(()).to(like.dtype)
        dim, n = self.segments
        shape = [1] * like.dim()
        shape[dim] = like.shape[dim]
        return values.to(like.dtype).repeat_interleave(like.shape[dim] // n).reshape(shape)
