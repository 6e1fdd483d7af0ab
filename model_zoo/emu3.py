"""Emu3-style model (Wang et al. 2024, arXiv 2409.18869): one Llama-style decoder over one vocabulary
of text tokens, special tokens and VQ image codes, trained by next-token prediction on every token
with the vision tokens' loss weighted 0.5.

Documents: generation `[BOS] caption [SOV] meta [SOT] image [EOV] [EOS]`, understanding
`[BOS] [SOV] meta [SOT] image [EOV] caption [EOS]` (Emu3 moves the caption after the image)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from model_zoo.decoder import DecoderShape, sample

# Emu3's tokenizer: 151,643 Qwen BPE tokens, 211 specials, then 32,768 VQ codes (184,622 in all).
EMU3_IDS = dict(pad_id=151643, bos_id=151849, eos_id=151850, image_offset=151854, codebook_size=32768)


@dataclass(kw_only=True)
class Emu3Config(DecoderShape):
    """vocab_size is the whole unified vocabulary; image_offset and codebook_size locate the image codes
    (only generate_images needs them: the loss takes the image positions from the batch)."""

    rope_theta: float = 1e6
    vision_loss_weight: float = 0.5

    @classmethod
    def tiny(cls, vocab_size: int, **fields: Any) -> "Emu3Config":
        """The CPU shape: hidden 64, 2 layers, 4 heads, 2 KV heads. `fields`: the token ids, or shape overrides."""
        return cls(vocab_size=vocab_size, **{**dict(hidden_size=64, intermediate_size=176, num_layers=2,
                                                    num_heads=4, num_kv_heads=2, max_position=64), **fields})

    @classmethod
    def emu3_8b(cls, **fields: Any) -> "Emu3Config":
        """Published Emu3-8B: 32 layers, hidden 4096, FFN 14336, 32 heads, 8 KV heads, RoPE base 1e6,
        RMSNorm eps 1e-5, dropout 0.1, vocab 184,622 with Emu3's own token ids; context 131,072 (pretraining
        stage 2). `fields` override, e.g. the token ids of another vocabulary."""
        return cls(**{**dict(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, max_position=131072, rope_theta=1e6, rms_norm_eps=1e-5,
                             dropout=0.1, **EMU3_IDS), **fields})


def token_losses(logits: torch.Tensor, labels: torch.Tensor, image_mask: torch.Tensor,
                 vision_weight: float) -> dict[str, torch.Tensor]:
    """Next-token CE; position t predicts labels[t + 1], an image-code target when image_mask[t + 1].

    loss = (sum_text CE + w * sum_image CE) / (n_text + w * n_image), w = vision_weight, over the
    non-pad targets of this micro-batch (labels != -100): a weighted per-token mean, so w is a relative
    weight and the loss stays on the scale of one token's CE. Text targets include the special and meta
    tokens. text_loss and image_loss are the plain per-token means of each kind (0 when there is none),
    differentiable, for logging and for per-modality backward passes."""
    logits, targets, image = logits[:, :-1], labels[:, 1:], image_mask[:, 1:]
    valid = targets != -100
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0),
                         reduction="none").view_as(targets)
    text, img = valid & ~image, valid & image
    n_text, n_image = text.sum(), img.sum()
    text_sum, image_sum = ce.masked_fill(~text, 0).sum(), ce.masked_fill(~img, 0).sum()
    correct = logits.argmax(-1) == targets
    return dict(loss=(text_sum + vision_weight * image_sum) / (n_text + vision_weight * n_image).clamp_min(1e-8),
                text_loss=text_sum / n_text.clamp_min(1), image_loss=image_sum / n_image.clamp_min(1),
                n_text=n_text, n_image=n_image, text_correct=(correct & text).sum(),
                image_correct=(correct & img).sum())


class Emu3Model(torch.nn.Module):
    """`decoder` is a transformers LlamaForCausalLM, so parameters are named
    decoder.model.layers.N.self_attn.q_proj.weight, decoder.model.embed_tokens.weight, decoder.lm_head.weight."""

    def __init__(self, config: Emu3Config, decoder: Optional[LlamaForCausalLM] = None):
        super().__init__()
        self.config = config
        self.decoder = decoder if decoder is not None else LlamaForCausalLM(self._llama_config())

    def _llama_config(self):
        c = self.config
        return c.llama(image_offset=c.image_offset, codebook_size=c.codebook_size,
                       vision_loss_weight=c.vision_loss_weight)

    @classmethod
    def from_pretrained(cls, path: str, **fields: Any) -> "Emu3Model":
        """A local Hugging Face Llama-architecture checkpoint directory; nothing is downloaded. Fields the
        checkpoint's config.json lacks (image_offset, codebook_size for a foreign checkpoint) come from `fields`."""
        decoder = LlamaForCausalLM.from_pretrained(path, local_files_only=True)
        c = decoder.config
        saved = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                     num_kv_heads=c.num_key_value_heads, max_position=c.max_position_embeddings,
                     rope_theta=c.rope_parameters["rope_theta"], rms_norm_eps=c.rms_norm_eps,
                     dropout=c.attention_dropout, pad_id=c.pad_token_id, bos_id=c.bos_token_id,
                     eos_id=c.eos_token_id)
        for name in ("image_offset", "codebook_size", "vision_loss_weight"):
            if getattr(c, name, None) is not None:
                saved[name] = getattr(c, name)
        return cls(Emu3Config(**{**saved, **fields}), decoder)

    def save_pretrained(self, path: str) -> None:
        """The decoder's own Hugging Face format (config.json + safetensors), loadable without this class."""
        self.decoder.config.update(dict(image_offset=self.config.image_offset,
                                        codebook_size=self.config.codebook_size,
                                        vision_loss_weight=self.config.vision_loss_weight))
        self.decoder.save_pretrained(path)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Right-padded sequences need no attention mask under causal attention (real tokens never see the
        pads behind them); the mask is passed anyway when the pad id is known, for left-padded callers."""
        pad = self.config.pad_id
        mask = None if pad is None else (input_ids != pad).long()
        return self.decoder(input_ids=input_ids, attention_mask=mask).logits

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """dict(loss, text_loss, image_loss, n_text, n_image, text_correct, image_correct); see token_losses."""
        return token_losses(self.logits(batch["input_ids"]), batch["labels"], batch["image_mask"],
                            self.config.vision_loss_weight)

    @torch.no_grad()
    def generate_images(self, prompt_ids: Union[torch.Tensor, Sequence[int]], n: int = 1, temperature: float = 1.0,
                        gen: Optional[torch.Generator] = None, n_codes: int = 16) -> torch.Tensor:
        """n images for one prompt `[BOS] caption [SOV] meta [SOT]` (1-D, no pads): each of the n_codes steps
        samples only among the image codes. Returns codebook indices LongTensor[n, n_codes]."""
        c = self.config
        if c.image_offset is None or c.codebook_size is None:
            raise ValueError("generate_images needs Emu3Config.image_offset and codebook_size")
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.decoder.lm_head.weight.device)
        if ids.dim() != 1 or len(ids) == 0:
            raise ValueError(f"prompt_ids must be one non-empty 1-D prompt, got shape {tuple(ids.shape)}")
        out = self.decoder(input_ids=ids.expand(n, -1), use_cache=True)
        codes = []
        for step in range(n_codes):
            logits = out.logits[:, -1, c.image_offset:c.image_offset + c.codebook_size]
            codes.append(sample(logits, temperature, gen))
            if step + 1 < n_codes:
                out = self.decoder(input_ids=codes[-1] + c.image_offset, past_key_values=out.past_key_values,
                                   use_cache=True)
        return torch.cat(codes, 1)
