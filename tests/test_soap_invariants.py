"""SOAP invariants (research/algorithms.md section 3d), eigh fall-backs and counters."""

import pytest
import torch

from distopt import SOAP
from distopt.soap import merged_shape, rotate, unrotate

F64 = torch.float64


def grads(seed, shape, n):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=F64) for _ in range(n)]


@pytest.mark.parametrize("shape", [(5, 4), (7,)])
def test_no_rotation_is_adam_on_the_shifted_gradients(shape):
    """max_precond_dim = 0 (and 1-D without precondition_1d): SOAP step t+1 == Adam step t on g_2, g_3, ..."""
    gs = grads(0, shape, 12)
    p = torch.nn.Parameter(torch.ones(shape, dtype=F64))
    q = torch.nn.Parameter(torch.ones(shape, dtype=F64))
    soap = SOAP([p], lr=0.01, betas=(0.9, 0.99), eps=1e-30, weight_decay=0.0, max_precond_dim=0, verbose=False)
    adam = torch.optim.Adam([q], lr=0.01, betas=(0.9, 0.99), eps=1e-30)
    p.grad = gs[0]
    soap.step()
    assert torch.equal(p, q) and soap.state[p]["step"] == 0, "first step only collects statistics"
    for g in gs[1:]:
        p.grad, q.grad = g, g.clone()
        soap.step()
        adam.step()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert soap.counters["eigh"] == 0 and all(x is None for x in soap.state[p]["Q"])


def test_bases_stay_orthogonal_and_refresh_on_schedule():
    p = torch.nn.Parameter(torch.zeros(6, 5))
    opt = SOAP([p], precondition_frequency=4, verbose=False)
    previous = None
    for g in grads(1, (6, 5), 13):
        p.grad = g.float()
        opt.step()
        st = opt.state[p]
        for q in st["Q"]:
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), atol=1e-5, rtol=0)
        if previous is not None:
            changed = any(not torch.equal(a, b) for a, b in zip(previous, st["Q"], strict=True))
            assert changed == (st["step"] % 4 == 0), f"basis changed at step {st['step']}"
        previous = [q.clone() for q in st["Q"]]
    assert opt.counters["eigh"] == 2 and opt.counters["qr"] == 2 * 3  # steps 4, 8, 12, two dims each
    x = torch.randn(6, 5)
    torch.testing.assert_close(unrotate(rotate(x, st["Q"]), st["Q"]), x, atol=1e-5, rtol=0)


def test_first_call_leaves_the_parameter_alone():
    p = torch.nn.Parameter(torch.randn(3, 3))
    before = p.detach().clone()
    opt = SOAP([p], weight_decay=0.5, verbose=False)
    p.grad = torch.randn(3, 3)
    opt.step()
    assert torch.equal(p, before) and opt.state[p]["step"] == 0 and opt.counters["eigh"] == 2


def test_refresh_sorts_by_estimated_eigenvalue():
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=F64))
    opt = SOAP([p], precondition_frequency=1, weight_decay=0.0, verbose=False)
    p.grad = torch.diag(torch.tensor([1.0, 3.0, 2.0, 0.5], dtype=F64))
    opt.step()
    q0 = opt.state[p]["Q"][0]
    assert torch.equal(q0.abs(), q0.abs().round()), "a diagonal GG has a permutation eigenbasis"
    p.grad = torch.diag(torch.tensor([0.2, 0.1, 4.0, 0.3], dtype=F64))  # reorders the eigenvalues
    opt.step()
    st = opt.state[p]
    lam = torch.diagonal(st["Q"][0].T @ st["GG"][0] @ st["Q"][0])
    assert torch.all(lam[:-1] >= lam[1:] - 1e-12), "columns ordered by descending eigenvalue"


def test_momentum_rotation_is_exact_across_a_refresh():
    """m lives in the eigenbasis; across a refresh, unrot_new(m_new) = b1 unrot_old(m_old) + (1 - b1) g."""
    p = torch.nn.Parameter(torch.zeros(5, 4, dtype=F64))
    opt = SOAP([p], betas=(0.9, 0.95), precondition_frequency=3, verbose=False)
    gs = grads(2, (5, 4), 4)
    for g in gs[:3]:
        p.grad = g
        opt.step()
    st = opt.state[p]
    m_before = unrotate(st["exp_avg"], st["Q"])
    old_q = [q.clone() for q in st["Q"]]
    p.grad = gs[3]
    opt.step()  # step 3: refresh
    assert any(not torch.equal(a, b) for a, b in zip(old_q, st["Q"], strict=True))
    torch.testing.assert_close(unrotate(st["exp_avg"], st["Q"]), 0.9 * m_before + 0.1 * gs[3], rtol=1e-12, atol=1e-14)


def test_permuting_basis_and_second_moment_together_changes_nothing():
    def run(permute):
        p = torch.nn.Parameter(torch.zeros(4, 3, dtype=F64))
        opt = SOAP([p], precondition_frequency=100, verbose=False)
        gs = grads(3, (4, 3), 4)
        for g in gs[:3]:
            p.grad = g
            opt.step()
        if permute:
            st = opt.state[p]
            perm = torch.tensor([2, 0, 3, 1])
            m = unrotate(st["exp_avg"], st["Q"])
            st["Q"][0] = st["Q"][0][:, perm]
            st["exp_avg_sq"] = st["exp_avg_sq"][perm]
            st["exp_avg"] = rotate(m, st["Q"])
        p.grad = gs[3]
        opt.step()
        return p.detach()

    torch.testing.assert_close(run(False), run(True), rtol=1e-12, atol=1e-14)


def test_constant_gradient_keeps_an_eigenbasis_through_refreshes():
    p = torch.nn.Parameter(torch.zeros(6, 4, dtype=F64))
    opt = SOAP([p], precondition_frequency=1, verbose=False)
    g = grads(4, (6, 4), 1)[0]
    for _ in range(6):
        p.grad = g
        opt.step()
    st = opt.state[p]
    for gg, q in zip(st["GG"], st["Q"], strict=True):
        lam = torch.diagonal(q.T @ gg @ q)
        torch.testing.assert_close(gg @ q, q * lam, atol=1e-8, rtol=0)


def test_merge_dims_rule():
    assert merged_shape((4, 3, 3, 3), 12) == (12, 9)
    assert merged_shape((64, 32, 3, 3), 10000) == (6144, 3)
    assert merged_shape((20000, 2), 100) == (20000, 2)
    assert merged_shape((1,), 10) == (1,)


def test_eigh_failure_retries_in_fp64_then_keeps_the_previous_basis(monkeypatch):
    real_eigh = torch.linalg.eigh
    mode = {"fail": "fp32"}

    def flaky(a, *args, **kwargs):
        if mode["fail"] == "all" or (mode["fail"] == "fp32" and a.dtype == torch.float32):
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = SOAP([p], verbose=False)
    p.grad = torch.randn(4, 4)
    opt.step()
    assert opt.counters["eigh_fp64_retry"] == 2 and opt.counters["eigh_failed"] == 0
    assert opt.state[p]["Q"][0].dtype == torch.float32
    mode["fail"] = "all"
    q = torch.nn.Parameter(torch.zeros(3, 3))
    opt2 = SOAP([q], verbose=False)
    q.grad = torch.randn(3, 3)
    opt2.step()
    assert opt2.counters["eigh_failed"] == 2
    assert torch.equal(opt2.state[q]["Q"][0], torch.eye(3)), "no previous basis: identity, no crash"
    q.grad = torch.randn(3, 3)
    opt2.step()  # and training goes on
    assert torch.isfinite(q).all()


def test_nonfinite_qr_keeps_the_previous_basis():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = SOAP([p], precondition_frequency=1, verbose=False)
    p.grad = torch.randn(3, 3)
    opt.step()
    before = [q.clone() for q in opt.state[p]["Q"]]
    opt.state[p]["GG"][0].fill_(float("nan"))
    p.grad = torch.randn(3, 3)
    opt.step()
    assert opt.counters["qr_failed"] == 1 and torch.equal(opt.state[p]["Q"][0], before[0])
