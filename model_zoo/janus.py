"""Janus-style model (Wu et al. 2024, arXiv 2410.13848): a shared decoder with decoupled visual pathways.

Understanding: an understanding encoder turns pixels into visual tokens, a 2-layer MLP adaptor maps them
into the decoder, and the decoder's text head predicts the caption (loss on the caption text only).
Generation: the caption, then the image codes embedded by a codebook and a 2-layer MLP generation adaptor;
a separate image head predicts the codes (loss on the image codes only). Both sequences start with [BOS]
when the config has a bos_id. At CPU scale the understanding encoder is a patch MLP over the 8x8 image
(SigLIP-L/16 at 384 px in Janus); the VQ tokenizer is model_zoo/vq.py (LlamaGen's, 16,384 codes, in Janus).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaModel

from model_zoo.decoder import DecoderShape, sample


@dataclass(kw_only=True)
class JanusConfig(DecoderShape):
    """The decoder embeds, and the text head predicts, the text vocabulary: the ids below image_offset when
    the config has one (text + special tokens of the unified vocabulary; image codes never enter as ids),
    else vocab_size. codebook_size is the image head's width."""

    codebook_size: int
    encoder_dim: int = 32           # understanding encoder width (SigLIP-L: 1024)
    gen_embed_dim: int = 16         # codebook embedding width before the generation adaptor (LlamaGen VQ: 8)
    image_size: int = 8             # pixels per side of the (single-channel) understanding input
    patch: int = 4                  # understanding encoder patch side: (image_size / patch)^2 visual tokens

    @property
    def text_vocab_size(self) -> int:
        return self.image_offset if self.image_offset is not None else self.vocab_size

    @classmethod
    def tiny(cls, vocab_size: int, **fields: Any) -> "JanusConfig":
        """The CPU shape: hidden 64, 2 layers, 4 heads, 2 KV heads, 4 visual tokens. `fields` must hold
        codebook_size; the token ids and shape overrides are optional."""
        return cls(vocab_size=vocab_size, **{**dict(hidden_size=64, intermediate_size=176, num_layers=2,
                                                    num_heads=4, num_kv_heads=2, max_position=64), **fields})

    @classmethod
    def janus_1_3b(cls, **fields: Any) -> "JanusConfig":
        """Published Janus-1.3B: DeepSeek-LLM 1.3B (24 layers, hidden 2048, FFN 5632, 16 heads with full
        multi-head KV, vocab 102,400, BOS 100000, EOS 100001; its base vocabulary has no pad token), context
        4096, an image head over 16,384 VQ codes, a codebook embedding of width 8, SigLIP-L's width 1024
        into the understanding adaptor (the encoder itself stays the patch-MLP stand-in)."""
        return cls(**{**dict(vocab_size=102400, codebook_size=16384, bos_id=100000, eos_id=100001,
                             hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=16,
                             max_position=4096, rope_theta=1e4, encoder_dim=1024, gen_embed_dim=8), **fields})


def mlp(d_in: int, d_out: int) -> torch.nn.Sequential:
    """Janus' adaptor shape: Linear, GELU, Linear."""
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out))


class JanusModel(torch.nn.Module):
    """Parameter names: decoder.layers.N.self_attn.q_proj.weight (transformers LlamaModel), decoder.embed_tokens,
    und_encoder, und_adaptor, gen_embed, gen_adaptor, lm_head (text), image_head."""

    def __init__(self, config: JanusConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch:
            raise ValueError(f"patch={c.patch} must divide image_size={c.image_size}")
        self.decoder = LlamaModel(c.llama(vocab_size=c.text_vocab_size))
        self.und_encoder = mlp(c.patch * c.patch, c.encoder_dim)
        self.und_adaptor = mlp(c.encoder_dim, c.hidden_size)
        self.gen_embed = torch.nn.Embedding(c.codebook_size, c.gen_embed_dim)
        self.gen_adaptor = mlp(c.gen_embed_dim, c.hidden_size)
        self.lm_head = torch.nn.Linear(c.hidden_size, c.text_vocab_size, bias=False)
        self.image_head = torch.nn.Linear(c.hidden_size, c.codebook_size, bias=False)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] -> [B, (S / patch)^2, hidden]: row-major patches, encoder, understanding adaptor."""
        p, g = self.config.patch, self.config.image_size // self.config.patch
        patches = pixels.reshape(len(pixels), g, p, g, p).permute(0, 1, 3, 2, 4).reshape(len(pixels), g * g, p * p)
        return self.und_adaptor(self.und_encoder(patches))

    def image_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        return self.gen_adaptor(self.gen_embed(codes))

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[BOS] + the real caption tokens moved to the front (right padding, whatever padding came in), so
        that every row starts at position 0, as it does when sampling."""
        order = torch.argsort((~mask).long(), dim=1, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        if self.config.bos_id is not None:
            ids = torch.cat([torch.full_like(ids[:, :1], self.config.bos_id), ids], 1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        return ids, mask

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """A modality-pure micro-batch: its loss is that modality's per-token mean CE; the other modality is
        reported as loss 0 (differentiable) with n = 0. Janus' input_ids/labels/image_mask are not used."""
        if batch["modality"] == "understanding":
            return self._understanding(batch["pixel_values"], batch["caption_ids"], batch["caption_mask"])
        if batch["modality"] == "generation":
            return self._generation(batch["caption_ids"], batch["caption_mask"], batch["image_codes"])
        raise ValueError(f"modality={batch['modality']!r} is invalid: 'understanding' or 'generation'")

    def _understanding(self, pixels: torch.Tensor, caption: torch.Tensor, mask: torch.Tensor) -> dict:
        """[BOS] visual tokens, caption: the token before caption token t predicts it (text head)."""
        embed = self.decoder.get_input_embeddings()
        cap, cap_mask = self._text(caption, mask)
        skip = int(self.config.bos_id is not None)            # the [BOS] goes in front of the visual tokens
        vis = self.visual_tokens(pixels)
        x = torch.cat([embed(cap[:, :skip]), vis, embed(cap[:, skip:])], 1)
        attn = torch.cat([cap_mask[:, :skip], torch.ones(vis.shape[:2], dtype=torch.bool, device=vis.device),
                          cap_mask[:, skip:]], 1)
        h = self.decoder(inputs_embeds=x, attention_mask=attn.long()).last_hidden_state
        start = skip + vis.shape[1]
        logits = self.lm_head(h[:, start - 1:-1])
        return _losses(logits, cap[:, skip:], cap_mask[:, skip:], "text")

    def _generation(self, caption: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> dict:
        """[BOS] caption, then the codes right behind each row's caption (scattered, so no left padding):
        the token before code k predicts it (image head)."""
        cap, cap_mask = self._text(caption, mask)
        n = cap_mask.sum(1, keepdim=True)                      # real prefix tokens per row
        if self.config.bos_id is None and bool((n == 0).any()):
            raise ValueError("an empty caption needs a bos_id in the config to condition the first image code")
        k, hidden = codes.shape[1], self.config.hidden_size
        text = self.decoder.get_input_embeddings()(cap)
        x = torch.cat([text, text.new_zeros(len(cap), k, hidden)], 1)
        where = n + torch.arange(k, device=codes.device)       # [B, k] sequence position of code k
        x = x.scatter(1, where[..., None].expand(-1, -1, hidden), self.image_embeddings(codes).to(x.dtype))
        attn = torch.arange(x.shape[1], device=x.device)[None] < n + k
        h = self.decoder(inputs_embeds=x, attention_mask=attn.long()).last_hidden_state
        logits = self.image_head(h.gather(1, (where - 1)[..., None].expand(-1, -1, hidden)))
        return _losses(logits, codes, torch.ones_like(codes, dtype=torch.bool), "image")

    @torch.no_grad()
    def generate_images(self, caption_ids: torch.Tensor, n: int = 1, temperature: float = 1.0,
                        gen: Optional[torch.Generator] = None, n_codes: int = 16) -> torch.Tensor:
        """n images for one caption (1-D text ids; pad ids are dropped): [BOS] caption, then n_codes steps
        of image-head sampling, each sampled code fed back through the generation adaptor (KV cache).
        Returns codebook indices LongTensor[n, n_codes]."""
        ids = torch.as_tensor(caption_ids, dtype=torch.long, device=self.image_head.weight.device)
        if ids.dim() != 1:
            raise ValueError(f"caption_ids must be one 1-D caption, got shape {tuple(ids.shape)}")
        if self.config.pad_id is not None:
            ids = ids[ids != self.config.pad_id]
        cap, _ = self._text(ids[None], torch.ones_like(ids[None], dtype=torch.bool))
        if cap.shape[1] == 0:
            raise ValueError("an empty caption needs a bos_id in the config")
        out = self.decoder(inputs_embeds=self.decoder.get_input_embeddings()(cap.expand(n, -1)), use_cache=True)
        codes = []
        for step in range(n_codes):
            codes.append(sample(self.image_head(out.last_hidden_state[:, -1]), temperature, gen))
            if step + 1 < n_codes:
                out = self.decoder(inputs_embeds=self.image_embeddings(codes[-1]), past_key_values=out.past_key_values,
                                   use_cache=True)
        return torch.cat(codes, 1)

    def save_pretrained(self, path: str) -> None:
        """Own format: janus_config.json (the JanusConfig fields) + model.safetensors (the state dict)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "janus_config.json").write_text(json.dumps(asdict(self.config), indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(path) / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str) -> "JanusModel":
        """A directory written by save_pretrained (strict: every tensor must match)."""
        config = JanusConfig(**json.loads((Path(path) / "janus_config.json").read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model


def _losses(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-token mean CE over the valid targets of one kind; the other kind reads 0 with n = 0."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    n = valid.sum()
    loss = ce.masked_fill(~valid, 0).sum() / n.clamp_min(1)
    correct = ((logits.argmax(-1) == targets) & valid).sum()
    zero = torch.zeros((), dtype=torch.long, device=n.device)
    other = "image" if kind == "text" else "text"
    return {"loss": loss, f"{kind}_loss": loss, f"{other}_loss": loss * 0, f"n_{kind}": n, f"n_{other}": zero,
            f"{kind}_correct": correct, f"{other}_correct": zero}
