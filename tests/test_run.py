"""launcher/run.py end to end: every launcher trains both transformers model families from a tiny
checkpoint saved with save_pretrained (model.pretrained), writes the scalars, labelled samples and
checkpoints, and exports a model that plain transformers opens with exactly the trained weights; a
run trains from image-caption pairs prepared by model_zoo.prepare; a resumed run continues the loss
curve exactly; bad configs stop before work. (The Slurm batch script under a real local Slurm:
tests/test_preemption.py.)"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import Emu3ForConditionalGeneration, JanusForConditionalGeneration, PreTrainedModel

from model_zoo.build import build_model
from model_zoo.config import DataConfig, ModelConfig
from model_zoo.digits import caption_corpus
from model_zoo.images import GAP, LINE_H, wrap
from model_zoo.lora import LLAMA_LINEARS
from model_zoo.prepare import prepare
from model_zoo.vocab import Vocab, load_or_train_wordpiece
from own_data import emu3_checkpoint, shapes_folder
from test_launchers import free_port
from test_prepare import write_pairs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = str(ROOT / "launcher" / "run.py")
CLASSES: dict[str, type[PreTrainedModel]] = {"emu3": Emu3ForConditionalGeneration,
                                             "janus": JanusForConditionalGeneration}
SCALARS = {"loss/text", "loss/image", "lr", "grad/cosine", "grad/norm_ratio",
           "fop/beta_abs_mean", "fop/eta_mean", "optimizer/eigh", "optimizer/qr", "optimizer/qr_seconds",
           "time/step_s", "time/forward_s", "time/backward_s", "time/optimizer_s", "throughput/tokens_per_s",
           "memory/rank0_mib", "val/text_loss", "val/image_loss", "val/image_token_accuracy", "val/caption_accuracy"}


def settings(out: Path, cache: Path, steps=4, extra=()):
    args = [f"run.out_dir={out}", f"data.cache_dir={cache}", f"schedule.steps={steps}", "schedule.warmup_steps=1",
            "logging.every=1", f"eval.every={steps}", "eval.batches=1", "checkpoint.every=2",
            "batch.micro_batch_size=4", *extra]
    return [a for kv in args for a in ("--set", kv)]


def launch(kind: str, config: str, out: Path, cache: Path, steps=4, extra=(), check=True):
    cmd = {"python": [sys.executable, RUN],
           "deepspeed": [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), RUN],
           "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), RUN],
           "mpiexec": [str(BIN / "mpiexec"), "-n", "2", sys.executable, RUN]}[kind]
    proc = subprocess.run(cmd + ["--config", str(ROOT / "configs" / config)] + settings(out, cache, steps, extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def scalars(out: Path) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def cache(digits_cache):
    return digits_cache


@pytest.fixture(scope="module")
def checkpoints(cache, tmp_path_factory):
    """Tiny Emu3ForConditionalGeneration and JanusForConditionalGeneration saved with save_pretrained,
    over the vocabulary the runs build from the same cache."""
    vocab = Vocab.from_wordpiece(load_or_train_wordpiece(cache, caption_corpus()), 64)
    out = {}
    for family in CLASSES:
        torch.manual_seed(0)
        out[family] = tmp_path_factory.mktemp(f"tiny-{family}")
        build_model(ModelConfig(family=family), vocab).save_pretrained(str(out[family]))
    return out


def trained_weights(checkpoint: Path, scratch: Path) -> dict:
    """The model a checkpoint holds, in one process: model.pt (engine deepspeed) or the DCP folder (fsdp2)."""
    if (checkpoint / "model.pt").exists():
        return torch.load(checkpoint / "model.pt")
    dcp_to_torch_save(checkpoint / "model", scratch)
    return torch.load(scratch)["model"]


# every launcher and both families under the deepspeed engine; both families under fsdp2 with the deepspeed launcher
LAUNCHES = [("deepspeed", "emu3", "deepspeed"), ("torchrun", "janus", "deepspeed"), ("mpiexec", "emu3", "deepspeed"),
            ("python", "janus", "deepspeed"), ("deepspeed", "emu3", "fsdp2"), ("deepspeed", "janus", "fsdp2")]


@pytest.mark.parametrize("kind,family,engine", LAUNCHES)
def test_each_launcher_trains_a_checkpoint_and_exports_what_it_trained(kind, family, engine, checkpoints, tmp_path,
                                                                       cache):
    launch(kind, f"{family}_tiny_mlfop.yaml", tmp_path, cache, steps=3,
           extra=[f"model.pretrained={checkpoints[family]}", f"engine={engine}"])
    acc = scalars(tmp_path)
    missing = SCALARS - set(acc.Tags()["scalars"])
    assert not missing, f"scalars not written: {sorted(missing)}"
    assert "samples" in acc.Tags()["images"]
    png = (tmp_path / "samples" / "step-3.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    tile_w, tile_h = 4 * 8 + GAP, LINE_H + GAP + 4 * 8 + GAP
    assert struct.unpack(">II", png[16:24]) == (4 * tile_w - GAP, 10 * tile_h - GAP), \
        "4 columns x 10 digits of 8x8 tiles scaled 4 times, each under its one-line label"
    assert [e.value for e in acc.Scalars("optimizer/fop_folds")][-1] > 0
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-2"
    trained = trained_weights(tmp_path / "checkpoints" / "step-2", tmp_path / "dcp.pt")
    start = CLASSES[family].from_pretrained(str(checkpoints[family])).state_dict()
    exported = CLASSES[family].from_pretrained(str(tmp_path / "model")).state_dict()  # plain transformers
    assert exported.keys() == start.keys() == {k[len("hf."):] for k in trained}
    assert all(torch.equal(v, trained["hf." + k]) for k, v in exported.items()), "exported = trained weights"
    moved = [k for k, v in start.items() if not torch.equal(v, exported[k])]
    assert any(".layers.0.self_attn.q_proj" in k for k in moved) and not any(".vqmodel." in k for k in moved)
    if engine == "fsdp2":  # resume the DCP checkpoint: one more step
        proc = launch(kind, f"{family}_tiny_mlfop.yaml", tmp_path, cache, steps=4,
                      extra=[f"model.pretrained={checkpoints[family]}", f"engine={engine}"])
        assert f"resumed from {tmp_path / 'checkpoints'} step 2" in proc.stderr
        assert sorted({e.step for e in scalars(tmp_path).Scalars("loss/text")}) == [0, 1, 2, 3]
        assert (tmp_path / "checkpoints" / "latest").read_text() == "step-3"


@pytest.fixture(scope="module")
def prepared_pairs(cache, tmp_path_factory):
    """Real digits as PNG files with caption files, tokenized once for Janus by model_zoo.prepare."""
    root = tmp_path_factory.mktemp("pairs")
    write_pairs(root / "pairs", corrupt=None, empty=None)
    d = DataConfig(source="pairs", path=str(root / "pairs"), prepared=str(root / "prepared"), cache_dir=str(cache),
                   val_fraction=0.25)
    prepare(ModelConfig(family="janus"), d, progress=False)
    return ["data.source=pairs", f"data.path={root / 'pairs'}", f"data.prepared={root / 'prepared'}",
            "data.val_fraction=0.25", "eval.samples_png=false"]


@pytest.mark.parametrize("config,engine", [("emu3_tiny_adamw.yaml", "deepspeed"), ("janus_tiny_soap.yaml", "deepspeed"),
                                           ("janus_tiny_soap.yaml", "fsdp2")])
def test_baseline_optimizers_run(config, engine, tmp_path, cache, prepared_pairs):
    """Janus trains from the prepared pairs (its understanding encoder reads their stored images); SOAP
    under fsdp2 runs as MLFOPSOAP(fop=False), which its counters show."""
    launch("deepspeed", config, tmp_path, cache, steps=2,
           extra=[f"engine={engine}", *(prepared_pairs if "janus" in config else ())])
    acc = scalars(tmp_path)
    for tag in ("loss/text", "loss/image", "val/text_loss", "val/image_loss"):
        assert all(0 < e.value < 20 for e in acc.Scalars(tag)), tag
    if engine == "fsdp2":
        assert [e.value for e in acc.Scalars("optimizer/reductions")] == [1, 2], "one redistribution a step"
        assert all(e.value == 0 for e in acc.Scalars("optimizer/fop_folds"))


def test_resume_continues_the_loss_curve_exactly(tmp_path, cache):
    """A first launch of 4 steps (a constant schedule, so the horizon does not change the LR), then a
    launch of 6 that resumes from its last checkpoint, against one launch of 6."""
    full, part = tmp_path / "full", tmp_path / "part"
    constant = ["schedule.lr_schedule=constant"]
    launch("python", "emu3_tiny_mlfop.yaml", full, cache, steps=6, extra=constant)
    launch("python", "emu3_tiny_mlfop.yaml", part, cache, steps=4, extra=constant)
    launch("python", "emu3_tiny_mlfop.yaml", part, cache, steps=6, extra=constant)  # resumes from step-3 (auto)
    a, b = scalars(full), scalars(part)
    for tag in ("loss/text", "loss/image"):
        curve_full = {e.step: e.value for e in a.Scalars(tag)}
        curve_part = {e.step: e.value for e in b.Scalars(tag)}
        assert set(curve_part) == set(curve_full) == set(range(6))
        assert curve_part == curve_full, tag
    for x, y in zip(torch.load(full / "checkpoints" / "step-5" / "model.pt").values(),
                    torch.load(part / "checkpoints" / "step-5" / "model.pt").values(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("extra,message", [
    (["batch.global_batch_size=7"], "batch.global_batch_size: 7 != micro_batch_size 4"),
    (["checkpoint.resume=/no/such/dir"], "checkpoint.resume: '/no/such/dir' is neither"),
    (["data.cache_dir=/etc/hostname/cache"], "data.cache_dir: '/etc/hostname/cache' cannot be created"),
    (["optimizer.params.levle=head"], "optimizer.params.levle: not an argument of mlfop_soap"),
    (["optimizer.params.level=heads"], "optimizer.params.level: 'heads'; choose one of ('layer', 'head', 'global')"),
    (["model.size=emu3_8b"], "memory: this run needs about"),  # 8.5 B fp32 parameters on this machine
])
def test_bad_configs_stop_before_any_work(extra, message, tmp_path, cache):
    proc = launch("python", "emu3_tiny_mlfop.yaml", tmp_path / "out", cache, extra=extra, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing may be written before the config is valid"


def test_a_config_error_comes_before_deepspeed_builds_its_op_and_without_a_traceback(tmp_path, cache):
    """A pairs corpus that was never prepared: the launcher says so as a config error, with the command
    that prepares it, before the process group starts (DeepSpeed builds its communication op there, in an
    empty TORCH_EXTENSIONS_DIR minutes on a first launch) and before anything is written."""
    write_pairs(tmp_path / "pairs", corrupt=None, empty=None)
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    cmd = [sys.executable, RUN, "--config", str(ROOT / "configs" / "emu3_tiny_mlfop.yaml"),
           *settings(tmp_path / "out", cache, extra=["data.source=pairs", f"data.path={tmp_path / 'pairs'}",
                                                     f"data.prepared={tmp_path / 'prepared'}"])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"config error: data.prepared: {tmp_path / 'prepared'} holds no prepared dataset" in proc.stderr
    assert "Prepare it: python -m model_zoo.prepare --config <your run config> (or set data.prepare: auto" \
        in proc.stderr
    assert not any(ext.iterdir()), "DeepSpeed built its op before the config was checked"
    assert not (tmp_path / "out").exists() and not (tmp_path / "prepared").exists()


def test_bring_your_own_checkpoint_and_corpus(tmp_path, cache):
    """docs/models_and_data.md's walk-through: a tiny Emu3 checkpoint made the transformers way (its own
    byte-level BPE tokenizer, the embedding padded to a multiple of 64 rows) and a folder of non-square
    RGB pictures with .txt captions. One launch prepares the corpus (data.prepare: auto), trains, draws
    the sample grid for a caption of the config and two validation captions with classifier-free
    guidance, and exports a model plain transformers opens, with a tokenizer that may be downloaded."""
    from transformers import AutoTokenizer

    checkpoint = emu3_checkpoint(tmp_path / "checkpoint")
    shapes_folder(tmp_path / "shapes")
    ours = "a red square on white"
    proc = launch("python", "emu3_tiny_adamw.yaml", tmp_path / "run", cache, steps=2, extra=[
        f"model.pretrained={checkpoint}", "data.source=pairs", f"data.path={tmp_path / 'shapes'}", "data.prepare=auto",
        "data.text_tokenizer=pretrained", "data.image_tokenizer=pretrained", "data.image_size=8",
        "data.caption_dropout=0.1", "data.val_fraction=0.25", f"eval.captions=[{ours}]", "eval.validation_captions=2",
        "eval.guidance=2.0"])
    assert "[prepare] data.prepare: auto;" in proc.stderr and "[prepare] 24 pairs ->" in proc.stderr
    assert "[prepare] 24 images were not square: centre-cropped to a square (data.image_fit: crop" in proc.stderr
    out = tmp_path / "run"
    png = (out / "samples" / "step-2.png").read_bytes()
    prepared = datasets.load_from_disk(str(DataConfig(path=str(tmp_path / "shapes"), cache_dir=str(cache))
                                           .prepared_dir() / "validation"))
    drawn = [ours] + list(dict.fromkeys(r["text"] for r in prepared if r["task"] == "generation" and r["text"]))[:2]
    lines = max(len(wrap(c, 128)) for c in drawn)
    tile_w, tile_h = 8 * 16 + GAP, lines * LINE_H + GAP + 8 * 16 + GAP
    assert struct.unpack(">IIBB", png[16:26]) == (4 * tile_w - GAP, 3 * tile_h - GAP, 8, 2), \
        "3 captions (the config's and 2 of the validation split) x 4 RGB images scaled to 128 px, under their captions"
    assert "samples" in scalars(out).Tags()["images"]
    exported = Emu3ForConditionalGeneration.from_pretrained(str(out / "model"))
    assert exported.get_input_embeddings().weight.shape[0] == 384, "the padded embedding, trained and exported"
    assert "local_files_only" not in json.loads((out / "model" / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    assert exported.config.vocabulary_map is not None
    assert tokenizer.convert_tokens_to_ids("<|visual token000063|>") == exported.config.vocabulary_map[
        "<|visual token000063|>"]


@pytest.fixture(scope="module")
def pretrained(cache, tmp_path_factory):
    """Short pretraining runs whose exported <out>/model the LoRA runs start from."""
    out = {}
    for family in ("emu3", "janus"):
        out[family] = tmp_path_factory.mktemp(f"pretrain-{family}")
        launch("python", f"{family}_tiny_adamw.yaml", out[family], cache, steps=2, extra=["eval.samples_png=false"])
    return out


LORA_OPTIMIZERS = {  # the four rules over AdamW, and ML-FOP-SOAP's modality pair source
    "sum": "{base: adamw, lr: 0.003}", "pcgrad": "{base: adamw, lr: 0.003}", "mgda": "{base: soap, lr: 0.003}",
    "pareto_lora": "{base: adamw, lr: 0.003, granularity: layer}",
    "mlfop_soap": "{lr: 0.003, pair_source: modality, precondition_frequency: 2}"}


@pytest.mark.parametrize("name", sorted(LORA_OPTIMIZERS))
def test_lora_run_with_each_rule_writes_per_layer_ratios_and_keeps_base_weights(name, pretrained, tmp_path, cache):
    base = pretrained["emu3"] / "model"
    launch("python", "emu3_tiny_lora.yaml", tmp_path, cache, steps=2,
           extra=[f"model.pretrained={base}", f"optimizer.name={name}", f"optimizer.params={LORA_OPTIMIZERS[name]}",
                  "eval.generated_digits=2"])
    acc = scalars(tmp_path)
    tags = acc.Tags()["scalars"]
    ratios = [t for t in tags if t.startswith("layer_grad/norm_ratio/")]
    assert len(ratios) == 2 * 7, ratios  # 2 layers x 7 LoRA-wrapped linears
    for t in ratios + [r.replace("norm_ratio", "cosine") for r in ratios]:
        assert len(acc.Scalars(t)) == 2, t
    assert 0 <= acc.Scalars("val/generated_digit_accuracy")[-1].value <= 1
    if name != "mlfop_soap":  # the rule itself ran, once per step, on both modalities
        assert [e.value for e in acc.Scalars("optimizer/steps_combined")] == [1, 2]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    saved = torch.load(tmp_path / "checkpoints" / "step-1" / "model.pt")
    original = Emu3ForConditionalGeneration.from_pretrained(str(base)).state_dict()
    for key, value in original.items():  # peft renames a wrapped linear's weight to ...base_layer.weight
        name = "hf.base_model.model." + key
        if ".text_model.layers." in key and any(f".{m}." in key for m in LLAMA_LINEARS):
            name = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(saved[name], value), key


def test_lora_rule_over_sharded_mlfop_soap_under_deepspeed_janus(pretrained, tmp_path, cache):
    """SOAP's first two steps build the eigenbasis and its second moment; the third folds."""
    launch("deepspeed", "janus_tiny_lora.yaml", tmp_path, cache, steps=3,
           extra=[f"model.pretrained={pretrained['janus'] / 'model'}",
                  "optimizer.params={base: mlfop_soap, lr: 0.003, precondition_frequency: 2}"])
    acc = scalars(tmp_path)
    assert [e.value for e in acc.Scalars("optimizer/steps_combined")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("optimizer/fop_folds")][-1] > 0
    merged = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "model"))  # the merged export: a plain model
    assert not any("lora" in n for n, _ in merged.named_parameters())
