"""Two-objective rules (research/algorithms.md section 4c): closed forms and the wrapper."""

from collections.abc import Callable, Iterable
from typing import Any, Optional

import pytest
import torch

from distopt import build_optimizer
from distopt.protocols import TakesMicrosteps
from distopt.rules import TwoObjective, combine, gradnorm_weights, module_of
from sharded_worker import run_sharded, train

F64 = torch.float64



def prefixed(what: str) -> Callable[[str], str]:
    """assert_close's `msg`: its own message after `what`."""
    return lambda m: f"{what}: {m}"


def build_rule(spec: dict[str, Any], named: Iterable[Any]) -> TwoObjective:
    opt = build_optimizer(spec, named)
    assert isinstance(opt, TwoObjective)
    return opt


def vec(*x):
    return torch.tensor(x, dtype=F64)


def test_mgda_orthogonal_equal_norms_gives_the_midpoint():
    g1, g2 = vec(1.0, 0.0), vec(0.0, 1.0)
    torch.testing.assert_close(combine("mgda", g1, g2), (g1 + g2) / 2)


def test_mgda_min_norm_point_and_common_descent():
    gen = torch.Generator().manual_seed(0)
    g1, g2 = 10 * torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    d = combine("mgda", g1, g2)
    alphas = torch.linspace(0, 1, 2001, dtype=F64)
    brute = min(float((a * g1 + (1 - a) * g2).norm()) for a in alphas)
    assert float(d.norm()) <= brute + 1e-9
    assert float(d @ g1) >= float(d @ d) - 1e-9 and float(d @ g2) >= float(d @ d) - 1e-9
    assert float((d - g2).norm()) < float((d - g1).norm()), "the min-norm point lies near the shorter gradient"


def test_pcgrad_projects_only_conflicts():
    g1, g2 = vec(1.0, 1.0), vec(1.0, -0.5)
    torch.testing.assert_close(combine("pcgrad", g1, g2), (g1 + g2) / 2)
    g2 = vec(-1.0, 0.2)
    g1p = g1 - (g1 @ g2) / (g2 @ g2) * g2
    g2p = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert abs(float(g1p @ g2)) < 1e-12 and abs(float(g2p @ g1)) < 1e-12
    torch.testing.assert_close(combine("pcgrad", g1, g2), (g1p + g2p) / 2)


def test_pareto_lora_closed_forms():
    g1, g2 = vec(3.0, 0.0), vec(0.0, 3.0)
    torch.testing.assert_close(combine("pareto_lora", g1, g2), (g1 + g2) / 2, msg="equal norms, orthogonal: midpoint")
    zero = torch.zeros(2, dtype=F64)  # the update is twice the direction (the summed loss's scale):
    torch.testing.assert_close(2 * combine("pareto_lora", g1, zero), g1, msg="zero: the update is the other's gradient")
    torch.testing.assert_close(2 * combine("pareto_lora", zero, g2), g2)
    g = vec(0.3, -2.0, 1.0)
    torch.testing.assert_close(combine("pareto_lora", g, g.clone()), g, msg="identical gives that gradient")
    big, small = vec(100.0, 0.0), vec(0.0, 1.0)
    d = combine("pareto_lora", big, small)
    torch.testing.assert_close(d, 50.5 * (vec(1.0, 0.0) + vec(0.0, 1.0)) / 2, msg="strengths equalised")


@pytest.mark.parametrize("rule", ["mgda", "pcgrad", "pareto_lora"])
def test_identical_gradients_give_that_gradient(rule):
    g = vec(0.3, -2.0, 1.0)
    torch.testing.assert_close(combine(rule, g, g.clone()), g)


@pytest.mark.parametrize("rule", ["sum", "mgda", "pcgrad", "pareto_lora"])
def test_a_group_one_modality_reaches_follows_it_at_the_vanilla_scale(rule):
    """MGDA's min-norm point would be 0 (the group never trains), Pareto-LoRA's equalisation undefined."""
    g, zero = vec(0.3, -2.0, 1.0), torch.zeros(3, dtype=F64)
    torch.testing.assert_close(2 * combine(rule, g, zero), g)
    torch.testing.assert_close(2 * combine(rule, zero, g), g)


def test_layer_granularity_weighs_each_layer_by_its_own_gradients():
    """Two layers: one where text dominates 100x, one balanced. Per layer, Pareto-LoRA-style equalises
    each; globally, one weight pair (set by the dominant layer) scales both."""
    grads = {"text": [vec(100.0, 0.0), vec(1.0, 0.0)], "image": [vec(0.0, 1.0), vec(0.0, 1.0)]}
    updates = {}
    for granularity in ("layer", "global"):
        params = [torch.nn.Parameter(torch.zeros(2, dtype=F64)) for _ in range(2)]
        spec = {"name": "pareto_lora", "params": {"base": "adamw", "granularity": granularity, "lr": 0.1}}
        opt = build_rule(spec, [("l1.weight", params[0]), ("l2.weight", params[1])])
        for tag, gs in grads.items():
            with opt.modality(tag):
                sum((p * g).sum() for p, g in zip(params, gs, strict=True)).backward()
        opt.base.step = lambda closure=None: None  # type: ignore[method-assign, assignment]  # a no-op: the combined gradient stays in p.grad
        opt.step()
        updates[granularity] = [p.grad.clone() for p in params if p.grad is not None]
    torch.testing.assert_close(updates["layer"][0], vec(50.5, 50.5))  # 2 x 50.5 x (u1 + u2) / 2
    torch.testing.assert_close(updates["layer"][1], vec(1.0, 1.0))
    n1, n2 = (100.0**2 + 1) ** 0.5, 2**0.5  # global norms: one weight pair for both layers
    w1, w2 = (n1 + n2) / 2 / (2 * n1), (n1 + n2) / 2 / (2 * n2)
    torch.testing.assert_close(updates["global"][1], 2 * vec(w1, w2))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
def test_resumed_wrapper_keeps_the_lr_schedule_reaching_its_base(tmp_path):
    model = torch.nn.Linear(3, 2).double()
    opt = build_rule({"name": "pcgrad", "params": {"base": "adamw", "lr": 0.1}}, model.named_parameters())
    for tag in ("text", "image"):
        with opt.modality(tag):
            model(torch.ones(1, 3, dtype=F64)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    fresh = build_rule({"name": "pcgrad", "params": {"base": "adamw", "lr": 0.1}}, model.named_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 0.5 ** step)
    fresh.load_state_dict(saved)
    assert fresh.state is fresh.base.state and len(fresh.state) == 2
    scheduler.step()
    assert fresh.base.param_groups[0]["lr"] == fresh.param_groups[0]["lr"] == 0.05


def test_gradnorm_weight_update_matches_a_hand_computation():
    """w = (1, 1), norms (3, 1), losses (0.5, 0.8) from (1, 1), alpha 1.5, lr 0.1:
    G = (3, 1), Gbar = 2; Lt = (0.5, 0.8), r = (0.5, 0.8) / 0.65 = (0.7692, 1.2308), r^1.5 = (0.6747, 1.3654),
    target = (1.3493, 2.7308); G - target = (+, -), so dL/dw = (+3, -1), divided by the mean norm 2:
    w = (1 - 0.15, 1 + 0.05) = (0.85, 1.05), rescaled to sum 2: (0.8947, 1.1053). The task whose gradient
    is larger and whose loss falls faster loses weight."""
    new = gradnorm_weights(vec(1.0, 1.0), vec(3.0, 1.0), vec(0.5, 0.8), vec(1.0, 1.0), 1.5, 0.1)
    torch.testing.assert_close(new, vec(0.85, 1.05) * 2 / 1.9)
    clamped = gradnorm_weights(vec(1.0, 1.0), vec(3.0, 1.0), vec(0.5, 0.8), vec(1.0, 1.0), 1.5, 1.0)
    torch.testing.assert_close(clamped, vec(1e-3, 1.5) * 2 / 1.501, msg="1 - 1.5 < 0: clamped to 1e-3, rescaled")
    balanced = gradnorm_weights(vec(1.0, 1.0), vec(2.0, 2.0), vec(0.3, 0.6), vec(0.5, 1.0), 1.5, 0.1)
    torch.testing.assert_close(balanced, vec(1.0, 1.0), msg="equal norms and equal training rates: fixed")


def _one_layer_rule(name, **params):
    p = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = build_rule({"name": name, "params": {"base": "adamw", "lr": 0.1, "granularity": "global", **params}},
                     [("l.weight", p)])
    opt.base.step = lambda closure=None: None  # type: ignore[method-assign, assignment]  # a no-op: the combined gradient stays in p.grad
    return p, opt


def _step(p, opt, grads: dict, losses: Optional[dict] = None):
    p.grad = None
    for tag, g in grads.items():
        if losses:
            opt.record_loss(tag, torch.tensor(losses[tag], dtype=F64))
        with opt.modality(tag):
            (p * g).sum().backward()
    opt.step()
    return p.grad.clone()


def test_gradnorm_uses_its_weights_then_moves_them():
    """Text gradient (3, 0), image (0, 1). Step 1 (losses 0.5, 0.8 become L(0)): weights (1, 1), so the
    update is vanilla; then, r = (1, 1) and target Gbar = 2: w = (0.85, 1.05) * 2 / 1.9 = (0.8947, 1.1053).
    Step 2 (text loss halved, 0.25): the update is 0.8947 g_text + 1.1053 g_image; then G = (2.6842,
    1.1053), Gbar = 1.8947, r = (0.5, 1) / 0.75, target = (1.0314, 2.9171): (+, -) again, w = (0.7447,
    1.1553) * 2 / 1.9 = (0.7839, 1.2161)."""
    p, opt = _one_layer_rule("gradnorm", gradnorm_lr=0.1)
    grads = {"text": vec(3.0, 0.0), "image": vec(0.0, 1.0)}
    torch.testing.assert_close(_step(p, opt, grads, {"text": 0.5, "image": 0.8}), vec(3.0, 1.0))
    w1 = opt.runtime_state()["gradnorm"]["weights"]["all"]
    assert w1["text"] == pytest.approx(0.85 * 2 / 1.9) and w1["image"] == pytest.approx(1.05 * 2 / 1.9)
    torch.testing.assert_close(_step(p, opt, grads, {"text": 0.25, "image": 0.8}), vec(3 * 0.85, 1.05) * 2 / 1.9)
    w2 = opt.runtime_state()["gradnorm"]["weights"]["all"]
    assert w2["text"] == pytest.approx(0.7447368 * 2 / 1.9, rel=1e-6)
    assert w2["image"] == pytest.approx(1.1552632 * 2 / 1.9, rel=1e-6)
    assert opt.runtime_state()["gradnorm"]["initial_loss"] == {"text": 0.5, "image": 0.8}
    saved = opt.state_dict()
    _, fresh = _one_layer_rule("gradnorm", gradnorm_lr=0.1)
    fresh.load_state_dict(saved)
    assert fresh.runtime_state()["gradnorm"] == opt.runtime_state()["gradnorm"], "weights and L(0) are resumed"
    with pytest.raises(RuntimeError, match="record_loss"):
        _step(p, opt, grads)


def test_fixed_modality_weights_scale_each_modality():
    """sum with [w_text, w_image] is the gradient of w_text L_text + w_image L_image, also on a step that
    has one modality only; understanding/generation are the text/image tags of the training loop."""
    p, opt = _one_layer_rule("sum", modality_weights=[0.5, 2.0])
    grads = {"understanding": vec(3.0, 1.0), "generation": vec(-1.0, 2.0)}
    torch.testing.assert_close(_step(p, opt, grads), 0.5 * grads["understanding"] + 2.0 * grads["generation"])
    torch.testing.assert_close(_step(p, opt, {"text": vec(3.0, 1.0)}), vec(1.5, 0.5))
    p, vanilla = _one_layer_rule("sum", modality_weights=[1, 1])
    torch.testing.assert_close(_step(p, vanilla, grads), grads["understanding"] + grads["generation"])
    p, odd = _one_layer_rule("sum", modality_weights=[0.5, 2.0])
    with pytest.raises(ValueError, match="modality_weights: modality tag 'left'"):
        _step(p, odd, {"left": vec(1.0, 0.0), "text": vec(0.0, 1.0)})


@pytest.mark.parametrize("name, params, match", [
    ("pcgrad", {"modality_weights": [1, 2]}, "modality_weights=.*for rule 'sum'"),
    ("sum", {"modality_weights": [1, -2]}, r"modality_weights=\[1, -2\] is invalid"),
    ("sum", {"modality_weights": [1]}, "w_text, w_image"),
    ("sum", {"modality_weights": ["heavy", 1]}, "two positive numbers"),
    ("sum", {"gradnorm_lr": 0.1}, "for rule 'gradnorm'"),
    ("gradnorm", {"gradnorm_alpha": -1}, "gradnorm_alpha=-1 is invalid"),
])
def test_rule_options_are_checked(name, params, match):
    with pytest.raises(ValueError, match=match):
        _one_layer_rule(name, **params)


def test_lora_a_and_b_form_one_layer():
    a = "base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    b = "base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert module_of(a, 0) == module_of(b, 1) == "base_model.model.layers.0.self_attn.q_proj"
    assert module_of("l1.weight", 0) == module_of("l1.bias", 1) == "l1"


def _two_modality_run(name, conflicting, granularity="global"):
    """Three steps; each backs up a text loss and an image loss (the same loss when not conflicting)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    params = {"lr": 0.01} if name == "adamw" else {"base": "adamw", "lr": 0.01, "granularity": granularity}
    opt = build_optimizer({"name": name, "params": params}, model.named_parameters())
    x = torch.randn(8, 4, dtype=F64)
    for _ in range(3):
        for tag in ("text", "image"):
            out = model(x)
            if conflicting:  # opposite targets for one output: the two gradients conflict
                loss = 5 * ((out[:, 0] - 1) ** 2).mean() if tag == "text" else ((out[:, 0] + 1) ** 2).mean()
            else:
                loss = ((out[:, 1] - 1) ** 2).mean()
            if name == "adamw":
                loss.backward()
            else:
                assert isinstance(opt, TakesMicrosteps)
                with opt.modality(tag):
                    loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "pareto_lora"])
@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_wrapper_with_identical_modalities_is_the_base_optimizer(name, granularity):
    for a, b in zip(_two_modality_run(name, False, granularity), _two_modality_run("adamw", False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "pareto_lora"])
def test_wrapper_changes_the_update_when_modalities_differ(name):
    got, ref = _two_modality_run(name, True), _two_modality_run("adamw", True)
    assert not all(torch.allclose(a, b) for a, b in zip(got, ref, strict=True))


RANK_CASES: list[dict[str, Any]] = [
    dict(rule="pareto_lora", base="adamw"), dict(rule="pcgrad", base="soap", max_grad_norm=0.05),
    dict(rule="mgda", base="mlfop_soap"), dict(rule="sum", base="mlfop_soap", max_block=4),
    dict(rule="gradnorm", base="adamw", rule_params=dict(gradnorm_lr=0.2))]


def test_rules_on_two_ranks_equal_one_process(tmp_path):
    """Each rank holds half of every global micro-batch: the rule must see the two modality gradients
    of the whole batch (one all-reduce of [g_text; g_image] per step, plus a 2-number tag check),
    so every base optimizer ends where one process with the whole batch ends (GradNorm: with the
    recorded losses averaged over ranks in the same all-reduce)."""
    configs = [{**c, "K": 4, "W": 2, "steps": 4} for c in RANK_CASES]
    results = run_sharded(2, configs, str(tmp_path))
    for ci, config in enumerate(configs):
        ref = train(config, 0, 1)
        assert ref["counters"]["steps_combined"] == 4
        for r in range(2):
            assert results[r][ci]["calls"]["all_reduce"] == 2 * 4, config
            for step, (got, want) in enumerate(zip(results[r][ci]["history"], ref["history"], strict=True)):
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-8, atol=5e-10,
                                               msg=prefixed(f"{config} rank {r} step {step}"))
