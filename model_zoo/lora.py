"""LoRA adapters on the unified models' shared decoder through Hugging Face peft.

`add_lora` wraps the transformers model (`model.hf`) in a peft `PeftModel` whose targets are the
decoder's linear layers only (a regex on module names: the understanding encoder and the VQ-VAE have
q/k/v projections too), so the adapters are saved in peft's own format (adapter_config.json +
adapter_model.safetensors) for the transformers class itself: `PeftModel.from_pretrained(
Emu3ForConditionalGeneration.from_pretrained(base), adapter)` opens them without distopt. Every other
parameter is frozen: a LoRA run trains the adapters only and leaves the base weights bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from model_zoo.unified import DECODER_LINEARS, UnifiedModel

LLAMA_LINEARS = DECODER_LINEARS  # the names lora.target_modules chooses among


def add_lora(model: UnifiedModel, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] = LLAMA_LINEARS, adapter: Optional[str] = None) -> UnifiedModel:
    """Freeze `model` and wrap its decoder's linear layers with trainable LoRA adapters: new ones
    (B = 0, so the model's outputs do not change) or, with `adapter`, a saved peft adapter directory
    to go on training."""
    bad = sorted(set(target_modules) - set(LLAMA_LINEARS))
    if bad or not target_modules:
        raise ValueError(f"target_modules={list(target_modules)!r}: choose among the decoder's linear layers "
                         f"{list(LLAMA_LINEARS)}")
    model.requires_grad_(False)
    if adapter is not None:
        model.hf = PeftModel.from_pretrained(model.hf, adapter, is_trainable=True)
    else:
        model.hf = get_peft_model(model.hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]  # peft annotates lora_alpha int; it scales by lora_alpha / r
                                                       target_modules=model.decoder_linears(tuple(target_modules))))
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "hf", None), PeftModel)


def save_adapter(model: UnifiedModel, path: str | Path) -> None:
    """The adapters only, in peft's format."""
    model.hf.save_pretrained(str(path))


def merged(model: UnifiedModel) -> UnifiedModel:
    """A copy with the adapters folded into the base weights (W + alpha/r B A): a plain model of the
    same family, for inference and for `save_pretrained`."""
    out = copy.deepcopy(model)
    out.hf = out.hf.merge_and_unload()
    return out
