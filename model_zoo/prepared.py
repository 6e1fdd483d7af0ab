"""What a prepared corpus was made from, and whether it still matches the run that reads it.

`python -m model_zoo.prepare` writes `distopt_prepare.json` beside the tokenized dataset. Its
`made_from` is the corpus's key: the source (resolved path, and a fingerprint of its files: count,
bytes, a digest of each file's path, size and modification time), the model family, the text and
image tokenizers (by content: the WordPiece's name, a digest of the checkpoint's tokenizer files or
of its VQ-VAE's config), and every data setting that changes the records (seq_len, text_format,
image_size, image_fit, val_fraction, seed, caption_dropout, the columns). A run whose config gives
another key refuses the prepared corpus with both descriptions and the command that prepares it
again, or with `data.prepare: auto` prepares it again itself. The key is computed from the config
and file contents alone (no tokenizer or model is built), so the launcher checks it with the config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from model_zoo.config import DataConfig, ModelConfig
from model_zoo.digits import caption_corpus
from model_zoo.pairs import fingerprint
from model_zoo.vocab import wordpiece_name

PREPARED_META = "distopt_prepare.json"
FORMAT = 2  # 2: made_from and the `text` column; bump when prepare writes other records
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")
PREPARE_COMMAND = "python -m model_zoo.prepare --config <your run config>"


def text_tokenizer_id(m: ModelConfig, d: DataConfig) -> str:
    """The text tokenizer by content: the WordPiece's name (a function of its training corpus), or a
    digest of the tokenizer files saved in the checkpoint (wherever the checkpoint is copied)."""
    if d.text_tokenizer == "wordpiece":
        return f"wordpiece {wordpiece_name(caption_corpus())}"
    assert m.pretrained is not None  # validate_data: a pretrained tokenizer needs model.pretrained
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(m.pretrained) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return f"pretrained (tokenizer files {h.hexdigest()[:16]})"


def image_tokenizer_id(m: ModelConfig, d: DataConfig) -> str:
    """The image tokenizer: the digits VQ's codebook settings, or a digest of the checkpoint's VQ-VAE config."""
    if d.image_tokenizer == "digits_vq":
        return f"digits_vq (codebook_size {d.codebook_size}, seed {d.seed})"
    assert m.pretrained is not None  # validate_data: a pretrained tokenizer needs model.pretrained
    vq = json.loads((Path(m.pretrained) / "config.json").read_text()).get("vq_config", {})
    return f"pretrained (vq_config {hashlib.sha256(json.dumps(vq, sort_keys=True).encode()).hexdigest()[:16]})"


def made_from(m: ModelConfig, d: DataConfig) -> dict[str, Any]:
    """The key of the prepared corpus this config reads (see the module docstring)."""
    assert d.path is not None  # validate_data: a corpus source has its path
    source = Path(d.path).resolve()
    return dict(source={"path": str(source), **fingerprint(source, d.image_column, d.text_column)},
                family=m.family, text_tokenizer=text_tokenizer_id(m, d), image_tokenizer=image_tokenizer_id(m, d),
                image_size=d.image_size, image_fit=d.image_fit, seq_len=d.seq_len, text_format=d.text_format,
                val_fraction=d.val_fraction, seed=d.seed, caption_dropout=d.caption_dropout,
                columns=[d.image_column, d.text_column])


def read_meta(folder: Path) -> Optional[dict]:
    """The folder's distopt_prepare.json, or None when it has none."""
    f = folder / PREPARED_META
    return json.loads(f.read_text()) if f.is_file() else None


def _show(field: str, value: Any) -> str:
    if field == "source" and isinstance(value, dict):
        return f"{value['path']} ({value['files']} files, {value['bytes']} bytes, digest {value['digest']})"
    return json.dumps(value)


def differences(theirs: dict, mine: dict, fields: Optional[tuple[str, ...]] = None) -> list[str]:
    """One line per field whose value differs: what the corpus was prepared from, what this config has."""
    return [f"  {k}: prepared from {_show(k, theirs.get(k))}, this config has {_show(k, mine[k])}"
            for k in (fields or tuple(mine)) if theirs.get(k) != mine[k]]


def stale_reason(m: ModelConfig, d: DataConfig) -> Optional[str]:
    """None when d.prepared_dir() holds the corpus this config would prepare, else why not."""
    out = d.prepared_dir()
    if not (out / "dataset_dict.json").is_file():
        return f"{out} holds no prepared dataset"
    meta = read_meta(out) or {}
    if meta.get("format") != FORMAT or "made_from" not in meta:
        return f"{out} was prepared by an older model_zoo.prepare, which did not record what it was made from"
    lines = differences(meta["made_from"], made_from(m, d))
    return f"{out} was prepared from other data or settings than this config's:\n" + "\n".join(lines) if lines else None


def check_prepared_corpus(m: ModelConfig, d: DataConfig) -> None:
    """A `pairs` run reads only the corpus its config would prepare (data.prepare: manual); the error
    gives both descriptions and the command that prepares it again."""
    reason = stale_reason(m, d)
    if reason is not None:
        raise ValueError(f"data.prepared: {reason}\nPrepare it: {PREPARE_COMMAND} (or set data.prepare: auto to "
                         "prepare it when the run starts)")


def check_tokenized(path: Path, m: ModelConfig, d: DataConfig) -> None:
    """A prepared corpus read as `data.source: tokenized` must have been made with this config's model
    family and tokenizers (its source and data settings are its own)."""
    meta = read_meta(path)
    if not meta or "made_from" not in meta:
        return
    mine = dict(family=m.family, text_tokenizer=text_tokenizer_id(m, d), image_tokenizer=image_tokenizer_id(m, d))
    lines = differences(meta["made_from"], mine)
    if lines:
        raise ValueError(f"data.path: {path} was prepared for another model or tokenizer:\n" + "\n".join(lines)
                         + f"\nPrepare its pairs again with this config's model and data sections ({PREPARE_COMMAND})")


def check_target(out: Path, source: Path) -> None:
    """prepare writes only into a new or empty folder, or over a corpus prepared from the same source:
    two corpora never share a prepared folder, and a folder of the user's own is never replaced."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    meta = read_meta(out)
    if meta is None:
        raise ValueError(f"data.prepared: {out} exists and is not a corpus written by model_zoo.prepare; point "
                         "data.prepared at a new folder (prepare replaces only corpora it prepared)")
    theirs = meta.get("made_from", {}).get("source", {}).get("path") or str(Path(meta.get("source", "")).resolve())
    if theirs != str(source.resolve()):
        raise ValueError(f"data.prepared: {out} holds the corpus prepared from {theirs}, not from {source.resolve()}; "
                         "point data.prepared at another folder (or leave it unset: each corpus then gets its own "
                         "folder under <cache_dir>/prepared), or delete that folder first")


def check_layout(path: Path, layout) -> None:
    """A dataset written by `prepare` records the vocabulary and layout it was made for; a run with
    another one would read wrong ids."""
    meta = read_meta(path)
    if meta is None:
        return  # a user's own tokenized dataset: its ids are checked record by record
    mine = layout_fingerprint(layout)
    wrong = {k: (meta["layout"].get(k), v) for k, v in mine.items() if meta["layout"].get(k) != v}
    if wrong:
        raise ValueError(f"data.path: {path} was prepared for another model or tokenizer ("
                         + ", ".join(f"{k} {a}, here {b}" for k, (a, b) in wrong.items())
                         + f"); prepare it again with this config ({PREPARE_COMMAND})")


def layout_fingerprint(layout) -> dict:
    """The ids and shapes a document layout writes: what a reader of its records must share."""
    from model_zoo.emu3 import Emu3Layout

    v = layout.vocab
    return dict(family="emu3" if isinstance(layout, Emu3Layout) else "janus", image_offset=v.image_offset,
                codebook_size=v.codebook_size, bos=v.bos, eos=v.eos, sov=v.sov, eov=v.eov, grid=list(layout.grid),
                n_visual=getattr(layout, "n_visual", 0))
