"""Tokenize a user's image-caption pairs once into an on-disk Hugging Face `datasets` dataset.

    python -m model_zoo.prepare --config configs/my_run.yaml [--set data.path=...] [--set ...]

Reads the config's `model` and `data` sections (data.source: pairs). Pairs come from `data.path`:
- a folder of images (.png, .jpg, .jpeg, .bmp, .webp) each with a caption in a same-named .txt file;
- a .jsonl / .json / .csv / .parquet file with an `image` column (a path, relative to the file's
  folder) and a `text` column.
Each pair gives two records, an understanding one (image -> caption) and a generation one
(caption -> image): `input_ids`, `loss_mask` (1: a target), `task`, `source` (file and row), and for
a model whose understanding encoder reads pixels (Janus) the resized `image`. The text tokenizer is
the checkpoint's or the project's WordPiece, the image tokenizer the checkpoint's VQ-VAE or the
project's digits VQ (`data.text_tokenizer`, `data.image_tokenizer`); images are converted to the
tokenizer's channels and size. Pairs are split into train / validation (`data.val_fraction`, seeded
by `data.seed`, by pair, so both records of a pair land in one split) and the records shuffled
once, seeded. The dataset is written to `data.prepared` (default: <cache_dir>/prepared/<name>)
atomically (a temporary folder renamed into place), with `distopt_prepare.json` recording what it was
made for and how many records were skipped.

A bad pair (unreadable image, empty caption, a document longer than `data.seq_len`) stops with an
error naming the file, row and field; with `data.on_bad_record: skip` it is counted and logged.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, TextIO

import datasets
import numpy as np
import torch
import yaml

from model_zoo.build import PREPARED_META, build_image_tokenizer, build_vocab, layout_fingerprint, layout_for
from model_zoo.config import DataConfig, ModelConfig, validate_data, validate_model
from model_zoo.data import TASKS, BadRecord, BadRecordError, fit_images, mixed_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "loss_mask": datasets.Sequence(datasets.Value("int8")),
                              "task": datasets.Value("string"), "image": datasets.Image(),
                              "source": datasets.Value("string"), "split": datasets.Value("string")})


def read_pairs(path: Path) -> tuple[int, Iterator[tuple[str, Optional[Path], Optional[str]]]]:
    """(number of pairs, iterator of (where, image path, caption)); a missing caption or image path
    comes through as None, for the caller to report."""
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

        def folder():
            for row, image in enumerate(images):
                text = image.with_suffix(".txt")
                yield f"{text} (row {row})", image, text.read_text() if text.is_file() else None

        return len(images), folder()
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    table = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    missing = {"image", "text"} - set(table.column_names)
    if missing:
        raise ValueError(f"data.path: {path} lacks the columns {sorted(missing)}; pairs need 'image' (a path) "
                         "and 'text'")

    def rows():
        for row, r in enumerate(table):
            image = r["image"]
            yield f"{path} row {row}", (path.parent / image) if image else None, r["text"]

    return len(table), rows()


def load_image(path: Optional[Path], channels: int, size: int) -> torch.Tensor:
    """[C, size, size] in [0, 1]; raises on a missing or unreadable file."""
    from PIL import Image

    if path is None:
        raise ValueError("no image path")
    with Image.open(path) as pil:
        x = torch.from_numpy(np.asarray(pil.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return fit_images(x[None], channels, size)[0]


def png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    x = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(x[0].numpy()) if x.shape[0] == 1 else Image.fromarray(x.permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


class Preparer:
    """Turns pairs into records of both tasks, chunk by chunk (the image tokenizer encodes a chunk at once)."""

    def __init__(self, m: ModelConfig, d: DataConfig, log: Optional[TextIO] = None):
        self.d, self.log = d, log or sys.stderr
        self.vocab = build_vocab(d, m)
        self.images = build_image_tokenizer(d, m)
        self.layout = layout_for(m, self.vocab, self.images.grid)
        self.skipped: Counter = Counter()
        self.counts: Counter = Counter()

    def bad(self, record: BadRecord) -> None:
        if self.d.on_bad_record == "error":
            raise BadRecordError(record.message())
        self.skipped[record.field] += 1
        print(f"[prepare] skipped {record.where}, field {record.field!r}: {record.problem}", file=self.log)

    def records(self, pairs: Iterator, total: int, progress: bool) -> Iterator[dict]:
        from tqdm import tqdm

        chunk = []
        for pair in tqdm(pairs, total=total, desc="prepare", unit="pair", disable=not progress, file=self.log):
            chunk.append(pair)
            if len(chunk) == 64:
                yield from self._chunk(chunk)
                chunk = []
        yield from self._chunk(chunk)

    def _chunk(self, pairs: list) -> Iterator[dict]:
        ready = []
        for where, image_path, text in pairs:
            if text is None or not text.strip():
                self.bad(BadRecord(where, "text", "empty caption" if text is not None else "no caption (.txt) file"))
                continue
            try:
                pixels = load_image(image_path, self.images.channels, self.images.image_size)
            except Exception as e:
                self.bad(BadRecord(f"{where}: {image_path}", "image", f"unreadable ({type(e).__name__}: {e})"))
                continue
            ready.append((where, pixels, self.vocab.text(text.strip())))
        if not ready:
            return
        codes = self.images.encode(torch.stack([p for _, p, _ in ready])).tolist()
        for (where, pixels, caption), code in zip(ready, codes):
            docs = {t: self.layout.document(t, caption, code, self.d.text_format == "instruct") for t in TASKS}
            longest = max(len(ids) for ids, _ in docs.values())
            if longest > self.d.seq_len:
                self.bad(BadRecord(where, "text", f"a {len(caption)}-token caption makes a {longest}-token document, "
                                                  f"more than data.seq_len={self.d.seq_len}"))
                continue
            split = "validation" if mixed_seed(self.d.seed, self.counts["pairs"]) % 10**6 < self.d.val_fraction * 10**6 \
                else "train"
            self.counts["pairs"] += 1
            for task, (ids, mask) in docs.items():
                self.counts[f"{split}/{task}"] += 1
                image = {"bytes": png(pixels), "path": None} if task in self.layout.pixels else None
                yield dict(input_ids=ids, loss_mask=mask, task=task, image=image, source=where, split=split)


def prepare(m: ModelConfig, d: DataConfig, progress: bool = True, log: Optional[TextIO] = None) -> Path:
    """Write the tokenized dataset of `d.path` to `d.prepared_dir()`; returns that folder."""
    validate_model(m)
    validate_data(d, m)
    if d.source != "pairs":
        raise ValueError(f"data.source: {d.source!r}; prepare tokenizes image-caption pairs, set it to 'pairs'")
    out = d.prepared_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    prep = Preparer(m, d, log)
    total, pairs = read_pairs(Path(d.path))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        datasets.disable_progress_bars()
        try:
            # a fresh cache folder, so the fingerprint only has to be unique (hashing the generator would pickle it)
            every = datasets.Dataset.from_generator(lambda: prep.records(pairs, total, progress), features=FEATURES,
                                                    cache_dir=str(work / "cache"), fingerprint=work.name)
        except datasets.exceptions.DatasetGenerationError as e:
            raise (e.__cause__ if isinstance(e.__cause__, ValueError) else e) from None
        if not prep.counts["pairs"]:
            raise ValueError(f"data.path: {d.path} gave no usable pairs ({dict(prep.skipped)} skipped)")
        if not any(prep.layout.pixels):
            every = every.remove_columns("image")
        splits = {s: every.filter(lambda r, s=s: r["split"] == s).remove_columns("split")
                  .shuffle(seed=d.seed).flatten_indices() for s in ("train", "validation")}
        datasets.DatasetDict(splits).save_to_disk(str(work / "dataset"))
        meta = dict(layout=layout_fingerprint(prep.layout), pairs=prep.counts["pairs"],
                    records={k: v for k, v in prep.counts.items() if "/" in k}, skipped=dict(prep.skipped),
                    source=str(d.path), seq_len=d.seq_len, text_format=d.text_format,
                    tokenizers=[d.text_tokenizer, d.image_tokenizer])
        (work / "dataset" / PREPARED_META).write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        (work / "dataset").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    records = ", ".join(f"{k} {v}" for k, v in sorted(prep.counts.items()) if "/" in k)
    print(f"[prepare] {prep.counts['pairs']} pairs -> {out} ({records}); skipped {sum(prep.skipped.values())} "
          f"{dict(prep.skipped) or ''}".rstrip(), file=prep.log)
    return out


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
    return sections[0], sections[1]


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
