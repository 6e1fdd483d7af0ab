"""The data pipeline on real digits and real on-disk `datasets`: captions and the trained text
tokenizer, the unified vocabulary and both families' document layouts, the split, augmentation,
packing, the sharded resumable sampler, memory-mapped against streamed tokenized corpora, and bad
records."""

import collections
import dataclasses

import datasets
import pytest
import torch

from model_zoo.data import (
    MODALITIES,
    MODALITY,
    TASKS,
    BadRecord,
    BadRecordError,
    DigitsSource,
    Doc,
    MicroBatchSampler,
    TokenizedSource,
    collate,
    open_tokenized,
)
from model_zoo.digits import augment, caption, caption_corpus, split
from model_zoo.emu3 import Emu3Layout
from model_zoo.janus import JanusLayout
from model_zoo.vocab import Vocab, load_or_train_wordpiece
from model_zoo.vq import VQTokenizer, digits


@pytest.fixture(scope="module")
def built(digits_cache):
    cache = digits_cache
    vocab = Vocab.from_wordpiece(load_or_train_wordpiece(cache, caption_corpus()), 64)
    vq = VQTokenizer.load_or_train(cache, 64, 0)
    train, val = split(0, 0.1)
    return dict(cache=cache, vocab=vocab, vq=vq, train=train, val=val, emu3=Emu3Layout(vocab, vq.grid),
                janus=JanusLayout(vocab, vq.grid, 16))


def sampler(b, rows=None, family="emu3", **kw):
    source = DigitsSource(rows if rows is not None else b["train"], b[family], b["vq"], kw.pop("text_format", "plain"),
                          3, shuffle=kw.pop("shuffle", True))
    return MicroBatchSampler(source, **{"micro_batch_size": 2, "seq_len": 64, "pad": b["vocab"].pad, "seed": 3, **kw})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_text_tokenizer_round_trips_every_caption_and_is_cached(built, tmp_path):
    vocab, cache = built["vocab"], built["cache"]
    for text in caption_corpus():
        ids = vocab.text(text)
        assert 0 not in ids, f"[UNK] in {text!r}"  # [UNK] is id 0
        assert vocab.tokenizer.decode(ids).replace(" * ", "*") == text.lower()
    assert 100 <= vocab.image_offset <= 256
    (path,) = cache.glob("text-wordpiece-*.json")
    mtime = path.stat().st_mtime_ns
    assert load_or_train_wordpiece(cache, caption_corpus()).encode("a 4*4 seven").ids == vocab.text("a 4*4 seven")
    assert path.stat().st_mtime_ns == mtime, "the cached tokenizer is read, not retrained"
    (tmp_path / path.name).write_text("{broken")
    with pytest.raises(ValueError, match=f"(?s){path.name}.*delete it to retrain"):
        load_or_train_wordpiece(tmp_path, caption_corpus())


def test_captions_are_fixed_per_sample_and_varied_per_digit(built):
    assert [caption(3, i) for i in range(50)] == [caption(3, i) for i in range(50)]
    templates = collections.defaultdict(set)
    for row in built["train"].select(range(500)):
        templates[row["digit"]].add(caption(row["digit"], row["index"]))
    assert all(len(t) >= 3 for t in templates.values())  # not tied to the digits' cyclic order
    with pytest.raises(ValueError, match="text_format='chat'"):
        caption(1, 1, "chat")


def test_vocab_is_text_then_specials_then_image_codes(built):
    v = built["vocab"]
    specials = [v.pad, v.bos, v.eos, v.sov, v.sot, v.eov, v.img]
    assert specials == list(range(v.image_offset - 7, v.image_offset)) and v.size == v.image_offset + 64


@pytest.mark.parametrize("task", TASKS)
def test_documents_follow_each_familys_layout(built, task):
    v, cap, codes = built["vocab"], [5, 6, 7], list(range(16))
    image = [v.image_offset + c for c in codes]
    ids, mask = built["emu3"].document(task, cap, codes, response_only=False)
    head = [v.sov, *v.text("4*4"), v.sot]
    body = [v.bos, *cap, *head, *image, v.eov, v.eos] if task == "generation" else \
        [v.bos, *head, *image, v.eov, *cap, v.eos]
    assert ids == body and mask == [0] + [1] * (len(ids) - 1)
    _, response = built["emu3"].document(task, cap, codes, response_only=True)
    kept = [i for i, m in zip(ids, response, strict=True) if m]
    assert kept == (image + [v.eov] if task == "generation" else cap + [v.eos])
    rows = Emu3Layout(dataclasses.replace(v, eol=v.img, eof=v.pad), (4, 4)).image_ids(codes)  # Emu3 checkpoints' rows
    assert rows == [i for r in range(4) for i in image[4 * r:4 * r + 4] + [v.img]] + [v.pad]
    ids, mask = built["janus"].document(task, cap, codes, response_only=False)
    if task == "generation":
        assert ids == [v.bos, *cap, v.sov, *image] and mask == [0] * 5 + [1] * 16
    else:
        assert ids == [v.bos, v.sov, *[v.img] * 16, v.eov, *cap, v.eos] and mask == [0] * 19 + [1] * 4


def test_split_is_seeded_stratified_and_disjoint(built):
    train, val = built["train"], built["val"]
    assert len(train) + len(val) == 1797 and len(val) == 180
    assert sorted(list(train["index"]) + list(val["index"])) == list(range(1797))
    labels = digits()[1]
    for d in range(10):
        share = sum(1 for x in val["digit"] if x == d) / int((labels == d).sum())
        assert abs(share - 0.1) < 0.02
    assert list(split(0, 0.1)[1]["index"]) == list(val["index"]) != list(split(1, 0.1)[1]["index"])
    for bad in (1.5, 0.0, 0.001):
        with pytest.raises(ValueError, match="val_fraction"):
            split(0, bad)


def test_augmentation_shifts_by_at_most_one_pixel_and_stays_in_range():
    images = digits()[0][:64]
    views = augment(images, torch.Generator().manual_seed(0))
    assert not torch.equal(views, images) and float(views.min()) >= 0 and float(views.max()) <= 1
    shifted = augment(images, torch.Generator().manual_seed(1), noise=0.0)[:, 0]
    padded = torch.nn.functional.pad(images[:, 0], (1, 1, 1, 1))
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for view, src in zip(shifted, padded, strict=True):  # an independent re-derivation: some window of the padded image
        assert any(torch.equal(view, src[1 - dy:9 - dy, 1 - dx:9 - dx]) for dy, dx in shifts)
    assert len({torch.equal(v, i) for v, i in zip(shifted, images[:, 0], strict=True)}) == 2  # some shifted, some not


def test_collate_packs_documents_with_restarting_positions():
    docs = [Doc([1, 2, 3], [0, 1, 1]), Doc([4, 5], [0, 1], torch.ones(1, 8, 8)), Doc([6, 7, 8, 9], [0, 0, 1, 1])]
    b = collate([docs[:2], docs[2:]], 8, 0, "understanding")
    assert b["modality"] == MODALITY["understanding"] == "text" and MODALITIES == ("text", "image")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100], [-100, -100, 8, 9] + [-100] * 4]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert b["pixel_values"].shape == (1, 1, 8, 8)


def test_sampler_interleaves_modality_pure_packed_micro_batches(built):
    s = sampler(built, grad_accum=2, family="janus")
    steps = [s.next_step() for _ in range(3)]
    assert [[b["task"] for b in step] for step in steps] == [list(TASKS)] * 3
    for b in (b for step in steps for b in step):
        starts = int((b["position_ids"] == 0).sum()) - int((b["input_ids"][:, -1] == built["vocab"].pad).sum())
        assert starts >= 3, "several documents per 64-token row"
        n_images = int((b["input_ids"] == built["vocab"].img).sum()) // 16
        assert len(b["pixel_values"]) == (n_images if b["task"] == "understanding" else 0)


def test_rank_shards_are_the_rows_of_one_global_packing(built):
    world, micro = 3, 2
    ranks = [sampler(built, rank=r, world_size=world, micro_batch_size=micro, augment=False) for r in range(world)]
    whole = sampler(built, micro_batch_size=world * micro, augment=False)   # reference: one rank, all rows
    for _ in range(4):
        batch = whole.next_micro_batch()
        for r, s in enumerate(ranks):
            mine = s.next_micro_batch()
            assert torch.equal(mine["input_ids"], batch["input_ids"][r * micro:(r + 1) * micro])
            assert torch.equal(mine["position_ids"], batch["position_ids"][r * micro:(r + 1) * micro])
    assert all(s.state_dict()["positions"] == whole.state_dict()["positions"] for s in ranks)


def test_resume_is_exact_across_an_epoch_boundary(built):
    small = built["train"].select(range(10))  # about 8 documents per global micro-batch: several epochs
    run = sampler(built, small, rank=1, world_size=2)
    for _ in range(3):
        run.next_micro_batch()
    state = run.state_dict()
    expected = [run.next_micro_batch() for _ in range(6)]
    resumed = sampler(built, small, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(expected, (resumed.next_micro_batch() for _ in range(6)), strict=True))
    assert run.state_dict()["positions"]["generation"][0] >= 2 and run.state_dict() == resumed.state_dict()
    first = [sampler(built, small, rank=1, world_size=2).next_micro_batch() for _ in range(2)]
    assert same(first[0], first[1]), "two constructions give the same stream"
    other = sampler(built, small, rank=1, world_size=2, micro_batch_size=1, augment=False)  # resharded resume
    whole = sampler(built, small, micro_batch_size=2, augment=False)
    for s in (other, whole):
        s.load_state_dict(state)
    assert torch.equal(other.next_micro_batch()["input_ids"][0], whole.next_micro_batch()["input_ids"][1])
    with pytest.raises(ValueError, match="seed=3"):
        sampler(built, small, seed=4).load_state_dict(state)


def write_tokenized(path, docs_by_split, with_images=False):
    """A DatasetDict on disk in the tokenized schema, one record per Doc, in the given order."""
    def records(docs):
        rows = []
        for task, doc in docs:
            row = dict(input_ids=doc.ids, loss_mask=doc.loss_mask, task=task)
            if with_images:
                from model_zoo.images import png_bytes, to_uint8
                row["image"] = None if doc.pixels is None else {"bytes": png_bytes(to_uint8(doc.pixels)), "path": None}
            rows.append(row)
        features = {"input_ids": datasets.Sequence(datasets.Value("int32")),
                    "loss_mask": datasets.Sequence(datasets.Value("int8")), "task": datasets.Value("string")}
        if with_images:
            features["image"] = datasets.Image()
        return datasets.Dataset.from_list(rows, features=datasets.Features(features))

    corpus = datasets.DatasetDict({k: records(v) for k, v in docs_by_split.items()})
    corpus.save_to_disk(str(path), max_shard_size="20KB")


def digit_docs(built, family, n, seed=0):
    """(task, Doc) pairs of real digits, tasks interleaved irregularly, as a prepared corpus would hold them."""
    source = DigitsSource(built["train"].select(range(n)), built[family], built["vq"], "plain", seed, shuffle=False)
    out = []
    for task in TASKS:
        items = list(source.items(task, 0, 0))
        out += [(task, d) for d in source.docs(items, task, None)]
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()
    return [out[i] for i in order]


@pytest.mark.parametrize("family", ["emu3", "janus"])
def test_streamed_and_memory_mapped_corpora_give_the_same_batches_and_resume_exactly(built, tmp_path, family):
    write_tokenized(tmp_path, {"train": digit_docs(built, family, 30)}, with_images=family == "janus")
    layout, vq = built[family], built["vq"]

    def make(streaming, **kw):
        ds = open_tokenized(tmp_path, "train", streaming)
        source = TokenizedSource(ds, "corpus", layout, vq, 64, built["vocab"].size)
        return MicroBatchSampler(source, 2, 64, built["vocab"].pad, rank=1, world_size=2, augment=False, **kw)

    mapped, streamed = make(False), make(True)
    assert isinstance(streamed.source.ds, datasets.IterableDataset) and isinstance(mapped.source.ds, datasets.Dataset)
    first = [mapped.next_micro_batch() for _ in range(4)]
    assert all(same(a, streamed.next_micro_batch()) for a in first)
    if family == "janus":
        assert first[0]["pixel_values"].shape[1:] == (1, 8, 8) and len(first[0]["pixel_values"]) > 0
    state = mapped.state_dict()
    expected = [mapped.next_micro_batch() for _ in range(8)]  # past the end of the corpus: a second epoch
    assert mapped.state_dict()["positions"]["understanding"][0] == 1
    for streaming in (False, True):
        resumed = make(streaming)
        resumed.load_state_dict(state)
        assert all(same(a, resumed.next_micro_batch()) for a in expected), f"streaming={streaming}"


def test_bad_records_name_file_row_and_field_or_are_counted(built, tmp_path):
    docs = digit_docs(built, "emu3", 12)
    task = docs[3][0]
    docs[3] = (task, Doc(docs[3][1].ids * 3, docs[3][1].loss_mask * 3))                 # too long for 64
    docs[5] = (docs[5][0], Doc([0, built["vocab"].size + 7, 1], [0, 1, 1]))              # outside the vocabulary
    docs[7] = ("captioning", docs[7][1])                                                  # an unknown task
    write_tokenized(tmp_path, {"train": docs})
    for streaming in (False, True):
        source = TokenizedSource(open_tokenized(tmp_path, "train", streaming), str(tmp_path), built["emu3"],
                                 built["vq"], 64, built["vocab"].size)
        strict = MicroBatchSampler(source, 4, 64, built["vocab"].pad, augment=False)
        with pytest.raises(BadRecordError, match=rf"{tmp_path} row [357], field '(input_ids|task)': .*on_bad_record"):
            for _ in range(4):
                strict.next_micro_batch()
        too_long = source._check({"input_ids": [1] * 70, "loss_mask": [0] + [1] * 69, "task": "generation"}, 9)
        assert isinstance(too_long, BadRecord)
        assert too_long.message().startswith(f"{tmp_path} row 9, field 'input_ids': 70 tokens, more than "
                                             "data.seq_len=64; raise data.seq_len to at least 70, or shorten the "
                                             "record, or set data.on_bad_record: skip"), "the fix, not 'drop it'"
        lenient = MicroBatchSampler(source, 4, 64, built["vocab"].pad, augment=False, on_bad_record="skip")
        batches = [lenient.next_micro_batch() for _ in range(2)]  # one per task, within the first epoch
        assert lenient.skipped == 3 and lenient.state_dict()["skipped"] == 3, "none is silently dropped"
        assert all(int(b["input_ids"].max()) < built["vocab"].size for b in batches)
    missing = tmp_path / "no_mask"
    datasets.Dataset.from_dict({"input_ids": [[1, 2]], "task": ["generation"]}).save_to_disk(str(missing))
    with pytest.raises(ValueError, match=r"lacks the columns \['loss_mask'\]"):
        TokenizedSource(open_tokenized(missing, "train", False), str(missing), built["emu3"], built["vq"], 64, 300)
