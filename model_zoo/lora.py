"""LoRA adapters on the unified models' decoder through Hugging Face peft.

Both families keep their transformers Llama decoder in `model.decoder`; `add_lora` replaces it by a
peft `PeftModel` around it, so adapters are saved and loaded in peft's own format
(adapter_config.json + adapter_model.safetensors) and merged by peft. Every other parameter of the
model (Janus's image encoder, embeddings and heads) is frozen too: a LoRA run trains the adapters
only and leaves the base weights bit-identical.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model

# The Llama decoder's linear layers, by the names peft matches (attention, then the SwiGLU MLP).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: torch.nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] = LLAMA_LINEARS, adapter: Optional[str] = None) -> torch.nn.Module:
    """Freeze `model` and wrap its decoder with trainable LoRA adapters: new ones (B = 0, so the
    model's outputs do not change) or, with `adapter`, a saved peft adapter directory to go on
    training."""
    bad = sorted(set(target_modules) - set(LLAMA_LINEARS))
    if bad or not target_modules:
        raise ValueError(f"target_modules={list(target_modules)!r}: choose among the decoder's linear layers "
                         f"{list(LLAMA_LINEARS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter is not None:
        model.decoder = PeftModel.from_pretrained(model.decoder, adapter, is_trainable=True)
    else:
        model.decoder = get_peft_model(model.decoder, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                                 target_modules=list(target_modules)))
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "decoder", None), PeftModel)


def save_adapter(model: torch.nn.Module, path: str | Path) -> None:
    """The adapters only, in peft's format."""
    model.decoder.save_pretrained(str(path))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with the adapters folded into the base weights (W + alpha/r B A): a plain model of the
    same family, for inference and for `save_pretrained`."""
    out = copy.deepcopy(model)
    out.decoder = out.decoder.merge_and_unload()
    return out
