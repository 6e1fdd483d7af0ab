"""FOP operator invariants (research/algorithms.md section 1d) against the dense reference, and the
pure functions of docs/algorithm.md section 2: damping, the bounded eta*, diagnostics."""

import pytest
import torch

import dense
from dense import fop, random_spd
from distopt.fold import make_fold
from distopt.fop import BlockMetric, correction_partials, cosine_sq, fold_eta, fop_coefficients, fop_combine


def eta_coefficient(partials: torch.Tensor) -> torch.Tensor:
    """eta* = <g, c>_{M^-1} / <c, c>_{M^-1}; 1 where c = 0 (the general definition fold_eta specialises)."""
    gc, cc = partials.unbind(-1)
    return torch.where(cc > 0, gc / torch.where(cc > 0, cc, torch.ones_like(cc)), torch.ones_like(cc))


def relative_correction(partials: torch.Tensor) -> torch.Tensor:
    """||G_fop - G|| / ||G|| from correction_partials (..., 2), as MLFOPSOAP.stats() forms it; 0 where G = 0."""
    ok = partials[..., 1] > 0
    return torch.where(ok, partials[..., 0] / torch.where(ok, partials[..., 1], 1.0), 0.0).sqrt()


N = 12
TOL = 1e-5


def combine(g1, g2, q, dvec, n1=1, n2=1, damping=0.0):
    """distopt's path: rotate once, partials, coefficients, combine; returned unrotated, with (s, beta)."""
    metric = BlockMetric([q], dvec, damping=damping)
    x1, x2 = metric.prepare(g1), metric.prepare(g2)
    a, d = (n1 * x1 + n2 * x2) / (n1 + n2), x1 - x2
    s, beta, _ = fop_coefficients(metric.partials(a, d), TOL)
    c = fop_combine(a, d, metric.expand(s, a), metric.expand(beta, a))
    return q @ c, float(s), float(beta)


@pytest.fixture
def setup():
    gen = torch.Generator().manual_seed(0)
    m, q, dvec = random_spd(N, gen)
    g1, g2 = (torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(2))
    return m, q, dvec, g1, g2


def test_matches_dense_reference(setup):
    m, q, dvec, g1, g2 = setup
    c, s, beta = combine(g1, g2, q, dvec)
    c_ref, s_ref, beta_ref = fop(g1, g2, m)
    assert abs(beta_ref) > 1e-3, "the test needs a non-trivial correction"
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)
    assert s == pytest.approx(s_ref, rel=1e-10) and beta == pytest.approx(beta_ref, rel=1e-10)


def test_unequal_counts_match_dense_reference(setup):
    m, q, dvec, g1, g2 = setup
    torch.testing.assert_close(combine(g1, g2, q, dvec, 4, 2)[0], fop(g1, g2, m, 4, 2)[0], rtol=1e-10, atol=1e-12)


def test_identical_gradients_give_the_mean(setup):
    _, q, dvec, g1, _ = setup
    c, _, beta = combine(g1, g1.clone(), q, dvec)
    assert beta == 0.0
    torch.testing.assert_close(c, g1, rtol=1e-12, atol=1e-12)


def test_f_orthogonality(setup):
    m, q, dvec, g1, g2 = setup
    a, d = (g1 + g2) / 2, g1 - g2
    _, s, _ = combine(g1, g2, q, dvec)
    p = d - s * a
    assert abs(float(a @ m @ p)) <= 1e-10 * float((a @ m @ a).sqrt() * (p @ m @ p).sqrt())
    minv = torch.linalg.inv(m)
    assert abs(float(a @ minv @ p)) > 1e-3 * float((a @ minv @ a).sqrt() * (p @ minv @ p).sqrt()), \
        "orthogonal in M but not in M^-1: that mismatch is FOP's whole effect"


@pytest.mark.parametrize("c", [1e-3, 1.0, 250.0])
def test_scalar_metric_is_a_no_op(setup, c):
    _, q, _, g1, g2 = setup
    out, _, beta = combine(g1, g2, q, torch.full((N,), c, dtype=torch.float64))
    assert abs(beta) < 1e-8
    torch.testing.assert_close(out, (g1 + g2) / 2, rtol=1e-8, atol=1e-10)


def test_swap_symmetry(setup):
    _, q, dvec, g1, g2 = setup
    c12, s12, b12 = combine(g1, g2, q, dvec)
    c21, s21, b21 = combine(g2, g1, q, dvec)
    assert b21 == pytest.approx(-b12, rel=1e-10)
    torch.testing.assert_close(c12, c21, rtol=1e-10, atol=1e-12)


def test_scale_invariance(setup):
    _, q, dvec, g1, g2 = setup
    c, s, beta = combine(g1, g2, q, dvec)
    c_scaled, s2, beta2 = combine(3.5 * g1, 3.5 * g2, q, dvec)
    torch.testing.assert_close(c_scaled, 3.5 * c, rtol=1e-10, atol=1e-12)
    _, s3, beta3 = combine(g1, g2, q, 7.0 * dvec)
    assert (s2, beta2) == pytest.approx((s, beta), rel=1e-10)
    assert (s3, beta3) == pytest.approx((s, beta), rel=1e-10)


def test_parallel_gradients_give_beta_zero(setup):
    _, q, dvec, g1, _ = setup
    _, _, beta = combine(g1, 0.3 * g1, q, dvec)
    assert beta == 0.0


def test_beta_and_eta_are_optimal(setup):
    m, q, dvec, g1, g2 = setup
    minv = torch.linalg.inv(m)
    a, d = (g1 + g2) / 2, g1 - g2
    _, s, beta = combine(g1, g2, q, dvec)
    p = d - s * a

    def j(b):  # quadratic model of L1 + L2 along -M^-1 (a + b p)
        x = a + b * p
        return float(-2 * a @ minv @ x + 0.5 * x @ minv @ x)

    for delta in (1e-3, 1e-1, 1.0):
        assert j(beta) <= min(j(beta + delta), j(beta - delta))
    assert j(beta) <= j(0.0)
    c = a + beta * p
    eta = float(eta_coefficient(torch.stack([a @ minv @ c, c @ minv @ c])))
    assert 0.5 <= eta <= 1.0


def test_eta_is_one_without_correction(setup):
    m, _, _, g1, _ = setup
    minv = torch.linalg.inv(m)
    assert float(eta_coefficient(torch.stack([g1 @ minv @ g1, g1 @ minv @ g1]))) == pytest.approx(1.0)


# -- damping -----------------------------------------------------------------------------------------

def test_damped_metric_matches_dense_reference(setup):
    """dvec + lam mean(dvec) is M + lam (tr M / n) I: FOP's F + lam I, relative to M's average eigenvalue."""
    m, q, dvec, g1, g2 = setup
    lam = 0.3
    damped = m + lam * float(dvec.mean()) * torch.eye(N, dtype=torch.float64)
    c, s, beta = combine(g1, g2, q, dvec, damping=lam)
    c_ref, s_ref, beta_ref = fop(g1, g2, damped)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)
    assert (s, beta) == pytest.approx((s_ref, beta_ref), rel=1e-10)
    assert abs(beta - combine(g1, g2, q, dvec)[2]) > 1e-2 * abs(beta), "damping must change the fold"
    _, s7, beta7 = combine(g1, g2, q, 7.0 * dvec, damping=lam)
    assert (s7, beta7) == pytest.approx((s, beta), rel=1e-10), "still invariant to M -> cM"
    _, _, beta_big = combine(g1, g2, q, dvec, damping=1e9)
    assert abs(beta_big) < 1e-6, "heavy damping: a scalar metric, FOP is the mean"
    with pytest.raises(ValueError, match="fop_damping=-0.1 is invalid"):
        BlockMetric([q], dvec, damping=-0.1)


# -- eta* bounded by construction ----------------------------------------------------------------------

def _micro_gradients(kind: str, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    gs = [torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(k)]
    if kind == "scaled":  # micro-steps whose sizes span four decades
        return [g * 10 ** (4 * float(torch.rand(1, generator=gen)) - 2) for g in gs]
    if kind == "alternating":  # large alternating halves around a small mean: big lower-level corrections
        base = 0.05 * torch.randn(N, generator=gen, dtype=torch.float64)
        u = torch.randn(N, generator=gen, dtype=torch.float64)
        return [base + (-1) ** i * (1 + 0.5 * float(torch.randn(1, generator=gen))) * u + 0.3 * g
                for i, g in enumerate(gs)]
    return gs


def _distopt_fold(gs, q, dvec, schedule):
    """distopt.fold with distopt.fop in the eigenbasis; returns (c unrotated, the last fold's partials and beta)."""
    metric, last = BlockMetric([q], dvec), {}

    def combine_items(x1, n1, x2, n2):
        a, d = (n1 * x1 + n2 * x2) / (n1 + n2), x1 - x2
        last["partials"] = metric.partials(a, d)
        s, beta, _ = fop_coefficients(last["partials"], TOL)
        last["beta"] = beta
        return fop_combine(a, d, s, beta)

    fold = make_fold(schedule, combine_items, lambda x1, n1, x2, n2: (n1 * x1 + n2 * x2) / (n1 + n2))
    for g in gs:
        fold.push(metric.prepare(g))
    result = fold.result()
    assert result is not None
    return q @ result[0], last["partials"], last["beta"]


def test_eta_is_bounded_for_every_k_and_schedule_and_the_old_formula_is_not():
    """eta* against the top fold's own a is (1 + x)/(1 + 3x) in [1/2, 1] by construction; against the
    plain mean (the old g_tot) it leaves [1/2, 1] for K >= 3, and turns negative (an ascent step)."""
    gen = torch.Generator().manual_seed(5)
    old_outside, old_min = set(), 1.0
    for schedule in ("streaming", "tree"):
        for k in range(2, 17):
            for draw in range(18):
                m, q, dvec = random_spd(N, gen, spread=6.0)
                gs = _micro_gradients(("random", "scaled", "alternating")[draw % 3], k, gen)
                c, partials, beta = _distopt_fold(gs, q, dvec, schedule)
                c_ref, a_top = (dense.fold_tree_top if schedule == "tree" else dense.fold_streaming_top)(gs, m)
                torch.testing.assert_close(c, c_ref, rtol=1e-8, atol=1e-10)
                eta = float(fold_eta(partials, beta))
                assert eta == pytest.approx(dense.eta(a_top, c_ref, m), rel=1e-8, abs=1e-10)
                assert 0.5 - 1e-12 <= eta <= 1 + 1e-12, (schedule, k, draw, eta)
                old = dense.eta(sum(gs, torch.zeros_like(gs[0])) / k, c_ref, m)
                if k == 2:
                    assert old == pytest.approx(eta, rel=1e-8), "one fold: a is the plain mean"
                elif not 0.5 - 1e-9 <= old <= 1 + 1e-9:
                    old_outside.add((schedule, k))
                old_min = min(old_min, old)
    assert len(old_outside) >= 20, f"the old formula should leave [1/2, 1] for most K >= 3: {sorted(old_outside)}"
    assert old_min < 0, "and turn the step around somewhere"


# -- diagnostics ---------------------------------------------------------------------------------------

def test_diagnostics_match_dense(setup):
    """x = D^2/(A E) is the squared M^-1-cosine of a and p, and eta* = (1 + x)/(1 + 3x); the relative
    correction ||G_fop - G|| / ||G|| is basis-free (measured on rotated items)."""
    m, q, dvec, g1, g2 = setup
    minv = torch.linalg.inv(m)
    metric = BlockMetric([q], dvec)
    x1, x2 = metric.prepare(g1), metric.prepare(g2)
    a_rot, d_rot = (x1 + x2) / 2, x1 - x2
    partials = metric.partials(a_rot, d_rot)
    s, beta, _ = fop_coefficients(partials, TOL)
    c_rot = fop_combine(a_rot, d_rot, s, beta)
    a, p = (g1 + g2) / 2, (g1 - g2) - float(s) * (g1 + g2) / 2
    x_ref = float((a @ minv @ p) ** 2 / ((a @ minv @ a) * (p @ minv @ p)))
    assert 1e-3 < x_ref < 1
    assert float(cosine_sq(partials)) == pytest.approx(x_ref, rel=1e-9)
    assert float(fold_eta(partials, beta)) == pytest.approx((1 + x_ref) / (1 + 3 * x_ref), rel=1e-9)
    c = q @ c_rot
    ratio = float(relative_correction(correction_partials(a_rot, c_rot)))
    assert ratio == pytest.approx(float((c - a).norm() / a.norm()), rel=1e-9)
    two_blocks = correction_partials(a_rot, c_rot) + correction_partials(2 * a_rot, 2 * a_rot)
    assert float(relative_correction(two_blocks)) == pytest.approx(
        float((c - a).norm() / (5 * a @ a).sqrt()), rel=1e-9), "partials add over blocks"
    zero = torch.zeros(5, dtype=torch.float64)
    assert float(cosine_sq(zero)) == 0.0 and float(fold_eta(zero, torch.tensor(0.0, dtype=torch.float64))) == 1.0


