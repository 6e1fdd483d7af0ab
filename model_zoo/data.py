"""Training data: documents of one task each, packed into rows, modality-pure interleaved micro-batches
sharded over ranks, with an exact resume position.

Sources (`data.source`):
- `digits`: scikit-learn's digits with captions (model_zoo/digits.py), turned into documents on the
  fly: fresh augmented views, VQ-encoded per micro-batch.
- `pairs`: a user's image-caption pairs, tokenized once by `python -m model_zoo.prepare` into a
  `tokenized` dataset (data.prepared), then read as one.
- `tokenized`: a Hugging Face `datasets` dataset on disk (a `save_to_disk` folder, or .parquet /
  .jsonl / .arrow files) with `input_ids`, `loss_mask` and `task` per record (plus `image` for Janus
  understanding records), memory-mapped, or streamed as an `IterableDataset` when `data.streaming`
  (larger than memory). Records are read in stored order every epoch (prepare shuffles once, seeded),
  so the two modes give the same batches.

Tasks and modalities, one vocabulary: a record's task is `understanding` (image -> text) or
`generation` (text -> image); a micro-batch of one task trains one modality, MODALITY[task] (`text`
or `image`), and that is the tag the optimizer and the probes see.

Micro-batches: global micro-batch g holds records of task TASKS[g % 2] only, from that task's
records in order, packed greedily into world x micro_batch_size rows of seq_len tokens (a record that
does not fit starts the next row; position_ids restart at 0 for each record, so under transformers'
packed-sequence attention no record sees another); rank r takes rows [r * micro, (r + 1) * micro).
Every rank reads the lengths of the whole global micro-batch (so all ranks agree on the packing) and
builds only its own rows. One optimizer step is grad_accum consecutive micro-batches (`next_step`),
so with an even grad_accum every step holds both modalities.

State: micro-batches served and, per task, (epoch, records read in that epoch): the whole position,
so a resumed run, at any world size or micro-batch size, reads exactly the records an uninterrupted
one would. Bad records (empty or over-long sequences, ids outside the vocabulary, a loss mask of the
wrong length, a missing image) stop the run with a message naming the file, row and field, or with
`on_bad_record: skip` are counted (`skipped`) and logged.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import datasets
import numpy as np
import torch

from model_zoo import digits as digit_data

TASKS = ("understanding", "generation")
MODALITY = {"understanding": "text", "generation": "image"}  # the objective each task's micro-batches train
MODALITIES = tuple(MODALITY[t] for t in TASKS)


@dataclass
class Doc:
    """One document: ids, 0/1 loss mask (1: a target), and the pixels [C, H, W] in [0, 1] of the image an
    understanding encoder reads (Janus), else None."""

    ids: list[int]
    loss_mask: list[int]
    pixels: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Item:
    """A record as the packer sees it: its length, what its source needs to build the Doc, and where
    it lives (for messages)."""

    length: int
    key: Any
    where: str


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot be used: where it is (file and row), which field, what is wrong, and the
    fix for this kind of problem."""

    where: str
    field: str
    problem: str
    fix: str = "fix or drop the record"

    def message(self) -> str:
        return (f"{self.where}, field {self.field!r}: {self.problem}; {self.fix}, or set "
                "data.on_bad_record: skip to count and skip such records")


class BadRecordError(ValueError):
    pass


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), the same in every process."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


IMAGE_FITS = ("crop", "squash", "pad")
PAD_VALUE = 0.5  # mid-grey, the colour Janus' image processor pads with (its image mean)


def fit_images(images: torch.Tensor, channels: int, size: int, fit: str = "crop") -> torch.Tensor:
    """[N, C, H, W] in [0, 1] to the tokenizer's channels (grey repeated to RGB, RGB averaged to grey)
    and square side `size`. A non-square image is first made square by `fit`: `crop` (the centre
    square, as the models' own processors crop), `pad` (centred on mid-grey) or `squash` (nothing:
    the resize changes its aspect). The resize is bilinear and antialiased, so downscaling averages
    every source pixel (fine stripes become their mean, not a moire)."""
    if fit not in IMAGE_FITS:
        raise ValueError(f"data.image_fit: {fit!r}; choose one of {IMAGE_FITS}")
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images[:, :1].expand(-1, channels, -1, -1)
    h, w = images.shape[-2:]
    if h != w and fit == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[..., top:top + side, left:left + side]
    elif h != w and fit == "pad":
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        images = torch.nn.functional.pad(images, (left, side - w - left, top, side - h - top), value=PAD_VALUE)
    if images.shape[-2:] != (size, size):
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                                 antialias=True)
    return images.clamp(0, 1)


class DigitsSource:
    """The digits as documents: per task and epoch a seeded permutation of the rows (validation: stored
    order); each document built when its micro-batch is, from a fresh augmented view when `gen` is given,
    and then with probability `caption_dropout` a generation document gets an empty caption (so the
    model also learns the unconditioned image distribution that classifier-free guidance needs)."""

    def __init__(self, rows: datasets.Dataset, layout, images, text_format: str, seed: int, shuffle: bool,
                 caption_dropout: float = 0.0):
        self.rows, self.layout, self.images, self.caption_dropout = rows, layout, images, caption_dropout
        self.seed, self.shuffle, self.response_only = seed, shuffle, text_format == "instruct"
        n_codes = images.grid[0] * images.grid[1]
        self.captions = {t: [layout.vocab.text(digit_data.caption(d, i, text_format, t))
                             for d, i in zip(rows["digit"], rows["index"], strict=True)] for t in TASKS}
        self.lengths = {t: [len(layout.document(t, c, [0] * n_codes, self.response_only)[0]) for c in caps]
                        for t, caps in self.captions.items()}
        self.name = f"digits ({len(rows)} rows)"

    def items(self, task: str, epoch: int, start: int) -> Iterator[Item]:
        order: Sequence[int] = range(len(self.rows))
        if self.shuffle:
            gen = torch.Generator().manual_seed(mixed_seed(self.seed, epoch, TASKS.index(task)))
            order = torch.randperm(len(self.rows), generator=gen).tolist()
        for row in order[start:]:
            yield Item(self.lengths[task][row], row, f"digits row {row}")

    def docs(self, items: list[Item], task: str, gen: Optional[torch.Generator]) -> list[Doc]:
        if not items:
            return []
        rows = [it.key for it in items]
        pixels = torch.tensor(self.rows[rows]["image"], dtype=torch.float32).reshape(-1, 1, 8, 8)
        if gen is not None:
            pixels = digit_data.augment(pixels, gen)
        pixels = fit_images(pixels, self.images.channels, self.images.image_size)
        codes = self.images.encode(pixels).tolist()
        keep = task in self.layout.pixels
        captions = [self.captions[task][r] for r in rows]
        if gen is not None and task == "generation" and self.caption_dropout:  # unconditioned samples, for guidance
            drop = (torch.rand(len(rows), generator=gen) < self.caption_dropout).tolist()
            captions = [[] if d else c for c, d in zip(captions, drop, strict=True)]
        docs = []
        for c, code, p in zip(captions, codes, pixels, strict=True):
            ids, mask = self.layout.document(task, c, code, self.response_only)
            docs.append(Doc(ids, mask, p if keep else None))
        return docs


def open_tokenized(path: str | Path, split: str, streaming: bool,
                   cache_dir: Optional[str] = None) -> Optional[Union[datasets.Dataset, datasets.IterableDataset]]:
    """Split `split` of a tokenized dataset: a `save_to_disk` folder (a DatasetDict with train and
    validation, or one Dataset, which is train) or data files; None if the split is absent. Streaming
    reads the same arrow files record by record."""
    path = Path(path)
    if path.is_dir():
        root = path / split if (path / "dataset_dict.json").is_file() else (path if split == "train" else None)
        if root is None or not root.is_dir():
            return None
        if not streaming:
            ds = datasets.load_from_disk(str(root))
        else:
            files = sorted(str(f) for f in root.glob("*.arrow"))
            ds = datasets.load_dataset("arrow", data_files=files, split="train", streaming=True)
    else:
        if split != "train":
            return None
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}[path.suffix]
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=streaming, cache_dir=cache_dir)
    if "image" in (ds.features or {}) and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # decoded for this rank's rows only
    return ds


class TokenizedSource:
    """Records with input_ids, loss_mask, task (and image) from a tokenized dataset, checked one by one."""

    def __init__(self, ds: Union[datasets.Dataset, datasets.IterableDataset], name: str, layout, images,
                 seq_len: int, vocab_size: int, image_fit: str = "crop"):
        missing = {"input_ids", "loss_mask", "task"} - set(ds.column_names or ())
        if missing:
            raise ValueError(f"data.path: {name} lacks the columns {sorted(missing)}; a tokenized dataset needs "
                             "input_ids, loss_mask and task (prepare writes them)")
        self.ds, self.name, self.layout, self.images = ds, name, layout, images
        self.seq_len, self.vocab_size, self.image_fit = seq_len, vocab_size, image_fit
        self.streaming = isinstance(ds, datasets.IterableDataset)
        self.has_image = "image" in ds.column_names
        if not self.streaming:
            tasks = np.asarray(ds.with_format("numpy", columns=["task"])["task"]).astype(str)
            self.rows = {t: np.flatnonzero(self._reads(tasks, t)) for t in TASKS}
            self._text = ds.select_columns(["input_ids", "loss_mask", "task"])
            self.no_image = np.asarray(ds.with_format("arrow", columns=["image"])[:]["image"].is_null()) \
                if self.has_image else np.ones(len(ds), dtype=bool)

    def items(self, task: str, epoch: int, start: int) -> Iterator[Union[Item, BadRecord]]:
        if self.streaming:
            stream = self.ds.map(lambda r, i: {"_row": i}, with_indices=True).filter(
                lambda r: bool(self._reads(np.asarray([r["task"]]).astype(str), task)[0]))
            for record in stream.skip(start):
                yield self._check(record, int(record["_row"]))
            return
        rows = self.rows[task][start:]
        for lo in range(0, len(rows), 256):
            chunk = rows[lo:lo + 256].tolist()
            got = self._text[chunk]
            for j, row in enumerate(chunk):
                yield self._check({k: got[k][j] for k in got}, row)

    @staticmethod
    def _reads(tasks: np.ndarray, task: str) -> np.ndarray:
        """Which records `task`'s stream reads: its own, and for the first task also those with an unknown
        task, so that they are reported as bad records rather than never read."""
        return (tasks == task) | (~np.isin(tasks, TASKS) if task == TASKS[0] else False)

    def _check(self, record: dict, row: int) -> Union[Item, BadRecord]:
        where = f"{self.name} row {row}"
        ids, mask, task = record["input_ids"], record["loss_mask"], record["task"]

        def bad(name: str, problem: str, fix: str = BadRecord.fix) -> BadRecord:
            return BadRecord(where, name, problem, fix)

        if task not in TASKS:
            return bad("task", f"{task!r} is not one of {TASKS}")
        if not ids:
            return bad("input_ids", "empty")
        if len(ids) > self.seq_len:
            return bad("input_ids", f"{len(ids)} tokens, more than data.seq_len={self.seq_len}",
                       f"raise data.seq_len to at least {len(ids)}, or shorten the record")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            return bad("input_ids", f"ids in [{min(ids)}, {max(ids)}], outside the vocabulary [0, {self.vocab_size})")
        if len(mask) != len(ids) or not set(mask) <= {0, 1}:
            return bad("loss_mask", f"must be {len(ids)} zeros and ones, one per input id")
        if not any(mask[1:]):
            return bad("loss_mask", "no targets (a document's first token is never one)")
        no_image = record.get("image") is None if self.streaming else self.no_image[row]
        if task in self.layout.pixels and no_image:
            return bad("image", f"missing: a {task} record needs its image for this model's understanding encoder")
        return Item(len(ids), (row, record) if self.streaming else row, where)

    def docs(self, items: list[Item], task: str, gen: Optional[torch.Generator]) -> list[Doc]:
        if not items:
            return []
        if self.streaming:
            records = [it.key[1] for it in items]
        else:
            got = self.ds[[it.key for it in items]]
            records = [{k: got[k][j] for k in got} for j in range(len(items))]
        docs = []
        for r in records:
            pixels = self._pixels(r["image"]) if task in self.layout.pixels else None
            mask = [0, *r["loss_mask"][1:]]  # nothing precedes a document's first token in its row
            docs.append(Doc(list(r["input_ids"]), mask, pixels))
        return docs

    def _pixels(self, image: dict) -> torch.Tensor:
        from PIL import Image

        pil = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        mode = "L" if self.images.channels == 1 else "RGB"
        x = torch.from_numpy(np.asarray(pil.convert(mode), dtype=np.float32) / 255.0)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        return fit_images(x[None], self.images.channels, self.images.image_size, self.image_fit)[0]

    def captions(self, limit: int) -> list[str]:
        """Up to `limit` distinct captions of the generation records, in stored order (the `text` column
        prepare writes; none when the corpus has no such column): the prompts of the sample grid."""
        if limit <= 0 or "text" not in (self.ds.column_names or ()):
            return []
        found: list[str] = []
        records = self.ds if self.streaming else self.ds.select_columns(["task", "text"])
        for record in records:
            text = record["text"]
            if record["task"] == "generation" and text and text not in found:
                found.append(text)
                if len(found) == limit:
                    break
        return found


def collate(rows: list[list[Doc]], seq_len: int, pad: int, task: str) -> dict[str, Any]:
    """A modality-pure micro-batch from packed rows of documents: input_ids padded with `pad`, labels
    (input_ids where the loss mask is 1, else -100), position_ids restarting at every document (the
    padding counts as one more), pixel_values [n, C, H, W] of the rows' images in reading order."""
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    pixels = []
    for r, docs in enumerate(rows):
        at = 0
        for doc in docs:
            n = len(doc.ids)
            ids = torch.tensor(doc.ids, dtype=torch.long)
            input_ids[r, at:at + n] = ids
            labels[r, at:at + n] = ids.masked_fill(torch.tensor(doc.loss_mask) == 0, -100)
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
            if doc.pixels is not None:
                pixels.append(doc.pixels)
        position_ids[r, at:] = torch.arange(seq_len - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0), "modality": MODALITY[task], "task": task}


@dataclass
class _Cursor:
    """Reading position in one task's records, with a one-record lookahead."""

    epoch: int = 0
    offset: int = 0
    it: Optional[Iterator] = field(default=None, repr=False)
    head: Any = field(default=None, repr=False)
    whole_epoch: bool = False  # this process read the epoch from its start...
    usable: bool = False       # ...and found a usable record in it


class MicroBatchSampler:
    """Modality-pure packed micro-batches, understanding and generation interleaved, sharded over ranks
    (see the module docstring). Augmented views (digits) are drawn from a generator seeded by
    (seed, micro-batch number, rank)."""

    def __init__(self, source, micro_batch_size: int, seq_len: int, pad: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, augment: bool = True, grad_accum: int = 1, on_bad_record: str = "error",
                 log: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size} are invalid: need 0 <= rank < world_size")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} is invalid: must be >= 1")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} is invalid: must be >= 1")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record={on_bad_record!r} is invalid: 'error' or 'skip'")
        self.source, self.micro, self.seq_len, self.pad = source, micro_batch_size, seq_len, pad
        self.rank, self.world, self.grad_accum, self.seed, self.augment = rank, world_size, grad_accum, seed, augment
        self.on_bad_record, self.log = on_bad_record, log and rank == 0
        self.served, self.skipped = 0, 0
        self.cursors = {t: _Cursor() for t in TASKS}

    def _peek(self, task: str):
        c = self.cursors[task]
        while c.head is None:
            if c.it is None:
                c.whole_epoch = c.whole_epoch or c.offset == 0
                c.it = self.source.items(task, c.epoch, c.offset)
            c.head = next(c.it, None)
            if c.head is None:  # the epoch is used up: the next one starts over
                if c.whole_epoch and not c.usable:
                    raise ValueError(f"data: {self.source.name} has no usable {task!r} records; modality-pure "
                                     "micro-batches need records of both tasks")
                self.cursors[task] = c = _Cursor(c.epoch + 1)
        return c.head

    def _advance(self, task: str) -> None:
        c = self.cursors[task]
        c.offset, c.head = c.offset + 1, None

    def _pack(self, task: str) -> list[list[Item]]:
        """The rows of the next global micro-batch of `task`, consuming its records."""
        rows: list[list[Item]] = [[] for _ in range(self.world * self.micro)]
        r, used = 0, 0
        while True:
            item = self._peek(task)
            if isinstance(item, BadRecord):
                if self.on_bad_record == "error":
                    raise BadRecordError(item.message())
                self.skipped += 1
                if self.log:
                    print(f"[distopt] skipped bad record {self.skipped}: {item.where}, field {item.field!r}: "
                          f"{item.problem}", file=sys.stderr)
                self._advance(task)
                continue
            if used + item.length > self.seq_len:
                if r + 1 == len(rows):
                    return rows
                r, used = r + 1, 0
            rows[r].append(item)
            used += item.length
            self.cursors[task].usable = True
            self._advance(task)

    def next_micro_batch(self) -> dict[str, Any]:
        task = TASKS[self.served % 2]
        mine = self._pack(task)[self.rank * self.micro:(self.rank + 1) * self.micro]
        gen = torch.Generator().manual_seed(mixed_seed(self.seed, self.served, self.rank)) if self.augment else None
        docs = iter(self.source.docs([it for row in mine for it in row], task, gen))
        self.served += 1
        return collate([[next(docs) for _ in row] for row in mine], self.seq_len, self.pad, task)

    def next_step(self) -> list[dict[str, Any]]:
        """The grad_accum micro-batches of this rank for one optimizer step."""
        return [self.next_micro_batch() for _ in range(self.grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served, "skipped": self.skipped, "seed": self.seed, "source": self.source.name,
                "positions": {t: [c.epoch, c.offset] for t, c in self.cursors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position from state_dict(); the seed and source must match (else the order differs
        and the position means nothing)."""
        missing = {"served", "positions"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; it must come from MicroBatchSampler.state_dict()")
        for key, mine in (("seed", self.seed), ("source", self.source.name)):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, this sampler has {key}={mine!r}: "
                                 f"resume with the same run seed and data")
        self.served, self.skipped = int(state["served"]), int(state.get("skipped", 0))
        positions = state["positions"]  # {task: [epoch, offset]}
        self.cursors = {t: _Cursor(int(positions[t][0]), int(positions[t][1])) for t in TASKS}
