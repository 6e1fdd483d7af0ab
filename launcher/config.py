"""The run configuration: one YAML file, typed sections, errors that name the field and the fix.

    run:        name, out_dir, seed (initialisation, batch order, augmentation)
    model:      family (emu3 | janus), size, pretrained, overrides, dtype, activation_checkpointing
                (model_zoo/config.py)
    data:       source (digits | pairs | tokenized), path, prepared, prepare, image_column, text_column,
                streaming, seq_len, on_bad_record, image_tokenizer, text_tokenizer, image_size, image_fit,
                cache_dir, seed, codebook_size, val_fraction, augment, caption_dropout, text_format
                (model_zoo/config.py)
    lora:       enabled, r, alpha, dropout, target_modules, adapter (peft LoRA on the decoder)
    batch:      micro_batch_size, grad_accum, global_batch_size (= micro x accum x world)
    optimizer:  name, params (distopt.build_optimizer), max_grad_norm
    schedule:   steps, warmup_steps, lr_schedule (constant | cosine)
    logging:    every, tensorboard, progress, grad_geometry (text-vs-image gradient cosine on log steps)
    eval:       every, batches, samples_png, captions, validation_captions, generated_digits, temperature,
                guidance
    checkpoint: every, resume (auto | none | <path>), keep_last, async (write in the background),
                max_requeues (Slurm requeues after a preemption), stop_deadline (seconds from a stop
                signal to an immediate exit)
    engine:     deepspeed (ZeRO stage 0, replicated parameters) | fsdp2 (PyTorch FSDP2, all sharded)
    fsdp:       replicate (HSDP groups; engine fsdp2)
    deepspeed:  extra DeepSpeed JSON keys (distopt.deepspeed_glue builds and validates the engine's JSON)
"""

from __future__ import annotations

import dataclasses
import keyword
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distopt.options import MLFOPOptions, OptionError, RuleOptions
from distopt.registry import OPTIMIZERS, TWO_OBJECTIVE, parse_options, valid_arguments
from launcher.engines import ENGINES
from model_zoo.config import DataConfig, ModelConfig, validate_data, validate_model
from model_zoo.lora import LLAMA_LINEARS
from model_zoo.prepared import FORMAT, check_prepared_corpus, check_target, read_meta


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0


@dataclass
class LoraSection:
    """peft LoRA on the decoder's linear layers; everything else is frozen. `adapter`: a saved peft
    adapter directory to go on from (else new adapters); its own adapter_config.json then fixes r,
    alpha, dropout and target_modules, and the fields here are not used."""
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(LLAMA_LINEARS))
    adapter: Optional[str] = None


@dataclass
class BatchConfig:
    micro_batch_size: int = 8
    grad_accum: int = 4
    global_batch_size: Optional[int] = None


@dataclass
class OptimizerConfig:
    name: str = "mlfop_soap"
    params: dict = field(default_factory=dict)
    max_grad_norm: Optional[float] = 1.0


@dataclass
class ScheduleConfig:
    steps: int = 100
    warmup_steps: int = 0
    lr_schedule: str = "constant"


@dataclass
class LoggingConfig:
    every: int = 5
    tensorboard: bool = True
    progress: bool = True
    grad_geometry: bool = True  # costs two copies of each rank's gradient on log steps (launcher/metrics.py)


@dataclass
class EvalConfig:
    every: int = 50
    batches: int = 4
    samples_png: bool = True   # a grid of generated images: per digit, or per caption of a corpus
    captions: list = field(default_factory=list)  # your prompts for the grid (pairs, tokenized), before...
    validation_captions: int = 4  # ...this many captions of the validation split (a prepared corpus's text)
    generated_digits: int = 0  # images generated per digit and scored by the digit classifier (0: off)
    temperature: float = 1.0   # sampling of generated images (samples_png, generated_digits)
    guidance: float = 1.0      # classifier-free guidance scale (1: none; needs data.caption_dropout > 0)


@dataclass
class CheckpointConfig:
    """`async` (a Python keyword, so the field is `async_`): write checkpoints in the background after a
    staging copy (distopt.checkpoint.AsyncCheckpointer). max_requeues: how often a Slurm job may be
    requeued after a stop on a signal (SLURM_RESTART_COUNT) before the launcher stops asking for it.
    stop_deadline: seconds from a stop signal after which the process exits at once even if the stop
    checkpoint is not written (null: only a second signal does that)."""
    every: int = 0
    resume: str = "auto"
    keep_last: Optional[int] = 3  # the newest N complete checkpoints are kept (null: all)
    async_: bool = False
    max_requeues: int = 10
    stop_deadline: Optional[float] = None


@dataclass
class FsdpConfig:
    """engine: fsdp2 only. replicate > 1: HSDP, shard within groups of world / replicate ranks."""
    replicate: int = 1


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: str = "deepspeed"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    deepspeed: dict = field(default_factory=dict)


SCHEDULES = ("constant", "cosine")
RESUME = ("auto", "none")


def _key(field_name: str) -> str:
    """The YAML key of a field: a field named after a Python keyword carries a trailing underscore."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[f.name] = _build(f.default_factory, value, f"{where}.{name}" if where else name)
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def _check(cond: bool, field_path: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_path}: {message}")


def validate(cfg: Config, world_size: int) -> Config:
    """Every check that can fail before any work starts, section by section."""
    _validate_model_and_data(cfg)
    _validate_batch(cfg.batch, world_size)
    _validate_optimizer(cfg.optimizer, cfg.batch, world_size)
    _validate_schedule(cfg.schedule)
    _check(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    _validate_eval(cfg.eval)
    _validate_checkpoint(cfg.checkpoint)
    _validate_lora(cfg.lora)
    _validate_engine(cfg, world_size)
    return cfg


def _validate_batch(b: BatchConfig, world_size: int) -> None:
    for name in ("micro_batch_size", "grad_accum"):
        value = getattr(b, name)
        _check(isinstance(value, int) and value >= 1, f"batch.{name}", f"{value!r} must be an integer >= 1")
    if b.global_batch_size is not None:
        _check(b.global_batch_size == b.micro_batch_size * b.grad_accum * world_size, "batch.global_batch_size",
               f"{b.global_batch_size} != micro_batch_size {b.micro_batch_size} x grad_accum {b.grad_accum} x "
               f"world size {world_size} = {b.micro_batch_size * b.grad_accum * world_size}; fix one of them")


def _validate_optimizer(o: OptimizerConfig, b: BatchConfig, world_size: int) -> None:
    """The optimizer's own options object decides what is valid (distopt.options); the launcher adds
    what its training loop needs."""
    _check(o.name in OPTIMIZERS, "optimizer.name", f"{o.name!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
    try:
        valid = valid_arguments(o.name, o.params)
    except OptionError as e:
        raise ConfigError(f"optimizer.params.{e.field}: {e.detail}") from None
    bad = sorted(set(o.params) - set(valid))
    _check(not bad, f"optimizer.params.{bad[0] if bad else ''}",
           f"not an argument of {o.name}; valid arguments are {valid}")
    _check(o.params.get("capture", "hooks") == "hooks", "optimizer.params.capture",
           "the launcher's training loop needs 'hooks' (each backward is one micro-step); remove the key")
    _check("max_grad_norm" not in o.params, "optimizer.params.max_grad_norm",
           "set clipping once, as optimizer.max_grad_norm")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be > 0 or null")
    try:
        options = parse_options(o.name, o.params)
        if isinstance(options, (MLFOPOptions, RuleOptions)):
            options.check_world(world_size)
    except OptionError as e:
        raise ConfigError(f"optimizer.params.{e.field}: {e.detail}") from None
    if isinstance(options, RuleOptions):
        _check(b.grad_accum % 2 == 0, "batch.grad_accum",
               f"{b.grad_accum} is odd: {o.name} combines a text and an image gradient per step, and micro-batches "
               "alternate modality, so use an even grad_accum (>= 2)")
    if isinstance(options, MLFOPOptions) and options.fop and options.pair_source == "microstep" and b.grad_accum == 1:
        raise ConfigError("batch.grad_accum: 1 leaves pair_source='microstep' nothing to fold; use grad_accum >= 2 "
                          "or optimizer.params.pair_source: ranks (needs >= 2 ranks) or modality")


def _validate_schedule(s: ScheduleConfig) -> None:
    _check(isinstance(s.steps, int) and s.steps >= 1, "schedule.steps", f"{s.steps!r} must be an integer >= 1")
    _check(0 <= s.warmup_steps < s.steps, "schedule.warmup_steps", f"{s.warmup_steps} must be in [0, steps)")
    _check(s.lr_schedule in SCHEDULES, "schedule.lr_schedule", f"{s.lr_schedule!r}; choose one of {SCHEDULES}")


def _validate_eval(e: EvalConfig) -> None:
    _check(e.every >= 0 and e.batches >= 1, "eval", "every must be >= 0 and batches >= 1")
    _check(isinstance(e.generated_digits, int) and e.generated_digits >= 0, "eval.generated_digits",
           f"{e.generated_digits!r} must be an integer >= 0 (images per digit; 0: off)")
    _check(isinstance(e.temperature, (int, float)) and e.temperature >= 0, "eval.temperature",
           f"{e.temperature!r} must be >= 0 (0: greedy)")
    _check(isinstance(e.guidance, (int, float)) and e.guidance >= 1, "eval.guidance",
           f"{e.guidance!r} must be >= 1 (1: no guidance)")
    _check(isinstance(e.captions, list) and all(isinstance(c, str) and c.strip() for c in e.captions),
           "eval.captions", f"{e.captions!r} must be a list of non-empty captions")
    _check(isinstance(e.validation_captions, int) and e.validation_captions >= 0, "eval.validation_captions",
           f"{e.validation_captions!r} must be an integer >= 0")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _check(c.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    if c.resume not in RESUME:
        _check(Path(c.resume).is_dir(), "checkpoint.resume",
               f"{c.resume!r} is neither 'auto', 'none' nor an existing checkpoint directory")
    _check(c.keep_last is None or (isinstance(c.keep_last, int) and c.keep_last >= 1), "checkpoint.keep_last",
           f"{c.keep_last!r} must be an integer >= 1 or null (keep every checkpoint)")
    _check(isinstance(c.async_, bool), "checkpoint.async",
           f"{c.async_!r} must be true (write in the background) or false")
    _check(isinstance(c.max_requeues, int) and not isinstance(c.max_requeues, bool) and c.max_requeues >= 0,
           "checkpoint.max_requeues", f"{c.max_requeues!r} must be an integer >= 0 (0: never requeue)")
    deadline = c.stop_deadline
    _check(deadline is None or (isinstance(deadline, (int, float)) and not isinstance(deadline, bool) and deadline > 0),
           "checkpoint.stop_deadline", f"{deadline!r} must be a number of seconds > 0, or null (no deadline); keep it "
           "below the Slurm signal lead (--signal=B:USR1@<seconds>)")


def _validate_engine(cfg: Config, world_size: int) -> None:
    _check(cfg.engine in ENGINES, "engine", f"{cfg.engine!r}; choose one of {ENGINES}")
    if cfg.engine != "fsdp2":
        _check(cfg.fsdp.replicate == 1, "fsdp.replicate",
               "applies to engine: fsdp2 only; remove it or set engine: fsdp2")
        return
    r = cfg.fsdp.replicate
    _check(isinstance(r, int) and r >= 1 and world_size % r == 0, "fsdp.replicate",
           f"{r!r} must be an integer >= 1 that divides the world size {world_size} (HSDP: world / replicate ranks "
           "per shard group)")
    _check(cfg.optimizer.name not in TWO_OBJECTIVE, "optimizer.name",
           f"{cfg.optimizer.name!r} under engine: fsdp2: the two-objective rules need each rank's unreduced "
           "modality gradients, which FSDP2's reduce-scatter averages away; use engine: deepspeed")
    _check(not cfg.lora.enabled, "lora.enabled", "LoRA runs are small and tested under engine: deepspeed; use it")


def _validate_model_and_data(cfg: Config) -> None:
    """model_zoo's own field checks, as config errors, and the prepared corpus a `pairs` run reads
    (before anything is built: a stale or missing one is refused here, with the command that prepares
    it). The digit judge prompts digits; the sample grid prompts digits, or a corpus's captions."""
    try:
        validate_model(cfg.model)
        validate_data(cfg.data, cfg.model)
        if cfg.data.source == "pairs" and cfg.data.prepare == "manual":
            check_prepared_corpus(cfg.model, cfg.data)
        elif cfg.data.source == "pairs":
            assert cfg.data.path is not None  # validate_data: a corpus source has its path
            check_target(cfg.data.prepared_dir(), Path(cfg.data.path))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.source == "digits":
        _check(not cfg.eval.captions, "eval.captions", "the digits' sample grid prompts each digit; remove it")
        return
    assert cfg.data.path is not None  # validate_data: a corpus source has its path
    _check(not cfg.eval.generated_digits, "eval.generated_digits",
           f"{cfg.eval.generated_digits!r}, but it prompts for digits and data.source is {cfg.data.source!r}; "
           "set it to 0")
    if cfg.eval.samples_png and not cfg.eval.captions:
        has_text = cfg.data.source == "pairs" or (read_meta(Path(cfg.data.path)) or {}).get("format") == FORMAT
        _check(has_text and cfg.eval.validation_captions > 0, "eval.samples_png",
               "true, but there is no caption to draw: "
               + ("eval.validation_captions is 0" if has_text else f"{cfg.data.path} is not a corpus prepared by "
                  "model_zoo.prepare, so it has no caption text") + "; list your prompts in eval.captions")


def _validate_lora(lora: LoraSection) -> None:
    if not lora.enabled:
        return
    _check(isinstance(lora.r, int) and lora.r >= 1, "lora.r", f"{lora.r!r} must be an integer >= 1")
    _check(isinstance(lora.alpha, (int, float)) and lora.alpha > 0, "lora.alpha", f"{lora.alpha!r} must be > 0")
    _check(isinstance(lora.dropout, (int, float)) and 0 <= lora.dropout < 1, "lora.dropout",
           f"{lora.dropout!r} must be in [0, 1)")
    targets = lora.target_modules
    _check(isinstance(targets, list) and bool(targets) and set(targets) <= set(LLAMA_LINEARS), "lora.target_modules",
           f"{targets!r}: choose a non-empty list among the decoder's linear layers {list(LLAMA_LINEARS)}")
    if lora.adapter is not None:
        _check((Path(lora.adapter) / "adapter_config.json").is_file(), "lora.adapter",
               f"{lora.adapter!r} holds no adapter_config.json; point it at a directory written by a LoRA run "
               "(<out_dir>/adapter)")


def load_config(path: str | Path, world_size: int = 1, overrides: Optional[list[str]] = None) -> Config:
    """Read, apply `section.key=value` overrides (values parsed as YAML), build and validate."""
    return validate(read_config(path, overrides), world_size)


def read_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """The config with its overrides, typed but not yet validated (the memory planner reads cluster
    configs whose paths are still placeholders)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({e})") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or ("." not in key and key != "engine"):
            raise ConfigError(f"--set {item!r}: expected section.key=value (or engine=...)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                              "quote it, and pass one --set per key") from None
    return _build(Config, data, "")
