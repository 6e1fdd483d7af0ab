"""From the `model` and `data` config sections to the parts a run trains with, in dependency order:
the vocabulary (text tokenizer and image-code ids), the model, the image tokenizer, the layout of
documents, then the data (training sampler, validation micro-batches, and for the digits the splits
the digit judge reads). The launcher calls these in that order; `prepare` uses the tokenizers and
the layout without building the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import datasets
import torch
from transformers import Emu3ForConditionalGeneration, JanusForConditionalGeneration

from model_zoo import digits as digit_data
from model_zoo import emu3, janus
from model_zoo.config import DTYPES, DataConfig, ModelConfig
from model_zoo.data import DigitsSource, MicroBatchSampler, TokenizedSource, open_tokenized
from model_zoo.emu3 import Emu3, Emu3Layout
from model_zoo.janus import Janus, JanusLayout
from model_zoo.prepared import check_layout, check_prepared_corpus, check_tokenized
from model_zoo.unified import SHAPE_FIELDS, UnifiedModel, load_submodule
from model_zoo.vocab import Vocab, load_or_train_wordpiece
from model_zoo.vq import CheckpointVQ, VQTokenizer

FAMILIES: dict[str, Union[type[Emu3], type[Janus]]] = {"emu3": Emu3, "janus": Janus}
CONFIGS = {"emu3": emu3.config, "janus": janus.config}
HF_CLASSES = {"emu3": Emu3ForConditionalGeneration, "janus": JanusForConditionalGeneration}


def checkpoint_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def build_vocab(d: DataConfig, m: ModelConfig) -> Vocab:
    """The checkpoint's tokenizer, or the project's WordPiece (trained on the digits' caption corpus and
    cached) with the image codes of the image tokenizer's codebook."""
    if d.text_tokenizer == "pretrained":
        assert m.pretrained is not None  # validate_data: a pretrained tokenizer needs model.pretrained
        return Vocab.from_checkpoint(m.pretrained, m.family, checkpoint_config(m.pretrained))
    if d.image_tokenizer == "pretrained":
        assert m.pretrained is not None  # validate_data: a pretrained tokenizer needs model.pretrained
        c = checkpoint_config(m.pretrained).vq_config
        codebook = c.codebook_size if m.family == "emu3" else c.num_embeddings
    else:
        codebook = d.codebook_size
    return Vocab.from_wordpiece(load_or_train_wordpiece(d.cache_dir, digit_data.caption_corpus()), codebook)


def build_model(m: ModelConfig, vocab: Vocab, meta: bool = False) -> UnifiedModel:
    """A new model of `size` (unset: tiny) sized to `vocab`, or the local checkpoint `pretrained` with
    `overrides` applied to its text config (shape fields refused). With both, the checkpoint must have
    the decoder shape `size` names. The checkpoint must use `vocab`'s ids. `meta`: the same model with
    no weights (on the meta device, nothing read but the checkpoint's config), for a launcher that
    shards it first and loads the weights into the shards."""
    cls = FAMILIES[m.family]
    if meta:
        config = CONFIGS[m.family](m.size or "tiny", vocab, m.overrides) if m.pretrained is None else \
            checkpoint_config(m.pretrained)
        if m.pretrained is not None:
            for key, value in m.overrides.items():
                setattr(config if key == "vision_loss_weight" else config.text_config, key, value)
        with torch.device("meta"):
            model = cls(HF_CLASSES[m.family](config))
    elif m.pretrained is None:
        return cls.build(m.size or "tiny", vocab, m.overrides)
    else:
        model = cls.from_pretrained(m.pretrained, m.overrides, dtype=DTYPES[m.dtype])
    if m.pretrained is None:
        return model
    if m.size is not None:
        want = CONFIGS[m.family](m.size, vocab).text_config
        wrong = {k: (getattr(model.text_config, k, None), getattr(want, k, None)) for k in SHAPE_FIELDS
                 if k != "vocab_size" and getattr(model.text_config, k, None) != getattr(want, k, None)}
        if wrong:
            raise ValueError(f"model.size: {m.pretrained} is not a {m.family} {m.size} checkpoint ("
                             + ", ".join(f"{k} {got}, not {exp}" for k, (got, exp) in wrong.items())
                             + "); fix model.size, or leave it unset to take the checkpoint's shape")
    check_vocab(model, vocab, m.pretrained)
    return model


def check_vocab(model: UnifiedModel, vocab: Vocab, where: str) -> None:
    """The model uses the run's ids: the same special ids and image-code range, and an embedding row for
    every id the run writes. An Emu3 embedding with more rows than the vocabulary has ids is accepted
    (checkpoints padded by `resize_token_embeddings(pad_to_multiple_of=...)`): no document holds those
    ids, so they are never targets. Janus places image ids right after its text embedding, whose size
    is therefore image_offset itself (its checkpoint tokenizer reads image_offset from the config)."""
    c = model.text_config
    found = dict(pad=c.pad_token_id, bos=c.bos_token_id, eos=c.eos_token_id, image_offset=model.image_offset,
                 codebook_size=model.codebook_size)
    expected = dict(pad=vocab.pad, bos=vocab.bos, eos=vocab.eos, image_offset=vocab.image_offset,
                    codebook_size=vocab.codebook_size)
    wrong = {k: f"{k} {found[k]}, here {expected[k]}" for k in found
             if found[k] != expected[k] and not (k == "pad" and found[k] is None)}
    if isinstance(model, Emu3) and c.vocab_size < vocab.size:
        wrong["rows"] = f"{c.vocab_size} embedding rows, here ids up to {vocab.size - 1}"
    if not wrong:
        return
    if vocab.origin == "pretrained":
        fix = (f"the tokenizer saved in {where} is not the one this checkpoint was trained with; save the model's "
               "own tokenizer there (tokenizer.save_pretrained)")
    else:
        fix = "use data.text_tokenizer: pretrained (the tokenizer saved with the checkpoint)"
        if "codebook_size" in wrong:
            fix += f", and data.codebook_size: {found['codebook_size']} or data.image_tokenizer: pretrained"
    raise ValueError(f"model.pretrained: {where} does not use this run's token ids ({', '.join(wrong.values())}); "
                     f"{fix}")


def build_image_tokenizer(d: DataConfig, m: ModelConfig,
                          model: Optional[UnifiedModel] = None) -> Union[VQTokenizer, CheckpointVQ]:
    """The cached digits VQ (fitted on first use), or the checkpoint's VQ-VAE: the model's own when
    given, else read alone from the checkpoint (prepare needs no decoder)."""
    if d.image_tokenizer == "digits_vq":
        return VQTokenizer.load_or_train(d.cache_dir, d.codebook_size, d.seed)
    if model is not None:
        vqmodel, config = model.vqmodel(), model.base().config
    else:
        from transformers import Emu3VQVAE, JanusVQVAE

        assert m.pretrained is not None  # validate_data: a pretrained tokenizer needs model.pretrained
        config = checkpoint_config(m.pretrained)
        vqmodel = load_submodule((Emu3VQVAE if m.family == "emu3" else JanusVQVAE)(config.vq_config), m.pretrained)
    size = d.image_size
    if size is None:
        if m.family == "emu3":
            raise ValueError("data.image_size: null, but Emu3's VQ-VAE tokenizes any size divisible by its "
                             f"downsampling ({vqmodel.spatial_scale_factor}); set the side in pixels")
        size = config.vision_config.image_size
    return CheckpointVQ(vqmodel, size)


def layout_for(m: ModelConfig, vocab: Vocab, grid: tuple[int, int],
               model: Optional[UnifiedModel] = None) -> Union[Emu3Layout, JanusLayout]:
    """How documents are laid out for this family (Janus: as many placeholders as its vision config's
    image tokens)."""
    if m.family == "emu3":
        return Emu3Layout(vocab, grid)
    if model is not None:
        config = model.base().config
    elif m.pretrained is not None:
        config = checkpoint_config(m.pretrained)
    else:
        config = janus.config(m.size or "tiny", vocab)
    return JanusLayout(vocab, grid, config.vision_config.num_image_tokens)


@dataclass
class Data:
    """What a run reads: its sampler, evaluation micro-batches (the first `eval_batches` of each task of
    the validation split, the same on every rank), for the digits the (train, validation) rows, and
    for a corpus with captions the first validation captions (the sample grid's prompts)."""

    sampler: MicroBatchSampler
    validation: list[dict]
    digits: Optional[tuple[datasets.Dataset, datasets.Dataset]] = None
    captions: list[str] = field(default_factory=list)


def build_data(d: DataConfig, layout, images, *, micro_batch_size: int, grad_accum: int, rank: int = 0,
               world_size: int = 1, seed: int = 0, eval_batches: int = 0, model: Optional[ModelConfig] = None,
               captions: int = 0) -> Data:
    """Sources for the training and validation splits, the training sampler and the validation batches.
    A prepared corpus is checked against `model` and `d` (prepared.py); `pairs` needs `model`."""
    splits, found = None, []
    train: Union[DigitsSource, TokenizedSource, None]
    val: Union[DigitsSource, TokenizedSource, None]
    if d.source == "digits":
        splits = digit_data.split(d.seed, d.val_fraction)
        train = DigitsSource(splits[0], layout, images, d.text_format, seed, shuffle=True,
                             caption_dropout=d.caption_dropout)
        val = DigitsSource(splits[1], layout, images, d.text_format, seed, shuffle=False)
    else:
        assert d.path is not None  # validate_data: a corpus source has its path
        path = d.prepared_dir() if d.source == "pairs" else Path(d.path)
        if d.source == "pairs":
            if model is None:
                raise ValueError("build_data: data.source 'pairs' needs model= (its prepared corpus is keyed by the "
                                 "model family and tokenizers)")
            check_prepared_corpus(model, d)
        elif model is not None:
            check_tokenized(path, model, d)
        check_layout(path, layout)
        train, val = (_tokenized(path, split, d, layout, images) for split in ("train", "validation"))
        if train is None:
            raise ValueError(f"data.path: {path} has no training split")
        found = (val.captions(captions) if val is not None else []) or train.captions(captions)
    common = dict(seq_len=d.seq_len, pad=layout.vocab.pad, on_bad_record=d.on_bad_record)
    sampler = MicroBatchSampler(train, micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                                augment=d.augment and d.source == "digits", grad_accum=grad_accum, **common)
    batches = []
    if val is not None and eval_batches:
        reader = MicroBatchSampler(val, micro_batch_size, augment=False, log=False, **common)
        batches = [reader.next_micro_batch() for _ in range(2 * eval_batches)]
    return Data(sampler, batches, splits, found)


def _tokenized(path: Path, split: str, d: DataConfig, layout, images) -> Optional[TokenizedSource]:
    ds = open_tokenized(path, split, d.streaming, d.cache_dir)
    if ds is None:
        return None
    return TokenizedSource(ds, f"{path} ({split})", layout, images, d.seq_len, layout.vocab.size, d.image_fit)
