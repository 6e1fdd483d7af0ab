"""Models and data for unified multimodal training: Emu3-style and Janus-style decoders, a VQ image
tokenizer and the multimodal data pipeline on real offline images."""

from __future__ import annotations

import dataclasses

import torch

from model_zoo.emu3 import Emu3Config, Emu3Model
from model_zoo.janus import JanusConfig, JanusModel


def build_model(cfg, vocab) -> torch.nn.Module:
    """From the launcher's `model` section: family, size, pretrained (a local path), overrides."""
    ids = dict(pad_id=vocab.pad, bos_id=vocab.bos, eos_id=vocab.eos)
    image = dict(image_offset=vocab.image_offset, codebook_size=vocab.codebook_size)
    if cfg.family == "emu3":
        if cfg.pretrained:
            return Emu3Model.from_pretrained(cfg.pretrained)
        base = Emu3Config.emu3_8b(**ids, **image) if cfg.size == "emu3_8b" else \
            Emu3Config.tiny(vocab.size, **ids, **image)
        return Emu3Model(dataclasses.replace(base, **cfg.overrides))
    if cfg.pretrained:
        return JanusModel.from_pretrained(cfg.pretrained)
    # the published preset keeps its 102,400-id text head and 16,384-code image head
    base = JanusConfig.janus_1_3b(**ids) if cfg.size == "janus_1_3b" else JanusConfig.tiny(vocab.size, **ids, **image)
    return JanusModel(dataclasses.replace(base, **cfg.overrides))
