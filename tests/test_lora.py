"""peft LoRA on both transformers model families: only the decoder's linears get adapters (not the
vision encoder's or the VQ-VAE's q/k/v), only adapters train (under every two-objective rule), the
base weights stay bit-identical, adapters round-trip through peft's format and open on the plain
transformers class, merging equals W + (alpha/r) B A."""

import pytest
import torch
from peft import PeftModel
from torch.testing import assert_close
from transformers import Emu3ForConditionalGeneration, JanusForConditionalGeneration, PreTrainedModel

from distopt import build_optimizer
from distopt.protocols import TakesMicrosteps
from model_zoo.lora import LLAMA_LINEARS, add_lora, has_lora, merged, save_adapter
from test_models import emu3, janus, make_batch

FAMILIES = {"emu3": emu3, "janus": janus}
CLASSES: dict[str, type[PreTrainedModel]] = {"emu3": Emu3ForConditionalGeneration,
                                             "janus": JanusForConditionalGeneration}


def lora_model(family, adapter=None):
    return add_lora(FAMILIES[family](), r=4, alpha=8.0, target_modules=LLAMA_LINEARS, adapter=adapter)


def train(model, family, rule, steps=3):
    """`steps` optimizer steps, each one understanding and one generation micro-batch."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer({"name": rule, "params": {"base": "adamw", "lr": 0.05}}, trainable)
    assert isinstance(opt, TakesMicrosteps)
    for step in range(steps):
        for task in ("understanding", "generation"):
            batch = make_batch(family, task, seed=step)
            with opt.modality(batch["modality"]):
                model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return opt


def decoder_layer(hf, family):
    inner = hf.model.text_model if family == "emu3" else hf.model.language_model
    return inner.layers[0].self_attn.q_proj


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["sum", "pcgrad", "mgda", "pareto_lora"])
def test_rules_train_only_the_adapters_and_leave_base_weights_bit_identical(family, rule):
    model = lora_model(family)
    wrapped = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(wrapped) == len(LLAMA_LINEARS) * 2 and all(("text_model" if family == "emu3" else "language_model")
                                                            in n for n in wrapped), wrapped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = train(model, family, rule)
    trained = {n for g in opt.param_groups for n in g["param_names"]}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * len(LLAMA_LINEARS) * model.text_config.num_hidden_layers
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"base weight {n} changed"
    assert opt.counters["steps_combined"] == 3
    assert set(opt.last_weights) == {n.rsplit(".lora_", 1)[0] for n in trained}  # one weight pair per LoRA layer


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_round_trip_through_peft_format_and_merge(family, tmp_path):
    base = FAMILIES[family]()
    base.save_pretrained(str(tmp_path / "base"))
    model = lora_model(family)
    train(model, family, "pareto_lora")
    model.eval()
    batch = make_batch(family, "generation", seed=9)
    want = model(batch)["loss"]
    save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    loaded = lora_model(family, adapter=str(tmp_path / "adapter")).eval()
    assert_close(loaded(batch)["loss"], want, rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}, "a loaded adapter trains on"
    plain = PeftModel.from_pretrained(CLASSES[family].from_pretrained(str(tmp_path / "base")),
                                      str(tmp_path / "adapter"))
    ids = batch["input_ids"][:, :20].clamp_max(model.image_offset - 1)   # text ids: both classes embed them
    assert_close(plain(input_ids=ids).logits, model.hf(input_ids=ids).logits, rtol=0, atol=0)

    flat = merged(model)
    assert not has_lora(flat) and has_lora(model)
    assert_close(flat(batch)["loss"], want, rtol=1e-5, atol=1e-5)
    layer = decoder_layer(model.hf.base_model.model, family)
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8.0 / 4)
    assert_close(decoder_layer(flat.hf, family).weight, layer.base_layer.weight + delta)


def test_bad_target_modules_name_the_valid_ones():
    with pytest.raises(ValueError, match="q_proj"):
        add_lora(emu3(), target_modules=["qkv"])
