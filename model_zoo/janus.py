"""Janus (Wu et al. 2024, arXiv 2410.13848) on transformers' `JanusForConditionalGeneration`: a shared
decoder with decoupled visual pathways.

Understanding: the understanding encoder (hf.model.vision_model, SigLIP in Janus) and its aligner
turn pixels into the embeddings of the image placeholders; the text head (hf.lm_head) predicts the
caption: `[BOS] [SOV] [IMG] x n [EOV] caption [EOS]`, loss on the caption and [EOS].
Generation: the caption, then the image codes embedded by the generation embedding and aligner; the
generation head (hf.model.generation_head) predicts each code: `[BOS] caption [SOV] codes`, loss on
the codes. In the batch, code c of a generation sample is id `image_offset + c` (image_offset = the
text vocabulary size), so one id tensor carries both kinds; the wrapper routes each id to its
embedding. Every target is weighted 1.

Parameter names are transformers' own under `hf.`: hf.model.language_model.layers.N.self_attn.q_proj.weight,
hf.model.vision_model..., hf.model.aligner..., hf.model.generation_embeddings / _aligner / _head,
hf.lm_head; the VQ-VAE (hf.model.vqmodel) is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig

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

SIZES = ("tiny", "janus_1_3b")
# DeepSeek-LLM 1.3B, Janus' language model (its base vocabulary has no pad token)
JANUS_1_3B_TEXT = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                       bos_token_id=100000, eos_token_id=100001, pad_token_id=None)


def config(size: str, vocab: Optional[Vocab] = None, overrides: Optional[dict] = None) -> JanusConfig:
    """`tiny`: the CPU shape (hidden 64, 2 layers, 4 heads, 2 KV heads; a 1-layer understanding
    encoder of width 32 over 2x2 patches of single-channel 8x8 images, 16 visual tokens; a 2-stage
    VQ-VAE with 32 channels and a 4x4 code grid). `janus_1_3b`: the published Janus-1.3B / Janus-Pro-1B
    (DeepSeek-LLM 1.3B; SigLIP-L at 384 px, 576 visual tokens; its VQ-VAE with 16,384 codes):
    transformers' defaults for the vision and VQ parts. Input and output embeddings are separate, as
    in Janus' own checkpoints. The token ids come from `vocab` (None: the published ones, for planning
    on the meta device); `overrides` set text-config fields."""
    overrides = dict(overrides or {})
    check_overrides(overrides, override_keys(LlamaConfig), None)
    if size == "tiny":
        hidden = overrides.get("hidden_size", 64)
        text: dict[str, Any] = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_channels=1, image_size=8,
                      patch_size=2, projection_dim=hidden, num_image_tokens=16, mlp_ratio=2.0)
        vq = dict(num_embeddings=vocab.codebook_size if vocab else 64, embed_dim=8, latent_channels=32,
                  in_channels=1, out_channels=1, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                  projection_dim=hidden, image_token_embed_dim=hidden)
    elif size == "janus_1_3b":
        text, vision, vq = dict(JANUS_1_3B_TEXT), {}, {}
    else:
        raise ValueError(f"model.size: {size!r} is not a janus size; choose one of {SIZES}")
    ids: dict[str, Any] = {}
    if vocab is not None:
        text.update(vocab_size=vocab.image_offset, pad_token_id=vocab.pad, bos_token_id=vocab.bos,
                    eos_token_id=vocab.eos)
        ids = dict(image_token_id=vocab.img)
    return JanusConfig(text_config=LlamaConfig(**{**text, **overrides, "tie_word_embeddings": False}),
                       vision_config=vision, vq_config=vq, tie_word_embeddings=False, **ids)


@dataclass(frozen=True)
class JanusLayout:
    """Where each token of a Janus document goes: one vocabulary, the code grid (h, w) of generated
    images, and `n_visual` placeholders per understanding image."""

    vocab: Vocab
    grid: tuple[int, int]
    n_visual: int
    pixels: tuple[str, ...] = ("understanding",)  # tasks whose samples carry pixels

    def document(self, task: str, caption: Sequence[int], codes: Sequence[int],
                 response_only: bool) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of one sample: the loss is always on the response (Janus' heads each predict
        one kind), so `response_only` changes nothing here."""
        v = self.vocab
        if task == "generation":
            prompt, response = self.generation_prompt(caption), [v.image_offset + int(c) for c in codes]
        elif task == "understanding":
            assert v.img is not None  # a Janus vocabulary has its image placeholder (Vocab.img)
            prompt, response = [v.bos, v.sov, *[v.img] * self.n_visual, v.eov], [*caption, v.eos]
        else:
            raise ValueError(f"task={task!r} is invalid: 'understanding' or 'generation'")
        return prompt + response, [0] * len(prompt) + [1] * len(response)

    def generation_prompt(self, caption: Sequence[int]) -> list[int]:
        """`[BOS] caption [SOV]`: a generation document up to its first image code."""
        return [self.vocab.bos, *caption, self.vocab.sov]


class Janus(UnifiedModel):
    decoder_path = "model.language_model"

    def __init__(self, hf: JanusForConditionalGeneration):
        super().__init__(hf)
        config: Any = hf.config  # JanusConfig types its sub-configs dict | config | None; built, they are configs
        self.image_offset = config.text_config.vocab_size
        self.codebook_size = config.vq_config.num_embeddings

    @classmethod
    def build(cls, size: str, vocab: Vocab, overrides: Optional[dict] = None) -> Janus:
        return cls(JanusForConditionalGeneration(config(size, vocab, overrides)))

    @classmethod
    def from_pretrained(cls, path: str, overrides: Optional[dict] = None,
                        dtype: torch.dtype = torch.float32) -> Janus:
        """A local checkpoint directory in transformers' Janus layout; nothing is downloaded."""
        overrides = dict(overrides or {})
        check_overrides(overrides, override_keys(LlamaConfig), path)
        return cls(load_checkpoint(JanusForConditionalGeneration, path, "janus", overrides, dtype))

    def embed(self, ids: torch.Tensor, images: bool) -> torch.Tensor:
        """Text ids through the text embedding and, when the ids hold images (`images`: a generation
        micro-batch, or codes being sampled; known on the host, so nothing waits for the device), image
        ids (>= image_offset) through the generation embedding and aligner. A micro-batch without images
        never calls the generation pathway, whose gradient then stays None, not zero."""
        base = self.base()
        image = ids >= self.image_offset
        x = base.get_input_embeddings()(ids.masked_fill(image, 0))
        if images:
            codes = base.prepare_embeddings_for_image_generation((ids - self.image_offset).clamp_min(0))
            x = torch.where(image[..., None], codes.to(x.dtype), x)
        return x

    def _place_image_features(self, x: torch.Tensor, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The understanding encoder's features (the class's own get_image_features) at the image
        placeholders, in order: what JanusModel.forward does, with a gather by running count instead of
        its masked_scatter and count check, which read the device on the host."""
        features = self.base().model.get_image_features(pixels, return_dict=True).pooler_output
        features = features.reshape(-1, x.shape[-1]).to(x.dtype)
        placeholder = ids == self.base().config.image_token_id
        index = (placeholder.reshape(-1).cumsum(0) - 1).clamp_min(0).reshape(placeholder.shape)
        return torch.where(placeholder[..., None], features[index], x)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """dict(loss, text_loss, image_loss, n_text, n_image, text_correct, image_correct). The
        understanding encoder's features go to the image placeholders (pixel_values in [0, 1],
        normalised to [-1, 1] here); text targets go through the text head, image targets through the
        generation head."""
        generation = batch["task"] == "generation"  # modality-pure micro-batches: one head each
        x = self.embed(batch["input_ids"], images=generation)
        pixels = batch.get("pixel_values")
        if pixels is not None and len(pixels):
            x = self._place_image_features(x, batch["input_ids"], pixels * 2 - 1)
        h = self.base().model.language_model(inputs_embeds=x, position_ids=batch["position_ids"],
                                             use_cache=False).last_hidden_state[:, :-1]
        targets = batch["labels"][:, 1:]
        image = targets >= self.image_offset
        if generation:
            head, targets = self.base().model.generation_head, torch.where(image, targets - self.image_offset, -100)
        else:
            head, targets = self.hf.lm_head, targets.masked_fill(image, -100)
        return token_losses(head, h, targets, image & (targets != -100))

    @torch.no_grad()
    def generate_images(self, layout: JanusLayout, caption: Sequence[int], n: int = 1, temperature: float = 1.0,
                        gen: Optional[torch.Generator] = None, guidance: float = 1.0) -> torch.Tensor:
        """n images for one caption (text ids): the prompt, then h * w steps of generation-head sampling,
        each sampled code fed back through the generation embedding and aligner (KV cache). With
        guidance != 1 an unconditioned stream (empty caption) runs beside and the logits are guided
        (`guided`), as Janus samples. Returns codebook indices LongTensor[n, h * w]."""
        base = self.base()
        device = self.hf.lm_head.weight.device
        decoder, head = base.model.language_model, base.model.generation_head
        prompts = [layout.generation_prompt(caption)] + ([layout.generation_prompt([])] if guidance != 1.0 else [])
        outs = [decoder(inputs_embeds=self.embed(torch.tensor(p, device=device).expand(n, -1), images=False),
                        use_cache=True) for p in prompts]
        codes, steps = [], layout.grid[0] * layout.grid[1]
        for step in range(steps):
            logits = [head(o.last_hidden_state[:, -1]) for o in outs]
            codes.append(sample(guided(logits[0], logits[1] if len(logits) > 1 else None, guidance), temperature, gen))
            if step + 1 < steps:
                x = self.embed(codes[-1] + self.image_offset, images=True)
                outs = [decoder(inputs_embeds=x, past_key_values=o.past_key_values, use_cache=True) for o in outs]
        return torch.cat(codes, 1)

