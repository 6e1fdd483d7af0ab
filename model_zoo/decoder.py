"""The decoder shape both model families share, and its transformers Llama config."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig


@dataclass(kw_only=True)
class DecoderShape:
    vocab_size: int
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position: int = 64
    rope_theta: float = 1e4
    dropout: float = 0.0

    def llama(self) -> LlamaConfig:
        """No biases, untied input and output embeddings, RMSNorm and SwiGLU (Llama's own)."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                           max_position_embeddings=self.max_position, rope_theta=self.rope_theta,
                           attention_dropout=self.dropout, attention_bias=False, mlp_bias=False,
                           tie_word_embeddings=False)
