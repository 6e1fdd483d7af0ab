"""Models and data for unified multimodal training: Emu3-style and Janus-style decoders, a VQ image
tokenizer and the multimodal data pipeline on real offline images."""

from __future__ import annotations

import dataclasses

import torch

from model_zoo.emu3 import Emu3Config, Emu3Model
from model_zoo.janus import JanusConfig, JanusModel


def build_model(cfg, vocab) -> torch.nn.Module:
    """From the launcher's `model` section: family, size, pretrained (a local path), overrides."""
    if cfg.family == "emu3":
        if cfg.pretrained:
            return Emu3Model.from_pretrained(cfg.pretrained)
        base = Emu3Config.emu3_8b() if cfg.size == "emu3_8b" else Emu3Config(vocab_size=vocab.size)
        return Emu3Model(dataclasses.replace(base, **cfg.overrides))
    if cfg.pretrained:
        return JanusModel.from_pretrained(cfg.pretrained)
    base = JanusConfig.janus_1_3b() if cfg.size == "janus_1_3b" else JanusConfig(
        vocab_size=vocab.image_offset, codebook_size=vocab.codebook_size, pad_id=vocab.pad)
    return JanusModel(dataclasses.replace(base, **cfg.overrides))
