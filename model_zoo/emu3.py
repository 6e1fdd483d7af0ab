"""Emu3 (Wang et al. 2024, arXiv 2409.18869) on transformers' `Emu3ForConditionalGeneration`: one
decoder over one vocabulary of text tokens, special tokens and VQ image codes, trained by next-token
prediction on every target with the vision tokens' loss weighted 0.5 (`vision_loss_weight`).

Documents (`Emu3Layout`): generation `[BOS] caption [SOV] meta [SOT] image [EOV] [EOS]`, understanding
`[BOS] [SOV] meta [SOT] image [EOV] caption [EOS]` (Emu3 moves the caption after the image); meta is
the code grid as text, "h*w", as Emu3's processor writes it. With an Emu3 checkpoint's tokenizer
every image row ends with its end-of-line token and the image with its end-of-frame token, as in
transformers' Emu3Processor.

Parameter names are transformers' own under `hf.`: hf.model.text_model.layers.N.self_attn.q_proj.weight,
hf.model.text_model.embed_tokens.weight, hf.lm_head.weight; the VQ-VAE (hf.model.vqmodel) is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig

from model_zoo.unified import (
    UnifiedModel,
    check_overrides,
    guided,
    load_checkpoint,
    override_keys,
    sample,
    token_losses,
)
from model_zoo.vocab import Vocab

SIZES = ("tiny", "emu3_8b")
VISION_LOSS_WEIGHT = 0.5  # Emu3's weight of the vision tokens in the next-token loss


def visual_token(code: int) -> str:
    """The name Emu3's vocabulary_map gives image code `code`."""
    return f"<|visual token{code:06d}|>"


def config(size: str, vocab: Optional[Vocab] = None, overrides: Optional[dict] = None) -> Emu3Config:
    """`tiny`: the CPU shape (hidden 64, 2 layers, 4 heads, 2 KV heads, a 2-stage VQ-VAE with 32
    channels, single-channel 8x8 images). `emu3_8b`: the published Emu3 (32 layers, hidden 4096, FFN
    14336, 32 heads, 8 KV heads, RoPE base 1e6, its VQ-VAE with 32,768 codes): transformers' defaults,
    which are Emu3-Chat-hf's. The token ids and the visual tokens come from `vocab` (None: the
    published 184,622-id vocabulary, for planning on the meta device); `overrides` set text-config fields."""
    overrides = dict(overrides or {})
    check_overrides(overrides, override_keys(Emu3TextConfig, ("vision_loss_weight",)), None)
    weight = overrides.pop("vision_loss_weight", VISION_LOSS_WEIGHT)
    if size == "tiny":
        text = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
        vq = dict(codebook_size=vocab.codebook_size if vocab else 64, embed_dim=4, latent_channels=4, in_channels=1,
                  out_channels=1, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                  hidden_size=64, temporal_downsample_factor=2)
    elif size == "emu3_8b":
        text, vq = {}, {}
    else:
        raise ValueError(f"model.size: {size!r} is not an emu3 size; choose one of {SIZES}")
    if vocab is not None:
        text.update(vocab_size=vocab.size, pad_token_id=vocab.pad, bos_token_id=vocab.bos, eos_token_id=vocab.eos)
        visual = {visual_token(c): vocab.image_offset + c for c in range(vocab.codebook_size)}
    else:
        visual = {visual_token(c): 151854 + c for c in range(32768)}
    cfg = Emu3Config(text_config={**text, **overrides}, vq_config=vq, vocabulary_map=visual)
    cfg.vision_loss_weight = weight
    return cfg


@dataclass(frozen=True)
class Emu3Layout:
    """Where each token of an Emu3 document goes, for one vocabulary and code grid (h, w)."""

    vocab: Vocab
    grid: tuple[int, int]
    pixels: tuple[str, ...] = ()  # tasks whose samples carry pixels: none, Emu3 reads images as codes

    def document(self, task: str, caption: Sequence[int], codes: Sequence[int],
                 response_only: bool) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of one sample. Loss on every token after [BOS], or with `response_only` on
        the response alone: the image (codes, row ends, [EOV]) of a generation sample; the caption and
        [EOS] of an understanding sample."""
        v = self.vocab
        image = self.image_ids(codes)
        if task == "generation":
            prompt, response, tail = self.generation_prompt(caption), [*image, v.eov], [v.eos]
        elif task == "understanding":
            prompt, response, tail = [v.bos, *self.image_head(), *image, v.eov], [*caption, v.eos], []
        else:
            raise ValueError(f"task={task!r} is invalid: 'understanding' or 'generation'")
        ids = prompt + response + tail
        if response_only:
            return ids, [0] * len(prompt) + [1] * len(response) + [0] * len(tail)
        return ids, [0] + [1] * (len(ids) - 1)

    def generation_prompt(self, caption: Sequence[int]) -> list[int]:
        """`[BOS] caption [SOV] meta [SOT]`: a generation document up to its first image code."""
        return [self.vocab.bos, *caption, *self.image_head()]

    def image_head(self) -> list[int]:
        """`[SOV] meta [SOT]`: what opens an image, meta being the code grid as text."""
        assert self.vocab.sot is not None  # an Emu3 vocabulary has its image-token marker (Vocab.sot)
        return [self.vocab.sov, *self.vocab.text(f"{self.grid[0]}*{self.grid[1]}"), self.vocab.sot]

    def image_ids(self, codes: Sequence[int]) -> list[int]:
        """The image's codes as unified ids, row by row; with the vocabulary's eol, each row closed by
        it and the image by eof."""
        v, (h, w) = self.vocab, self.grid
        ids = [v.image_offset + int(c) for c in codes]
        if v.eol is None:
            return ids
        rows = [ids[r * w:(r + 1) * w] + [v.eol] for r in range(h)]
        return [i for row in rows for i in row] + ([v.eof] if v.eof is not None else [])


class Emu3(UnifiedModel):
    decoder_path = "model.text_model"

    def __init__(self, hf: Emu3ForConditionalGeneration):
        super().__init__(hf)
        assert hf.config.vocabulary_map is not None  # Emu3 models are built from a config with their vocabulary
        visual = sorted(v for k, v in hf.config.vocabulary_map.items() if k.startswith("<|visual token"))
        self.image_offset, self.codebook_size = visual[0], len(visual)
        self.vision_loss_weight = float(getattr(hf.config, "vision_loss_weight", VISION_LOSS_WEIGHT))

    @classmethod
    def build(cls, size: str, vocab: Vocab, overrides: Optional[dict] = None) -> Emu3:
        return cls(Emu3ForConditionalGeneration(config(size, vocab, overrides)))

    @classmethod
    def from_pretrained(cls, path: str, overrides: Optional[dict] = None,
                        dtype: torch.dtype = torch.float32) -> Emu3:
        """A local checkpoint directory in transformers' Emu3 layout; nothing is downloaded."""
        overrides = dict(overrides or {})
        check_overrides(overrides, override_keys(Emu3TextConfig, ("vision_loss_weight",)), path)
        return cls(load_checkpoint(Emu3ForConditionalGeneration, path, "emu3", overrides, dtype))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """dict(loss, text_loss, image_loss, n_text, n_image, text_correct, image_correct) over the
        batch's labels (-100: no loss), position_ids restarting at each packed document."""
        h = self.base().model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).last_hidden_state[:, :-1]
        targets = batch["labels"][:, 1:]
        image = (targets >= self.image_offset) & (targets < self.image_offset + self.codebook_size)
        return token_losses(self.hf.lm_head, h, targets, image, self.vision_loss_weight)

    @torch.no_grad()
    def generate_images(self, layout: Emu3Layout, caption: Sequence[int], n: int = 1, temperature: float = 1.0,
                        gen: Optional[torch.Generator] = None, guidance: float = 1.0) -> torch.Tensor:
        """n images for one caption (text ids), prompted by layout.generation_prompt: each step samples
        only among the image codes, with the KV cache; with an eol token, each row's end is fed in, not
        sampled. With guidance != 1 an unconditioned stream (empty caption) runs beside and the logits
        are guided (`guided`). Returns codebook indices LongTensor[n, h * w]."""
        device, lo, hi = self.hf.lm_head.weight.device, self.image_offset, self.image_offset + self.codebook_size
        prompts = [layout.generation_prompt(caption)] + ([layout.generation_prompt([])] if guidance != 1.0 else [])
        outs = [self.hf(input_ids=torch.tensor(p, device=device).expand(n, -1), use_cache=True) for p in prompts]
        codes, (h, w), eol = [], layout.grid, layout.vocab.eol
        for step in range(h * w):
            logits = [o.logits[:, -1, lo:hi] for o in outs]
            codes.append(sample(guided(logits[0], logits[1] if len(logits) > 1 else None, guidance), temperature, gen))
            if step + 1 < h * w:
                nxt = codes[-1] + lo
                if eol is not None and (step + 1) % w == 0:
                    nxt = torch.cat([nxt, torch.full_like(nxt, eol)], 1)
                outs = [self.hf(input_ids=nxt, past_key_values=o.past_key_values, use_cache=True) for o in outs]
        return torch.cat(codes, 1)
