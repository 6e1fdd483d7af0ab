"""`python -m model_zoo.prepare` on a user's image-caption pairs written by the test (real digits as
PNG files): records re-derived by hand from the files, a corrupt image and an empty caption named by
file, row and field (or counted with `skip`), a JSONL table, the checkpoint's own tokenizers, and the
prepared corpus read back as training batches. (Training from it under a launcher: test_run.py.)"""

import json

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model_zoo.build import build_data, build_image_tokenizer, build_vocab, layout_for
from model_zoo.config import DataConfig, ModelConfig
from model_zoo.data import TASKS
from model_zoo.digits import caption
from model_zoo.images import write_png
from model_zoo.prepare import main, prepare
from model_zoo.vq import digits

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
    ids, mask = layout.document(record["task"], vocab.text(open(txt).read().strip()), images.encode(pixels)[0].tolist(),
                                False)
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
    with pytest.raises(ValueError, match=rf"pairs.jsonl row {N} \(line {N + 1}\): .*missing.png, field 'image': unreadable"):
        prepare(m, d, progress=False)
    d.on_bad_record = "skip"
    prepare(m, d, progress=False)
    corpus = datasets.load_from_disk(str(tmp_path / "prepared"))
    for record in corpus["train"]:
        assert (record["image"] is not None) == (record["task"] == "understanding")
    understanding = next(r for r in corpus["train"] if r["task"] == "understanding")
    row = int(understanding["source"].rsplit("row ", 1)[1].split()[0])
    assert np.array_equal(np.asarray(understanding["image"]), np.asarray(Image.open(tmp_path / "files" / f"{row:03d}.png")))


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
