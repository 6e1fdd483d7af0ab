"""What both model families share: the decoder shape, the token ids of the unified vocabulary, and
the transformers Llama config built from them (so parameter names are transformers' own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import LlamaConfig


@dataclass(kw_only=True)
class DecoderShape:
    """Defaults are the tiny CPU shape. The token ids come from the data's vocabulary description
    (plain ints, so the models never import the data pipeline); None where a model does not need one."""

    vocab_size: int
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position: int = 64
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-6
    dropout: float = 0.0
    pad_id: Optional[int] = None
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    image_offset: Optional[int] = None     # image code c has unified id image_offset + c
    codebook_size: Optional[int] = None

    def llama(self, vocab_size: Optional[int] = None, **extra: Any) -> LlamaConfig:
        """No biases, untied input and output embeddings, RMSNorm and SwiGLU (Llama's own). `extra`
        lands in config.json, so a saved checkpoint carries what the wrapper needs to rebuild itself."""
        return LlamaConfig(vocab_size=vocab_size or self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                           max_position_embeddings=self.max_position, rope_theta=self.rope_theta,
                           rms_norm_eps=self.rms_norm_eps, attention_dropout=self.dropout, attention_bias=False,
                           mlp_bias=False, tie_word_embeddings=False, pad_token_id=self.pad_id,
                           bos_token_id=self.bos_id, eos_token_id=self.eos_id, **extra)


def sample(logits: torch.Tensor, temperature: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    """[n, C] logits -> [n, 1] class indices; temperature 0 is greedy (used to check that sampling
    and training see the same sequence layout)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)
