"""Multimodal data on real offline images: digits with captions, one unified vocabulary, two tasks.

- understanding (image -> caption): `[BOS] [SOV] meta [SOT] image [EOV] caption [EOS]`
- generation (caption -> image):    `[BOS] caption [SOV] meta [SOT] image [EOV] [EOS]`

Two text formats share one tokenizer: `plain` (pretraining: descriptive captions, loss on every
token) and `instruct` (instruction tuning: an instruction to draw for generation, an answer for
understanding, and the loss on the response only: the image codes, or the answer and [EOS]).

This is Emu3's document layout (Emu3 moves the caption after the image for understanding data);
`meta` is the resolution text "8x8". The text tokenizer is a WordPiece model trained here on the
caption corpus (Hugging Face `tokenizers`) and cached; an image is 16 codes of the VQ tokenizer
(model_zoo/vq.py). Samples live in Hugging Face `datasets`. Every sequence is padded to one fixed
length, so micro-batches of both modalities have the same shape.

Micro-batches are modality-pure and interleaved (understanding, generation, ...); each rank takes a
disjoint slice of every global micro-batch, and the sampler's state is an exact resume position.
For large global batches, training micro-batches are fresh augmented views (1-pixel shifts, small
noise) encoded on the fly, so one global batch is not the whole data set.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from model_zoo.vq import CODES, SIDE, VQTokenizer, digits
from model_zoo.wordpiece import train_wordpiece

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {d} written by hand", "a small image of a {w}",
             "handwriting showing the digit {w}", "a scanned picture of the number {w}",
             "a {w} drawn with a pen", "the digit {d}, handwritten"]
INSTRUCT = {"generation": ["please draw the digit {w}", "draw a {w} for me", "can you sketch the number {d}"],
            "understanding": ["the picture shows a {w}", "it is the digit {w}", "i see the number {d}"]}
FORMATS = ("plain", "instruct")
SPECIALS = ("pad", "bos", "eos", "sov", "sot", "eov")
META = "8x8"
MODALITIES = ("understanding", "generation")
TEXT_VOCAB = 192  # the trainer's target; the small corpus caps the learnt vocabulary a little below it


def caption(digit: int, index: int, text_format: str = "plain", modality: str = "generation") -> str:
    """The text of sample `index` showing `digit`: a template picked by a generator seeded with the
    index, so it is fixed per sample but not tied to the digits' cyclic 0..9 order (index % k would be).
    `plain`: a caption (either modality); `instruct`: the modality's instruction or answer."""
    if text_format not in FORMATS:
        raise ValueError(f"text_format={text_format!r} is invalid: choose one of {FORMATS}")
    templates = TEMPLATES if text_format == "plain" else INSTRUCT[modality]
    return templates[random.Random(index).randrange(len(templates))].format(w=WORDS[digit], d=digit)


def caption_corpus() -> list[str]:
    """Every text any sample can get in either format, plus the meta text: what the text tokenizer is
    trained on (so pretraining and instruction tuning share one vocabulary)."""
    templates = TEMPLATES + [t for ts in INSTRUCT.values() for t in ts]
    return [t.format(w=w, d=d) for d, w in enumerate(WORDS) for t in templates] + [META]


def _cache_dir(cache_dir: str | os.PathLike) -> Path:
    try:
        path = Path(cache_dir)
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, TypeError) as e:
        raise ValueError(f"cache_dir={str(cache_dir)!r} cannot be created ({e}); pick a writable folder") from e
    return path


def load_or_train_text_tokenizer(cache_dir: str | os.PathLike) -> Tokenizer:
    """A WordPiece tokenizer trained on the caption corpus (model_zoo/wordpiece.py: its content is a
    function of the corpus alone), cached as JSON (atomic write). The file name carries a hash of the
    corpus, so editing the templates never reuses a stale tokenizer, and the trainer's version, so a
    cache left by Hugging Face's nondeterministic trainer (v1) is never read."""
    corpus = caption_corpus()
    digest = hashlib.sha1("\n".join(corpus).encode()).hexdigest()[:10]
    path = _cache_dir(cache_dir) / f"text-wordpiece-v2-{TEXT_VOCAB}-{digest}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"text tokenizer cache {path} is unreadable or corrupt ({e}); delete it to retrain") from e
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    tok = Tokenizer(models.WordPiece(train_wordpiece(words, TEXT_VOCAB), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tok.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return tok


@dataclass
class Vocab:
    """One id space for one decoder, in Emu3's order: text tokens, then the special tokens, then the
    image codes (`image_offset + code`). Lengths are fixed from the caption corpus: `caption_len`
    is the longest caption in tokens, `seq_len` the padded length of every sequence."""

    tokenizer: Tokenizer
    codebook_size: int
    text_size: int = field(init=False)
    pad: int = field(init=False)
    bos: int = field(init=False)
    eos: int = field(init=False)
    sov: int = field(init=False)
    sot: int = field(init=False)
    eov: int = field(init=False)
    image_offset: int = field(init=False)
    size: int = field(init=False)
    meta: list[int] = field(init=False)
    caption_len: int = field(init=False)
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.text_size = self.tokenizer.get_vocab_size()
        for i, name in enumerate(SPECIALS):
            setattr(self, name, self.text_size + i)
        self.image_offset = self.text_size + len(SPECIALS)
        self.size = self.image_offset + self.codebook_size
        self.meta = self.text(META)
        self.caption_len = max(len(self.text(c)) for c in caption_corpus()[:-1])
        self.seq_len = len(self.sequence("generation", [0] * self.caption_len, [0] * CODES))

    def text(self, s: str) -> list[int]:
        """Text-token ids of `s` (no special tokens)."""
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def image_token(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes -> unified-vocabulary ids."""
        return codes + self.image_offset

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor: True where `ids` are image codes (so -100 labels and specials are False)."""
        return (ids >= self.image_offset) & (ids < self.size)

    def sequence(self, modality: str, caption_ids: list[int], codes: list[int]) -> list[int]:
        """The unpadded sequence of one sample (see the module docstring for both layouts)."""
        image = [self.sov, *self.meta, self.sot, *[int(c) + self.image_offset for c in codes], self.eov]
        if modality == "generation":
            return [self.bos, *caption_ids, *image, self.eos]
        if modality == "understanding":
            return [self.bos, *image, *caption_ids, self.eos]
        raise ValueError(f"modality={modality!r} is invalid: choose one of {MODALITIES}")


def build_datasets(cache_dir: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1,
                   codebook_size: int = 64) -> tuple[datasets.Dataset, datasets.Dataset, Vocab, VQTokenizer]:
    """(train, validation, vocab, vq): a seeded split of the 1,797 digits, stratified by digit.

    Columns: `image` (64 floats in [0, 1], row-major 8x8), `digit` (ClassLabel), `caption`, and
    `index` (the row in scikit-learn's digits, which fixes the caption)."""
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    images, labels = digits()
    if round(val_fraction * len(images)) < 10 or round((1 - val_fraction) * len(images)) < 10:
        raise ValueError(f"val_fraction={val_fraction!r} leaves fewer than 10 samples (one per digit) in a split")
    if not isinstance(codebook_size, int) or not 2 <= codebook_size <= 4096:
        raise ValueError(f"codebook_size={codebook_size!r} is invalid: must be an int in [2, 4096]")
    cache = _cache_dir(cache_dir)
    datasets.disable_progress_bars()
    vq = VQTokenizer.load_or_train(cache, codebook_size, seed)
    vocab = Vocab(load_or_train_text_tokenizer(cache), codebook_size)
    ds = datasets.Dataset.from_dict({"image": images.reshape(-1, SIDE * SIDE).tolist(), "digit": labels.tolist(),
                                     "caption": [caption(int(d), i) for i, d in enumerate(labels)],
                                     "index": list(range(len(labels)))})
    ds = ds.class_encode_column("digit")
    split = ds.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column="digit")
    return split["train"], split["test"], vocab, vq


def augment(images: torch.Tensor, gen: torch.Generator, noise: float = 0.03) -> torch.Tensor:
    """Fresh views of [N, 8, 8] images in [0, 1]: a random shift of up to one pixel per axis (the
    uncovered border is 0, the background) plus Gaussian noise of std `noise`, clipped to [0, 1]."""
    n = len(images)
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))  # [N, 10, 10]
    rows = (torch.arange(SIDE)[None, :] + 1 - shifts[:, :1])  # [N, 8]: source row of each output row
    cols = (torch.arange(SIDE)[None, :] + 1 - shifts[:, 1:])
    out = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return (out + noise * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def collate(rows: dict[str, list[Any]], vocab: Vocab, vq: VQTokenizer, modality: str,
            gen: Optional[torch.Generator] = None, text_format: str = "plain") -> dict[str, Any]:
    """A modality-pure batch from dataset rows (`data[indices]`); with `gen`, augmented views are
    drawn before VQ encoding. Sequences are padded to vocab.seq_len, captions to vocab.caption_len.
    `labels` is input_ids with -100 at pads (the model shifts, as Hugging Face causal LMs do) and, in
    the instruct format, at every prompt token."""
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} is invalid: choose one of {MODALITIES}")
    if text_format == "instruct":
        rows = {**rows, "caption": [caption(d, i, "instruct", modality) for d, i in zip(rows["digit"], rows["index"])]}
    elif text_format != "plain":
        raise ValueError(f"text_format={text_format!r} is invalid: choose one of {FORMATS}")
    images = torch.tensor(rows["image"], dtype=torch.float32).reshape(-1, SIDE, SIDE)
    if gen is not None:
        images = augment(images, gen)
    codes = vq.encode(images)
    n = len(images)
    input_ids = torch.full((n, vocab.seq_len), vocab.pad)
    caption_ids = torch.full((n, vocab.caption_len), vocab.pad)
    for i, (text, code) in enumerate(zip(rows["caption"], codes.tolist())):
        cap = vocab.text(text)
        if len(cap) > vocab.caption_len:
            raise ValueError(f"caption {text!r} has {len(cap)} tokens, more than vocab.caption_len="
                             f"{vocab.caption_len}; captions must come from caption()")
        seq = vocab.sequence(modality, cap, code)
        input_ids[i, :len(seq)] = torch.tensor(seq)
        caption_ids[i, :len(cap)] = torch.tensor(cap, dtype=torch.long)
    labels = input_ids.masked_fill(input_ids == vocab.pad, -100)
    if text_format == "instruct":  # loss on the response only
        answer_start = len(vocab.sequence("understanding", [], [0] * CODES)) - 1  # [BOS] image, then the answer
        prompt = ~vocab.is_image(input_ids) if modality == "generation" else torch.arange(vocab.seq_len) < answer_start
        labels = labels.masked_fill(prompt, -100)
    return {"modality": modality, "input_ids": input_ids, "labels": labels,
            "image_mask": vocab.is_image(input_ids), "pixel_values": images.unsqueeze(1), "image_codes": codes,
            "caption_ids": caption_ids, "caption_mask": caption_ids != vocab.pad,
            "digit": torch.tensor(rows["digit"], dtype=torch.long)}


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), the same in every process."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class MicroBatchSampler:
    """Modality-pure micro-batches, understanding and generation interleaved, sharded over ranks.

    Every rank builds the same seeded permutation for each epoch. Global micro-batch number g
    (counted from the start of training) takes the next `world_size * micro_batch_size` samples of
    that permutation and rank r their r-th slice, so ranks are disjoint; its modality is
    MODALITIES[g % 2] on every rank. An epoch ends when fewer than a global micro-batch of samples
    remain (the rest is dropped). One optimizer step is `grad_accum` consecutive micro-batches
    (`next_step`), so with an even grad_accum every step holds both modalities in equal shares.
    Augmented views are drawn from a generator seeded by (seed, g, rank).

    The state (epoch, sample offset in the epoch, g) is the whole position: resuming it with the
    same layout replays exactly what an uninterrupted run would see. With another world_size or
    micro_batch_size (a resharded resume), it continues at the same sample position of the epoch.
    """

    def __init__(self, data: datasets.Dataset, vocab: Vocab, vq: VQTokenizer, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, augment: bool = True, grad_accum: int = 1,
                 text_format: str = "plain"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size} are invalid: need 0 <= rank < world_size")
        if micro_batch_size < 1 or micro_batch_size * world_size > len(data):
            raise ValueError(f"micro_batch_size={micro_batch_size} is invalid: micro_batch_size x world_size="
                             f"{world_size} must be in [1, {len(data)}] (the training samples)")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} is invalid: must be >= 1")
        self.data, self.vocab, self.vq = data, vocab, vq
        self.micro, self.rank, self.world, self.grad_accum = micro_batch_size, rank, world_size, grad_accum
        self.seed, self.augment, self.text_format = seed, augment, text_format
        self.epoch, self.offset, self.served = 0, 0, 0
        self._perm: tuple[int, list[int]] = (-1, [])

    @property
    def span(self) -> int:
        """Samples in one global micro-batch (all ranks)."""
        return self.micro * self.world

    @property
    def step(self) -> int:
        """Optimizer steps completed, counting grad_accum micro-batches per step."""
        return self.served // self.grad_accum

    def order(self, epoch: int) -> list[int]:
        """The epoch's permutation of dataset rows, identical on every rank."""
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self.data), generator=gen).tolist())
        return self._perm[1]

    def _position(self) -> tuple[int, int]:
        """(epoch, offset) of the next global micro-batch, rolling over when the epoch is used up."""
        if self.offset + self.span > len(self.data):
            return self.epoch + 1, 0
        return self.epoch, self.offset

    def indices(self) -> list[int]:
        """Dataset rows of this rank's next micro-batch (without consuming it)."""
        epoch, offset = self._position()
        start = offset + self.rank * self.micro
        return self.order(epoch)[start:start + self.micro]

    def next_micro_batch(self) -> dict[str, Any]:
        idx = self.indices()
        gen = torch.Generator().manual_seed(_seed(self.seed, self.served, self.rank)) if self.augment else None
        batch = collate(self.data[idx], self.vocab, self.vq, MODALITIES[self.served % 2], gen, self.text_format)
        self.epoch, self.offset = self._position()
        self.offset += self.span
        self.served += 1
        return batch

    def next_step(self) -> list[dict[str, Any]]:
        """The grad_accum micro-batches of this rank for one optimizer step."""
        return [self.next_micro_batch() for _ in range(self.grad_accum)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_micro_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "served": self.served, "seed": self.seed,
                "micro_batch_size": self.micro, "world_size": self.world, "num_samples": len(self.data)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position from state_dict(); the seed and data set must match (else the permutation
        differs and the position means nothing)."""
        missing = {"epoch", "offset", "served"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; it must come from MicroBatchSampler.state_dict()")
        for key, mine in (("seed", self.seed), ("num_samples", len(self.data))):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this sampler has {key}={mine}: "
                                 f"resume with the same run seed and data split (val_fraction)")
        self.epoch, self.offset, self.served = int(state["epoch"]), int(state["offset"]), int(state["served"])
