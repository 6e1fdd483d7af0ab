"""The launcher's config: every configs/*.yaml validates, and each kind of mistake names its field."""

from pathlib import Path

import pytest
import yaml

from distopt.deepspeed_glue import engine_config
from launcher.config import ConfigError, load_config
from model_zoo.config import is_placeholder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "emu3_tiny_mlfop.yaml"


def checkpoint_files(folder):
    """A folder with the files validation looks for in a checkpoint (their content is not read)."""
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    """Paths a config names (a LoRA run's pretraining output, a cluster run's checkpoint and corpus) are
    filled in with a folder; a cluster config's `<...>` placeholders are refused until then."""
    checkpoint_files(tmp_path)
    data = yaml.safe_load(path.read_text())
    named = {"model.pretrained": data["model"].get("pretrained"), "data.path": data.get("data", {}).get("path")}
    placeholders = [k for k, v in named.items() if is_placeholder(v)]
    if placeholders:
        with pytest.raises(ConfigError, match=rf"{placeholders[0]}: '<.*>' is a placeholder; set it to your"):
            load_config(path, world_size=2)
    assert ("cluster" in path.name) == (placeholders == ["model.pretrained", "data.path"])
    cfg = load_config(path, world_size=2, overrides=[f"{k}={tmp_path}" for k, v in named.items() if v])
    ds = engine_config(cfg.batch.micro_batch_size, cfg.batch.grad_accum, 2, cfg.optimizer.max_grad_norm, cfg.deepspeed)
    assert ds["zero_optimization"]["stage"] == 0 and ds["train_batch_size"] == (
        cfg.batch.micro_batch_size * cfg.batch.grad_accum * 2)


def test_tiny_configs_differ_only_in_the_optimizer():
    def load(name):
        data = yaml.safe_load((ROOT / "configs" / name).read_text())
        data.pop("optimizer"), data.pop("run")
        return data

    for family in ("emu3", "janus"):
        base = load(f"{family}_tiny_mlfop.yaml")
        assert load(f"{family}_tiny_soap.yaml") == base == load(f"{family}_tiny_adamw.yaml")


@pytest.mark.parametrize("override,match", [
    (["batch.micro_batchsize=4"], r"batch.micro_batchsize: unknown key; valid keys are \['global_batch_size'"),
    (["modle.family=emu3"], r"modle: unknown key"),
    (["batch.global_batch_size=100"],
     r"batch.global_batch_size: 100 != micro_batch_size 8 x grad_accum 4 x world size 1 = 32"),
    (["model.family=gpt"], r"model.family: 'gpt' is unknown"),
    (["model.size=janus_1_3b"], r"model.size: 'janus_1_3b' is not a emu3 size"),
    (["optimizer.name=lion"], r"optimizer.name: 'lion' is unknown"),
    (["optimizer.params.precondition_freq=3"], r"optimizer.params.precondition_freq: not an argument of mlfop_soap"),
    (["batch.grad_accum=1", "optimizer.params.pair_source=microstep"],
     r"batch.grad_accum: 1 leaves pair_source='microstep' nothing to fold"),
    (["optimizer.params.pair_source=ranks"], r"optimizer.params.pair_source: 'ranks' needs at least 2 ranks"),
    (["schedule.warmup_steps=500"], r"schedule.warmup_steps: 500 must be in \[0, steps\)"),
    (["checkpoint.resume=/no/such/checkpoint"], r"checkpoint.resume: '/no/such/checkpoint' is neither"),
    (["checkpoint.async=maybe"], r"checkpoint.async: 'maybe' must be true \(write in the background\) or false"),
    (["checkpoint.max_requeues=-1"], r"checkpoint.max_requeues: -1 must be an integer >= 0 \(0: never requeue\)"),
    (["checkpoint.stop_deadline=0"], r"checkpoint.stop_deadline: 0 must be a number of seconds > 0, or null"),
    (["checkpoint.asynch=true"], r"checkpoint.asynch: unknown key; valid keys are \['async', 'every', 'keep_last', "
                                 r"'max_requeues', 'resume', 'stop_deadline'\]"),
    (["model.pretrained=/no/such/model"], r"model.pretrained: '/no/such/model' is not a directory"),
    (["optimizer.params.max_grad_norm=1.0"], r"optimizer.params.max_grad_norm: set clipping once"),
    (["data.val_fraction=1.5"], r"data.val_fraction: 1.5 must be in \(0, 1\)"),
    (["data.source=web"], r"data.source: 'web' is unknown; choose one of \('digits', 'pairs', 'tokenized'\)"),
    (["data.source=tokenized"], r"data.path: null, but source 'tokenized' reads a corpus"),
    (["data.source=tokenized", "data.path=/no/such/corpus"], r"data.path: '/no/such/corpus' does not exist"),
    (["data.on_bad_record=ignore"], r"data.on_bad_record: 'ignore'; choose one of \('error', 'skip'\)"),
    (["data.seq_len=4"], r"data.seq_len: 4 must be an integer >= 8"),
    (["data.streaming=true"], r"data.streaming: true, but the digits live in memory"),
    (["data.image_tokenizer=pretrained"], r"data.image_tokenizer: 'pretrained' uses the checkpoint's own; set model"),
    (["data.image_size=16"], r"data.image_size: 16, but digits_vq tokenizes 8x8 images"),
    (["data.caption_dropout=1.0"], r"data.caption_dropout: 1.0 must be in \[0, 1\)"),
    (["model.size=huge"], r"model.size: 'huge' is not a emu3 size"),
    (["model.overrides={hiden_size: 8}"], r"model.overrides.hiden_size: unknown; valid keys are \[.*'hidden_size'"),
    (["eval.guidance=0.5"], r"eval.guidance: 0.5 must be >= 1"),
    (["engine=fsdp"], r"engine: 'fsdp'; choose one of \('deepspeed', 'fsdp2'\)"),
    (["fsdp.replicate=2"], r"fsdp.replicate: applies to engine: fsdp2 only"),
    (["engine=fsdp2", "fsdp.replicate=3"], r"fsdp.replicate: 3 must be an integer >= 1 that divides the world size 1"),
    (["engine=fsdp2", "optimizer.name=pcgrad", "optimizer.params={}"], r"optimizer.name: 'pcgrad' under engine: fsdp2"),
])
def test_mistakes_name_their_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, world_size=1, overrides=override)


@pytest.mark.parametrize("override,match", [
    (["lora.target_modules=[qkv]"], r"lora.target_modules: \['qkv'\]: choose a non-empty list among .*'q_proj'"),
    (["lora.r=0"], r"lora.r: 0 must be an integer >= 1"),
    (["lora.dropout=1.0"], r"lora.dropout: 1.0 must be in \[0, 1\)"),
    (["lora.adapter=/tmp"], r"lora.adapter: '/tmp' holds no adapter_config.json"),
    (["optimizer.params.base=lion"], r"optimizer.params.base: optimizer 'pareto_lora': base='lion' is invalid"),
    (["optimizer.params.rho=1"], r"optimizer.params.rho: not an argument of pareto_lora; valid arguments are"),
    (["batch.grad_accum=3"], r"batch.grad_accum: 3 is odd: pareto_lora combines a text and an image gradient"),
    (["data.text_format=chat"], r"data.text_format: 'chat'; choose one of \('plain', 'instruct'\)"),
    (["eval.generated_digits=-1"], r"eval.generated_digits: -1 must be an integer >= 0"),
    (["optimizer.params.granularity=head"],
     r"optimizer.params.granularity: 'head'; choose one of \('layer', 'global'\)"),
    (["optimizer.params.capture=manual"], r"optimizer.params.capture: the launcher's training loop needs 'hooks'"),
    (["optimizer.params={base: mlfop_soap, pair_source: ranks}"],
     r"optimizer.params.pair_source: 'ranks' under pareto_lora"),
])
def test_lora_mistakes_name_their_field(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "emu3_tiny_lora.yaml", world_size=1,
                    overrides=[f"model.pretrained={checkpoint_files(tmp_path)}", *override])


def test_digit_evaluations_need_the_digits_and_a_corpus_grid_needs_captions(tmp_path):
    corpus = ["data.source=tokenized", f"data.path={tmp_path}"]
    with pytest.raises(ConfigError, match=r"eval.generated_digits: 2, but it prompts for digits and data.source is "
                                          r"'tokenized'; set it to 0"):
        load_config(TINY, overrides=[*corpus, "eval.generated_digits=2"])
    with pytest.raises(ConfigError, match=r"eval.samples_png: true, but there is no caption to draw: .* is not "
                                          r"a corpus prepared by model_zoo.prepare.*; list your prompts in "
                                          r"eval.captions"):
        load_config(TINY, overrides=corpus)
    assert load_config(TINY, overrides=[*corpus, "eval.captions=[a red square]"]).eval.captions == ["a red square"]
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.png").write_bytes(b"")
    pairs = ["data.source=pairs", f"data.path={tmp_path / 'pairs'}", "data.prepare=auto"]
    assert load_config(TINY, overrides=pairs).eval.samples_png, "a grid of the validation captions"
    with pytest.raises(ConfigError, match=r"eval.captions: the digits' sample grid prompts each digit; remove it"):
        load_config(TINY, overrides=["eval.captions=[a red square]"])


def test_a_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch: 3\n")
    with pytest.raises(ConfigError, match="batch: expected a mapping, got int"):
        load_config(path)


def test_unparsable_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'model.overrides=a: 1, b: 2}': the value is not valid YAML"):
        load_config(TINY, overrides=["model.overrides=a: 1, b: 2}"])
    path = tmp_path / "bad.yaml"
    path.write_text("run: {name: [\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config: .*does not exist"):
        load_config(ROOT / "configs" / "nope.yaml")


def test_the_world_size_is_read_from_the_environment_before_any_process_group():
    """The launcher validates before DeepSpeed starts the process group, with the world size each
    launcher tells its processes."""
    from launcher.cluster import launch_world_size

    assert launch_world_size({"WORLD_SIZE": "8", "OMPI_COMM_WORLD_SIZE": "2"}) == 8   # deepspeed, torchrun, srun
    assert launch_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4                        # Open MPI
    assert launch_world_size({"PMI_SIZE": "3"}) == 3                                    # MPICH / Hydra
    assert launch_world_size({}) == 1                                                   # python alone


def test_checkpoint_async_is_read_from_its_yaml_key():
    """`async` is a Python keyword: the field is `async_`, the YAML key stays `async`."""
    cfg = load_config(TINY, overrides=["checkpoint.async=true", "checkpoint.max_requeues=2",
                                       "checkpoint.stop_deadline=90"])
    assert (cfg.checkpoint.async_, cfg.checkpoint.max_requeues, cfg.checkpoint.stop_deadline) == (True, 2, 90)
    assert load_config(TINY).checkpoint.async_ is False
