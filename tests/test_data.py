"""The VQ tokenizer on real digits, the unified vocabulary and sequences, and the micro-batch sampler."""

import pytest
import torch

from model_zoo.data import MicroBatchSampler, augment, build_datasets, caption
from model_zoo.vq import VQTokenizer, digits, render_grid


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return (cache, *build_datasets(cache))


def test_vq_reconstructs_real_digits(built):
    cache, _, _, _, vq = built
    images, _ = digits()
    baseline = float((images - images.mean(0)).square().mean())
    mse64 = vq.reconstruction_mse(images)
    mse16 = VQTokenizer.fit(images, 16, seed=0, iters=10).reconstruction_mse(images)
    assert mse64 < 0.1 * baseline and mse64 < mse16 < baseline
    codes = vq.encode(images[:5])
    assert codes.shape == (5, 16) and vq.decode(codes).shape == (5, 8, 8)


def test_vq_cache_round_trip_and_corrupt_cache(built, tmp_path):
    cache, _, _, _, vq = built
    again = VQTokenizer.load_or_train(cache)
    assert torch.equal(again.codebook, vq.codebook)
    bad = tmp_path / "vq-digits-64-0.pt"
    bad.write_bytes(b"not a codebook")
    with pytest.raises(ValueError, match="(?s)vq-digits-64-0.pt is unreadable.*delete it to retrain"):
        VQTokenizer.load_or_train(tmp_path)


def test_png_grid(tmp_path):
    images, _ = digits()
    grid = render_grid(images[:20], tmp_path / "g.png", nrow=10, scale=2)
    raw = (tmp_path / "g.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    assert (height, width) == (grid.shape[0] * 2, grid.shape[1] * 2) == (17 * 2, 89 * 2)


def test_sequences_follow_the_emu3_layout(built):
    _, train, _, vocab, vq = built
    cap = vocab.text(caption(7, 0))
    assert vocab.tokenizer.decode(cap) == "a handwritten digit seven"
    seq = vocab.sequence("generation", cap, list(range(16)))
    assert seq[0] == vocab.bos and seq[1:1 + len(cap)] == cap and seq[1 + len(cap)] == vocab.sov
    assert seq[-2:] == [vocab.eov, vocab.eos] and seq[-18:-2] == [vocab.image_offset + c for c in range(16)]
    und = vocab.sequence("understanding", cap, list(range(16)))
    assert und[-1 - len(cap) - 1:-1] == [vocab.eov, *cap] and und[1] == vocab.sov


def test_sampler_interleaves_shards_and_resumes_exactly(built):
    _, train, _, vocab, vq = built

    def sampler(rank, world=2):
        return MicroBatchSampler(train, vocab, vq, micro_batch_size=8, rank=rank, world_size=world, seed=3)

    s0, s1 = sampler(0), sampler(1)
    batches = [(s0.next_micro_batch(), s1.next_micro_batch()) for _ in range(4)]
    assert [b0["modality"] for b0, _ in batches] == ["understanding", "generation"] * 2
    for b0, b1 in batches:
        assert b0["modality"] == b1["modality"]
        assert not torch.equal(b0["pixel_values"], b1["pixel_values"]), "ranks see different samples"
    state = s0.state_dict()
    expected = [s0.next_micro_batch() for _ in range(3)]
    resumed = sampler(0)
    resumed.load_state_dict(state)
    for a, b in zip(expected, (resumed.next_micro_batch() for _ in range(3))):
        assert a["modality"] == b["modality"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    fresh = sampler(0)
    assert torch.equal(fresh.next_micro_batch()["input_ids"], batches[0][0]["input_ids"]), "deterministic"


def test_rank_shards_are_disjoint_and_cover_the_global_batch(built):
    _, train, _, vocab, vq = built
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(5)).tolist()
    world, micro = 3, 4
    seen = []
    for rank in range(world):
        s = MicroBatchSampler(train, vocab, vq, micro_batch_size=micro, rank=rank, world_size=world, seed=5,
                              augment=False)
        seen.append(s._order()[rank * micro:(rank + 1) * micro])
    flat = [i for shard in seen for i in shard]
    assert len(set(flat)) == world * micro and flat == order[:world * micro]


def test_augmentation_draws_fresh_views_in_range():
    images, _ = digits()
    gen = torch.Generator().manual_seed(0)
    views = augment(images[:32], gen)
    assert not torch.equal(views, images[:32]) and float(views.min()) >= 0 and float(views.max()) <= 1


def test_bad_arguments_name_the_argument(built, tmp_path):
    _, train, _, vocab, vq = built
    with pytest.raises(ValueError, match="val_fraction"):
        build_datasets(tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match="micro_batch_size=2000"):
        MicroBatchSampler(train, vocab, vq, micro_batch_size=2000)
