"""ML-FOP-SOAP invariants (research/algorithms.md section 2d) against a dense re-derivation.

The dense reference rebuilds one optimizer step from the math: metric M = Kronecker eigenbasis with
diagonal sqrt(v) + eps (state before the step) damped by the default fop_damping, folds of the
micro-gradients, G_fop = K z, eta*, Adam moments from rot(G_fop), update scaled by eta*. It never
calls distopt's FOP code.
"""

import math
from typing import Any

import pytest
import torch

import dense
from distopt import MLFOPSOAP, SOAP, MLFOPOptions

F64 = torch.float64
HP: dict[str, Any] = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=3)
LAM = MLFOPOptions().fop_damping  # the reference damps FOP's metric as the default optimizer does


def micro_grads(gen, shape, k):
    return [torch.randn(*shape, generator=gen, dtype=F64) for _ in range(k)]


def feed(opt, params, grads_per_micro, tags=None):
    """Manual capture: p.grad accumulates the micro-gradients as autograd would."""
    for i, grads in enumerate(grads_per_micro):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone() if p.grad is None else p.grad + g
        opt.end_microstep(tags[i] if tags else None)


def warm(opt, params, gen, steps=4, k=2):
    tags = ["text", "image"] * (k // 2) if opt.options.pair_source == "modality" else None
    for _ in range(steps):
        feed(opt, params, [[torch.randn(p.shape, generator=gen, dtype=F64) for p in params] for _ in range(k)], tags)
        opt.step()
        opt.zero_grad()


def make(shapes=((6, 5),), seed=0, **opts):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=F64)) for s in shapes]
    names = [f"layer{i}.weight" for i in range(len(params))]
    opt = MLFOPSOAP(list(zip(names, params, strict=True)), capture="manual", verbose=False, **{**HP, **opts})
    warm(opt, params, gen)
    return opt, params, gen


def dense_metric(state, eps, damping=LAM):
    """M = Q diag(dvec) Q^T with dvec = sqrt(v) + eps, damped: dvec + damping * mean(dvec)."""
    dvec = state["exp_avg_sq"].sqrt() + eps
    return dense.kron_metric(state["Q"], dvec + damping * dvec.mean())


def dense_step(p0, state, g_plain, g_fop, eta, hp=HP):
    """One SOAP step with moments from g_fop and the update scaled by eta (row-major flat vectors)."""
    rot = state["Q"][0].T
    for q in state["Q"][1:]:
        rot = torch.kron(rot, q.T)
    b1, b2 = hp["betas"]
    t = state["step"] + 1
    gr = rot @ g_fop
    m = b1 * state["exp_avg"].reshape(-1) + (1 - b1) * gr
    v = b2 * state["exp_avg_sq"].reshape(-1) + (1 - b2) * gr * gr
    ss = hp["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    new = p0.reshape(-1) - ss * eta * (rot.T @ (m / (v.sqrt() + hp["eps"])))
    return new * (1 - hp["lr"] * hp["weight_decay"])


def blk(opt, p, ordinal=0):
    """The optimizer state of one block of p (one block per parameter unless max_block cuts it)."""
    return opt.state[p]["blocks"][ordinal]


def snapshot(state):
    """A deep copy of a parameter's optimizer state."""
    def copy(v):
        if isinstance(v, list):
            return [copy(x) for x in v]
        return v.detach().clone() if torch.is_tensor(v) else v
    return {k: copy(v) for k, v in state.items()}


@pytest.mark.parametrize("schedule,k", [("tree", 2), ("tree", 3), ("tree", 4), ("tree", 7),
                                        ("streaming", 3), ("streaming", 4), ("streaming", 6)])
def test_layer_level_step_matches_dense(schedule, k):
    opt, (p,), gen = make(fold_schedule=schedule)
    st, p0 = snapshot(blk(opt, p)), p.detach().clone()
    gs = micro_grads(gen, p.shape, k)
    m = dense_metric(st, HP["eps"])
    flat = [g.reshape(-1) for g in gs]
    z, a_top = (dense.fold_tree_top if schedule == "tree" else dense.fold_streaming_top)(flat, m)
    g_plain, g_fop = sum(flat), k * z
    # eta* against the top fold's own average (docs/algorithm.md 4a.2; the plain mean for K = 2)
    expected = dense_step(p0, st, g_plain, g_fop, dense.eta(k * a_top, g_fop, m))
    folds = opt.counters["fop_folds"]
    feed(opt, [p], [[g] for g in gs])
    opt.step()
    assert opt.counters["fop_folds"] - folds == (k - 1 if schedule == "tree" else math.ceil(math.log2(k)))
    torch.testing.assert_close(p.detach().reshape(-1), expected, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(expected, dense_step(p0, st, g_plain, g_plain, 1.0), rtol=1e-6, atol=0), \
        "FOP made no difference: the test would not notice it switched off"


@pytest.mark.parametrize("schedule", ["tree", "streaming"])
def test_fold_counts_and_buffers(schedule):
    opt, params, gen = make(shapes=((4, 3), (5,)), fold_schedule=schedule)
    for k in range(1, 10):
        before = opt.counters["fop_folds"]
        peak = 0
        for g in [[torch.randn(p.shape, generator=gen, dtype=F64) for p in params] for _ in range(k)]:
            feed(opt, params, [g])
            fold = opt._window.fold
            peak = max(peak, len(fold.stack) if schedule == "tree" else 1 + (fold.chunk is not None))
        opt.step()
        opt.zero_grad()
        per_param = k - 1 if schedule == "tree" else math.ceil(math.log2(k))
        assert opt.counters["fop_folds"] - before == per_param * len(params)
        assert peak <= (math.floor(math.log2(k)) + 1 if schedule == "tree" else 2)


def test_fop_off_is_bitwise_soap():
    def run(cls, **extra):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = cls(model.named_parameters(), verbose=False, **HP, **extra)
        data = torch.randn(12, 6), torch.randn(12, 3)
        for _ in range(8):
            for i in range(3):
                loss = ((model(data[0][4 * i:4 * i + 4]) - data[1][4 * i:4 * i + 4]) ** 2).mean() / 3
                loss.backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    (m1, o1), (m2, o2) = run(SOAP), run(MLFOPSOAP, fop=False)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(o1.state[a][k], blk(o2, b)[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert o2.counters["fop_folds"] == 0 and o1.counters["eigh"] == o2.counters["eigh"] > 0


def test_identical_microgradients_give_soap():
    opt, (p,), gen = make()
    ref = SOAP([torch.nn.Parameter(p.detach().clone())], verbose=False, **HP)
    q = ref.param_groups[0]["params"][0]
    ref.state[q] = snapshot(blk(opt, p))
    g = torch.randn(p.shape, generator=gen, dtype=F64)
    guarded, folds = opt.counters["fop_beta_guarded"], opt.counters["fop_folds"]
    feed(opt, [p], [[g]] * 4)
    opt.step()
    q.grad = 4 * g
    ref.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.counters["fop_beta_guarded"] - guarded == opt.counters["fop_folds"] - folds == 2, \
        "both folds saw identical halves"


def test_scalar_metric_reduces_to_soap():
    opt, (p,), gen = make(max_precond_dim=0)
    blk(opt, p)["exp_avg_sq"].fill_(0.25)
    ref = SOAP([torch.nn.Parameter(p.detach().clone())], verbose=False, max_precond_dim=0, **HP)
    q = ref.param_groups[0]["params"][0]
    ref.state[q] = snapshot(blk(opt, p))
    gs = micro_grads(gen, p.shape, 4)
    feed(opt, [p], [[g] for g in gs])
    opt.step()
    q.grad = sum(gs)
    ref.step()
    torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_hooks_capture_the_standard_loop():
    """K plain backward calls then step(): hooks see the same micro-gradients as manual feeding."""
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 4, dtype=F64)
    x, y = torch.randn(4, 8, 5, dtype=F64), torch.randn(4, 8, 4, dtype=F64)
    hooked = MLFOPSOAP(model.named_parameters(), verbose=False, **HP)
    twin = torch.nn.Linear(5, 4, dtype=F64)
    twin.load_state_dict(model.state_dict())
    manual = MLFOPSOAP(twin.named_parameters(), capture="manual", verbose=False, **HP)
    for _ in range(5):
        for i in range(4):
            ((model(x[i]) - y[i]) ** 2).mean().div(4).backward()
            ((twin(x[i]) - y[i]) ** 2).mean().div(4).backward()
            manual.end_microstep()
        hooked.step(), manual.step()
        hooked.zero_grad(), manual.zero_grad()
    assert hooked.counters["fop_folds"] == manual.counters["fop_folds"] > 0
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("edit", ["in_place", "assigned"])
def test_changing_p_grad_after_backward_is_refused(edit):
    """Streaming folds reduce micro-steps 1, 2, 4, ...: after 3 micro-steps p.grad holds micro-step 3
    (kept for the tail), after 2 it was consumed (None). Editing the first or assigning the second is
    what clip_grad_norm_ or a hand-written loop would do; both are refused, not silently folded."""
    opt, (p,), gen = make()
    feed(opt, [p], [[g] for g in micro_grads(gen, p.shape, 3 if edit == "in_place" else 2)])
    if edit == "in_place":
        p.grad.mul_(0.3)  # what clip_grad_norm_ does
    else:
        assert p.grad is None, "the reduction at micro-step 2 consumes p.grad"
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        opt.step()


def test_max_grad_norm_clips_the_plain_and_the_folded_gradient():
    opt, (p,), gen = make(max_grad_norm=0.5)
    st, p0 = snapshot(blk(opt, p)), p.detach().clone()
    gs = micro_grads(gen, p.shape, 2)
    m = dense_metric(st, HP["eps"])
    flat = [g.reshape(-1) for g in gs]
    g_plain = sum(flat)
    clip = 0.5 / (float(g_plain.norm()) + 1e-6)
    assert clip < 0.5
    g_fop = 2 * dense.fop(flat[0], flat[1], m)[0]
    feed(opt, [p], [[g] for g in gs])
    opt.step()
    expected = dense_step(p0, st, clip * g_plain, clip * g_fop, dense.eta(g_plain, g_fop, m))
    torch.testing.assert_close(p.detach().reshape(-1), expected, rtol=1e-9, atol=1e-11)


def test_modality_pair_source_matches_dense():
    opt, (p,), gen = make(pair_source="modality")
    st, p0 = snapshot(blk(opt, p)), p.detach().clone()
    gs = micro_grads(gen, p.shape, 4)
    feed(opt, [p], [[g] for g in gs], tags=["text", "image", "text", "image"])
    opt.step()
    m = dense_metric(st, HP["eps"])
    text, image = (gs[0] + gs[2]).reshape(-1), (gs[1] + gs[3]).reshape(-1)
    g_plain, g_fop = text + image, 2 * dense.fop(text, image, m)[0]
    torch.testing.assert_close(p.detach().reshape(-1), dense_step(p0, st, g_plain, g_fop, dense.eta(g_plain, g_fop, m)),
                               rtol=1e-9, atol=1e-11)
    assert opt.counters["fop_folds"] >= 1


def test_modality_source_without_tag_is_an_error():
    opt, (p,), gen = make(pair_source="modality")
    p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
    with pytest.raises(RuntimeError, match="modality"):
        opt.end_microstep()


def test_global_level_is_fop_on_the_concatenation():
    opt, params, gen = make(shapes=((4, 3), (3, 3)), level="global")
    states = [snapshot(blk(opt, p)) for p in params]
    p0s = [p.detach().clone() for p in params]
    gs = [micro_grads(gen, p.shape, 2) for p in params]
    ms = [dense_metric(s, HP["eps"]) for s in states]
    m = torch.block_diag(*ms)
    flat = [torch.cat([gs[0][k].reshape(-1), gs[1][k].reshape(-1)]) for k in range(2)]
    c = dense.fop(flat[0], flat[1], m)[0]
    g_plain, g_fop = flat[0] + flat[1], 2 * c
    eta = dense.eta(g_plain, g_fop, m)
    feed(opt, params, [[gs[0][k], gs[1][k]] for k in range(2)])
    opt.step()
    n0 = params[0].numel()
    for p, p0, st, sl in zip(params, p0s, states, (slice(0, n0), slice(n0, None)), strict=True):
        torch.testing.assert_close(p.detach().reshape(-1), dense_step(p0, st, g_plain[sl], g_fop[sl], eta),
                                   rtol=1e-9, atol=1e-11)


def test_head_level_uses_the_metric_restricted_to_each_head():
    heads = 2
    opt, (p,), gen = make(shapes=((8, 5),), level="head", head_splits={"layer0.weight": (heads, 0)})
    st, p0 = snapshot(blk(opt, p)), p.detach().clone()
    gs = micro_grads(gen, p.shape, 2)
    m = dense_metric(st, HP["eps"])
    minv = torch.linalg.inv(m)
    rows = p.shape[0] // heads
    g_fop = torch.empty(p.numel(), dtype=F64)
    etas = torch.empty(p.numel(), dtype=F64)
    g_plain = (gs[0] + gs[1]).reshape(-1)
    for h in range(heads):
        idx = torch.arange(h * rows * 5, (h + 1) * rows * 5)
        m_h = m[idx][:, idx]
        minv_h = minv[idx][:, idx]   # the M^-1 form restricted to the head: (M^-1)_hh, not (M_hh)^-1
        a, d = (gs[0].reshape(-1)[idx] + gs[1].reshape(-1)[idx]) / 2, gs[0].reshape(-1)[idx] - gs[1].reshape(-1)[idx]
        s = float(d @ m_h @ a / (a @ m_h @ a))
        pp = d - s * a
        c = a + float(a @ minv_h @ pp / (pp @ minv_h @ pp)) * pp
        g_fop[idx] = 2 * c
        etas[idx] = float(g_plain[idx] @ minv_h @ (2 * c) / ((2 * c) @ minv_h @ (2 * c)))
    feed(opt, [p], [[g] for g in gs])
    opt.step()
    torch.testing.assert_close(p.detach().reshape(-1), dense_step(p0, st, g_plain, g_fop, etas), rtol=1e-9, atol=1e-11)
    assert opt.counters["fop_beta_guarded"] == 0


def test_streaming_is_invariant_to_order_within_a_chunk():
    results = []
    for order in ([0, 1, 2, 3], [0, 1, 3, 2], [0, 2, 1, 3]):
        opt, (p,), gen = make(seed=5, fold_schedule="streaming")
        gs = micro_grads(gen, p.shape, 4)
        feed(opt, [p], [[gs[i]] for i in order])
        opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(results[0], results[2], rtol=1e-8, atol=0), "across chunks the order matters"


def test_eta_conventions():
    deltas = {}
    for conv in ("mean", "sum", "none"):
        opt, (p,), gen = make(seed=7, eta_convention=conv, weight_decay=0.0)
        before = p.detach().clone()
        feed(opt, [p], [[g] for g in micro_grads(gen, p.shape, 2)])
        opt.step()
        deltas[conv] = p.detach() - before
    torch.testing.assert_close(deltas["sum"], 2 * deltas["mean"], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(deltas["none"], deltas["mean"], rtol=1e-6, atol=0)


def test_metric_not_ready_means_no_folds():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=F64))
    opt = MLFOPSOAP([p], capture="manual", verbose=False, **HP)
    for step in range(3):
        feed(opt, [p], [[torch.randn(4, 4, dtype=F64)] for _ in range(4)])
        opt.step()
        opt.zero_grad()
        # step 1: no state; step 2: v = 0 (scalar metric); folds start at step 3
        assert opt.counters["fop_folds"] == (0 if step < 2 else 2)  # streaming: ceil(log2 4) folds


def test_fisher_norm_weights_modalities_by_inverse_natural_norm():
    opt, (p,), gen = make(pair_source="modality", level="global", modality_weighting="fisher_norm",
                          modality_weight_beta=0.0)
    st, p0 = snapshot(blk(opt, p)), p.detach().clone()
    text, image = 10 * torch.randn(p.shape, generator=gen, dtype=F64), torch.randn(p.shape, generator=gen, dtype=F64)
    feed(opt, [p], [[text], [image]], tags=["text", "image"])
    opt.step()
    m = dense_metric(st, HP["eps"])
    minv = torch.linalg.inv(m)
    norms = [float(g.reshape(-1) @ minv @ g.reshape(-1)) ** 0.5 for g in (text, image)]
    w = [2 * (1 / n) / (1 / norms[0] + 1 / norms[1]) for n in norms]
    assert opt.levels.modality_norm_ema["text"] == pytest.approx(norms[0], rel=1e-10)
    weighted = (w[0] * text.reshape(-1), w[1] * image.reshape(-1))
    c = dense.fop(*weighted, m)[0]
    g_plain, g_fop = (text + image).reshape(-1), 2 * c
    eta = dense.eta(weighted[0] + weighted[1], g_fop, m)  # against the fold's own (weighted) average
    torch.testing.assert_close(p.detach().reshape(-1), dense_step(p0, st, g_plain, g_fop, eta), rtol=1e-9, atol=1e-11)


def test_state_dict_mid_accumulation_is_refused():
    opt, (p,), gen = make()
    feed(opt, [p], [[torch.randn(p.shape, generator=gen, dtype=F64)]])
    with pytest.raises(RuntimeError, match="mid-accumulation"):
        opt.state_dict()


def test_max_grad_norm_applies_with_fop_off_too():
    """FOP off in one process runs SOAP on p.grad; clipping must still happen (equal to clipping p.grad)."""
    gen = torch.Generator().manual_seed(11)
    grads = [10 * torch.randn(5, 4, generator=gen, dtype=F64) for _ in range(4)]
    results = []
    for clip_inside in (True, False):
        p = torch.nn.Parameter(torch.zeros(5, 4, dtype=F64))
        opt = MLFOPSOAP([p], fop=False, max_grad_norm=1.0 if clip_inside else None, verbose=False, **HP)
        for g in grads:
            p.grad = g.clone()
            if not clip_inside:  # the closed form: scale by max_norm / (||g|| + 1e-6) when ||g|| > max_norm
                p.grad.mul_(1.0 / (float(g.norm()) + 1e-6))
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


# -- the open readings as options (docs/algorithm.md section 4a) -----------------------------------------


def dense_step_full(p0, state, g_m, g_v, eta=1.0, delta=None, gamma=0.0, hp=HP):
    """One SOAP step, written out: m from g_m, v from g_v, the step scaled by eta, plus gamma times the
    preconditioned rot(delta) after Adam's normalisation (coupling='update'); row-major flat vectors."""
    rot = state["Q"][0].T
    for q in state["Q"][1:]:
        rot = torch.kron(rot, q.T)
    b1, b2 = hp["betas"]
    t = state["step"] + 1
    m = b1 * state["exp_avg"].reshape(-1) + (1 - b1) * (rot @ g_m)
    v = b2 * state["exp_avg_sq"].reshape(-1) + (1 - b2) * (rot @ g_v) ** 2
    d = v.sqrt() + hp["eps"]
    step = eta * (rot.T @ (m / d)) / (1 - b1 ** t)
    if delta is not None:
        step = step + gamma * (rot.T @ ((rot @ delta) / d))
    new = p0.reshape(-1) - hp["lr"] * math.sqrt(1 - b2 ** t) * step
    return new * (1 - hp["lr"] * hp["weight_decay"])


def one_fold_case(**opts):
    """A warmed-up block and K = 2 micro-gradients; the dense metric, plain and folded gradients, and eta*."""
    opt, (p,), gen = make(**opts)
    st, p0 = snapshot(blk(opt, p)), p.detach().clone()
    g1, g2 = micro_grads(gen, p.shape, 2)
    feed(opt, [p], [[g1], [g2]])
    opt.step()
    return opt, p, st, p0, g1.reshape(-1), g2.reshape(-1)


def test_damping_measures_in_the_damped_metric():
    lam = 0.37  # not the default: the option must reach the metric
    opt, p, st, p0, g1, g2 = one_fold_case(fop_damping=lam)
    m = dense_metric(st, HP["eps"], damping=lam)
    c = dense.fop(g1, g2, m)[0]
    expected = dense_step(p0, st, g1 + g2, 2 * c, dense.eta(g1 + g2, 2 * c, m))
    torch.testing.assert_close(p.detach().reshape(-1), expected, rtol=1e-9, atol=1e-11)
    undamped = dense_metric(st, HP["eps"], damping=0.0)
    c0 = dense.fop(g1, g2, undamped)[0]
    assert not torch.allclose(expected, dense_step(p0, st, g1 + g2, 2 * c0, dense.eta(g1 + g2, 2 * c0, undamped)),
                              rtol=1e-6, atol=0), "damping made no difference: the test would not notice it ignored"


def test_plain_second_moment_feeds_v_from_the_plain_gradient():
    opt, p, st, p0, g1, g2 = one_fold_case(second_moment="plain")
    m = dense_metric(st, HP["eps"])
    c = 2 * dense.fop(g1, g2, m)[0]
    eta = dense.eta(g1 + g2, c, m)
    torch.testing.assert_close(p.detach().reshape(-1), dense_step_full(p0, st, c, g1 + g2, eta), rtol=1e-9, atol=1e-11)
    assert not torch.allclose(p.detach().reshape(-1), dense_step_full(p0, st, c, c, eta), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_update_coupling_adds_the_preconditioned_correction_to_soaps_own_step(gamma):
    opt, p, st, p0, g1, g2 = one_fold_case(coupling="update", eta_convention="none", fop_gamma=gamma)
    m = dense_metric(st, HP["eps"])
    g, g_fop = g1 + g2, 2 * dense.fop(g1, g2, m)[0]
    expected = dense_step_full(p0, st, g, g, 1.0, delta=g_fop - g, gamma=gamma)
    torch.testing.assert_close(p.detach().reshape(-1), expected, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(expected, dense_step_full(p0, st, g, g), rtol=1e-6, atol=0)


def test_update_coupling_with_gamma_zero_is_soap_bit_for_bit():
    def run(**opts):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = MLFOPSOAP(model.named_parameters(), verbose=False, **HP, **opts)
        x, y = torch.randn(12, 6), torch.randn(12, 3)
        for _ in range(6):
            for i in range(3):
                ((model(x[4 * i:4 * i + 4]) - y[4 * i:4 * i + 4]) ** 2).mean().div(3).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], opt

    soap, _ = run(fop=False)
    coupled, opt = run(coupling="update", eta_convention="none", fop_gamma=0.0)
    assert opt.counters["fop_folds"] > 0, "FOP ran; only its term is switched off"
    for a, b in zip(soap, coupled, strict=True):
        assert torch.equal(a, b)


def test_stats_report_each_layers_diagnostics():
    opt, p, st, p0, g1, g2 = one_fold_case()
    m = dense_metric(st, HP["eps"])
    c = dense.fop(g1, g2, m)[0]
    minv = torch.linalg.inv(m)
    a, d = (g1 + g2) / 2, g1 - g2
    s = float(d @ m @ a / (a @ m @ a))
    perp = d - s * a
    x = float((a @ minv @ perp) ** 2 / ((a @ minv @ a) * (perp @ minv @ perp)))
    stats = opt.stats()
    assert stats["cosine_sq/layer0.weight"] == pytest.approx(x, rel=1e-8)
    assert stats["eta/layer0.weight"] == pytest.approx(dense.eta(g1 + g2, 2 * c, m), rel=1e-10)
    assert stats["correction/layer0.weight"] == pytest.approx(float((2 * c - (g1 + g2)).norm() / (g1 + g2).norm()),
                                                              rel=1e-8)
    assert stats["beta_abs_max"] >= stats["beta_abs_min"] > 0


def test_coupling_update_needs_eta_none():
    with pytest.raises(ValueError, match="eta_convention.*coupling='update'"):
        MLFOPSOAP([torch.nn.Parameter(torch.zeros(3, 3))], coupling="update")


@pytest.mark.parametrize("opts", [{}, dict(pair_source="modality"), dict(fold_schedule="tree")])
def test_a_finished_window_is_freed_without_the_cyclic_collector(opts):
    """With Python's cyclic garbage collector off, the window of a step (G, the folds' items, the
    metric) is gone as soon as step() returns: nothing in it refers back to it. (The window used to hand
    its folds bound methods of itself: a reference cycle that kept every finished window, ~21 GiB per
    rank for Emu3-8B at 8 GPUs, until the collector ran.)"""
    import gc
    import weakref

    opt, params, gen = make(shapes=((6, 5), (4, 4)), **opts)
    tags = ["text", "image"] * 2 if opts.get("pair_source") == "modality" else None
    gc.collect()
    gc.disable()
    try:
        feed(opt, params, [[torch.randn(p.shape, generator=gen, dtype=F64) for p in params] for _ in range(4)], tags)
        window = weakref.ref(opt._window)
        items = [weakref.ref(x) for node in opt._window.fold.held() for x in node.values()]
        opt.step()
        assert window() is None, "the step's window outlives step()"
        assert all(item() is None for item in items), "a fold item outlives step()"
    finally:
        gc.enable()
    assert opt.counters["fop_folds"] > 0
