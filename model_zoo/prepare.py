"""Tokenize a user's image-caption pairs once into an on-disk Hugging Face `datasets` dataset.

    python -m model_zoo.prepare --config configs/my_run.yaml [--set data.path=...] [--set ...]

Reads the config's `model` and `data` sections (data.source: pairs). Pairs come from `data.path` in
any of the layouts model_zoo/pairs.py reads: a folder of images with same-named .txt captions, a
`datasets` folder or Parquet files (an Image feature column and a text column), or a .jsonl / .json /
.csv table (`data.image_column`, `data.text_column`). Each pair gives two records, an understanding
one (image -> caption) and a generation one (caption -> image): `input_ids`, `loss_mask` (1: a
target), `task`, `text` (the caption the record holds), `source` (file and row), and for a model
whose understanding encoder reads pixels (Janus) the resized `image`. With `data.caption_dropout`, that
share of generation records (seeded) gets an empty caption, so that the model also learns the
unconditioned image distribution classifier-free guidance samples from. The text tokenizer is the
checkpoint's or the project's WordPiece, the image tokenizer the checkpoint's VQ-VAE or the project's
digits VQ (`data.text_tokenizer`, `data.image_tokenizer`); images are converted to the tokenizer's
channels and made square by `data.image_fit` (crop | squash | pad) before an antialiased resize.
Pairs are split into train / validation (`data.val_fraction`, seeded by `data.seed`, by pair, so both
records of a pair land in one split) and the records shuffled once, seeded.

The dataset is written to `data.prepared` (default: a folder under <cache_dir>/prepared named after
the corpus and its resolved path) atomically: a temporary folder beside it, renamed into place, so a
failure (a full disk included: the error names the folder and says there is no space) leaves the
previous corpus as it was and no temporary folder behind. `distopt_prepare.json` records what it was
made from (model_zoo/prepared.py: a run checks it), counts, skips, how many images were not square
and how many words became [UNK]. A folder that holds another corpus, or that prepare did not write, is
never replaced.

A bad pair (unreadable image, a caption that is empty or not UTF-8, a cell missing, a document longer
than `data.seq_len`) stops with an error naming the file, row and field and its fix; with
`data.on_bad_record: skip` it is counted and logged.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, TextIO, Union

import datasets
import numpy as np
import torch
import yaml

from model_zoo.build import build_image_tokenizer, build_vocab, layout_for
from model_zoo.config import DataConfig, ModelConfig, validate_data, validate_model
from model_zoo.data import TASKS, BadRecord, BadRecordError, fit_images, mixed_seed
from model_zoo.images import png_bytes, to_uint8
from model_zoo.pairs import Pair, read_pairs
from model_zoo.prepared import FORMAT, PREPARED_META, check_target, layout_fingerprint, made_from, stale_reason

FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "loss_mask": datasets.Sequence(datasets.Value("int8")),
                              "task": datasets.Value("string"), "text": datasets.Value("string"),
                              "image": datasets.Image(), "source": datasets.Value("string"),
                              "split": datasets.Value("string")})
# a write that fails for want of room: the disk is full, the quota or the file size limit is reached
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def load_image(image: Union[Path, bytes], channels: int, size: int, fit: str = "crop") -> tuple[torch.Tensor, bool]:
    """([C, size, size] in [0, 1], whether the image was not square); raises on an unreadable file.
    The EXIF orientation is applied first, as photo viewers show the picture."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as pil:
        upright = ImageOps.exif_transpose(pil)
        x = torch.from_numpy(np.asarray(upright.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return fit_images(x[None], channels, size, fit)[0], x.shape[1] != x.shape[2]


class Preparer:
    """Turns pairs into records of both tasks, chunk by chunk (the image tokenizer encodes a chunk at once)."""

    def __init__(self, m: ModelConfig, d: DataConfig, log: Optional[TextIO] = None):
        self.d, self.log = d, log or sys.stderr
        self.vocab = build_vocab(d, m)
        self.images = build_image_tokenizer(d, m)
        self.layout = layout_for(m, self.vocab, self.images.grid)
        self.skipped: Counter = Counter()
        self.counts: Counter = Counter()
        self.unknown: Counter = Counter()  # words that became [UNK], and how often

    def bad(self, record: BadRecord) -> None:
        if self.d.on_bad_record == "error":
            raise BadRecordError(record.message())
        self.skipped[record.field] += 1
        print(f"[prepare] skipped {record.where}, field {record.field!r}: {record.problem}", file=self.log)

    def records(self, pairs: Iterator, total: Optional[int], progress: bool) -> Iterator[dict]:
        from tqdm import tqdm

        chunk = []
        for pair in tqdm(pairs, total=total, desc="prepare", unit="pair", disable=not progress, file=self.log):
            chunk.append(pair)
            if len(chunk) == 64:
                yield from self._chunk(chunk)
                chunk = []
        yield from self._chunk(chunk)

    def _chunk(self, pairs: list[Union[Pair, BadRecord]]) -> Iterator[dict]:
        ready = []
        for pair in pairs:
            if isinstance(pair, BadRecord):
                self.bad(pair)
                continue
            try:
                pixels, not_square = load_image(pair.image, self.images.channels, self.images.image_size,
                                                self.d.image_fit)
            except Exception as e:
                what = pair.image if isinstance(pair.image, Path) else f"its {len(pair.image)} image bytes"
                self.bad(BadRecord(f"{pair.where}: {what}", pair.fields[0],
                                   f"unreadable ({type(e).__name__}: {e})"))
                continue
            self.counts["not_square"] += not_square
            ready.append((pair, pixels))
        if not ready:
            return
        codes = self.images.encode(torch.stack([p for _, p in ready])).tolist()
        for (pair, pixels), code in zip(ready, codes, strict=True):
            yield from self._records(pair, pixels, code)

    def _records(self, pair: Pair, pixels: torch.Tensor, code: list[int]) -> Iterator[dict]:
        """The two records of one pair, or none (a bad record) when its longer document exceeds seq_len."""
        caption, index = self.vocab.text(pair.text), self.counts["pairs"]
        dropped = mixed_seed(self.d.seed, index, 1) % 10**6 < self.d.caption_dropout * 10**6
        captions = {"understanding": caption, "generation": [] if dropped else caption}
        docs = {t: self.layout.document(t, captions[t], code, self.d.text_format == "instruct") for t in TASKS}
        longest = max(len(ids) for ids, _ in docs.values())
        if longest > self.d.seq_len:
            self.bad(BadRecord(pair.where, pair.fields[1],
                               f"a {len(caption)}-token caption makes a {longest}-token document, more than "
                               f"data.seq_len={self.d.seq_len}",
                               f"raise data.seq_len to at least {longest}, or shorten the caption"))
            return
        unknown = self.vocab.unknown_words(pair.text)
        self.unknown.update(unknown)
        self.counts["captions_with_unknown"] += bool(unknown)
        split = "validation" if mixed_seed(self.d.seed, index) % 10**6 < self.d.val_fraction * 10**6 else "train"
        self.counts["pairs"] += 1
        for task, (ids, mask) in docs.items():
            self.counts[f"{split}/{task}"] += 1
            image = {"bytes": png_bytes(to_uint8(pixels)), "path": None} if task in self.layout.pixels else None
            text = pair.text if captions[task] else ""
            yield dict(input_ids=ids, loss_mask=mask, task=task, text=text, image=image, source=pair.where,
                       split=split)

    def notes(self) -> list[str]:
        """What the user should know about the corpus beyond the counts: images made square, unknown words."""
        out = []
        if self.counts["not_square"]:
            how = {"crop": "centre-cropped to a square", "pad": "padded to a square with mid-grey",
                   "squash": "squashed to a square (their aspect changed)"}[self.d.image_fit]
            out.append(f"{self.counts['not_square']} images were not square: {how} (data.image_fit: "
                       f"{self.d.image_fit}; crop | squash | pad)")
        if self.unknown:
            examples = ", ".join(repr(w) for w, _ in self.unknown.most_common(5))
            out.append(f"{sum(self.unknown.values())} words in {self.counts['captions_with_unknown']} of "
                       f"{self.counts['pairs']} captions became [UNK], the text tokenizer does not know them (most "
                       f"frequent: {examples}); use "
                       "data.text_tokenizer: pretrained with a checkpoint whose tokenizer knows your words")
        return out


@contextlib.contextmanager
def no_space_named(out: Path) -> Iterator[None]:
    """A write that fails for want of room (anywhere in the exception's chain: `datasets` wraps what its
    writers raise) becomes an error naming the folder being written, and the fix."""
    try:
        yield
    except Exception as e:
        chain: list[BaseException] = []
        link: Optional[BaseException] = e
        while link is not None and link not in chain:  # contexts can loop back (re-raised causes)
            chain.append(link)
            link = link.__cause__ or link.__context__
        cause = next((c for c in chain if isinstance(c, OSError) and c.errno in NO_SPACE), None)
        if cause is None:
            raise
        raise ValueError(f"data.prepared: no space left to write {out} ({cause.strerror}); nothing was replaced "
                         f"there and the temporary files are removed. Free space on that disk or point "
                         "data.prepared at one with room") from e


def prepare(m: ModelConfig, d: DataConfig, progress: bool = True, log: Optional[TextIO] = None) -> Path:
    """Write the tokenized dataset of `d.path` to `d.prepared_dir()`; returns that folder."""
    validate_model(m)
    validate_data(d, m)
    if d.source != "pairs":
        raise ValueError(f"data.source: {d.source!r}; prepare tokenizes image-caption pairs, set it to 'pairs'")
    out = d.prepared_dir()
    assert d.path is not None  # validate_data: source 'pairs' has its path
    check_target(out, Path(d.path))
    key = made_from(m, d)  # before reading: an edit during the preparation makes the result stale, not wrong
    out.parent.mkdir(parents=True, exist_ok=True)
    prep = Preparer(m, d, log)
    total, pairs = read_pairs(Path(d.path), d.image_column, d.text_column)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with no_space_named(out):
            dataset = _write(prep, pairs, total, progress, work, d)
            meta = dict(format=FORMAT, made_from=key, layout=layout_fingerprint(prep.layout),
                        pairs=prep.counts["pairs"], records={k: v for k, v in prep.counts.items() if "/" in k},
                        skipped=dict(prep.skipped), not_square=prep.counts["not_square"],
                        unknown_words=dict(prep.unknown.most_common(100)))
            (dataset / PREPARED_META).write_text(json.dumps(meta, indent=1))
        _replace(out, dataset, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    records = ", ".join(f"{k} {v}" for k, v in sorted(prep.counts.items()) if "/" in k)
    print(f"[prepare] {prep.counts['pairs']} pairs -> {out} ({records}); skipped {sum(prep.skipped.values())} "
          f"{dict(prep.skipped) or ''}".rstrip(), file=prep.log)
    for note in prep.notes():
        print(f"[prepare] {note}", file=prep.log)
    return out


def _write(prep: Preparer, pairs: Iterator, total: Optional[int], progress: bool, work: Path, d: DataConfig) -> Path:
    """The records, split and shuffled, saved under `work`; returns the dataset's folder."""
    datasets.disable_progress_bars()
    try:
        # a fresh cache folder, so the fingerprint only has to be unique (hashing the generator would pickle it)
        every = datasets.Dataset.from_generator(lambda: prep.records(pairs, total, progress), features=FEATURES,
                                                cache_dir=str(work / "cache"), fingerprint=work.name)
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise
    if not prep.counts["pairs"]:
        raise ValueError(f"data.path: {d.path} gave no usable pairs ({dict(prep.skipped)} skipped)")
    if not any(prep.layout.pixels):
        every = every.remove_columns("image")
    splits = {s: every.filter(lambda r, s=s: r["split"] == s).remove_columns("split")
              .shuffle(seed=d.seed).flatten_indices() for s in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(str(work / "dataset"))
    return work / "dataset"


def _replace(out: Path, new: Path, work: Path) -> None:
    """`new` becomes `out`; a previous `out` is moved into `work` first (removed with it), and put back
    if the move of `new` fails, so `out` is always a whole corpus, old or new."""
    old = work / "previous"
    if out.exists():
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise


def prepare_if_needed(m: ModelConfig, d: DataConfig, log: Optional[TextIO] = None) -> None:
    """With data.prepare: auto, prepare a `pairs` corpus whose prepared folder is missing or stale
    (model_zoo/prepared.py), saying why; otherwise nothing (a manual run's config check refused it)."""
    if d.source != "pairs" or d.prepare != "auto":
        return
    reason = stale_reason(m, d)
    if reason is not None:
        print(f"[prepare] data.prepare: auto; {reason}\n[prepare] preparing it", file=log or sys.stderr)
        prepare(m, d, progress=False, log=log)


def load_sections(path: str, overrides: list[str]) -> tuple[ModelConfig, DataConfig]:
    """The `model` and `data` sections of a run config, with `section.key=value` overrides (YAML values)."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, eq, value = item.partition("=")
        section, dot, leaf = key.partition(".")
        if not (eq and dot and leaf):
            raise ValueError(f"--set {item!r}: expected section.key=value")
        cfg.setdefault(section, {})[leaf] = yaml.safe_load(value)
    sections = []
    for name, cls in (("model", ModelConfig), ("data", DataConfig)):
        values = cfg.get(name) or {}
        valid = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"{name}.{unknown[0]}: unknown key; valid keys are {valid}")
        sections.append(cls(**values))
    m, d = sections
    assert isinstance(m, ModelConfig) and isinstance(d, DataConfig)
    return m, d


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        model_cfg, data_cfg = load_sections(args.config, args.set)
        prepare(model_cfg, data_cfg, progress=not args.no_progress)
    except ValueError as e:
        sys.exit(f"prepare: {e}")


if __name__ == "__main__":
    main()
