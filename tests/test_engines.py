"""The launcher's engines: activation checkpointing keeps one backward = one micro-step."""

import torch
from torch.utils.checkpoint import checkpoint

from distopt import MLFOPSOAP
from launcher.engines import checkpoint_layers, decoder_layers


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def train(model, steps=4, k=3):
    opt = MLFOPSOAP(model.named_parameters(), lr=0.01, precondition_frequency=2, verbose=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(k):
            ids = torch.randint(0, 64, (2, 16), generator=gen)
            (model(input_ids=ids, labels=ids).loss / k).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_non_reentrant_checkpointing_keeps_one_backward_per_micro_step():
    plain, wrapped = llama(), llama()
    assert checkpoint_layers(wrapped) == len(decoder_layers(wrapped)) == 2
    opt_plain, opt_wrapped = train(plain), train(wrapped)
    assert opt_wrapped.counters["microsteps"] == opt_plain.counters["microsteps"] == 4 * 3
    assert opt_wrapped.counters["fop_folds"] == opt_plain.counters["fop_folds"] > 0
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_reentrant_checkpointing_would_split_a_backward():
    """Why the option is non-reentrant: a reentrant checkpoint runs a nested backward per checkpointed
    region, and the end-of-backward callback fires in each (the hazard the engines avoid)."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    counts = {}
    for reentrant in (False, True):
        opt = MLFOPSOAP(layers.named_parameters(), verbose=False)
        h = torch.randn(8, 4, requires_grad=True)
        for layer in layers:
            h = checkpoint(lambda x, layer=layer: torch.tanh(layer(x)), h, use_reentrant=reentrant)
        h.square().mean().backward()
        counts[reentrant] = opt.counters["microsteps"]
        opt.close()
        layers.zero_grad()
    assert counts[False] == 1 and counts[True] > 1, counts
