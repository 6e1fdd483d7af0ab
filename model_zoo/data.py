"""Multimodal data on real offline images: digits with captions, one unified vocabulary, two tasks.

- understanding (image -> caption): `[BOS] [SOV] meta [SOT] image [EOV] caption [EOS]`
- generation (caption -> image):    `[BOS] caption [SOV] meta [SOT] image [EOV] [EOS]`
(Emu3's document layout; Emu3 moves the caption after the image for understanding data.) The
text tokenizer is a WordPiece model trained here on the caption corpus (Hugging Face
`tokenizers`) and cached; images are 16 codes of the VQ tokenizer (model_zoo/vq.py). Samples live
in Hugging Face `datasets`. Micro-batches are modality-pure and interleaved (understanding,
generation, ...), each rank takes a disjoint slice of every global micro-batch, and the sampler's
state is an exact resume position. For large global batches, training micro-batches are fresh
augmented views (1-pixel shifts, small noise) encoded on the fly, so one batch is not the data set.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from model_zoo.vq import VQTokenizer, digits

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {d} written by hand", "a small image of a {w}",
             "handwriting showing the digit {w}", "an eight by eight picture of {d}"]
SPECIALS = ("pad", "bos", "eos", "sov", "sot", "eov")
META = "8x8"
MODALITIES = ("understanding", "generation")


def caption(digit: int, index: int) -> str:
    return TEMPLATES[index % len(TEMPLATES)].format(w=WORDS[digit], d=digit)


def load_or_train_text_tokenizer(cache_dir: str | os.PathLike) -> Tokenizer:
    """A WordPiece tokenizer trained on every caption (and the meta text), cached as JSON."""
    path = Path(cache_dir) / "text-tokenizer.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"text tokenizer cache {path} is unreadable ({e}); delete it to retrain") from e
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [caption(d, i) for d in range(10) for i in range(len(TEMPLATES))] + [META]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


@dataclass
class Vocab:
    """Text tokens, then the special tokens, then the image codes: one id space for one decoder."""

    tokenizer: Tokenizer
    codebook_size: int

    def __post_init__(self) -> None:
        self.text_size = self.tokenizer.get_vocab_size()
        for i, name in enumerate(SPECIALS):
            setattr(self, name, self.text_size + i)
        self.image_offset = self.text_size + len(SPECIALS)
        self.size = self.image_offset + self.codebook_size
        self.meta = self.text(META)

    def text(self, s: str) -> list[int]:
        return self.tokenizer.encode(s).ids

    def image_token(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_offset

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.image_offset

    def sequence(self, modality: str, caption_ids: list[int], codes: list[int]) -> list[int]:
        image = [self.sov, *self.meta, self.sot, *[c + self.image_offset for c in codes], self.eov]
        if modality == "generation":
            return [self.bos, *caption_ids, *image, self.eos]
        return [self.bos, *image, *caption_ids, self.eos]


def build_datasets(cache_dir: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1,
                   codebook_size: int = 64) -> tuple[datasets.Dataset, datasets.Dataset, Vocab, VQTokenizer]:
    """(train, validation, vocab, vq): a seeded, stratified split of the 1,797 digits."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cache_dir={str(cache_dir)!r} cannot be created ({e})") from e
    datasets.disable_progress_bars()
    vq = VQTokenizer.load_or_train(cache_dir, codebook_size, seed)
    vocab = Vocab(load_or_train_text_tokenizer(cache_dir), codebook_size)
    images, labels = digits()
    ds = datasets.Dataset.from_dict({"image": images.reshape(-1, 64).tolist(), "digit": labels.tolist(),
                                     "caption": [caption(int(d), i) for i, d in enumerate(labels)]})
    ds = ds.class_encode_column("digit")
    split = ds.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column="digit")
    return split["train"], split["test"], vocab, vq


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh views: a random shift of up to one pixel per axis (zero fill) and small Gaussian noise."""
    out = torch.zeros_like(images)
    shifts = torch.randint(-1, 2, (len(images), 2), generator=gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        shifted = torch.roll(images[i], (dy, dx), (0, 1))
        if dy:
            shifted[0 if dy > 0 else -1, :] = 0
        if dx:
            shifted[:, 0 if dx > 0 else -1] = 0
        out[i] = shifted
    return (out + 0.03 * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def collate(rows: Any, vocab: Vocab, vq: VQTokenizer, modality: str,
            gen: Optional[torch.Generator] = None) -> dict:
    """A modality-pure batch; `gen` draws augmented views before VQ encoding."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is invalid: choose one of {MODALITIES}")
    images = torch.tensor(rows["image"], dtype=torch.float32).reshape(-1, 8, 8)
    if gen is not None:
        images = augment(images, gen)
    codes = vq.encode(images)
    captions = [vocab.text(c) for c in rows["caption"]]
    seqs = [vocab.sequence(modality, cap, code.tolist()) for cap, code in zip(captions, codes)]
    length, cap_len = max(map(len, seqs)), max(map(len, captions))
    input_ids = torch.full((len(seqs), length), vocab.pad)
    caption_ids = torch.full((len(seqs), cap_len), vocab.pad)
    for i, (seq, cap) in enumerate(zip(seqs, captions)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        caption_ids[i, :len(cap)] = torch.tensor(cap)
    return {"modality": modality, "input_ids": input_ids,
            "labels": input_ids.masked_fill(input_ids == vocab.pad, -100),
            "image_mask": vocab.is_image(input_ids), "pixel_values": images.unsqueeze(1), "image_codes": codes,
            "caption_ids": caption_ids, "caption_mask": caption_ids != vocab.pad,
            "digit": torch.tensor(rows["digit"])}


class MicroBatchSampler:
    """Modality-pure micro-batches, understanding and generation interleaved, sharded over ranks.

    Every rank walks the same seeded permutation (one per epoch); global micro-batch j takes the
    next world_size * micro_batch_size samples and rank r its r-th slice. The position (epoch,
    offset, micro-batches served) is the whole state, so resuming replays exactly what comes next;
    the augmentation generator is re-seeded from that position too.
    """

    def __init__(self, data: datasets.Dataset, vocab: Vocab, vq: VQTokenizer, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, augment: bool = True):
        if micro_batch_size * world_size > len(data):
            raise ValueError(f"micro_batch_size={micro_batch_size} x world_size={world_size} exceeds the "
                             f"{len(data)} training samples")
        self.data, self.vocab, self.vq = data, vocab, vq
        self.micro, self.rank, self.world = micro_batch_size, rank, world_size
        self.seed, self.augment = seed, augment
        self.epoch, self.offset, self.served = 0, 0, 0

    def _order(self) -> list[int]:
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_micro_batch(self) -> dict:
        span = self.micro * self.world
        if self.offset + span > len(self.data):
            self.epoch, self.offset = self.epoch + 1, 0
        idx = self._order()[self.offset + self.rank * self.micro:self.offset + (self.rank + 1) * self.micro]
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.offset, self.rank)) % 2**62) \
            if self.augment else None
        batch = collate(self.data[idx], self.vocab, self.vq, MODALITIES[self.served % 2], gen)
        self.offset += span
        self.served += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.served = state["epoch"], state["offset"], state["served"]
