"""Emu3-style model: one Llama-style decoder over one vocabulary of text tokens, special tokens and
VQ image codes, trained by next-token prediction on every token with the vision tokens' loss
weighted 0.5 (Emu3, arXiv 2409.18869)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from distopt import attention_head_splits
from model_zoo.decoder import DecoderShape


@dataclass(kw_only=True)
class Emu3Config(DecoderShape):
    rope_theta: float = 1e6
    vision_loss_weight: float = 0.5

    @classmethod
    def emu3_8b(cls) -> "Emu3Config":
        """Published Emu3-8B shapes: 32 layers, hidden 4096, FFN 14336, 32 heads, 8 KV heads, vocab 184,622."""
        return cls(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                   num_kv_heads=8, max_position=131072, rope_theta=1e6, dropout=0.1)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, is_image: torch.Tensor, image_weight: float) -> dict:
    """Next-token CE split by target kind. loss = (sum text CE + w sum image CE) / (n_text + w n_image)."""
    logits, targets, image = logits[:, :-1], labels[:, 1:], is_image[:, 1:]
    valid = targets != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).clamp_min(0),
                         reduction="none").view_as(targets) * valid
    correct = (logits.argmax(-1) == targets) & valid
    text, img = valid & ~image, valid & image
    n_text, n_image = text.sum(), img.sum()
    loss = ((ce * text).sum() + image_weight * (ce * img).sum()) / (n_text + image_weight * n_image).clamp_min(1)
    return dict(loss=loss, text_loss=(ce * text).sum() / n_text.clamp_min(1),
                image_loss=(ce * img).sum() / n_image.clamp_min(1), n_text=n_text, n_image=n_image,
                text_correct=(correct & text).sum(), image_correct=(correct & img).sum())


class Emu3Model(torch.nn.Module):
    def __init__(self, config: Emu3Config, decoder: LlamaForCausalLM | None = None):
        super().__init__()
        self.config = config
        self.decoder = decoder if decoder is not None else LlamaForCausalLM(config.llama())

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "Emu3Model":
        """A local Hugging Face Llama-architecture checkpoint (nothing is downloaded)."""
        decoder = LlamaForCausalLM.from_pretrained(path, local_files_only=True)
        c = decoder.config
        config = Emu3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                            num_kv_heads=c.num_key_value_heads, max_position=c.max_position_embeddings,
                            rope_theta=getattr(c, "rope_theta", 1e6), **overrides)
        return cls(config, decoder)

    def save_pretrained(self, path: str) -> None:
        self.decoder.save_pretrained(path)

    def head_splits(self) -> dict[str, tuple[int, int]]:
        return attention_head_splits(self.config.num_heads, self.config.num_kv_heads)

    def forward(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        logits = self.decoder(input_ids=ids, attention_mask=(batch["labels"] != -100).long()).logits
        return token_losses(logits, batch["labels"], batch["image_mask"], self.config.vision_loss_weight)

    @torch.no_grad()
    def generate_images(self, prompts: list[list[int]], image_offset: int, codebook_size: int,
                        gen: torch.Generator, temperature: float = 1.0, n_codes: int = 16) -> torch.Tensor:
        """Sample `n_codes` image codes after each prompt ([BOS] caption [SOV] meta [SOT]), restricted to
        the image-code range; returns codebook indices LongTensor[len(prompts), n_codes]."""
        seqs = torch.tensor(prompts)
        for _ in range(n_codes):
            logits = self.decoder(input_ids=seqs).logits[:, -1, image_offset:image_offset + codebook_size]
            probs = torch.softmax(logits.float() / temperature, -1)
            seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=gen) + image_offset], 1)
        return seqs[:, -n_codes:] - image_offset
