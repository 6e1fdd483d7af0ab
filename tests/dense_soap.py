"""Dense SOAP reference, written from the equations alone (independent of distopt.soap and of soap.py).

Notation, per parameter with gradient G reshaped to the preconditioning shape (d_1, ..., d_k):

    unfold_i(X)      mode-i unfolding: move dim i to the front, reshape to d_i x (prod of the others)
    X x_i A          mode-i product: fold_i(A @ unfold_i(X))
    rot(X)   = X x_1 Q_1^T x_2 Q_2^T ... x_k Q_k^T      (Q_i = I for dims that are not preconditioned)
    unrot(X) = X x_1 Q_1   x_2 Q_2   ... x_k Q_k

    statistics   GG_i <- sb GG_i + (1 - sb) unfold_i(G) unfold_i(G)^T,   sb = shampoo_beta or betas[1] if < 0
    first call   m = v = 0, statistics, Q_i = eigh(GG_i) eigenvectors by descending eigenvalue; p untouched
    later calls  t <- t + 1;  G' = rot(G)
                 m <- b1 m + (1 - b1) G'          v <- b2 v + (1 - b2) G'^2
                 N = unrot(m / (sqrt(v) + eps))   (N <- N / (1e-30 + rms(N)) if normalize_grads)
                 p <- p - ss N,  ss = lr sqrt(1 - b2^t) / (1 - b1^t)  (ss = lr without correct_bias)
                 p <- p - lr wd p
                 m_orig = unrot(m); statistics with G;
                 every precondition_frequency steps, per dim i:
                     lam = diag(Q_i^T GG_i Q_i); pi = argsort(lam, descending)
                     v <- v permuted by pi along dim i;  Q_i <- qr(GG_i Q_i[:, pi]).Q
                 m = rot(m_orig)   (with the refreshed Q)

Everything is computed in float64 regardless of the parameter's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

F64 = torch.float64


def merged_shape(shape, max_dim):
    """Greedy merge of consecutive dims while the running product stays <= max_dim."""
    out, c = [], 1
    for s in shape:
        if c * s > max_dim:
            if c > 1:
                out.append(c)
                c = s
            else:
                out.append(s)
        else:
            c *= s
    if c > 1 or not out:
        out.append(c)
    return tuple(out)


def unfold(x, i):
    return x.movedim(i, 0).reshape(x.shape[i], -1)


def mode_product(x, a, i):
    """X x_i A for a matrix A of shape (r, d_i)."""
    rest = x.shape[:i] + x.shape[i + 1:]
    return (a @ unfold(x, i)).reshape(a.shape[0], *rest).movedim(0, i)


def rot(x, qs):
    for i, q in enumerate(qs):
        if q is not None:
            x = mode_product(x, q.T, i)
    return x


def unrot(x, qs):
    for i, q in enumerate(qs):
        if q is not None:
            x = mode_product(x, q, i)
    return x


class Layout:
    """Maps a parameter-shaped tensor to the preconditioning shape and back."""

    def __init__(self, shape, max_dim, merge, channels_last):
        self.shape = tuple(shape)
        self.perm = (0, 3, 1, 2) if channels_last and merge and len(shape) == 4 else None
        permuted = tuple(self.shape[j] for j in self.perm) if self.perm else self.shape
        self.permuted = permuted
        self.work = merged_shape(permuted, max_dim) if merge else permuted

    def to_work(self, x):
        if self.perm:
            x = x.permute(*self.perm)
        return x.reshape(self.work)

    def from_work(self, y):
        y = y.reshape(self.permuted)
        if self.perm:
            y = y.permute(0, 2, 3, 1)
        return y


class DenseSOAP:
    """Plain-tensor SOAP: ``step(params, grads)`` updates the float64 tensors ``params`` in place.

    ``rotate=False`` forces every Q_i = I (the Adam baseline used to show preconditioning is active).
    """

    def __init__(self, shapes, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, data_format="channels_first", correct_bias=True, rotate=True):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.sb = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.freq, self.normalize, self.correct_bias = precondition_frequency, normalize_grads, correct_bias
        self.layouts, self.active = [], []
        for shape in shapes:
            lay = Layout(shape, max_precond_dim, merge_dims, data_format == "channels_last")
            one_d_off = len(shape) == 1 and not precondition_1d
            self.layouts.append(lay)
            self.active.append([rotate and not one_d_off and d <= max_precond_dim for d in lay.work])
        self.state: list[Optional[dict[str, Any]]] = [None] * len(shapes)

    def _statistics(self, st, g):
        for i, gg in enumerate(st["GG"]):
            if gg is not None:
                u = unfold(g, i)
                st["GG"][i] = self.sb * gg + (1 - self.sb) * torch.einsum("ar,br->ab", u, u)

    def step(self, params, grads):
        for k, (p, grad) in enumerate(zip(params, grads, strict=True)):
            lay, g = self.layouts[k], self.layouts[k].to_work(grad.to(F64))
            st = self.state[k]
            if st is None:
                st = self.state[k] = {
                    "t": 0, "m": torch.zeros_like(g), "v": torch.zeros_like(g),
                    "GG": [torch.zeros(d, d, dtype=F64) if a else None
                           for d, a in zip(g.shape, self.active[k], strict=True)]}
                self._statistics(st, g)
                st["Q"] = [None if gg is None else torch.linalg.eigh(gg)[1].flip(-1) for gg in st["GG"]]
                continue
            st["t"] = t = st["t"] + 1
            qs = st["Q"]
            gr = rot(g, qs)
            st["m"] = self.b1 * st["m"] + (1 - self.b1) * gr
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * gr * gr
            n = unrot(st["m"] / (st["v"].sqrt() + self.eps), qs)
            if self.normalize:
                n = n / (1e-30 + n.square().mean().sqrt())
            ss = self.lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t) if self.correct_bias else self.lr
            p.sub_(ss * lay.from_work(n))
            if self.wd > 0:
                p.sub_(self.lr * self.wd * p)
            m_orig = unrot(st["m"], qs)
            self._statistics(st, g)
            if t % self.freq == 0:
                for i, gg in enumerate(st["GG"]):
                    if gg is None:
                        continue
                    lam = torch.einsum("ai,ab,bi->i", qs[i], gg, qs[i])
                    pi = torch.argsort(lam, descending=True)
                    st["v"] = st["v"].index_select(i, pi)
                    qs[i] = torch.linalg.qr(gg @ qs[i][:, pi])[0]
            st["m"] = rot(m_orig, qs)
