"""The multimodal pipeline on real digits: captions and the trained text tokenizer, the unified
vocabulary and Emu3 sequence layout, the split, augmentation, and the sharded resumable sampler."""

import collections

import pytest
import torch

from model_zoo.data import (MODALITIES, MicroBatchSampler, Vocab, augment, build_datasets, caption, caption_corpus,
                            collate, load_or_train_text_tokenizer)
from model_zoo.vq import digits


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return (cache, *build_datasets(cache, seed=0))


def make(data, vocab, vq, **kw):
    return MicroBatchSampler(data, vocab, vq, **{"micro_batch_size": 4, "seed": 3, **kw})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_text_tokenizer_round_trips_every_caption_and_is_cached(built, tmp_path):
    cache, _, _, vocab, _ = built
    for text in caption_corpus():
        ids = vocab.text(text)
        assert 0 not in ids, f"[UNK] in {text!r}"  # [UNK] is id 0
        assert vocab.tokenizer.decode(ids) == text.lower()
    assert 100 <= vocab.text_size <= 256 and vocab.meta == vocab.text("8x8")
    (path,) = cache.glob("text-wordpiece-*.json")
    assert load_or_train_text_tokenizer(cache).to_str() == vocab.tokenizer.to_str()
    (tmp_path / path.name).write_text("{broken")
    with pytest.raises(ValueError, match=f"(?s){path.name}.*delete it to retrain"):
        load_or_train_text_tokenizer(tmp_path)


def test_captions_are_fixed_per_sample_and_varied_per_digit(built):
    _, train, _, _, _ = built
    assert [caption(3, i) for i in range(50)] == [caption(3, i) for i in range(50)]
    templates = collections.defaultdict(set)
    for row in train.select(range(500)):
        assert row["caption"] == caption(row["digit"], row["index"])
        templates[row["digit"]].add(row["caption"])
    assert all(len(t) >= 3 for t in templates.values())  # not tied to the digits' cyclic order


def test_vocab_layout_text_then_specials_then_image_codes(built):
    _, _, _, vocab, vq = built
    specials = [vocab.pad, vocab.bos, vocab.eos, vocab.sov, vocab.sot, vocab.eov]
    assert specials == list(range(vocab.text_size, vocab.text_size + 6)) == list(range(vocab.text_size,
                                                                                        vocab.image_offset))
    assert vocab.codebook_size == vq.codebook_size == 64 and vocab.size == vocab.image_offset + 64
    ids = torch.arange(-100, vocab.size + 5)
    assert torch.equal(vocab.is_image(ids), (ids >= vocab.image_offset) & (ids < vocab.size))
    assert torch.equal(vocab.image_token(torch.tensor([0, 63])), torch.tensor([vocab.image_offset, vocab.size - 1]))


@pytest.mark.parametrize("modality", MODALITIES)
def test_batches_follow_the_emu3_layout(built, modality):
    _, _, val, vocab, vq = built
    rows = val[:6]
    b = collate(rows, vocab, vq, modality)
    n, t, l = 6, vocab.seq_len, vocab.caption_len
    assert b["modality"] == modality
    assert [tuple(b[k].shape) for k in ("input_ids", "labels", "image_mask", "pixel_values", "image_codes",
                                         "caption_ids", "caption_mask", "digit")] == \
        [(n, t), (n, t), (n, t), (n, 1, 8, 8), (n, 16), (n, l), (n, l), (n,)]
    images = torch.tensor(rows["image"]).reshape(n, 8, 8)
    assert torch.equal(b["pixel_values"][:, 0], images) and torch.equal(b["image_codes"], vq.encode(images))
    assert b["digit"].tolist() == rows["digit"]
    for i in range(n):
        cap = vocab.text(rows["caption"][i])
        image = [vocab.sov, *vocab.meta, vocab.sot, *vocab.image_token(b["image_codes"][i]).tolist(), vocab.eov]
        body = [vocab.bos, *(cap + image if modality == "generation" else image + cap), vocab.eos]
        ids = b["input_ids"][i].tolist()
        assert ids == body + [vocab.pad] * (t - len(body))
        assert b["labels"][i].tolist() == body + [-100] * (t - len(body))
        assert b["image_mask"][i].tolist() == [vocab.image_offset <= x < vocab.size for x in ids]
        assert int(b["image_mask"][i].sum()) == 16
        assert b["caption_ids"][i].tolist() == cap + [vocab.pad] * (l - len(cap))
        assert b["caption_mask"][i].tolist() == [True] * len(cap) + [False] * (l - len(cap))


def test_split_is_seeded_stratified_and_disjoint(built, tmp_path):
    cache, train, val, _, _ = built
    assert len(train) + len(val) == 1797 and len(val) == 180
    assert sorted(list(train["index"]) + list(val["index"])) == list(range(1797))
    labels = digits()[1]
    for d in range(10):
        share = sum(1 for x in val["digit"] if x == d) / int((labels == d).sum())
        assert abs(share - 0.1) < 0.02
    again = build_datasets(cache, seed=0)[1]
    other = build_datasets(cache, seed=1)[1]
    assert list(again["index"]) == list(val["index"]) != list(other["index"])


def test_augmentation_shifts_by_at_most_one_pixel_and_stays_in_range():
    images = digits()[0][:64]
    views = augment(images, torch.Generator().manual_seed(0))
    assert not torch.equal(views, images) and float(views.min()) >= 0 and float(views.max()) <= 1
    shifted = augment(images, torch.Generator().manual_seed(1), noise=0.0)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for view, src in zip(shifted, padded):  # an independent re-derivation: some window of the padded image
        assert any(torch.equal(view, src[1 - dy:9 - dy, 1 - dx:9 - dx]) for dy, dx in shifts)
    assert len({tuple(v.flatten().tolist()) == tuple(i.flatten().tolist())
                for v, i in zip(shifted, images)}) == 2  # some shifted, some not


def test_sampler_interleaves_modality_pure_micro_batches(built):
    _, train, _, vocab, vq = built
    s = make(train, vocab, vq, grad_accum=2)
    steps = [s.next_step() for _ in range(3)]
    assert [[b["modality"] for b in step] for step in steps] == [list(MODALITIES)] * 3 and s.step == 3
    for b in (b for step in steps for b in step):
        first = b["input_ids"][:, 1]  # generation starts with the caption, understanding with [SOV]
        assert ((first == vocab.sov).all()) == (b["modality"] == "understanding")


def test_rank_shards_are_disjoint_and_cover_each_global_micro_batch(built):
    _, train, _, vocab, vq = built
    world, micro = 3, 4
    ranks = [make(train, vocab, vq, rank=r, world_size=world, augment=False) for r in range(world)]
    seen = []
    for g in range(4):
        shards = [s.indices() for s in ranks]
        batches = [s.next_micro_batch() for s in ranks]
        flat = [i for shard in shards for i in shard]
        assert len(set(flat)) == world * micro and flat == ranks[0].order(0)[g * world * micro:(g + 1) * world * micro]
        assert len({b["modality"] for b in batches}) == 1
        for shard, b in zip(shards, batches):
            assert b["digit"].tolist() == [train[i]["digit"] for i in shard]
            assert torch.equal(b["pixel_values"].flatten(1), torch.tensor(train[shard]["image"]))
        seen += flat
    assert len(set(seen)) == len(seen)
    assert sorted(ranks[0].order(0)) == list(range(len(train)))


def test_resume_is_exact_across_an_epoch_boundary(built):
    _, train, _, vocab, vq = built
    small = train.select(range(20))  # 2 global micro-batches of 8 per epoch, 4 samples dropped
    run = make(small, vocab, vq, rank=1, world_size=2)
    for _ in range(3):
        run.next_micro_batch()
    state = run.state_dict()
    expected = [run.next_micro_batch() for _ in range(5)]
    resumed = make(small, vocab, vq, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(expected, (resumed.next_micro_batch() for _ in range(5))))
    assert run.epoch >= 3 and run.state_dict() == resumed.state_dict()
    first = [make(small, vocab, vq, rank=1, world_size=2).next_micro_batch() for _ in range(2)]
    assert same(first[0], first[1]), "two constructions give the same stream"
    assert not same(expected[0], expected[2]), "later epochs draw fresh augmented views and orders"


def test_resharded_resume_continues_at_the_same_sample(built):
    _, train, _, vocab, vq = built
    two = [make(train, vocab, vq, rank=r, world_size=2, augment=False) for r in range(2)]
    used = [i for _ in range(3) for s in two for i in (s.indices(), s.next_micro_batch())[0]]
    one = make(train, vocab, vq, augment=False)
    one.load_state_dict(two[0].state_dict())
    nxt = one.indices()
    assert not set(nxt) & set(used) and nxt == one.order(0)[24:28]


def test_bad_arguments_name_the_argument(built, tmp_path):
    _, train, _, vocab, vq = built
    for bad in (1.5, 0.0, 0.001):
        with pytest.raises(ValueError, match="val_fraction"):
            build_datasets(tmp_path, val_fraction=bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        build_datasets(tmp_path / "file" / "cache")
    with pytest.raises(ValueError, match="micro_batch_size=2000"):
        make(train, vocab, vq, micro_batch_size=2000)
    with pytest.raises(ValueError, match="rank=2"):
        make(train, vocab, vq, rank=2, world_size=2)
    with pytest.raises(ValueError, match="grad_accum"):
        make(train, vocab, vq, grad_accum=0)
    with pytest.raises(ValueError, match="modality"):
        collate(train[:2], vocab, vq, "text")
    state = make(train, vocab, vq).state_dict()
    with pytest.raises(ValueError, match="seed=3"):
        make(train, vocab, vq, seed=4).load_state_dict(state)
    assert isinstance(vocab, Vocab)


@pytest.mark.parametrize("modality", MODALITIES)
def test_instruct_format_puts_the_loss_on_the_response_only(modality, built):
    _, train, _, vocab, vq = built
    rows = train[:4]
    b = collate(rows, vocab, vq, modality, text_format="instruct")
    for i, (d, index) in enumerate(zip(rows["digit"], rows["index"])):
        text = vocab.text(caption(d, index, "instruct", modality))
        assert b["caption_ids"][i, :len(text)].tolist() == text
        kept = b["input_ids"][i][b["labels"][i] != -100].tolist()
        codes = (b["image_codes"][i] + vocab.image_offset).tolist()
        assert kept == (codes if modality == "generation" else text + [vocab.eos])
    plain = collate(rows, vocab, vq, modality)
    assert (plain["labels"] != -100).sum() > (b["labels"] != -100).sum()


def test_both_formats_share_one_vocabulary(built):
    _, _, _, vocab, _ = built
    for modality in MODALITIES:
        for d in range(10):
            assert vocab.tokenizer.token_to_id("[UNK]") not in vocab.text(caption(d, d, "instruct", modality))
    with pytest.raises(ValueError, match="text_format='chat'"):
        caption(1, 1, "chat")
