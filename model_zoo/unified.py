"""What the Emu3 and Janus wrappers share: the training losses, sampling, loading a local checkpoint
in transformers' `save_pretrained` layout, and the thin module around a transformers model.

Why a wrapper at all: the launcher hands a model one micro-batch dict and needs back the loss split
by modality (text / image) with token counts and accuracies, and sampling must be restricted to the
image codes. transformers' `Emu3ForConditionalGeneration` and `JanusForConditionalGeneration` return
one mixed loss (Emu3: plain CE over every token, no vision weight; Janus: the text head only), so the
wrapper computes the losses from the classes' own forward and heads. It adds no parameters: its
state is the transformers model's, under the prefix `hf.`, and export is the class's own
`save_pretrained`, which plain transformers opens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HFModel = TypeVar("HFModel", bound="PreTrainedModel")

# the decoder's linear layers (Llama's names, shared by Emu3's text model): LoRA targets
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# text-config fields that change parameter shapes: a checkpoint fixes them
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")


LOGIT_BYTES_PER_CHUNK = 2**30  # at most this much of one chunk's logits (bf16 + their fp32 copy) at a time


def token_losses(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor,
                 image: torch.Tensor, vision_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Losses over one micro-batch from the hidden states h [..., H] and the targets they predict
    (-100: none; position t predicts token t + 1), `image` marking the image targets.

    loss = (sum_text CE + w * sum_image CE) / (n_text + w * n_image), w = vision_weight: a weighted
    per-token mean, so w is a relative weight and the loss stays on the scale of one token's CE.
    text_loss and image_loss are the plain per-token means of each kind (0 when there is none),
    differentiable, for logging and for per-modality backward passes; *_correct count argmax hits.

    The head's logits are never whole: `chunked_cross_entropy` forms them for a chunk of tokens at a
    time, and masks (not gathers) pick the targets, so nothing here waits for the device."""
    ce, hit = chunked_cross_entropy(head, h.reshape(-1, h.shape[-1]), targets.reshape(-1))
    image, valid = image.reshape(-1), targets.reshape(-1) != -100
    text = valid & ~image
    n_text, n_image = text.sum(), image.sum()
    text_ce, image_ce = (ce * text).sum(), (ce * image).sum()
    return dict(loss=(text_ce + vision_weight * image_ce) / (n_text + vision_weight * n_image).clamp_min(1e-8),
                text_loss=text_ce / n_text.clamp_min(1), image_loss=image_ce / n_image.clamp_min(1),
                n_text=n_text, n_image=n_image, text_correct=(hit & text).sum(), image_correct=(hit & image).sum())


def chunked_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
                          targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp32 cross-entropy of head(h) against targets (0 where the target is -100) and the
    argmax hits, for h [N, H], in chunks of tokens small enough that one chunk's logits stay under
    LOGIT_BYTES_PER_CHUNK. With more than one chunk each is checkpointed (its logits recomputed in
    backward), so the full [N, V] logits never exist: for Emu3-8B's 8,191 x 184,622 they would be
    16.9 GiB in the three copies cross-entropy keeps."""
    width = _out_features(head)
    chunk = max(1, LOGIT_BYTES_PER_CHUNK // (6 * width))
    if chunk >= len(h):
        return _ce_chunk(head, h, targets)
    parts = [checkpoint(_ce_chunk, head, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
             for i in range(0, len(h), chunk)]
    return torch.cat([ce for ce, _ in parts]), torch.cat([hit for _, hit in parts])


def _ce_chunk(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    return ce, logits.argmax(-1) == targets


def _out_features(head: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """The head's output width (its vocabulary): a Linear's out_features, or the last Linear inside it."""
    if isinstance(head, torch.nn.Linear):
        return head.out_features
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if isinstance(head, torch.nn.Module) else []
    if not linears:
        raise ValueError(f"token_losses: cannot tell the output width of head {type(head).__name__}")
    return linears[-1].out_features


def sample(logits: torch.Tensor, temperature: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    """[n, C] logits -> [n, 1] class indices; temperature 0 is greedy (used to check that sampling
    and training see the same sequence layout)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)


def guided(cond: torch.Tensor, uncond: Optional[torch.Tensor], guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022; Emu3 and Janus sample with it): logits
    u + g (c - u) from the caption-conditioned c and the unconditioned u (an empty caption); g = 1 is
    plain conditional sampling."""
    return cond if uncond is None or guidance == 1.0 else uncond + guidance * (cond - uncond)


def override_keys(text_config_cls: type, extra: tuple[str, ...] = ()) -> list[str]:
    """The `model.overrides` a family accepts: its text config's own fields, plus `extra`."""
    from transformers import PreTrainedConfig

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return sorted({f.name for f in dataclasses.fields(text_config_cls)} - base | set(extra))


def check_overrides(overrides: dict, valid: list[str], pretrained: Optional[str]) -> None:
    """Errors name the key: unknown keys list the valid ones; with a checkpoint, shape fields are refused
    (its weights fix them) and every other override is applied to its config."""
    for key in overrides:
        if key not in valid:
            raise ValueError(f"model.overrides.{key}: unknown; valid keys are {valid}")
        if pretrained is not None and key in SHAPE_FIELDS:
            raise ValueError(f"model.overrides.{key}: a checkpoint's weights fix {key}; remove it, or drop "
                             "model.pretrained to train a new model of that shape")


def load_checkpoint(cls: type[HFModel], path: str, model_type: str, overrides: dict, dtype: torch.dtype = torch.float32,
                    text_config_of: Callable[[Any], Any] = lambda c: c.text_config) -> HFModel:
    """`cls.from_pretrained(path)` from the local directory only, in `dtype` (the run's parameter dtype),
    `overrides` applied to the text config, and every weight required: a checkpoint of
    another architecture is an error, not a silent random initialisation."""
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model.pretrained: {path} has no config.json; point it at a directory written by "
                         "save_pretrained")
    found = json.loads(config_file.read_text()).get("model_type")
    if found != model_type:
        raise ValueError(f"model.pretrained: {path} holds a {found!r} checkpoint, not {model_type!r}; "
                         f"set model.family to match it")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    for key, value in overrides.items():
        setattr(config if key == "vision_loss_weight" else text_config_of(config), key, value)
    loaded: tuple[HFModel, dict[str, Any]] = cls.from_pretrained(  # type: ignore[assignment]  # (model, info): transformers types the model alone
        path, config=config, local_files_only=True, dtype=dtype, output_loading_info=True)
    model, info = loaded
    missing = [k for k in info["missing_keys"] if "rotary" not in k]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"model.pretrained: {path} does not match {cls.__name__}: missing {missing[:5]}, "
                         f"unexpected {list(info['unexpected_keys'])[:5]}, "
                         f"mismatched {list(info['mismatched_keys'])[:5]}")
    return model


def load_submodule(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """Fill `module` with its tensors from a (possibly sharded) safetensors checkpoint, reading only
    those: a VQ-VAE of an 8B checkpoint without loading the 8B. The tensors are found by their names
    under some prefix (transformers writes a class's published key layout, which may differ from its
    module names, e.g. `vqmodel.` for Emu3's `model.vqmodel`)."""
    from safetensors import safe_open

    root = Path(path)
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    wanted = list(module.state_dict())
    handles = [safe_open(str(root / name), framework="pt") for name in files]
    keys = {k: f for f in handles for k in f.keys()}  # noqa: SIM118 (a safe_open handle has keys() but no __iter__)
    prefixes = [k[:-len(wanted[0])] for k in keys if k.endswith(wanted[0])]
    prefix = next((p for p in prefixes if all(p + w in keys for w in wanted)), None)
    if prefix is None:
        raise ValueError(f"model.pretrained: {path} holds no complete {type(module).__name__} "
                         f"({len(wanted)} tensors such as {wanted[0]!r})")
    module.load_state_dict({w: keys[prefix + w].get_tensor(prefix + w) for w in wanted}, strict=True)
    return module


class UnifiedModel(torch.nn.Module):
    """A transformers model `hf` with the training interface the launcher uses. Subclasses name
    `decoder_path` (the dotted path of the shared decoder inside `hf`) and implement forward,
    generation_prompt and generate_images."""

    decoder_path: str = ""
    # the transformers model, or peft's PeftModel around it (model_zoo.lora): its submodules are reached
    # by name through torch.nn.Module.__getattr__, which a type checker cannot follow
    hf: Any

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf
        self.vqmodel().requires_grad_(False)  # the VQ-VAE is a frozen tokenizer in both families

    def vqmodel(self) -> torch.nn.Module:
        return self.base().model.vqmodel

    def base(self) -> Any:
        """`hf` itself, or the model inside a peft wrapper (a transformers model: see `hf`)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    @property
    def text_config(self) -> Any:
        return self.base().config.text_config

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads or self.num_heads

    def decoder_linears(self, names: tuple[str, ...] = DECODER_LINEARS) -> str:
        """A regex (peft's `target_modules` as a string is matched in full) naming the decoder's linear
        layers among `names`, and no other module: the vision encoder and the VQ-VAE have q/k/v too."""
        attn = [n for n in names if n.endswith("_proj") and n[0] in "qkvo"]
        mlp = [n for n in names if n not in attn]
        parts = ([rf"self_attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
        return rf"{re.escape(self.decoder_path)}\.layers\.\d+\.({'|'.join(parts)})"

    def generate_images(self, layout: Any, caption: Sequence[int], n: int = 1, temperature: float = 1.0,
                        gen: Optional[torch.Generator] = None, guidance: float = 1.0) -> torch.Tensor:
        """n images for one caption (text ids) laid out by the family's `layout`: codebook indices
        LongTensor[n, h * w]. Each family implements it."""
        raise NotImplementedError

    def save_pretrained(self, path: str, state_dict: Optional[dict] = None) -> None:
        """The transformers class's own save_pretrained (config.json + safetensors). `state_dict`: this
        wrapper's full state dict when the live parameters are sharded (it is gathered by the caller)."""
        if state_dict is not None:
            state_dict = {k.removeprefix("hf."): v for k, v in state_dict.items()}
        self.hf.save_pretrained(path, state_dict=state_dict)
