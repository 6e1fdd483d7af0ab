"""Emu3-style and Janus-style models on a synthetic batch that follows the data contract: losses against
independent re-computations, which tokens and pathways train, full-size shapes on the meta device,
from_pretrained round trips, and sampling (whose greedy codes must be what the training layout predicts)."""

from fnmatch import fnmatchcase

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from distopt import attention_head_splits
from model_zoo.emu3 import Emu3Config, Emu3Model
from model_zoo.janus import JanusConfig, JanusModel

# text 0..19, specials, then 32 image codes: one unified vocabulary of 58 ids
PAD, BOS, EOS, SOV, SOT, EOV, OFFSET, CODES = 20, 21, 22, 23, 24, 25, 26, 32
IDS = dict(pad_id=PAD, bos_id=BOS, eos_id=EOS, image_offset=OFFSET, codebook_size=CODES)
META = [5, 6]


def make_batch(modality: str, lengths=(3, 6, 4, 5), seed: int = 0) -> dict:
    """Emu3 layout in input_ids, plus the caption/codes/pixels views Janus reads; captions of unequal length."""
    g = torch.Generator().manual_seed(seed)
    captions = [torch.randint(0, PAD, (n,), generator=g).tolist() for n in lengths]
    codes = torch.randint(0, CODES, (len(lengths), 16), generator=g)
    seqs = []
    for cap, c in zip(captions, codes):
        image = [SOV, *META, SOT, *(c + OFFSET).tolist(), EOV]
        seqs.append([BOS, *cap, *image, EOS] if modality == "generation" else [BOS, *image, *cap, EOS])
    input_ids = torch.full((len(seqs), max(map(len, seqs))), PAD)
    caption_ids = torch.full((len(seqs), max(lengths)), PAD)
    for i, (seq, cap) in enumerate(zip(seqs, captions)):
        input_ids[i, :len(seq)], caption_ids[i, :len(cap)] = torch.tensor(seq), torch.tensor(cap)
    return dict(modality=modality, input_ids=input_ids, labels=input_ids.masked_fill(input_ids == PAD, -100),
                image_mask=input_ids >= OFFSET, pixel_values=torch.rand(len(seqs), 1, 8, 8, generator=g),
                image_codes=codes, caption_ids=caption_ids, caption_mask=caption_ids != PAD)


def emu3() -> Emu3Model:
    torch.manual_seed(0)
    return Emu3Model(Emu3Config.tiny(OFFSET + CODES, **IDS))


def janus() -> JanusModel:
    torch.manual_seed(0)
    return JanusModel(JanusConfig.tiny(OFFSET + CODES, **IDS))


@pytest.mark.parametrize("modality", ["understanding", "generation"])
def test_emu3_loss_is_the_half_weighted_next_token_ce(modality):
    model, batch = emu3(), make_batch(modality)
    out = model(batch)
    logits = model.decoder(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    image = targets >= OFFSET
    text = (targets != -100) & ~image
    expected = (ce[text].sum() + 0.5 * ce[image].sum()) / (text.sum() + 0.5 * image.sum())
    assert torch.isfinite(out["loss"])
    assert_close(out["loss"], expected)
    assert_close(out["text_loss"], ce[text].mean())
    assert_close(out["image_loss"], ce[image].mean())
    assert int(out["n_image"]) == 16 * 4 and int(out["n_text"]) == int(text.sum())
    assert (out["loss"] - ce[text | image].mean()).abs() > 1e-4, "the 0.5 weight must change the loss"
    model.config.vision_loss_weight = 1.0                              # weight 1: plain mean over all targets
    assert_close(model(batch)["loss"], F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100))


def test_emu3_backward_reaches_every_parameter():
    model = emu3()
    sum(model(make_batch(m))["loss"] for m in ("understanding", "generation")).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("modality", ["understanding", "generation"])
def test_janus_loss_matches_an_unpadded_per_sample_recomputation(modality):
    model, batch = janus(), make_batch(modality)
    out = model(batch)
    embed, total, count = model.decoder.get_input_embeddings(), 0.0, 0
    for i in range(4):
        cap = batch["caption_ids"][i][batch["caption_mask"][i]]
        bos = embed(torch.tensor([BOS]))
        if modality == "understanding":
            vis = model.visual_tokens(batch["pixel_values"][i:i + 1])[0]
            h = model.decoder(inputs_embeds=torch.cat([bos, vis, embed(cap)])[None]).last_hidden_state[0]
            logits, targets = model.lm_head(h[len(vis):-1]), cap
        else:
            codes = batch["image_codes"][i]
            h = model.decoder(inputs_embeds=torch.cat([bos, embed(cap), model.image_embeddings(codes)])[None]
                              ).last_hidden_state[0]
            logits, targets = model.image_head(h[len(cap):-1]), codes
        total, count = total + F.cross_entropy(logits, targets, reduction="sum"), count + len(targets)
    assert torch.isfinite(out["loss"])
    assert_close(out["loss"], total / count)
    kind, other = ("text", "image") if modality == "understanding" else ("image", "text")
    assert int(out[f"n_{kind}"]) == count and int(out[f"n_{other}"]) == 0 and float(out[f"{other}_loss"].detach()) == 0


def test_janus_masked_out_tokens_do_not_change_the_loss():
    model = janus()
    for modality in ("understanding", "generation"):
        batch = make_batch(modality)
        loss = model(batch)["loss"]
        changed = {**batch, "caption_ids": batch["caption_ids"].masked_fill(~batch["caption_mask"], 7),
                   "input_ids": torch.zeros_like(batch["input_ids"]), "labels": torch.zeros_like(batch["labels"])}
        changed["image_codes" if modality == "understanding" else "pixel_values"] = \
            torch.zeros_like(batch["image_codes" if modality == "understanding" else "pixel_values"])
        assert_close(model(changed)["loss"], loss, rtol=1e-6, atol=1e-6)
        order = torch.argsort(batch["caption_mask"].long(), dim=1, stable=True)      # the same captions padded left
        left = {**batch, "caption_ids": batch["caption_ids"].gather(1, order),
                "caption_mask": batch["caption_mask"].gather(1, order)}
        assert_close(model(left)["loss"], loss)
        trained = {**batch}                         # a trained target changes it: the test can fail
        key = "caption_ids" if modality == "understanding" else "image_codes"
        trained[key] = batch[key].clone()
        trained[key][0, 1] = (trained[key][0, 1] + 1) % 10
        assert (model(trained)["loss"] - loss).abs() > 1e-6


def test_janus_each_pathway_trains_on_its_own_modality_only():
    model = janus()
    own = {"understanding": ("und_encoder", "und_adaptor", "lm_head"),
           "generation": ("gen_embed", "gen_adaptor", "image_head")}
    reached = set()
    for modality, mine in own.items():
        model.zero_grad(set_to_none=True)
        model(make_batch(modality))["loss"].backward()
        theirs = own["generation" if modality == "understanding" else "understanding"]
        for name, p in model.named_parameters():
            if name.startswith(theirs):
                assert p.grad is None, f"{modality} batch reached {name}"
            elif name.startswith(mine) or name.startswith("decoder."):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{modality} batch missed {name}"
                reached.add(name)
    assert reached == {name for name, _ in model.named_parameters()}


def test_full_size_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        e = Emu3Model(Emu3Config.emu3_8b())
        j = JanusModel(JanusConfig.janus_1_3b())
    assert all(p.is_meta for p in [*e.parameters(), *j.parameters()]), "nothing may be allocated"
    n_emu3 = sum(p.numel() for p in e.parameters())            # everything: untied embedding and head
    n_lm = sum(p.numel() for p in j.decoder.parameters()) + j.lm_head.weight.numel()   # DeepSeek-LLM 1.3B
    assert 8.0e9 <= n_emu3 <= 8.5e9, n_emu3
    assert 1.3e9 <= n_lm <= 2.1e9, n_lm
    assert e.decoder.model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, 4096)
    assert e.decoder.model.layers[0].mlp.gate_proj.weight.shape == (14336, 4096)
    assert j.image_head.weight.shape == (16384, 2048) and j.lm_head.weight.shape == (102400, 2048)
    assert j.gen_adaptor[0].weight.shape == (2048, 8) and j.und_adaptor[0].weight.shape == (2048, 1024)


@pytest.mark.parametrize("make", [emu3, janus])
def test_head_splits_name_real_parameters_with_whole_heads(make):
    model = make()
    c = model.config
    splits = attention_head_splits(c.num_heads, c.num_kv_heads)
    matched = 0
    for name, p in model.named_parameters():
        assert not name.endswith(".bias") or not name.startswith("decoder."), f"decoder bias {name}"
        for pattern, (heads, dim) in splits.items():
            if fnmatchcase(name, pattern):
                matched += 1
                assert p.shape[dim] == heads * c.hidden_size // c.num_heads, name
    assert matched == 4 * c.num_layers
    assert splits["*k_proj.weight"] == (c.num_kv_heads, 0) and splits["*o_proj.weight"] == (c.num_heads, 1)


def test_from_pretrained_round_trips_bit_identically(tmp_path):
    e = emu3()
    e.save_pretrained(str(tmp_path / "emu3"))
    e2 = Emu3Model.from_pretrained(str(tmp_path / "emu3"))
    ids = make_batch("generation")["input_ids"]
    assert e2.config == e.config and torch.equal(e.logits(ids), e2.logits(ids))
    j = janus()
    j.save_pretrained(str(tmp_path / "janus"))
    j2 = JanusModel.from_pretrained(str(tmp_path / "janus"))
    assert j2.config == j.config
    assert all(torch.equal(a, b) for a, b in zip(j.state_dict().values(), j2.state_dict().values()))
    for m in ("understanding", "generation"):
        assert torch.equal(j(make_batch(m))["loss"], j2(make_batch(m))["loss"])


def test_generate_images_samples_codes_the_training_layout_predicts():
    e, j = emu3(), janus()
    prompt = [BOS, 3, 4, 5, SOV, *META, SOT]
    for model, ids in ((e, prompt), (j, [3, 4, 5, PAD])):
        codes = model.generate_images(ids, 3, 1.0, torch.Generator().manual_seed(0))
        assert codes.shape == (3, 16) and codes.dtype == torch.long
        assert 0 <= int(codes.min()) and int(codes.max()) < CODES
        assert torch.equal(codes, model.generate_images(ids, 3, 1.0, torch.Generator().manual_seed(0)))
    # greedy sampling (KV cache) must pick the argmax of the teacher-forced training forward at every step
    greedy = e.generate_images(prompt, 1, temperature=0.0)[0]
    logits = e.logits(torch.tensor([prompt + (greedy + OFFSET).tolist()]))[0, len(prompt) - 1:-1]
    assert torch.equal(logits[:, OFFSET:].argmax(-1), greedy)
    batch = make_batch("generation", lengths=(3, 6))
    batch["image_codes"] = torch.cat([j.generate_images(c, 1, temperature=0.0) for c in batch["caption_ids"]])
    assert int(j(batch)["image_correct"]) == 2 * 16
