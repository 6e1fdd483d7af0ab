"""The torch.optim contract: param groups, LR schedulers, zero_grad, state_dict resume, routing."""

import io

import pytest
import torch

from distopt import MLFOPSOAP, SOAP, build_optimizer
from distopt.protocols import counters_of


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6, dtype=dtype)
        self.conv = torch.nn.Conv1d(6, 6, 3, padding=1, dtype=dtype)
        self.proj = torch.nn.Linear(6, 6, dtype=dtype)
        self.lm_head = torch.nn.Linear(6, 11, dtype=dtype)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(torch.tanh(self.proj(h)))


def batches(seed, n, k):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 11, (4, 7), generator=gen) for _ in range(k)] for _ in range(n)]


def train(model, opt, data, sched=None):
    for micro in data:
        for tokens in micro:
            logits = model(tokens[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1)) / len(micro)
            loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name,dtype", [("soap", torch.float32), ("mlfop_soap", torch.float32),
                                        ("mlfop_soap", torch.bfloat16)])
def test_save_load_continue_is_bit_identical(name, dtype):
    spec = {"name": name, "params": {"lr": 0.01, "precondition_frequency": 3, "verbose": False}}
    data = batches(0, 10, 3)

    torch.manual_seed(0)
    model = Tiny(dtype)
    opt = build_optimizer(spec, model.named_parameters())
    train(model, opt, data)

    torch.manual_seed(0)
    model_a = Tiny(dtype)
    opt_a = build_optimizer(spec, model_a.named_parameters())
    train(model_a, opt_a, data[:6])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model_b = Tiny(dtype)
    model_b.load_state_dict(saved["model"])
    opt_b = build_optimizer(spec, model_b.named_parameters())
    opt_b.load_state_dict(saved["opt"])
    train(model_b, opt_b, data[6:])
    for a, b in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
        st = opt_b.state[b]["blocks"][0] if name == "mlfop_soap" else opt_b.state[b]
        assert st["exp_avg"].dtype == torch.float32, "state stays fp32 whatever the parameter dtype"
    if name == "mlfop_soap":
        assert counters_of(opt_b)["fop_folds"] > 0


def test_param_groups_have_their_own_lr_and_schedulers_drive_them():
    torch.manual_seed(0)
    model = Tiny()
    opt = MLFOPSOAP([{"params": list(model.proj.parameters()), "lr": 0.0, "weight_decay": 0.0},
                     {"params": list(model.lm_head.parameters()) + list(model.conv.parameters())},
                     {"params": list(model.embed.parameters()), "lr": 0.02}], lr=0.01, verbose=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    frozen = [p.detach().clone() for p in model.proj.parameters()]
    train(model, opt, batches(1, 5, 2), sched)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.proj.parameters(), strict=True))
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.01 * 0.25, 0.02 * 0.25]
    assert opt.counters["fop_folds"] > 0


def test_scheduler_lr_is_what_the_step_uses():
    """A scheduler halving lr must equal a run that sets the halved lr by hand."""
    runs = []
    for use_scheduler in (True, False):
        torch.manual_seed(0)
        model = Tiny()
        opt = SOAP(model.parameters(), lr=0.01, verbose=False)
        sched = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda _: 0.5) if use_scheduler else None
        for i, micro in enumerate(batches(2, 4, 1)):
            if not use_scheduler:
                opt.param_groups[0]["lr"] = 0.01 * 0.5 ** i
            train(model, opt, [micro], sched)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_zero_grad_and_closure():
    model = Tiny()
    opt = MLFOPSOAP(model.parameters(), verbose=False)
    tokens = batches(3, 1, 1)[0][0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 11), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_routing_by_name_and_summary_printed_once(capsys):
    model = Tiny()
    opt = SOAP(model.named_parameters())
    paths = {r.name: r.path for r in opt.routes.values()}
    assert paths["embed.weight"] == "adam" and paths["lm_head.weight"] == "adam"
    assert paths["proj.weight"] == "soap" and paths["conv.weight"] == "soap"
    summary = opt.routing_summary()
    assert summary["soap"]["count"] == 2  # proj.weight and conv.weight; biases are 1-D (Adam)
    assert summary["adam"]["numel"] == sum(p.numel() for p in model.parameters()) - 36 - 108
    train(model, opt, batches(4, 2, 1))
    err = capsys.readouterr().err
    assert err.count("routing") == 1 and "soap: 2 params" in err
    opted_in = SOAP(model.named_parameters(), soap_patterns=["embed.*"], verbose=False)
    assert {r.name: r.path for r in opted_in.routes.values()}["embed.weight"] == "soap"


def test_unnamed_parameters_follow_reference_soap():
    model = Tiny()
    opt = SOAP(model.parameters(), verbose=False)
    assert opt.routing_summary()["soap"]["count"] == 4  # embed, conv, proj, lm_head matrices
