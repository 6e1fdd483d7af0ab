"""Janus-style model (arXiv 2410.13848): a shared decoder with decoupled visual pathways.

Understanding: an understanding encoder turns pixels into visual tokens, a 2-layer MLP adaptor maps
them into the decoder, and the text head predicts the caption (loss on caption text only).
Generation: caption tokens, then image codes embedded by a codebook and a 2-layer MLP generation
adaptor; a separate image head predicts the codes (loss on image codes only). At CPU scale the
understanding encoder is a patch MLP over the 8x8 image (SigLIP-L/16 in Janus).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaModel

from distopt import attention_head_splits
from model_zoo.decoder import DecoderShape


@dataclass(kw_only=True)
class JanusConfig(DecoderShape):
    """vocab_size: the text and special tokens the text head predicts."""

    codebook_size: int
    pad_id: int
    encoder_dim: int = 32           # understanding encoder width
    gen_embed_dim: int = 16         # codebook embedding width before the generation adaptor
    patch: int = 4                  # understanding encoder patch side: (8 / patch)^2 visual tokens

    @classmethod
    def janus_1_3b(cls) -> "JanusConfig":
        """Published Janus-1.3B shapes: DeepSeek-LLM 1.3B (24 layers, hidden 2048, 16 heads, vocab 102,400),
        image head over 16,384 VQ codes, SigLIP-L width 1024 into the understanding adaptor."""
        return cls(vocab_size=102400, codebook_size=16384, pad_id=100001, hidden_size=2048, intermediate_size=5632,
                   num_layers=24, num_heads=16, num_kv_heads=16, max_position=4096, encoder_dim=1024,
                   gen_embed_dim=8, patch=4)


def mlp(d_in: int, d_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out))


class JanusModel(torch.nn.Module):
    def __init__(self, config: JanusConfig):
        super().__init__()
        c = self.config = config
        self.decoder = LlamaModel(c.llama())
        self.und_encoder = torch.nn.Sequential(torch.nn.Linear(c.patch * c.patch, c.encoder_dim), torch.nn.GELU(),
                                               torch.nn.Linear(c.encoder_dim, c.encoder_dim))
        self.und_adaptor = mlp(c.encoder_dim, c.hidden_size)
        self.gen_embed = torch.nn.Embedding(c.codebook_size, c.gen_embed_dim)
        self.gen_adaptor = mlp(c.gen_embed_dim, c.hidden_size)
        self.lm_head = torch.nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.image_head = torch.nn.Linear(c.hidden_size, c.codebook_size, bias=False)

    def head_splits(self) -> dict[str, tuple[int, int]]:
        return attention_head_splits(self.config.num_heads, self.config.num_kv_heads)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] -> [B, (8 / patch)^2, hidden]."""
        p = self.config.patch
        b = pixels.shape[0]
        patches = pixels.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        return self.und_adaptor(self.und_encoder(patches))

    def _left_aligned(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions padded on the left, so that the last caption token sits right before what follows."""
        order = torch.argsort(mask.long(), dim=1, stable=True)
        return ids.gather(1, order), mask.gather(1, order)

    def forward(self, batch: dict) -> dict:
        embed = self.decoder.get_input_embeddings()
        if batch["modality"] == "understanding":
            vis = self.visual_tokens(batch["pixel_values"])
            cap, mask = batch["caption_ids"], batch["caption_mask"]
            x = torch.cat([vis, embed(cap)], 1)
            attn = torch.cat([torch.ones(vis.shape[:2], dtype=torch.long), mask.long()], 1)
            h = self.decoder(inputs_embeds=x, attention_mask=attn).last_hidden_state
            logits = self.lm_head(h[:, vis.shape[1] - 1:-1])   # position t predicts caption token t
            return _losses(logits, cap, mask, "text")
        cap, mask = self._left_aligned(batch["caption_ids"], batch["caption_mask"])
        codes = batch["image_codes"]
        x = torch.cat([embed(cap), self.gen_adaptor(self.gen_embed(codes))], 1)
        attn = torch.cat([mask.long(), torch.ones(codes.shape, dtype=torch.long)], 1)
        h = self.decoder(inputs_embeds=x, attention_mask=attn).last_hidden_state
        logits = self.image_head(h[:, cap.shape[1] - 1:-1])    # last caption token predicts code 0, ...
        return _losses(logits, codes, torch.ones_like(codes, dtype=torch.bool), "image")

    @torch.no_grad()
    def generate_images(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor, gen: torch.Generator,
                        temperature: float = 1.0, n_codes: int = 16) -> torch.Tensor:
        cap, mask = self._left_aligned(caption_ids, caption_mask)
        x, attn = self.decoder.get_input_embeddings()(cap), mask.long()
        codes = torch.zeros(len(cap), 0, dtype=torch.long)
        for _ in range(n_codes):
            h = self.decoder(inputs_embeds=x, attention_mask=attn).last_hidden_state[:, -1]
            probs = torch.softmax(self.image_head(h).float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            codes = torch.cat([codes, nxt], 1)
            x = torch.cat([x, self.gen_adaptor(self.gen_embed(nxt))], 1)
            attn = torch.cat([attn, torch.ones_like(nxt)], 1)
        return codes

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "janus_config.json").write_text(json.dumps(asdict(self.config), indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(path) / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str) -> "JanusModel":
        config = JanusConfig(**json.loads((Path(path) / "janus_config.json").read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model


def _losses(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, kind: str) -> dict:
    """A modality-pure micro-batch trains one kind of token; the other is reported as zero."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets) * valid
    n = valid.sum()
    loss = ce.sum() / n.clamp_min(1)
    correct = ((logits.argmax(-1) == targets) & valid).sum()
    zero = torch.zeros((), dtype=torch.long)
    other = "image" if kind == "text" else "text"
    return {"loss": loss, f"{kind}_loss": loss, f"{other}_loss": loss.detach() * 0, f"n_{kind}": n, f"n_{other}": zero,
            f"{kind}_correct": correct, f"{other}_correct": zero}
