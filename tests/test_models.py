"""transformers' own Emu3ForConditionalGeneration and JanusForConditionalGeneration under model_zoo's
wrappers: losses against per-document re-computations from the classes' own modules (so packing is
checked too), which parameters train, full-size shapes on the meta device, save_pretrained round
trips that plain transformers opens, checkpoint errors, and sampling (whose greedy codes must be what
the training layout predicts)."""

import ast
import dataclasses
import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Union

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import Emu3ForConditionalGeneration, Emu3VQVAEConfig, JanusForConditionalGeneration, PreTrainedModel

from model_zoo import emu3 as emu3_module
from model_zoo import janus as janus_module
from model_zoo.build import build_model
from model_zoo.config import ModelConfig
from model_zoo.data import Doc, collate
from model_zoo.emu3 import Emu3, Emu3Layout
from model_zoo.janus import Janus, JanusLayout
from model_zoo.unified import UnifiedModel
from model_zoo.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
# text 0..19, specials 20..26, then 32 image codes: one unified vocabulary of 59 ids
VOCAB = Vocab(encode=lambda s: [ord(c) % 20 for c in s], tokenizer=None, pad=20, bos=21, eos=22, sov=23,
              sot=24, eov=25, img=26, image_offset=27, codebook_size=32)
GRID = (4, 4)
LAYOUTS: dict[str, Union[Emu3Layout, JanusLayout]] = {"emu3": Emu3Layout(VOCAB, GRID),
                                                      "janus": JanusLayout(VOCAB, GRID, 16)}


def emu3() -> Emu3:
    torch.manual_seed(0)
    return Emu3.build("tiny", VOCAB)


def janus() -> Janus:
    torch.manual_seed(0)
    return Janus.build("tiny", VOCAB)


def make_docs(family: str, task: str, lengths=(3, 6, 4), seed: int = 0, response_only: bool = False) -> list[Doc]:
    g = torch.Generator().manual_seed(seed)
    layout, docs = LAYOUTS[family], []
    for n in lengths:
        caption = torch.randint(0, 20, (n,), generator=g).tolist()
        codes = torch.randint(0, VOCAB.codebook_size, (16,), generator=g).tolist()
        pixels = torch.rand(1, 8, 8, generator=g) if task in layout.pixels else None
        ids, mask = layout.document(task, caption, codes, response_only)
        docs.append(Doc(ids, mask, pixels))
    return docs


def make_batch(family: str, task: str, seed: int = 0, lengths=(3, 6, 4)) -> dict:
    """Three documents packed into two rows of 64 (the first row holds two)."""
    docs = make_docs(family, task, lengths, seed)
    return collate([docs[:2], docs[2:]], 64, VOCAB.pad, task)


def per_doc_ce(logits: torch.Tensor, doc: Doc, shift: int = 0) -> tuple[list, list]:
    """(text CEs, image CEs) of one document's targets from its own logits (position t predicts t + 1)."""
    text: list[torch.Tensor] = []
    image: list[torch.Tensor] = []
    for t in range(1, len(doc.ids)):
        if doc.loss_mask[t]:
            target = doc.ids[t]
            is_image = VOCAB.image_offset <= target < VOCAB.size
            ce = F.cross_entropy(logits[t - 1][None], torch.tensor([target - (shift if is_image else 0)]))
            (image if is_image else text).append(ce)
    return text, image


@pytest.mark.parametrize("task", ["understanding", "generation"])
def test_emu3_loss_is_the_weighted_next_token_ce_of_each_document(task):
    model, docs = emu3(), make_docs("emu3", task)
    out = model(collate([docs[:2], docs[2:]], 64, VOCAB.pad, task))
    text: list[torch.Tensor] = []
    image: list[torch.Tensor] = []
    for doc in docs:                      # each document alone, unpacked, through the class's own forward
        t, i = per_doc_ce(model.hf(input_ids=torch.tensor([doc.ids])).logits[0], doc)
        text, image = text + t, image + i
    t_sum, i_sum = torch.stack(text).sum(), torch.stack(image).sum()
    assert_close(out["loss"], (t_sum + 0.5 * i_sum) / (len(text) + 0.5 * len(image)))
    assert_close(out["text_loss"], t_sum / len(text)) and assert_close(out["image_loss"], i_sum / len(image))
    assert int(out["n_image"]) == 16 * 3 and int(out["n_text"]) == len(text)
    assert (out["loss"] - (t_sum + i_sum) / (len(text) + len(image))).abs() > 1e-4, "the 0.5 weight must matter"
    one = collate([docs[:1]], 64, VOCAB.pad, task)       # weight 1 on one document: transformers' own loss
    model.vision_loss_weight = 1.0
    labels = one["labels"].clone()
    assert_close(model(one)["loss"], model.hf(input_ids=one["input_ids"], labels=labels).loss)


@pytest.mark.parametrize("task", ["understanding", "generation"])
def test_janus_loss_matches_a_per_document_recomputation(task):
    model, docs = janus(), make_docs("janus", task)
    out = model(collate([docs[:2], docs[2:]], 64, VOCAB.pad, task))
    m = model.hf.model
    total: Union[float, torch.Tensor] = 0.0
    count = 0
    for doc in docs:
        ids = torch.tensor(doc.ids)
        if task == "understanding":
            assert doc.pixels is not None  # an understanding document carries its image
            x = m.language_model.embed_tokens(ids)
            vision = m.aligner(m.vision_model(doc.pixels[None] * 2 - 1).last_hidden_state)[0]
            x = torch.cat([x[:2], vision, x[2 + len(vision):]])
            h = m.language_model(inputs_embeds=x[None]).last_hidden_state[0]
            text, _ = per_doc_ce(model.hf.lm_head(h), doc)
            ces = text
        else:
            n = len(ids) - 16
            x = torch.cat([m.language_model.embed_tokens(ids[:n]), m.generation_aligner(m.generation_embeddings(
                ids[n:] - VOCAB.image_offset))])
            h = m.language_model(inputs_embeds=x[None]).last_hidden_state[0]
            _, ces = per_doc_ce(m.generation_head(h), doc, shift=VOCAB.image_offset)
        total, count = total + torch.stack(ces).sum(), count + len(ces)
    assert_close(out["loss"], total / count)
    kind, other = ("text", "image") if task == "understanding" else ("image", "text")
    assert int(out[f"n_{kind}"]) == count and int(out[f"n_{other}"]) == 0 and float(out[f"{other}_loss"].detach()) == 0


def test_backward_reaches_what_trains_and_each_janus_pathway_only_its_own():
    model: UnifiedModel = emu3()
    sum(model(make_batch("emu3", t))["loss"] for t in ("understanding", "generation")).backward()
    for name, p in model.named_parameters():
        if ".vqmodel." in name:
            assert not p.requires_grad and p.grad is None, f"the VQ-VAE is frozen: {name}"
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model = janus()
    own = {"understanding": ("hf.model.vision_model", "hf.model.aligner", "hf.lm_head"),
           "generation": ("hf.model.generation_embeddings", "hf.model.generation_aligner", "hf.model.generation_head")}
    reached = set()
    for task, mine in own.items():
        model.zero_grad(set_to_none=True)
        model(make_batch("janus", task))["loss"].backward()
        theirs = own["generation" if task == "understanding" else "understanding"]
        for name, p in model.named_parameters():
            if name.startswith(theirs) or ".vqmodel." in name:
                assert p.grad is None, f"{task} batch reached {name}"
            elif name.startswith(mine) or name.startswith("hf.model.language_model."):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{task} batch missed {name}"
                reached.add(name)
    assert reached == {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_size_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        e = Emu3ForConditionalGeneration(emu3_module.config("emu3_8b"))
        j = JanusForConditionalGeneration(janus_module.config("janus_1_3b"))
    assert all(p.is_meta for p in [*e.parameters(), *j.parameters()]), "nothing may be allocated"
    n_emu3 = sum(p.numel() for n, p in e.named_parameters() if ".vqmodel." not in n)
    n_lm = sum(p.numel() for p in j.model.language_model.parameters()) + j.lm_head.weight.numel()
    assert 8.0e9 <= n_emu3 <= 8.5e9, n_emu3
    assert 1.3e9 <= n_lm <= 2.1e9, n_lm
    layer = e.model.text_model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (8 * 128, 4096) and layer.mlp.gate_proj.weight.shape == (14336, 4096)
    assert j.model.generation_head.vision_head.weight.shape[0] == 16384 and j.lm_head.weight.shape == (102400, 2048)
    assert isinstance(e.config.vq_config, Emu3VQVAEConfig)
    assert j.model.vision_model.config.num_image_tokens == 576 and e.config.vq_config.codebook_size == 32768


@pytest.mark.parametrize("family", ["emu3", "janus"])
def test_save_pretrained_round_trips_and_plain_transformers_opens_it(family, tmp_path):
    model = {"emu3": emu3, "janus": janus}[family]()
    model.save_pretrained(str(tmp_path))
    cls: type[PreTrainedModel] = {"emu3": Emu3ForConditionalGeneration, "janus": JanusForConditionalGeneration}[family]
    plain = cls.from_pretrained(str(tmp_path), local_files_only=True)
    mine = model.hf.state_dict()
    assert plain.state_dict().keys() == mine.keys()
    assert all(torch.equal(v, mine[k]) for k, v in plain.state_dict().items())
    again = build_model(ModelConfig(family=family, size="tiny", pretrained=str(tmp_path)), VOCAB)
    batch = make_batch(family, "generation")
    assert torch.equal(again(batch)["loss"], model(batch)["loss"])


def test_checkpoint_mistakes_name_their_field(tmp_path):
    emu3().save_pretrained(str(tmp_path / "emu3"))
    cases = [
        (ModelConfig(family="janus", pretrained=str(tmp_path / "emu3")),
         r"model.pretrained: .* holds a 'emu3' checkpoint"),
        (ModelConfig(family="emu3", size="emu3_8b", pretrained=str(tmp_path / "emu3")),
         r"model.size: .* is not a emu3 emu3_8b checkpoint \(hidden_size 64, not 4096"),
        (ModelConfig(family="emu3", pretrained=str(tmp_path / "emu3"), overrides={"hidden_size": 32}),
         r"model.overrides.hidden_size: a checkpoint's weights fix hidden_size"),
        (ModelConfig(family="emu3", overrides={"hiden_size": 32}), r"model.overrides.hiden_size: unknown; valid keys"),
        (ModelConfig(family="emu3", pretrained=str(tmp_path)), r"model.pretrained: .* has no config.json"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            build_model(cfg, VOCAB)
    other = dataclasses.replace(VOCAB, codebook_size=16)
    with pytest.raises(ValueError, match=r"model.pretrained: .* does not use this run's token ids \(codebook_size 32, "
                                         r"here 16\); .*data.codebook_size: 32"):
        build_model(ModelConfig(family="emu3", pretrained=str(tmp_path / "emu3")), other)
    # a non-shape override is applied to the checkpoint's config, not ignored
    tuned = build_model(ModelConfig(family="emu3", pretrained=str(tmp_path / "emu3"),
                                    overrides={"rms_norm_eps": 1e-3, "vision_loss_weight": 0.25}), VOCAB)
    assert tuned.text_config.rms_norm_eps == 1e-3 and tuned.vision_loss_weight == 0.25


def test_a_padded_embedding_is_accepted_and_only_a_true_mismatch_refused_with_fitting_advice(tmp_path):
    """A checkpoint built the transformers way, its embedding padded by resize_token_embeddings(
    pad_to_multiple_of=64) to 384 rows for a 371-id tokenizer, loads with its own tokenizer and trains:
    no document holds the padding ids, so they are never targets. Refused, with the advice that fits:
    another tokenizer saved beside the checkpoint (other special ids), an embedding smaller than the
    ids, and the project's WordPiece."""
    from model_zoo.build import build_vocab
    from model_zoo.config import DataConfig
    from own_data import bpe_tokenizer, emu3_checkpoint

    m = ModelConfig(family="emu3", pretrained=str(emu3_checkpoint(tmp_path / "ckpt")))
    d = DataConfig(text_tokenizer="pretrained", image_tokenizer="pretrained", image_size=8, cache_dir=str(tmp_path))
    vocab = build_vocab(d, m)
    model = build_model(m, vocab)
    assert (model.text_config.vocab_size, vocab.size) == (384, 371)
    layout = Emu3Layout(vocab, (4, 4))
    docs = [Doc(*layout.document(t, vocab.text("a red square"), list(range(16)), False)) for t in ("generation",) * 2]
    batch = collate([docs], 64, vocab.pad, "generation")
    targets = batch["labels"][batch["labels"] != -100]
    assert int(targets.max()) < vocab.size <= model.text_config.vocab_size, "padding rows are never targets"
    model(batch)["loss"].backward()
    assert torch.isfinite(model.hf.lm_head.weight.grad).all()

    bpe_tokenizer(merges=320).save_pretrained(str(tmp_path / "ckpt"))  # another tokenizer: its specials moved
    with pytest.raises(ValueError, match=r"does not use this run's token ids \(bos 300, here 304, eos 301, here 305"
                                         r"\); the tokenizer saved in .*ckpt is not the one this checkpoint was "
                                         r"trained with; save the model's own tokenizer there") as info:
        build_model(m, build_vocab(d, m))
    assert "data.text_tokenizer: pretrained" not in str(info.value), "it is already set: not the advice"
    emu3_checkpoint(tmp_path / "ckpt")
    hf = Emu3ForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt"))
    hf.resize_token_embeddings(320, mean_resizing=False)   # fewer rows than the tokenizer's ids
    hf.save_pretrained(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"\(320 embedding rows, here ids up to 370\); the tokenizer saved in"):
        build_model(m, build_vocab(d, m))
    words = build_vocab(DataConfig(cache_dir=str(tmp_path), image_tokenizer="pretrained", image_size=8), m)
    with pytest.raises(ValueError, match=r"does not use this run's token ids .*; use data.text_tokenizer: pretrained "
                                         r"\(the tokenizer saved with the checkpoint\)"):
        build_model(m, words)


def test_caption_samples_are_the_models_guided_generations():
    """The sample grid's images for a corpus: each caption tokenized as training tokenizes it, generated
    with classifier-free guidance (greedy here: every code the argmax of u + g (c - u), from the class's
    own forward of the caption's prompt and of the empty caption's), decoded by the image tokenizer."""
    from model_zoo.quality import generate_captioned
    from model_zoo.vq import VQTokenizer, digits

    model, layout = emu3(), LAYOUTS["emu3"]
    vq = VQTokenizer.fit(digits()[0][:100], VOCAB.codebook_size, 0, iters=3)
    captions, g = ["abc", "a longer one"], 3.0
    pictures = generate_captioned(model, layout, vq, captions, 2, temperature=0.0, guidance=g)
    assert pictures.shape == (4, 1, 8, 8)
    lo, hi = VOCAB.image_offset, VOCAB.size
    for k, text in enumerate(captions):
        codes: list[int] = []
        ids = {c: layout.generation_prompt(VOCAB.text(c)) for c in (text, "")}
        for _ in range(16):   # each stream re-run whole: no cache, the class's plain forward
            c, u = (model.hf(input_ids=torch.tensor([ids[x] + [lo + i for i in codes]])).logits[0, -1, lo:hi]
                    for x in (text, ""))
            codes.append(int((u + g * (c - u)).argmax()))
        assert torch.equal(pictures[2 * k], vq.decode(torch.tensor([codes]))[0]), text
        assert torch.equal(pictures[2 * k + 1], pictures[2 * k]), "greedy: both images alike"
    unguided = generate_captioned(model, layout, vq, captions, 2, temperature=0.0, guidance=1.0)
    assert not torch.equal(unguided, pictures), "guidance changes what is drawn"


def test_an_exported_tokenizer_does_not_forbid_downloads(tmp_path):
    """A checkpoint's tokenizer is loaded offline (local_files_only); the exported copy must not carry that
    loading argument into its tokenizer_config.json, where it would bind every later user."""
    from model_zoo.build import build_vocab
    from model_zoo.config import DataConfig
    from own_data import emu3_checkpoint

    m = ModelConfig(family="emu3", pretrained=str(emu3_checkpoint(tmp_path / "ckpt")))
    vocab = build_vocab(DataConfig(text_tokenizer="pretrained", image_tokenizer="pretrained", image_size=8), m)
    vocab.save(str(tmp_path / "export"), "emu3")
    saved = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved and saved["bos_token"] == "<|extra_203|>"


def test_greedy_generation_samples_what_training_predicts():
    e, j = emu3(), janus()
    caption = [3, 4, 5]
    pairs: list[tuple[UnifiedModel, Union[Emu3Layout, JanusLayout]]] = [(e, LAYOUTS["emu3"]), (j, LAYOUTS["janus"])]
    for model, layout in pairs:
        codes = model.generate_images(layout, caption, 3, 1.0, torch.Generator().manual_seed(0))
        assert codes.shape == (3, 16) and 0 <= int(codes.min()) and int(codes.max()) < VOCAB.codebook_size
        assert torch.equal(codes, model.generate_images(layout, caption, 3, 1.0, torch.Generator().manual_seed(0)))
        greedy = model.generate_images(layout, caption, 1, temperature=0.0)[0].tolist()
        doc = Doc(*layout.document("generation", caption, greedy, True))
        if model is j:  # teacher forcing: every code is the generation head's argmax
            assert int(model(collate([[doc]], 64, VOCAB.pad, "generation"))["image_correct"]) == 16
        else:           # every code is the argmax among the image codes of the training forward's logits
            start = len(layout.generation_prompt(caption))
            logits = model.hf(input_ids=torch.tensor([doc.ids])).logits[0, start - 1:start + 15]
            assert logits[:, VOCAB.image_offset:].argmax(-1).tolist() == greedy


@pytest.mark.parametrize("make", [emu3, janus])
def test_head_splits_composed_from_the_models_head_counts_name_whole_heads(make):
    """Models expose num_heads / num_kv_heads; ML-FOP-SOAP's head splits are composed from them, limited
    to the decoder (Janus' vision encoder and the VQ-VAEs have q/k/v projections of their own)."""
    from distopt import attention_head_splits

    model = make()
    prefix = f"hf.{model.decoder_path}."
    splits = {prefix + k: v for k, v in attention_head_splits(model.num_heads, model.num_kv_heads).items()}
    head_dim = model.text_config.hidden_size // model.num_heads
    matched = 0
    for name, p in model.named_parameters():
        for pattern, (heads, dim) in splits.items():
            if fnmatchcase(name, pattern):
                matched += 1
                assert p.shape[dim] == heads * head_dim, name
    assert matched == 4 * model.text_config.num_hidden_layers and model.num_kv_heads == 2 and model.num_heads == 4


def test_model_zoo_imports_neither_distopt_nor_launcher():
    for path in (ROOT / "model_zoo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("distopt", "launcher") for n in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("family,task", [("emu3", "generation"), ("janus", "understanding"), ("janus", "generation")])
def test_chunked_losses_equal_whole_logits_and_never_hold_them(family, task, monkeypatch):
    """The head's logits a chunk of tokens at a time (each chunk checkpointed): the same losses and
    gradients as one chunk, to fp32 rounding, with no head call wider than a chunk."""
    import model_zoo.unified as unified

    batch = make_batch(family, task)
    whole_model = emu3() if family == "emu3" else janus()
    whole = whole_model(batch)
    whole["loss"].backward()
    model = emu3() if family == "emu3" else janus()
    head = model.hf.lm_head if family == "emu3" or task == "understanding" else model.hf.model.generation_head
    rows = []
    head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    width = head.out_features if isinstance(head, torch.nn.Linear) else unified._out_features(head)
    monkeypatch.setattr(unified, "LOGIT_BYTES_PER_CHUNK", 6 * width * 10)  # chunks of 10 tokens
    out = model(batch)
    out["loss"].backward()
    for key in ("loss", "text_loss", "image_loss"):
        assert_close(out[key], whole[key], rtol=1e-6, atol=1e-7)
    for key in ("n_text", "n_image", "text_correct", "image_correct"):
        assert int(out[key]) == int(whole[key]), key
    assert max(rows) == 10 and len(rows) > 2 * (2 * 63 // 10), "forward chunks, recomputed in backward"
    for (name, p), q in zip(model.named_parameters(), whole_model.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family,task", [("emu3", "generation"), ("emu3", "understanding"),
                                         ("janus", "understanding"), ("janus", "generation")])
def test_forward_and_backward_read_nothing_on_the_host(family, task):
    """Under FakeTensorMode a tensor has no values, so any read of one on the host (a boolean-mask
    gather, .item(), len() of a data-dependent shape) raises: the training step never waits for the
    device (the dry run, launcher/dryrun.py, runs the full-size model this way)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = Emu3.build("tiny", VOCAB) if family == "emu3" else Janus.build("tiny", VOCAB)
    batch = make_batch(family, task)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model.to_empty(device="cpu")
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model(fake)
        out["loss"].backward()
    assert out["loss"].shape == () and any(p.grad is not None for p in model.parameters())
