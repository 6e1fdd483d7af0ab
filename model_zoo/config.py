"""The `model` and `data` sections of a run's YAML config: typed, validated field by field, each error
`field: value is invalid: rule; fix`. The launcher's config embeds both; `python -m model_zoo.prepare`
reads them from the same file.

    model: family (emu3 | janus), size (tiny | emu3_8b | janus_1_3b; unset: tiny, or the checkpoint's
           shape), pretrained (a local checkpoint directory in transformers' layout), overrides (text-config
           fields; with a checkpoint, only fields that keep its shapes)
    data:  source (digits | pairs | tokenized), path, prepared, prepare (manual | auto), image_column,
           text_column, streaming, seq_len, on_bad_record (error | skip), image_tokenizer (digits_vq |
           pretrained), text_tokenizer (wordpiece | pretrained), image_size, image_fit (crop | squash | pad),
           cache_dir, seed, codebook_size, val_fraction, augment, caption_dropout, text_format (plain | instruct)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from model_zoo.data import IMAGE_FITS
from model_zoo.digits import FORMATS

FAMILY_SIZES = {"emu3": ("tiny", "emu3_8b"), "janus": ("tiny", "janus_1_3b")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SOURCES = ("digits", "pairs", "tokenized")
IMAGE_TOKENIZERS = ("digits_vq", "pretrained")
TEXT_TOKENIZERS = ("wordpiece", "pretrained")
BAD_RECORD = ("error", "skip")
PREPARE = ("manual", "auto")
TOKENIZED_FILES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass
class ModelConfig:
    family: str = "emu3"
    size: Optional[str] = None
    pretrained: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    dtype: str = "float32"  # bfloat16: bf16 parameters and compute (the optimizer keeps fp32 masters)
    activation_checkpointing: bool = False  # non-reentrant torch.utils.checkpoint on every decoder layer


@dataclass
class DataConfig:
    source: str = "digits"
    path: Optional[str] = None       # pairs: a folder or a .jsonl/.csv/.parquet file; tokenized: a dataset
    prepared: Optional[str] = None   # pairs: where `prepare` writes the tokenized dataset (default under cache_dir)
    prepare: str = "manual"          # pairs: auto re-prepares a missing or stale prepared corpus; manual refuses it
    image_column: str = "image"      # pairs tables: the column of images (paths, or a datasets.Image feature)
    text_column: str = "text"        # pairs tables: the column of captions
    streaming: bool = False          # tokenized/pairs: stream records (IterableDataset) instead of memory-mapping
    seq_len: int = 64                # every row of a micro-batch: documents packed, then padded to this length
    on_bad_record: str = "error"     # skip: count and log a bad record instead of stopping
    image_tokenizer: str = "digits_vq"
    text_tokenizer: str = "wordpiece"
    image_size: Optional[int] = None  # pixels per side for a checkpoint's VQ-VAE (Janus: its own; digits: 8)
    image_fit: str = "crop"  # a non-square image: centre crop, squash (aspect changes) or pad (mid-grey)
    cache_dir: str = ".cache/distopt"
    seed: int = 0  # fixes the split, the VQ codebook and prepare's order, so runs of any run.seed share them
    codebook_size: int = 64
    val_fraction: float = 0.1
    augment: bool = True
    caption_dropout: float = 0.0  # share of generation documents with an empty caption (guidance); pairs: by prepare
    text_format: str = "plain"  # instruct: instructions and answers, loss on the response only

    def prepared_dir(self) -> Path:
        """Where the tokenized dataset of a `pairs` source lives: data.prepared, else a folder under
        cache_dir named by the corpus's stem and a digest of its resolved path, so that two corpora (two
        `pairs.jsonl` in different folders) never share one."""
        if self.prepared:
            return Path(self.prepared)
        source = Path(self.path or "pairs")
        digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
        return Path(self.cache_dir) / "prepared" / f"{source.stem}-{digest}"


def is_placeholder(value: Optional[str]) -> bool:
    """A value a shipped config leaves for the user to fill in: `<...>`."""
    return isinstance(value, str) and value.strip().startswith("<") and value.strip().endswith(">")


def _check(cond: bool, field_path: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field_path}: {message}")


def validate_model(m: ModelConfig) -> None:
    import transformers

    from model_zoo.unified import check_overrides, override_keys

    _check(m.family in FAMILY_SIZES, "model.family", f"{m.family!r} is unknown; choose one of {sorted(FAMILY_SIZES)}")
    sizes = FAMILY_SIZES[m.family]
    _check(m.size is None or m.size in sizes, "model.size",
           f"{m.size!r} is not a {m.family} size; choose one of {sizes} (or leave it unset)")
    if m.pretrained is not None:
        _check(not is_placeholder(m.pretrained), "model.pretrained",
               f"{m.pretrained!r} is a placeholder; set it to your local checkpoint directory (transformers' "
               "save_pretrained layout: config.json + safetensors)")
        _check(Path(m.pretrained).is_dir(), "model.pretrained",
               f"{m.pretrained!r} is not a directory; point it at a local checkpoint (nothing is downloaded)")
        check_checkpoint_files(Path(m.pretrained))
    _check(isinstance(m.overrides, dict), "model.overrides", f"{m.overrides!r} must be a mapping of text-config fields")
    _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r}; choose one of {tuple(DTYPES)}")
    _check(isinstance(m.activation_checkpointing, bool), "model.activation_checkpointing",
           f"{m.activation_checkpointing!r} must be true or false")
    text = {"emu3": "Emu3TextConfig", "janus": "LlamaConfig"}[m.family]
    extra = ("vision_loss_weight",) if m.family == "emu3" else ()
    check_overrides(m.overrides, override_keys(getattr(transformers, text), extra), m.pretrained)


def check_checkpoint_files(path: Path) -> None:
    """Every file a checkpoint needs is there before anything loads it: config.json, and the weights
    (model.safetensors, or every shard its model.safetensors.index.json lists)."""
    _check((path / "config.json").is_file(), "model.pretrained",
           f"{path} has no config.json; point it at a directory written by save_pretrained")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"model.pretrained: {index} is unreadable ({type(e).__name__}: {e}); copy the "
                             "checkpoint again") from None
        missing = [s for s in shards if not (path / s).is_file()]
        _check(not missing, "model.pretrained",
               f"{path} lacks {len(missing)} of the {len(shards)} weight shards that model.safetensors.index.json "
               f"lists: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; copy the complete checkpoint "
               "(every shard) into it")
        return
    _check((path / "model.safetensors").is_file(), "model.pretrained",
           f"{path} has no model.safetensors (nor model.safetensors.index.json); point it at a directory written by "
           "save_pretrained, with its weights")


def validate_data(d: DataConfig, m: ModelConfig) -> None:
    _check(d.source in SOURCES, "data.source", f"{d.source!r} is unknown; choose one of {SOURCES}")
    if d.source == "digits":
        _check(d.path is None, "data.path", f"{d.path!r} is set, but source 'digits' reads no files; remove it "
               "or set data.source: pairs | tokenized")
        _check(not d.streaming, "data.streaming", "true, but the digits live in memory; set it false")
    else:
        _check(d.path is not None, "data.path", f"null, but source {d.source!r} reads a corpus; point it at one")
        assert d.path is not None  # _check raised otherwise
        _check(not is_placeholder(d.path), "data.path",
               f"{d.path!r} is a placeholder; set it to your corpus (source {d.source!r}: "
               + ("a folder of images with same-named .txt captions, or a .jsonl/.csv/.parquet file with "
                  "'image' and 'text' columns)" if d.source == "pairs" else
                  "a dataset written by `python -m model_zoo.prepare`, or files with input_ids, loss_mask, task)"))
        _check(Path(d.path).exists(), "data.path", f"{d.path!r} does not exist")
        if d.source == "pairs":
            from model_zoo.pairs import corpus_kind

            corpus_kind(Path(d.path))  # a folder or table that holds pairs, else an error saying what would
        else:
            _check(Path(d.path).is_dir() or Path(d.path).suffix.lower() in TOKENIZED_FILES, "data.path",
                   f"{d.path!r} is neither a folder nor a {'/'.join(TOKENIZED_FILES)} file")
    for name in ("image_column", "text_column"):
        _check(isinstance(getattr(d, name), str) and bool(getattr(d, name)), f"data.{name}",
               f"{getattr(d, name)!r} must be a column name")
    _check(d.prepare in PREPARE, "data.prepare", f"{d.prepare!r}; choose one of {PREPARE}")
    _check(d.image_fit in IMAGE_FITS, "data.image_fit", f"{d.image_fit!r}; choose one of {IMAGE_FITS}")
    _check(d.on_bad_record in BAD_RECORD, "data.on_bad_record", f"{d.on_bad_record!r}; choose one of {BAD_RECORD}")
    _check(isinstance(d.streaming, bool), "data.streaming", f"{d.streaming!r} must be true or false")
    _check(isinstance(d.seq_len, int) and d.seq_len >= 8, "data.seq_len", f"{d.seq_len!r} must be an integer >= 8")
    _check(d.image_tokenizer in IMAGE_TOKENIZERS, "data.image_tokenizer",
           f"{d.image_tokenizer!r}; choose one of {IMAGE_TOKENIZERS}")
    _check(d.text_tokenizer in TEXT_TOKENIZERS, "data.text_tokenizer",
           f"{d.text_tokenizer!r}; choose one of {TEXT_TOKENIZERS}")
    for name in ("image_tokenizer", "text_tokenizer"):
        _check(getattr(d, name) != "pretrained" or m.pretrained is not None, f"data.{name}",
               "'pretrained' uses the checkpoint's own; set model.pretrained to it")
    _check(d.image_size is None or (isinstance(d.image_size, int) and d.image_size >= 1), "data.image_size",
           f"{d.image_size!r} must be an integer >= 1 or null")
    _check(d.image_tokenizer == "pretrained" or d.image_size in (None, 8), "data.image_size",
           f"{d.image_size!r}, but digits_vq tokenizes 8x8 images; remove it or use image_tokenizer: pretrained")
    _check(isinstance(d.codebook_size, int) and 2 <= d.codebook_size <= 4096, "data.codebook_size",
           f"{d.codebook_size!r} must be an integer in [2, 4096]")
    _check(isinstance(d.val_fraction, (int, float)) and 0.0 < d.val_fraction < 1.0, "data.val_fraction",
           f"{d.val_fraction} must be in (0, 1)")
    _check(isinstance(d.caption_dropout, (int, float)) and 0.0 <= d.caption_dropout < 1.0, "data.caption_dropout",
           f"{d.caption_dropout!r} must be in [0, 1)")
    _check(d.source != "tokenized" or not d.caption_dropout, "data.caption_dropout",
           f"{d.caption_dropout}, but a tokenized corpus is read as written; prepare it from its pairs with "
           "data.caption_dropout set (python -m model_zoo.prepare), or set 0")
    _check(d.text_format in FORMATS, "data.text_format", f"{d.text_format!r}; choose one of {FORMATS}")
    existing = Path(d.cache_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    _check(existing.is_dir(), "data.cache_dir", f"{d.cache_dir!r} cannot be created: {existing} is not a directory")
