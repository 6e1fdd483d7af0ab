"""The text-vs-image gradient probe against autograd's own per-modality gradients: plain parameters,
activation checkpointing (a recomputed forward must not count twice) and FSDP2's sharded model."""

import functools

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from distopt import comm
from launcher.metrics import ModalityGradProbe


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(6, 5)
        self.second = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [("text", torch.randn(4, 6, generator=gen)), ("image", torch.randn(4, 6, generator=gen)),
            ("text", torch.randn(4, 6, generator=gen))]


def expected(model: torch.nn.Module) -> dict[str, float]:
    """Cosine and norm ratio of the per-modality gradient sums, from torch.autograd.grad."""
    params = dict(model.named_parameters())
    sums = {m: {n: torch.zeros_like(p) for n, p in params.items()} for m in ("text", "image")}
    for tag, x in batches():
        grads = torch.autograd.grad(model(x).square().mean(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            sums[tag][n] += g
    out = {}
    for layer in ("first", "second", None):
        names = [n for n in params if layer is None or n.startswith(layer + ".")]
        t = torch.cat([sums["text"][n].reshape(-1) for n in names]).double()
        i = torch.cat([sums["image"][n].reshape(-1) for n in names]).double()
        suffix = "" if layer is None else f"/{layer}"
        prefix = "grad" if layer is None else "layer_grad"
        out[f"{prefix}/cosine{suffix}"] = float(t @ i / (t.norm() * i.norm()))
        out[f"{prefix}/norm_ratio{suffix}"] = float(t.norm() / i.norm())
        out[f"{prefix}/text_norm{suffix}"], out[f"{prefix}/image_norm{suffix}"] = float(t.norm()), float(i.norm())
    return out


def probed(model: torch.nn.Module) -> dict[str, float]:
    probe = ModalityGradProbe(model)
    for tag, x in batches():
        with probe.modality(tag):
            model(x).square().mean().backward()
    return probe.stats()


def checkpointed(model: Net) -> Net:
    model.first.forward = functools.partial(checkpoint, model.first.forward, use_reentrant=False)  # type: ignore[method-assign]  # the point: this one layer's forward checkpointed
    return model


@pytest.mark.parametrize("variant", ["plain", "checkpointed"])
def test_probe_equals_autograd_per_modality(variant):
    torch.manual_seed(0)
    model = Net() if variant == "plain" else checkpointed(Net())
    want, got = expected(model), probed(model)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_probe_sees_fsdp2_unsharded_gradients(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    reference = expected(Net())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Net()
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model.first, mesh=mesh)
        fully_shard(model, mesh=mesh)
        got = probed(model)
    finally:
        comm.destroy_process_group()
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
