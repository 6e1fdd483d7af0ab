"""Bad optimizer arguments raise errors that name the argument (and the fix)."""

import pytest
import torch

from distopt import MLFOPSOAP, SOAP, build_optimizer, valid_arguments


def params():
    return [torch.nn.Parameter(torch.zeros(3, 3))]


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(precondition_frequency=0), "precondition_frequency"), (dict(max_precond_dim=-1), "max_precond_dim"),
    (dict(data_format="nhwc"), "data_format"), (dict(shampoo_beta=1.0), "shampoo_beta"),
])
def test_soap_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SOAP(params(), **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(pair_source="batches"), "pair_source"), (dict(level="block"), "level"),
    (dict(fold_schedule="dyadic"), "fold_schedule"), (dict(eta_convention="avg"), "eta_convention"),
    (dict(modality_weighting="fisher_norm"), "modality_weighting"), (dict(capture="auto"), "capture"),
    (dict(fop_tolerance=2.0), "fop_tolerance"), (dict(level="head"), "head_splits"),
    (dict(lr=-1.0), "lr"), (dict(fop_damping=-0.1), "fop_damping"), (dict(second_moment="v"), "second_moment"),
    (dict(coupling="after"), "coupling"), (dict(fop_gamma=-1.0), "fop_gamma"), (dict(comm_dtype="fp16"), "comm_dtype"),
])
def test_mlfop_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MLFOPSOAP(params(), **kwargs)


def test_ranks_pair_source_needs_two_ranks():
    with pytest.raises(ValueError, match="pair_source='ranks'.*at least 2 ranks"):
        MLFOPSOAP(params(), pair_source="ranks")


def test_head_split_that_does_not_divide():
    with pytest.raises(ValueError, match="head_splits.*'w'"):
        MLFOPSOAP([("w", torch.nn.Parameter(torch.zeros(6, 4)))], level="head", head_splits={"w": (4, 0)})


def test_registry_lists_valid_names_and_arguments():
    names = r"\['adamw', 'gradnorm', 'mgda', 'mlfop_soap', 'pareto_lora', 'pcgrad', 'soap', 'sum'\]"
    with pytest.raises(ValueError, match=r"unknown: choose one of " + names):
        build_optimizer({"name": "lion"}, params())
    with pytest.raises(ValueError,
                       match="no argument.*'precondition_freq'.*valid arguments are.*precondition_frequency"):
        build_optimizer({"name": "mlfop_soap", "params": {"precondition_freq": 5}}, params())
    with pytest.raises(ValueError, match="'name'"):
        build_optimizer({"type": "soap"}, params())
    assert "fold_schedule" in valid_arguments("mlfop_soap") and "max_precond_dim" in valid_arguments("mlfop_soap")
    assert "base" in valid_arguments("pcgrad")


def test_registry_builds_each_optimizer_with_the_same_interface():
    for name in ("adamw", "soap", "mlfop_soap", "pcgrad", "mgda", "pareto_lora", "gradnorm"):
        opt = build_optimizer({"name": name, "params": {"lr": 1e-3}}, [("w", torch.nn.Parameter(torch.zeros(2, 2)))])
        assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 1e-3
