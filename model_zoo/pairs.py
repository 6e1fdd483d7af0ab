"""A user's image-caption pairs as they keep them, read record by record, so that every bad record is
named by file, row and field whatever the format and whatever the failure (bytes that are not UTF-8
included), and `data.on_bad_record: skip` can skip it.

`data.path` (data.source: pairs) is one of:
- a folder of images (.png .jpg .jpeg .bmp .webp .gif .tif .tiff) with same-named .txt captions;
- a Hugging Face `datasets` folder (`save_to_disk`: a Dataset, or a DatasetDict whose `train` split is read);
- Parquet: one .parquet file, or a folder of them (as datasets on the Hugging Face Hub ship);
- one .jsonl / .json / .csv table.
Tables name their columns `data.image_column` and `data.text_column` (default `image`, `text`). An image
is a path (relative to the table's folder) or, in Parquet and `datasets` folders, a `datasets.Image`
feature (the encoded file in the table). Suffixes are matched whatever their case (PAIRS.JSONL).

`fingerprint` describes the files a corpus is made of (sizes and modification times), so a prepared
corpus can tell when its source has changed.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from model_zoo.data import BadRecord

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TABLES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
UTF8_FIX = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
BATCH = 256


@dataclass(frozen=True)
class Pair:
    """One usable record: where it is (file and row), its image (a file, or the encoded bytes a table
    holds) and its caption (not empty)."""

    where: str
    image: Union[Path, bytes]
    text: str
    fields: tuple[str, str] = ("image", "text")  # the names of its image and caption fields (a table's columns)


Record = Union[Pair, BadRecord]


def corpus_kind(path: Path) -> str:
    """How `path` holds its pairs: images | datasets | parquet | jsonl | json | csv; an error that says
    what was expected when it holds none of them."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "datasets"
        if next(_parquet_files(path), None) is not None:
            return "parquet"
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            return "images"
        raise ValueError(f"data.path: the folder {path} holds no images ({' '.join(IMAGE_SUFFIXES)}), no `datasets` "
                         "folder (save_to_disk) and no .parquet files; point data.path at your images with "
                         "same-named .txt captions, or at a table of pairs")
    kind = TABLES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"data.path: {path} is neither a folder nor a {'/'.join(TABLES)} file (any case)")
    return kind


def read_pairs(path: Path, image_column: str = "image", text_column: str = "text") -> tuple[Optional[int],
                                                                                             Iterator[Record]]:
    """(number of records, or None when unknown before reading; the records in order, each a Pair or a
    BadRecord). A CSV, Parquet or `datasets` table without the named columns is an error up front; a
    JSON record without one is a bad record (JSON has no header)."""
    kind = corpus_kind(path)
    if kind == "images":
        return _folder(path)
    if kind in ("jsonl", "json"):
        return _json(path, kind, image_column, text_column)
    if kind == "csv":
        return None, _csv(path, image_column, text_column)
    return _arrow(path, kind, image_column, text_column)


# -- a folder of images with .txt captions ------------------------------------------------------------


def _folder(path: Path) -> tuple[int, Iterator[Record]]:
    files = sorted(path.iterdir())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    captions = {p.stem: p for p in files if p.suffix.lower() == ".txt"}

    def records() -> Iterator[Record]:
        for row, image in enumerate(images):
            caption = captions.get(image.stem)
            where = f"{caption or image.with_suffix('.txt')} (row {row})"
            if caption is None:
                yield BadRecord(where, "text", f"no caption file beside {image.name}",
                                f"write its caption to {image.with_suffix('.txt').name}")
                continue
            text = _text(caption.read_bytes(), where, "text")
            yield text if isinstance(text, BadRecord) else Pair(where, image, text)

    return len(images), records()


# -- JSON lines, JSON, CSV --------------------------------------------------------------------------


def _json(path: Path, kind: str, image_column: str, text_column: str) -> tuple[int, Iterator[Record]]:
    raw = path.read_bytes()
    if kind == "json":
        try:  # a JSON array of records; anything else is read as JSON lines, as `datasets` does
            rows = json.loads(raw.decode("utf-8-sig", "surrogateescape"))
            if isinstance(rows, list):
                return len(rows), (_row(f"{path} row {i}", path.parent, r, image_column, text_column)
                                   for i, r in enumerate(rows))
        except json.JSONDecodeError:
            pass
    lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]

    def records() -> Iterator[Record]:
        for row, (number, line) in enumerate(lines):
            where = f"{path} row {row} (line {number})"
            try:
                value = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                yield BadRecord(where, "line", f"not valid JSON ({e.msg}, column {e.colno})")
                continue
            yield _row(where, path.parent, value, image_column, text_column)

    return len(lines), records()


def _row(where: str, base: Path, value: Any, image_column: str, text_column: str) -> Record:
    if not isinstance(value, dict):
        return BadRecord(where, "line", f"a JSON {type(value).__name__}, not an object with {image_column!r} and "
                                        f"{text_column!r}")
    for column in (image_column, text_column):
        if column not in value:
            keys = sorted(value)
            return BadRecord(where, column, f"absent (the record has {keys})",
                             f"add it, or set data.{'image' if column == image_column else 'text'}_column to the "
                             "key that holds it")
    return _pair(where, base, value[image_column], value[text_column], image_column, text_column)


def _csv(path: Path, image_column: str, text_column: str) -> Iterator[Record]:
    # surrogateescape: a byte that is not UTF-8 survives decoding, so its cell can be named (_text)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        _require_columns(path, header, image_column, text_column)
        row = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield BadRecord(f"{path} row {row} (line {reader.line_num})", "line", f"not valid CSV ({e})")
                row += 1
                continue
            where = f"{path} row {row} (line {reader.line_num})"
            row += 1
            image, text = cells.get(image_column), cells.get(text_column)
            if image is None or text is None:  # the row is shorter than the header
                column = image_column if image is None else text_column
                found = sum(v is not None for k, v in cells.items() if k)
                yield BadRecord(where, column, f"no cell: the row has {found} of the header's {len(header)} columns")
                continue
            yield _pair(where, path.parent, image, text, image_column, text_column, cell=True)


# -- Parquet and `datasets` folders (Arrow tables) ----------------------------------------------------


def _parquet_files(path: Path) -> Iterator[Path]:
    return (p for p in sorted(path.rglob("*")) if p.suffix.lower() == ".parquet" and p.is_file())


@dataclass(frozen=True)
class _Table:
    """One Arrow table of a corpus: its name (for messages), the folder relative image paths start from,
    its schema and row count, and a function that reads its record batches."""

    name: str
    base: Path
    schema: Any
    rows: int
    batches: Callable[[], Iterable]


def _arrow(path: Path, kind: str, image_column: str, text_column: str) -> tuple[int, Iterator[Record]]:
    """Parquet files or a `datasets` folder, read in record batches."""
    tables = _arrow_tables(path, kind)
    for t in tables:
        _require_columns(t.name, t.schema.names, image_column, text_column)
        _check_types(t.name, t.schema, image_column, text_column)

    def records() -> Iterator[Record]:
        for t in tables:
            row = 0
            for batch in t.batches():
                images = batch.column(image_column).to_pylist()
                texts = _as_bytes(batch.column(text_column)).to_pylist()
                for image, text in zip(images, texts, strict=True):
                    yield _pair(f"{t.name} row {row}", t.base, image, text, image_column, text_column)
                    row += 1

    return sum(t.rows for t in tables), records()


def _arrow_tables(path: Path, kind: str) -> list[_Table]:
    import pyarrow.parquet as pq

    if kind == "parquet":
        files = [path] if path.is_file() else list(_parquet_files(path))
        return [_Table(str(f), f.parent, pf.schema_arrow, pf.metadata.num_rows,
                       functools.partial(pf.iter_batches, batch_size=BATCH))
                for f in files for pf in [pq.ParquetFile(f)]]
    import datasets

    ds = datasets.load_from_disk(str(path))
    name = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"data.path: the `datasets` folder {path} has the splits {sorted(ds)} and no 'train'; "
                             "point data.path at the split to prepare (its folder)")
        ds, name = ds["train"], f"{path} (train)"
    table = ds.with_format("arrow")
    return [_Table(name, path, ds.data.schema, len(ds),
                   lambda: (b for t in table.iter(batch_size=BATCH) for b in t.to_batches()))]


def _require_columns(name: Union[str, Path], columns: Sequence[str], image_column: str, text_column: str) -> None:
    for column, key in ((image_column, "image_column"), (text_column, "text_column")):
        if column not in columns:
            what = "image" if key == "image_column" else "caption"
            raise ValueError(f"data.{key}: {name} has no column {column!r} (its columns: {list(columns)}); set "
                             f"data.{key} to the column that holds the {what}")


def _check_types(name: str, schema, image_column: str, text_column: str) -> None:
    import pyarrow as pa

    image, text = schema.field(image_column).type, schema.field(text_column).type
    image_ok = pa.types.is_string(image) or pa.types.is_large_string(image) or pa.types.is_binary(image) or \
        pa.types.is_large_binary(image) or (pa.types.is_struct(image) and {"bytes", "path"} <= {f.name for f in image})
    if not image_ok:
        raise ValueError(f"data.image_column: {image_column!r} in {name} holds {image}, not images (a datasets.Image "
                         "feature, encoded bytes, or file paths); set data.image_column to the image column")
    if not (pa.types.is_string(text) or pa.types.is_large_string(text)):
        raise ValueError(f"data.text_column: {text_column!r} in {name} holds {text}, not text; set data.text_column "
                         "to the caption column")


def _as_bytes(column):
    """A string column as raw bytes (zero-copy), so that each value's UTF-8 is checked by _text."""
    import pyarrow as pa

    return column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())


# -- one record's fields ------------------------------------------------------------------------------


def _pair(where: str, base: Path, image: Any, text: Any, image_column: str, text_column: str,
          cell: bool = False) -> Record:
    """A Pair, or the first problem of its image or caption field."""
    found = _image(image, base, where, image_column, cell)
    if isinstance(found, BadRecord):
        return found
    caption = _text(text, where, text_column, cell)
    return caption if isinstance(caption, BadRecord) else Pair(where, found, caption, (image_column, text_column))


def _image(value: Any, base: Path, where: str, column: str, cell: bool) -> Union[Path, bytes, BadRecord]:
    if isinstance(value, dict):  # a datasets.Image feature: the file's bytes, or its path
        value = value.get("bytes") or value.get("path")
    if value is None:
        return BadRecord(where, column, "null: no image")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if value else BadRecord(where, column, "empty: no image bytes")
    if not isinstance(value, str):
        return BadRecord(where, column, f"a {type(value).__name__}, not an image path")
    if not value.strip():
        return BadRecord(where, column, "empty cell: no image path" if cell else "empty: no image path")
    return base / value  # a name that is not UTF-8 stays the bytes the file system has (surrogateescape)


def _text(value: Any, where: str, column: str, cell: bool = False) -> Union[str, BadRecord]:
    """A caption's text, stripped; raw bytes must be UTF-8 (a leading byte-order mark is dropped)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return BadRecord(where, column, f"not UTF-8 text: byte 0x{value[e.start]:02x} at offset {e.start}",
                             UTF8_FIX)
    if value is None:
        return BadRecord(where, column, "null: no caption")
    if not isinstance(value, str):
        return BadRecord(where, column, f"a {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a byte kept by surrogateescape: the file is not UTF-8 there
        byte = ord(value[e.start]) - 0xDC00
        return BadRecord(where, column, f"not UTF-8 text: byte 0x{byte:02x} after {value[:e.start][-20:]!r}",
                         UTF8_FIX)
    if not value.strip():
        return BadRecord(where, column, "empty cell: no caption" if cell else "empty caption")
    return value.strip()


# -- fingerprint ---------------------------------------------------------------------------------------


def corpus_files(path: Path, image_column: str = "image", text_column: str = "text") -> list[Path]:
    """The files a corpus is made of: a folder's images and captions; a table, a `datasets` folder's or
    a Parquet folder's files, and the image files its records name (when it names files)."""
    kind = corpus_kind(path)
    if kind == "images":
        return [p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES + (".txt",) and p.is_file()]
    if kind == "datasets":
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path] if path.is_file() else list(_parquet_files(path))
    if kind in ("datasets", "parquet") and not any(_holds_paths(t.schema, image_column)
                                                   for t in _arrow_tables(path, kind)):
        return files  # the images are inside the tables
    _, records = read_pairs(path, image_column, text_column)
    return files + sorted({r.image for r in records if isinstance(r, Pair) and isinstance(r.image, Path)})


def _holds_paths(schema, column: str) -> bool:
    import pyarrow as pa

    return column in schema.names and (pa.types.is_string(schema.field(column).type)
                                       or pa.types.is_large_string(schema.field(column).type))


def fingerprint(path: Path, image_column: str = "image", text_column: str = "text") -> dict:
    """{files, bytes, digest}: how many files the corpus is made of, their size, and a digest of each one's
    path, size and modification time. Any edit, addition or removal changes the digest (a copy that does
    not keep modification times does too)."""
    h, total, files = hashlib.sha256(), 0, corpus_files(path, image_column, text_column)
    root = path if path.is_dir() else path.parent
    for f in files:
        try:
            st = f.stat()
        except OSError:  # a file a record names but that is gone: part of what changed
            h.update(f"{os.fsencode(f)!r}\tmissing\n".encode())
            continue
        total += st.st_size
        name = os.path.relpath(f, root)
        h.update(f"{os.fsencode(name)!r}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "digest": h.hexdigest()[:16]}
