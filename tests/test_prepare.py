"""`python -m model_zoo.prepare` on a user's image-caption pairs written by the test (real digits as
PNG files): records re-derived by hand from the files, a corrupt image and an empty caption named by
file, row and field (or counted with `skip`), a JSONL table, the checkpoint's own tokenizers, and the
prepared corpus read back as training batches. A prepared corpus is keyed by what made it (two
corpora of one name, an edited corpus, another corpus's folder); captions that are not UTF-8 in every
format; `datasets` folders and Parquet with an Image feature; the friction of a first use (a missing
shard, a folder without images, capital suffixes, a too-long caption, unknown words, a full disk).
(Training from it under a launcher: test_run.py.)"""

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from launcher.config import ConfigError, load_config
from model_zoo.build import build_data, build_image_tokenizer, build_vocab, layout_for
from model_zoo.config import DataConfig, ModelConfig, validate_model
from model_zoo.data import TASKS
from model_zoo.digits import caption
from model_zoo.images import write_png
from model_zoo.prepare import main, prepare, prepare_if_needed
from model_zoo.prepared import check_prepared_corpus
from model_zoo.vq import digits

ROOT = Path(__file__).resolve().parents[1]

N = 24


def write_pairs(folder, corrupt=10, empty=15):
    """N digits as 8-bit PNGs with same-named caption files; one unreadable PNG, one empty caption."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits()
    for i in range(N):
        write_png((images[i, 0] * 255).round().to(torch.uint8), folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption(int(labels[i]), i))
    if corrupt is not None:
        (folder / f"{corrupt:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    if empty is not None:
        (folder / f"{empty:03d}.txt").write_text("  \n")
    return folder


def config(tmp_path, cache, family="emu3", **data):
    m = ModelConfig(family=family)
    d = DataConfig(source="pairs", path=str(tmp_path / "pairs"), prepared=str(tmp_path / "prepared"),
                   cache_dir=str(cache), val_fraction=0.25, **data)
    return m, d


def test_bad_pairs_are_named_or_counted(tmp_path, digits_cache, capsys):
    write_pairs(tmp_path / "pairs")
    m, d = config(tmp_path, digits_cache)
    with pytest.raises(ValueError, match=r"010.txt \(row 10\): .*010.png, field 'image': unreadable"):
        prepare(m, d, progress=False)
    assert not (tmp_path / "prepared").exists(), "nothing is written for a failed preparation"
    write_pairs(tmp_path / "pairs", corrupt=None)
    with pytest.raises(ValueError, match=r"015.txt \(row 15\), field 'text': empty caption; .*on_bad_record: skip"):
        prepare(m, d, progress=False)
    write_pairs(tmp_path / "pairs")
    cfg_file = tmp_path / "run.yaml"   # the command line, with the run config's model and data sections
    cfg_file.write_text(yaml.safe_dump({"model": {"family": "emu3"}, "data": {**d.__dict__, "on_bad_record": "skip"}}))
    main(["--config", str(cfg_file), "--set", "data.seq_len=64"])
    err = capsys.readouterr().err
    assert "010.png, field 'image': unreadable" in err and "015.txt (row 15), field 'text': empty caption" in err
    assert "prepare: 100%" in err and f"{N}/{N}" in err, "a progress bar"
    meta = json.loads((tmp_path / "prepared" / "distopt_prepare.json").read_text())
    assert meta["pairs"] == N - 2 and meta["skipped"] == {"image": 1, "text": 1}
    corpus = datasets.load_from_disk(str(tmp_path / "prepared"))
    assert len(corpus["train"]) + len(corpus["validation"]) == 2 * (N - 2) and len(corpus["validation"]) >= 2
    assert set(corpus["train"]["task"]) == set(TASKS) and "image" not in corpus["train"].column_names  # Emu3
    sources = [s for split in corpus.values() for s in split["source"]]
    assert len(set(sources)) == N - 2 and all(sources.count(s) == 2 for s in sources), "both tasks of every pair"

    # one record re-derived from its files: the caption tokenized, the PNG read back and VQ-encoded
    vocab, images = build_vocab(d, m), build_image_tokenizer(d, m)
    layout = layout_for(m, vocab, images.grid)
    record = corpus["train"][0]
    png, txt = record["source"].split(" (row")[0].replace(".txt", ".png"), record["source"].split(" (row")[0]
    pixels = torch.from_numpy(np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255)[None, None]
    ids, mask = layout.document(record["task"], vocab.text(Path(txt).read_text().strip()),
                                images.encode(pixels)[0].tolist(), False)
    assert record["input_ids"] == ids and record["loss_mask"] == mask

    data = build_data(d, layout, images, micro_batch_size=2, grad_accum=2, eval_batches=1, model=m)  # as batches
    batches = data.sampler.next_step()
    assert [b["task"] for b in batches] == list(TASKS) and len(data.validation) == 2
    assert all(int((b["labels"] != -100).sum()) > 0 for b in batches)


def test_a_table_of_pairs_for_janus_keeps_the_images_its_encoder_reads(tmp_path, digits_cache):
    write_pairs(tmp_path / "files", corrupt=None, empty=None)
    rows = [{"image": f"files/{i:03d}.png", "text": f"digit {i}"} for i in range(N)] + \
        [{"image": "files/missing.png", "text": "gone"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    m, d = config(tmp_path, digits_cache, family="janus")
    d.path = str(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=rf"pairs.jsonl row {N} \(line {N + 1}\): .*missing.png, field 'image': "
                                         r"unreadable"):
        prepare(m, d, progress=False)
    d.on_bad_record = "skip"
    prepare(m, d, progress=False)
    corpus = datasets.load_from_disk(str(tmp_path / "prepared"))
    for record in corpus["train"]:
        assert (record["image"] is not None) == (record["task"] == "understanding")
    understanding = next(r for r in corpus["train"] if r["task"] == "understanding")
    row = int(understanding["source"].rsplit("row ", 1)[1].split()[0])
    assert np.array_equal(np.asarray(understanding["image"]),
                          np.asarray(Image.open(tmp_path / "files" / f"{row:03d}.png")))


def test_a_checkpoints_own_tokenizers_prepare_the_records(tmp_path, digits_cache):
    """A tiny Emu3 saved with its tokenizer: the text ids and image codes come from the checkpoint."""
    from model_zoo.emu3 import Emu3

    write_pairs(tmp_path / "pairs", corrupt=None, empty=None)
    words = DataConfig(cache_dir=str(digits_cache))
    vocab = build_vocab(words, ModelConfig())
    torch.manual_seed(0)
    model = Emu3.build("tiny", vocab)
    model.save_pretrained(str(tmp_path / "ckpt"))
    vocab.save(str(tmp_path / "ckpt"), "emu3")
    m, d = config(tmp_path, digits_cache, text_tokenizer="pretrained", image_tokenizer="pretrained", image_size=8)
    m.pretrained = str(tmp_path / "ckpt")
    prepare(m, d, progress=False)
    record = datasets.load_from_disk(str(tmp_path / "prepared"))["train"][0]
    theirs = build_vocab(d, m)
    assert hasattr(theirs.tokenizer, "save_pretrained") and theirs.image_offset == vocab.image_offset  # transformers'
    assert (theirs.pad, theirs.bos, theirs.eos, theirs.sov, theirs.sot, theirs.eov) == \
        (vocab.pad, vocab.bos, vocab.eos, vocab.sov, vocab.sot, vocab.eov)
    row = int(record["source"].rsplit("row ", 1)[1].rstrip(")"))
    png = Image.open(tmp_path / "pairs" / f"{row:03d}.png").convert("L")
    pixels = torch.from_numpy(np.asarray(png, dtype=np.float32) / 255)[None, None]
    codes = build_image_tokenizer(d, m).encode(pixels)[0].tolist()
    text = (tmp_path / "pairs" / f"{row:03d}.txt").read_text()
    assert record["input_ids"] == layout_for(m, theirs, (4, 4)).document(record["task"], theirs.text(text), codes,
                                                                         False)[0]
    assert theirs.text(text) == vocab.text(text)


def folder_digest(folder: Path) -> str:
    """Every file's relative path and bytes: equal digests, untouched folders."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def jsonl_of(folder: Path, path: Path, rows: range) -> Path:
    """A JSONL table of the folder's pairs `rows` (image paths relative to the table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image": os.path.relpath(folder / f"{i:03d}.png", path.parent),
                         "text": (folder / f"{i:03d}.txt").read_text()}) for i in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_corpora_of_one_name_never_share_a_prepared_folder(tmp_path, digits_cache):
    """The issue's mix-up: shapes/pairs.jsonl (24 pairs) and other/pairs.jsonl (6), data.prepared left
    to its default. Each gets its own folder, and the run of shapes reads shapes' 24 pairs."""
    write_pairs(tmp_path / "files", corrupt=None, empty=None)
    shapes = jsonl_of(tmp_path / "files", tmp_path / "shapes" / "pairs.jsonl", range(N))
    other = jsonl_of(tmp_path / "files", tmp_path / "other" / "pairs.jsonl", range(6))
    m = ModelConfig(family="emu3")
    configs = {p: DataConfig(source="pairs", path=str(p), cache_dir=str(digits_cache), val_fraction=0.25)
               for p in (shapes, other)}
    for d in configs.values():
        prepare(m, d, progress=False)
    assert configs[shapes].prepared_dir() != configs[other].prepared_dir()
    d = configs[shapes]
    vocab, images = build_vocab(d, m), build_image_tokenizer(d, m)
    data = build_data(d, layout_for(m, vocab, images.grid), images, micro_batch_size=2, grad_accum=2, model=m)
    corpus = data.sampler.source.ds
    assert len(corpus) + len(datasets.load_from_disk(str(d.prepared_dir()))["validation"]) == 2 * N
    assert {s.split(" row ")[0] for s in corpus["source"]} == {str(shapes)}


def test_an_edited_corpus_is_refused_with_both_descriptions_or_prepared_again_with_auto(tmp_path, digits_cache):
    write_pairs(tmp_path / "pairs", corrupt=None, empty=None)
    m, d = config(tmp_path, digits_cache)
    prepare(m, d, progress=False)
    check_prepared_corpus(m, d)                                          # as prepared: accepted
    (tmp_path / "pairs" / "003.txt").write_text("a handwritten digit zero, edited")
    edited = d.__class__(**{**d.__dict__, "seq_len": 48})
    with pytest.raises(ValueError) as info:
        check_prepared_corpus(m, edited)
    message = str(info.value)
    assert message.startswith(f"data.prepared: {tmp_path / 'prepared'} was prepared from other data or settings")
    source = str((tmp_path / "pairs").resolve())
    old, new = [line for line in message.splitlines() if line.strip().startswith("source:")][0].split(", this config")
    assert source in old and source in new and f"{2 * N} files" in old
    assert old.split("digest")[1] != new.split("digest")[1]
    assert "seq_len: prepared from 64, this config has 48" in message
    assert "python -m model_zoo.prepare --config <your run config> (or set data.prepare: auto" in message
    run_yaml = tmp_path / "run.yaml"   # the launcher refuses it with its config, before building anything
    run_yaml.write_text(yaml.safe_dump({"model": {"family": "emu3"}, "data": {**edited.__dict__},
                                        "eval": {"samples_png": False}}))
    with pytest.raises(ConfigError, match=r"data.prepared: .* was prepared from other data"):
        load_config(run_yaml)

    edited.prepare = "auto"
    load_config(run_yaml, overrides=["data.prepare=auto"])             # auto: the run will prepare it
    prepare_if_needed(m, edited)
    check_prepared_corpus(m, edited)
    texts = {r["text"] for split in datasets.load_from_disk(str(tmp_path / "prepared")).values() for r in split}
    assert "a handwritten digit zero, edited" in texts


def test_prepare_never_replaces_another_corpus_or_a_folder_it_did_not_write(tmp_path, digits_cache):
    write_pairs(tmp_path / "files", corrupt=None, empty=None)
    m = ModelConfig(family="emu3")
    first = DataConfig(source="pairs", path=str(jsonl_of(tmp_path / "files", tmp_path / "a.jsonl", range(N))),
                       prepared=str(tmp_path / "shared"), cache_dir=str(digits_cache), val_fraction=0.25)
    prepare(m, first, progress=False)
    before = folder_digest(tmp_path / "shared")
    second = DataConfig(**{**first.__dict__, "path": str(jsonl_of(tmp_path / "files", tmp_path / "b.jsonl", range(6)))})
    with pytest.raises(ValueError, match=rf"data.prepared: {tmp_path / 'shared'} holds the corpus prepared from "
                                         rf"{tmp_path / 'a.jsonl'}, not from {tmp_path / 'b.jsonl'}; point "
                                         r"data.prepared at another folder"):
        prepare(m, second, progress=False)
    mine = tmp_path / "my-own-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    second.prepared = str(mine)
    with pytest.raises(ValueError, match=r"data.prepared: .*my-own-folder exists and is not a corpus written by "
                                         r"model_zoo.prepare; point data.prepared at a new folder"):
        prepare(m, second, progress=False)
    assert folder_digest(tmp_path / "shared") == before and (mine / "notes.txt").read_text() == "keep me"


def latin1_corpus(tmp_path: Path, kind: str) -> Path:
    """N digit pairs in `kind` (folder | jsonl | csv) whose row 5 caption is Latin-1 ('é' = byte 0xe9);
    the CSV also has an empty caption cell in row 7."""
    folder = write_pairs(tmp_path / "files", corrupt=None, empty=None)
    texts = [(folder / f"{i:03d}.txt").read_bytes() for i in range(N)]
    texts[5] = "un chiffre écrit".encode("latin-1")
    if kind == "folder":
        (folder / "005.txt").write_bytes(texts[5])
        return folder
    if kind == "jsonl":
        lines = [b'{"image": "files/%03d.png", "text": "' % i + t + b'"}' for i, t in enumerate(texts)]
        (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(lines))
        return tmp_path / "pairs.jsonl"
    texts[7] = b""
    rows = [b"image,text"] + [b"files/%03d.png,%s" % (i, t) for i, t in enumerate(texts)]
    (tmp_path / "pairs.csv").write_bytes(b"\n".join(rows) + b"\n")
    return tmp_path / "pairs.csv"


@pytest.mark.parametrize("kind,where", [("folder", r"005.txt \(row 5\)"), ("jsonl", r"pairs.jsonl row 5 \(line 6\)"),
                                        ("csv", r"pairs.csv row 5 \(line 7\)")])
def test_captions_that_are_not_utf8_are_named_in_every_format_and_skipped(kind, where, tmp_path, digits_cache, capsys):
    m, d = config(tmp_path, digits_cache)
    d.path = str(latin1_corpus(tmp_path, kind))
    with pytest.raises(ValueError, match=rf"{where}, field 'text': not UTF-8 text: byte 0xe9 .*; save it as UTF-8 "
                                         r"\(e.g. iconv -f latin1 -t utf-8\), or set data.on_bad_record: skip"):
        prepare(m, d, progress=False)
    if kind == "csv":   # the empty cell of row 7 is named as such once row 5 is fixed
        d.on_bad_record = "error"
        raw = Path(d.path).read_bytes().replace("écrit".encode("latin-1"), "écrit".encode())
        Path(d.path).write_bytes(raw)
        with pytest.raises(ValueError, match=r"pairs.csv row 7 \(line 9\), field 'text': empty cell: no caption"):
            prepare(m, d, progress=False)
        Path(d.path).write_bytes(raw.replace("écrit".encode(), "écrit".encode("latin-1")))
    d.on_bad_record = "skip"
    prepare(m, d, progress=False)
    meta = json.loads((tmp_path / "prepared" / "distopt_prepare.json").read_text())
    bad = 2 if kind == "csv" else 1
    assert meta["pairs"] == N - bad and meta["skipped"] == {"text": bad}
    assert "field 'text': not UTF-8 text: byte 0xe9" in capsys.readouterr().err


def test_every_kind_of_bad_row_in_a_table_is_named_by_file_row_and_field(tmp_path):
    from model_zoo.data import BadRecord
    from model_zoo.pairs import Pair, read_pairs

    lines = ['{"image": "a.png", "text": "fine"}', '{"image": "a.png"', "[1, 2]", '{"image": "a.png"}',
             '{"image": "a.png", "text": null}', '{"image": null, "text": "a"}', '{"image": "a.png", "text": 5}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "t.csv").write_text("image,text\na.png,fine\na.png\n,a caption\na.png,\n")
    (tmp_path / "t.json").write_text('[{"image": "a.png", "text": "fine"}, 3]')
    expected = {
        "t.jsonl": [None, ("line", "not valid JSON"), ("line", "a JSON list, not an object"),
                    ("text", "absent (the record has ['image'])"), ("text", "null: no caption"),
                    ("image", "null: no image"), ("text", "a int, not text")],
        "t.csv": [None, ("text", "no cell: the row has 1 of the header's 2 columns"),
                  ("image", "empty cell: no image path"), ("text", "empty cell: no caption")],
        "t.json": [None, ("line", "a JSON int, not an object")]}
    for name, wanted in expected.items():
        total, read = read_pairs(tmp_path / name)
        records = list(read)
        assert total in (None, len(wanted)) and len(records) == len(wanted), name
        for row, (record, want) in enumerate(zip(records, wanted, strict=True)):
            if want is None:
                assert isinstance(record, Pair) and record.image == tmp_path / "a.png" and record.text == "fine"
                continue
            assert isinstance(record, BadRecord) and (record.field, record.problem[:len(want[1])]) == want, record
            line = f" (line {row + 2 if name == 't.csv' else row + 1})" if name != "t.json" else ""
            assert record.where == f"{tmp_path / name} row {row}{line}", record.where
    absent = [r for r in read_pairs(tmp_path / "t.jsonl")[1] if isinstance(r, BadRecord) and "absent" in r.problem]
    assert "set data.text_column to the key that holds it" in absent[0].message()


def test_hugging_face_datasets_folders_and_parquet_with_an_image_feature(tmp_path, digits_cache):
    """The digits as Hugging Face users keep them: a `datasets` Dataset with an Image feature column and a
    caption column, saved with save_to_disk, as one Parquet file and as a Hub-style folder of Parquet
    shards. Each gives the records the folder of PNG files and .txt captions gives."""
    folder = write_pairs(tmp_path / "files", corrupt=None, empty=None)
    rows = {"picture": [{"bytes": (folder / f"{i:03d}.png").read_bytes(), "path": None} for i in range(N)],
            "caption": [(folder / f"{i:03d}.txt").read_text() for i in range(N)]}   # the images inside, as on the Hub
    table = datasets.Dataset.from_dict(rows, features=datasets.Features({"picture": datasets.Image(),
                                                                        "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "one.parquet"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for k in range(2):
        shard = tmp_path / "hub" / "data" / f"train-0000{k}-of-00002.parquet"
        table.shard(2, k, contiguous=True).to_parquet(str(shard))
    m, d = config(tmp_path, digits_cache)
    d.path = str(folder)
    prepare(m, d, progress=False)
    reference = datasets.load_from_disk(str(tmp_path / "prepared"))

    def records(corpus):
        return sorted((r["task"], tuple(r["input_ids"]), r["text"]) for split in corpus.values() for r in split)

    for source in ("hf", "one.parquet", "hub"):
        d = DataConfig(**{**d.__dict__, "path": str(tmp_path / source), "prepared": str(tmp_path / f"p-{source}"),
                          "image_column": "picture", "text_column": "caption"})
        prepare(m, d, progress=False)
        corpus = datasets.load_from_disk(d.prepared)
        assert records(corpus) == records(reference), source
        assert {r.split(" row ")[0] for r in corpus["train"]["source"]} <= {
            f"{tmp_path / 'hf'} (train)", str(tmp_path / "one.parquet"),
            *(str(f) for f in (tmp_path / "hub" / "data").iterdir())}
    d.text_column = "text"
    with pytest.raises(ValueError, match=r"data.text_column: .*hub.* has no column 'text' \(its columns: "
                                         r"\['picture', 'caption'\]\); set data.text_column to the column"):
        prepare(m, d, progress=False)


def test_a_checkpoint_missing_a_shard_is_named_before_anything_loads(tmp_path, digits_cache):
    from model_zoo.emu3 import Emu3

    vocab = build_vocab(DataConfig(cache_dir=str(digits_cache)), ModelConfig())
    Emu3.build("tiny", vocab).hf.save_pretrained(str(tmp_path / "ckpt"), max_shard_size="200KB")
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    m = ModelConfig(family="emu3", pretrained=str(tmp_path / "ckpt"))
    pattern = (rf"model.pretrained: {tmp_path / 'ckpt'} lacks 1 of the {len(shards)} weight shards that "
               rf"model.safetensors.index.json lists: {shards[1].name}; copy the complete checkpoint")
    with pytest.raises(ValueError, match=pattern):
        validate_model(m)
    write_pairs(tmp_path / "pairs", corrupt=None, empty=None)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": m.__dict__, "data": {"source": "pairs", "path": str(tmp_path / "pairs"),
                                                                 "cache_dir": str(digits_cache)}}))
    with pytest.raises(SystemExit, match=rf"^prepare: {pattern}"):
        main(["--config", str(cfg), "--no-progress"])
    with pytest.raises(ConfigError, match=pattern):
        load_config(cfg)


def test_friction_of_a_first_corpus(tmp_path, digits_cache, capsys):
    """A folder without images, a table named in capitals, a caption too long for seq_len, and words
    the tokenizer does not know: each named with its fix."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("my captions")
    m, d = config(tmp_path, digits_cache)
    folder = write_pairs(tmp_path / "files", corrupt=None, empty=None)
    upper = jsonl_of(folder, tmp_path / "PAIRS.JSONL", range(N))
    d.path = str(upper)
    prepare(m, d, progress=False)   # a corpus already prepared, which no failure below may touch
    before = folder_digest(tmp_path / "prepared")
    with pytest.raises(ValueError, match=r"data.path: the folder .*empty holds no images \(.png .jpg.*\), no "
                                         r"`datasets` folder \(save_to_disk\) and no .parquet files; point data.path"):
        prepare(m, DataConfig(**{**d.__dict__, "path": str(tmp_path / "empty")}), progress=False)

    rows = Path(upper).read_text().splitlines()
    rows[4] = json.dumps({"image": "files/004.png", "text": "the digit four " * 12})
    rows[9] = json.dumps({"image": "files/009.png", "text": "a quokka jumps over a nine"})
    upper.write_text("\n".join(rows))
    with pytest.raises(ValueError, match=r"PAIRS.JSONL row 4 \(line 5\), field 'text': a 36-token caption makes a "
                                         r"(\d+)-token document, more than data.seq_len=48; raise data.seq_len to at "
                                         r"least (\d+), or shorten the caption, or set data.on_bad_record: skip") as e:
        prepare(m, DataConfig(**{**d.__dict__, "seq_len": 48}), progress=False)
    match = re.search(r"makes a (\d+)-token.*at least (\d+)", str(e.value))
    assert match is not None
    document, needed = match.groups()
    assert document == needed and int(needed) > 48
    assert folder_digest(tmp_path / "prepared") == before and not list(tmp_path.glob(".prepared.*"))
    prepare(m, d, progress=False)
    err = capsys.readouterr().err
    assert f"[prepare] 2 words in 1 of {N} captions became [UNK], the text tokenizer does not know them (most " \
           "frequent: 'quokka', 'jumps'); use data.text_tokenizer: pretrained" in err
    assert json.loads((tmp_path / "prepared" / "distopt_prepare.json").read_text())["pairs"] == N


def test_a_full_disk_names_the_folder_and_loses_nothing(tmp_path, digits_cache):
    """The disk fills while prepare writes. Simulated for real: the prepare process runs under a file size
    limit (RLIMIT_FSIZE, what `ulimit -f` sets, with SIGXFSZ ignored), so the kernel refuses the write
    inside the `datasets` / Arrow writers as a full disk would (errno EFBIG there, ENOSPC on a full
    disk; prepare treats both, and EDQUOT, as no space). The error names the folder and says there is no
    space; the corpus prepared before is untouched and no temporary folder is left."""
    write_pairs(tmp_path / "pairs", corrupt=None, empty=None)
    m, d = config(tmp_path, digits_cache)
    prepare(m, d, progress=False)
    before = folder_digest(tmp_path / "prepared")
    (tmp_path / "pairs" / "003.txt").write_text("a handwritten digit zero, edited")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": m.__dict__, "data": d.__dict__}))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run([sys.executable, "-m", "model_zoo.prepare", "--config", str(cfg), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=small_files,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"prepare: data.prepared: no space left to write {tmp_path / 'prepared'} (File too large)" in proc.stderr
    assert "Free space on that disk or point data.prepared at one with room" in proc.stderr
    assert folder_digest(tmp_path / "prepared") == before, "the corpus prepared before is as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "prepared", "run.yaml"], "no temporary folder"
