"""FOP operator invariants (research/algorithms.md section 1d) against the dense reference."""

import pytest
import torch

from dense import fop, random_spd
from distopt.fop import BlockMetric, eta_coefficient, fop_coefficients, fop_combine

N = 12
TOL = 1e-5


def combine(g1, g2, q, dvec, n1=1, n2=1):
    """distopt's path: rotate once, partials, coefficients, combine; returned unrotated, with (s, beta)."""
    metric = BlockMetric([q], dvec)
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
