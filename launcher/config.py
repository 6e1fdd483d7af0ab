"""The run configuration: one YAML file, typed sections, errors that name the field and the fix.

    run:        name, out_dir, seed (initialisation, batch order, augmentation)
    model:      family (emu3 | janus), size, pretrained, overrides (model_zoo/config.py)
    data:       source (digits | pairs | tokenized), path, prepared, streaming, seq_len, on_bad_record,
                image_tokenizer, text_tokenizer, image_size, cache_dir, seed, codebook_size, val_fraction,
                augment, caption_dropout, text_format (model_zoo/config.py)
    lora:       enabled, r, alpha, dropout, target_modules, adapter (peft LoRA on the decoder)
    batch:      micro_batch_size, grad_accum, global_batch_size (= micro x accum x world)
    optimizer:  name, params (distopt.build_optimizer), max_grad_norm
    schedule:   steps, warmup_steps, lr_schedule (constant | cosine)
    logging:    every, tensorboard, progress
    eval:       every, batches, samples_png, generated_digits, temperature, guidance
    checkpoint: every, resume (auto | none | <path>)
    deepspeed:  extra DeepSpeed JSON keys (validated by distopt.deepspeed_glue)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distopt.registry import OPTIMIZERS, TWO_OBJECTIVE, valid_arguments
from distopt.rules import GRANULARITIES
from model_zoo.config import DataConfig, ModelConfig, validate_data, validate_model
from model_zoo.lora import LLAMA_LINEARS


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


@dataclass
class EvalConfig:
    every: int = 50
    batches: int = 4
    samples_png: bool = True
    generated_digits: int = 0  # images generated per digit and scored by the digit classifier (0: off)
    temperature: float = 1.0   # sampling of generated images (samples_png, generated_digits)
    guidance: float = 1.0      # classifier-free guidance scale (1: none; needs data.caption_dropout > 0)


@dataclass
class CheckpointConfig:
    every: int = 0
    resume: str = "auto"


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
    deepspeed: dict = field(default_factory=dict)

    def deepspeed_json(self, world_size: int) -> dict:
        """The DeepSpeed config this run hands to the engine (stage 0, our optimizer object)."""
        ds = {"train_micro_batch_size_per_gpu": self.batch.micro_batch_size,
              "gradient_accumulation_steps": self.batch.grad_accum,
              "train_batch_size": self.batch.micro_batch_size * self.batch.grad_accum * world_size,
              "gradient_clipping": self.optimizer.max_grad_norm or 0.0,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
        ds.update(self.deepspeed)
        return ds


SCHEDULES = ("constant", "cosine")
RESUME = ("auto", "none")


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[name] = _build(f.default_factory, value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _check(cond: bool, field_path: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_path}: {message}")


def validate(cfg: Config, world_size: int) -> Config:
    """Every check that can fail before any work starts."""
    _validate_model_and_data(cfg)
    b = cfg.batch
    for name in ("micro_batch_size", "grad_accum"):
        value = getattr(b, name)
        _check(isinstance(value, int) and value >= 1, f"batch.{name}", f"{value!r} must be an integer >= 1")
    if b.global_batch_size is not None:
        _check(b.global_batch_size == b.micro_batch_size * b.grad_accum * world_size, "batch.global_batch_size",
               f"{b.global_batch_size} != micro_batch_size {b.micro_batch_size} x grad_accum {b.grad_accum} x "
               f"world size {world_size} = {b.micro_batch_size * b.grad_accum * world_size}; fix one of them")
    o = cfg.optimizer
    _check(o.name in OPTIMIZERS, "optimizer.name", f"{o.name!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
    try:
        valid = valid_arguments(o.name, o.params)
    except ValueError as e:
        raise ConfigError(f"optimizer.params.base: {e}") from None
    bad = sorted(set(o.params) - set(valid))
    _check(not bad, f"optimizer.params.{bad[0] if bad else ''}", f"not an argument of {o.name}; valid arguments are {valid}")
    _check(o.params.get("capture", "hooks") == "hooks", "optimizer.params.capture",
           "the launcher's training loop needs 'hooks' (each backward is one micro-step); remove the key")
    if o.name in TWO_OBJECTIVE:
        _check(o.params.get("granularity", "layer") in GRANULARITIES, "optimizer.params.granularity",
               f"{o.params.get('granularity')!r}; choose one of {GRANULARITIES}")
    _check("max_grad_norm" not in o.params, "optimizer.params.max_grad_norm",
           "set clipping once, as optimizer.max_grad_norm")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be > 0 or null")
    if o.name in TWO_OBJECTIVE:
        _check(b.grad_accum % 2 == 0, "batch.grad_accum",
               f"{b.grad_accum} is odd: {o.name} combines a text and an image gradient per step, and micro-batches "
               "alternate modality, so use an even grad_accum (>= 2)")
    pair = o.params.get("pair_source", "microstep")
    if o.name == "mlfop_soap" and pair == "microstep" and b.grad_accum == 1 and o.params.get("fop", True):
        raise ConfigError("batch.grad_accum: 1 leaves pair_source='microstep' nothing to fold; use grad_accum >= 2 "
                          "or optimizer.params.pair_source: ranks (needs >= 2 ranks) or modality")
    if pair == "ranks":
        _check(o.name not in TWO_OBJECTIVE, "optimizer.params.pair_source",
               f"'ranks' under {o.name}: the rule hands every rank the same reduced terms; use 'modality'")
        _check(world_size >= 2, "optimizer.params.pair_source", "'ranks' needs at least 2 ranks")
    s = cfg.schedule
    _check(isinstance(s.steps, int) and s.steps >= 1, "schedule.steps", f"{s.steps!r} must be an integer >= 1")
    _check(0 <= s.warmup_steps < s.steps, "schedule.warmup_steps", f"{s.warmup_steps} must be in [0, steps)")
    _check(s.lr_schedule in SCHEDULES, "schedule.lr_schedule", f"{s.lr_schedule!r}; choose one of {SCHEDULES}")
    _check(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    _check(cfg.eval.every >= 0 and cfg.eval.batches >= 1, "eval", "every must be >= 0 and batches >= 1")
    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    if c.resume not in RESUME:
        _check(Path(c.resume).is_dir(), "checkpoint.resume",
               f"{c.resume!r} is neither 'auto', 'none' nor an existing checkpoint directory")
    _validate_lora(cfg.lora)
    _check(isinstance(cfg.eval.generated_digits, int) and cfg.eval.generated_digits >= 0, "eval.generated_digits",
           f"{cfg.eval.generated_digits!r} must be an integer >= 0 (images per digit; 0: off)")
    _check(isinstance(cfg.eval.temperature, (int, float)) and cfg.eval.temperature >= 0, "eval.temperature",
           f"{cfg.eval.temperature!r} must be >= 0 (0: greedy)")
    _check(isinstance(cfg.eval.guidance, (int, float)) and cfg.eval.guidance >= 1, "eval.guidance",
           f"{cfg.eval.guidance!r} must be >= 1 (1: no guidance)")
    return cfg


def _validate_model_and_data(cfg: Config) -> None:
    """model_zoo's own field checks, as config errors; the sample grid and the digit judge prompt digits."""
    try:
        validate_model(cfg.model)
        validate_data(cfg.data, cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.source != "digits":
        for name in ("samples_png", "generated_digits"):
            _check(not getattr(cfg.eval, name), f"eval.{name}",
                   f"{getattr(cfg.eval, name)!r}, but it prompts for digits and data.source is "
                   f"{cfg.data.source!r}; set it to false / 0")


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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML ({e})") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                              "quote it, and pass one --set per key") from None
    return validate(_build(Config, data, ""), world_size)
