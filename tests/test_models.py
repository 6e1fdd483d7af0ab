"""Emu3-style and Janus-style models: losses against a manual re-computation, which tokens train what,
full-size shapes on the meta device, local from_pretrained round trips, sampling."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model_zoo.data import build_datasets, collate
from model_zoo.emu3 import Emu3Config, Emu3Model
from model_zoo.janus import JanusConfig, JanusModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, _, vocab, vq = build_datasets(tmp_path_factory.mktemp("cache"))
    rows = train[:6]
    return vocab, {m: collate(rows, vocab, vq, m) for m in ("understanding", "generation")}


def emu3(vocab):
    torch.manual_seed(0)
    return Emu3Model(Emu3Config(vocab_size=vocab.size))


def janus(vocab):
    torch.manual_seed(0)
    return JanusModel(JanusConfig(vocab_size=vocab.image_offset, codebook_size=vocab.codebook_size, pad_id=vocab.pad))


@pytest.mark.parametrize("modality", ["understanding", "generation"])
def test_emu3_loss_weights_vision_tokens_by_half(data, modality):
    vocab, batches = data
    model, batch = emu3(vocab), batches[modality]
    out = model(batch)
    logits = model.decoder(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none",
                         ignore_index=-100).view_as(targets)
    image = targets >= vocab.image_offset
    text = (targets != -100) & ~image
    expected = (ce[text].sum() + 0.5 * ce[image].sum()) / (text.sum() + 0.5 * image.sum())
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["image_loss"], ce[image].mean(), rtol=1e-4, atol=1e-5)
    assert int(out["n_image"]) == 16 * len(batch["input_ids"]) and int(out["n_text"]) > 0


def test_janus_trains_only_the_right_tokens_and_pathways(data):
    vocab, batches = data
    model = janus(vocab)
    und, gen = model(batches["understanding"]), model(batches["generation"])
    assert int(und["n_image"]) == 0 and int(gen["n_text"]) == 0
    assert int(und["n_text"]) == int(batches["understanding"]["caption_mask"].sum())
    und["loss"].backward()
    assert model.und_encoder[0].weight.grad is not None and model.image_head.weight.grad is None
    model.zero_grad(set_to_none=True)
    gen["loss"].backward()
    assert model.image_head.weight.grad is not None and model.und_encoder[0].weight.grad is None
    assert model.lm_head.weight.grad is None, "generation samples train the image head, not the text head"
    changed = dict(batches["generation"])
    changed["caption_ids"] = changed["caption_ids"].clone()
    pads = ~changed["caption_mask"]
    if pads.any():  # a padded caption slot is masked out: changing its id changes nothing
        changed["caption_ids"][pads] = vocab.bos
        torch.testing.assert_close(model(changed)["loss"], gen["loss"].detach())


def test_full_size_shapes_on_the_meta_device():
    with torch.device("meta"):
        e = Emu3Model(Emu3Config.emu3_8b())
        j = JanusModel(JanusConfig.janus_1_3b())
    n_emu3 = sum(p.numel() for p in e.parameters())
    n_janus_lm = sum(p.numel() for p in j.decoder.parameters()) + j.lm_head.weight.numel()
    assert 8.0e9 < n_emu3 < 8.6e9, n_emu3          # Emu3-8B (untied embedding and head over 184,622 tokens)
    assert n_janus_lm > 1.3e9 and n_janus_lm < 1.8e9, n_janus_lm   # DeepSeek-LLM 1.3B inside Janus-1.3B
    assert j.image_head.weight.shape == (16384, 2048)
    assert e.head_splits()["*k_proj.weight"] == (8, 0)


def test_from_pretrained_round_trips(data, tmp_path):
    vocab, batches = data
    for make, cls in ((emu3, Emu3Model), (janus, JanusModel)):
        model = make(vocab)
        model.save_pretrained(str(tmp_path / cls.__name__))
        loaded = cls.from_pretrained(str(tmp_path / cls.__name__))
        for m in ("understanding", "generation"):
            assert torch.equal(model(batches[m])["loss"], loaded(batches[m])["loss"])


def test_sampling_stays_in_the_image_code_range(data):
    vocab, batches = data
    gen = torch.Generator().manual_seed(0)
    prompts = [vocab.sequence("generation", vocab.text("the number 3 written by hand"), [])[:-2]] * 3
    codes = emu3(vocab).generate_images(prompts, vocab.image_offset, vocab.codebook_size, gen)
    assert codes.shape == (3, 16) and 0 <= int(codes.min()) and int(codes.max()) < vocab.codebook_size
    b = batches["generation"]
    codes = janus(vocab).generate_images(b["caption_ids"], b["caption_mask"], gen)
    assert codes.shape == (6, 16) and int(codes.max()) < vocab.codebook_size


def test_overrides_reach_the_config(data):
    vocab, _ = data
    cfg = dataclasses.replace(Emu3Config(vocab_size=vocab.size), num_layers=1)
    assert len(Emu3Model(cfg).decoder.model.layers) == 1
