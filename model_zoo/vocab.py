"""One id space per run: text tokens, special tokens and image codes (`data.text_tokenizer`).

- `wordpiece`: the project's own WordPiece (Hugging Face `tokenizers`) trained on a caption corpus
  and cached, followed by the special tokens, then the image codes: Emu3's order. Janus embeds only
  the text and special ids; its image codes live beside them as ids >= image_offset, which the model
  routes to its generation embedding.
- `pretrained`: the checkpoint's own tokenizer (`AutoTokenizer` from the checkpoint directory) and
  its special tokens by the names transformers' Emu3 and Janus processors use; Emu3's image codes are
  the visual tokens of its `vocabulary_map`, each image row closed by its end-of-line token.

Special tokens by role: pad, bos, eos; sov/eov open and close an image (Emu3 `<|image start|>` /
`<|image end|>`, Janus `<begin_of_image>` / `<end_of_image>`); sot separates Emu3's size text from
the image codes (`<|image token|>`); img is Janus' placeholder for one understanding-encoder token
(`<image_placeholder>`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from model_zoo.files import atomic_write, writable_dir
from model_zoo.wordpiece import train_wordpiece

SPECIALS = ("pad", "bos", "eos", "sov", "sot", "eov", "img")
WORDPIECE_SIZE = 192  # the trainer's target; a small corpus caps the learnt vocabulary a little below it


def wordpiece_name(corpus: Sequence[str]) -> str:
    """The name of the WordPiece trained on `corpus`: the trainer's version, its size and a hash of the
    corpus, which fix its content (model_zoo/wordpiece.py is deterministic)."""
    digest = hashlib.sha1("\n".join(corpus).encode()).hexdigest()[:10]
    return f"text-wordpiece-v2-{WORDPIECE_SIZE}-{digest}"


def load_or_train_wordpiece(cache_dir: str | os.PathLike, corpus: Sequence[str]) -> Tokenizer:
    """A WordPiece tokenizer trained on `corpus` (model_zoo/wordpiece.py: its content is a function of
    the corpus alone), cached as JSON (atomic write). The file name carries a hash of the corpus, so a
    changed corpus never reuses a stale tokenizer, and the trainer's version, so a cache left by
    Hugging Face's nondeterministic trainer (v1) is never read."""
    path = writable_dir(cache_dir) / f"{wordpiece_name(corpus)}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"text tokenizer cache {path} is unreadable or corrupt ({e}); delete it to retrain") from e
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]
    tok = Tokenizer(models.WordPiece(train_wordpiece(words, WORDPIECE_SIZE), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    atomic_write(path, lambda tmp: tok.save(str(tmp)))
    return tok


@dataclass(frozen=True)
class Vocab:
    """Token ids of one run. Image code c is id `image_offset + c`; `size` ids in all (Emu3's
    embedding rows; Janus embeds the first `image_offset`). `eol`/`eof`: Emu3 checkpoints close every
    image row with `eol` and the image with `eof` (None: plain code rows)."""

    encode: Callable[[str], list[int]]
    tokenizer: Any  # the tokenizers.Tokenizer (wordpiece) or the transformers tokenizer (a checkpoint's)
    pad: int
    bos: int
    eos: int
    sov: int
    sot: Optional[int]
    eov: int
    img: Optional[int]
    image_offset: int
    codebook_size: int
    eol: Optional[int] = None
    eof: Optional[int] = None
    origin: str = "wordpiece"  # data.text_tokenizer: wordpiece, or pretrained (the checkpoint's own)

    @property
    def size(self) -> int:
        return self.image_offset + self.codebook_size

    def text(self, s: str) -> list[int]:
        """Text-token ids of `s` (no special tokens)."""
        return list(self.encode(s))

    def unknown_words(self, s: str) -> list[str]:
        """The pieces of `s` the tokenizer maps to its unknown token ([UNK]); none for a byte-level
        tokenizer, which has no unknown token."""
        if self.origin == "wordpiece":
            enc = self.tokenizer.encode(s, add_special_tokens=False)
            unk = self.tokenizer.token_to_id("[UNK]")
            return [s[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i == unk]
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        enc = self.tokenizer(s, add_special_tokens=False, return_offsets_mapping=True)
        return [s[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if i == unk]

    @classmethod
    def from_wordpiece(cls, tokenizer: Tokenizer, codebook_size: int) -> Vocab:
        """Text ids, then SPECIALS in order, then the image codes."""
        text = tokenizer.get_vocab_size()
        ids = {name: text + i for i, name in enumerate(SPECIALS)}
        return cls(encode=lambda s: tokenizer.encode(s, add_special_tokens=False).ids, tokenizer=tokenizer,
                   pad=ids["pad"], bos=ids["bos"], eos=ids["eos"], sov=ids["sov"], sot=ids["sot"], eov=ids["eov"],
                   img=ids["img"], image_offset=text + len(SPECIALS), codebook_size=codebook_size)

    @classmethod
    def from_checkpoint(cls, path: str, family: str, config) -> Vocab:
        """The tokenizer saved in checkpoint directory `path` and the checkpoint's `config`
        (an Emu3Config or JanusConfig)."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"data.text_tokenizer: 'pretrained' found no tokenizer in {path} ({type(e).__name__}: "
                             f"{e}); save the checkpoint's tokenizer there or use 'wordpiece'") from e
        # transformers keeps loading arguments in init_kwargs and writes them back on save_pretrained: an
        # exported tokenizer must not tell its later users never to download
        tok.init_kwargs.pop("local_files_only", None)

        def optional_special(attr: str, default: str) -> Optional[int]:
            tid = tok.convert_tokens_to_ids(getattr(tok, attr, None) or default)  # one token: one id, or None
            return tid if isinstance(tid, int) and tid != tok.unk_token_id else None

        def special(attr: str, default: str) -> int:
            tid = optional_special(attr, default)
            if tid is None:
                name = getattr(tok, attr, None) or default
                raise ValueError(f"data.text_tokenizer: the tokenizer in {path} lacks {name!r} ({attr}); "
                                 f"it must be the checkpoint's own {family} tokenizer")
            return tid

        base = dict(encode=lambda s: tok(s, add_special_tokens=False)["input_ids"], tokenizer=tok,
                    pad=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                    bos=tok.bos_token_id, eos=tok.eos_token_id, origin="pretrained")
        if family == "emu3":
            visual = sorted(v for k, v in (config.vocabulary_map or {}).items() if k.startswith("<|visual token"))
            if not visual or visual != list(range(visual[0], visual[0] + len(visual))):
                raise ValueError(f"model.pretrained: {path}'s vocabulary_map has no contiguous '<|visual token...|>' "
                                 "ids; it is not an Emu3 checkpoint in transformers' layout")
            return cls(**base, sov=special("boi_token", "<|image start|>"), sot=special("image_wrapper_token",
                       "<|image token|>"), eov=special("eoi_token", "<|image end|>"), img=None,
                       image_offset=visual[0], codebook_size=len(visual),
                       eol=config.vocabulary_map.get("<|extra_200|>"),
                       eof=optional_special("eof_token", "<|extra_201|>"))
        return cls(**base, sov=special("boi_token", "<begin_of_image>"), sot=None,
                   eov=special("eoi_token", "<end_of_image>"), img=special("image_token", "<image_placeholder>"),
                   image_offset=config.text_config.vocab_size, codebook_size=config.vq_config.num_embeddings)

    def save(self, path: str, family: str) -> None:
        """The tokenizer beside a checkpoint, in transformers' format, so that `data.text_tokenizer:
        pretrained` (and plain transformers) reads this vocabulary back: a checkpoint's own tokenizer as
        it is; the project's WordPiece with the special tokens (and Emu3's visual tokens) appended at
        their ids, named as transformers' Emu3 and Janus processors look them up."""
        if self.origin == "pretrained":
            self.tokenizer.save_pretrained(path)
            return
        from tokenizers import AddedToken
        from transformers import PreTrainedTokenizerFast

        names = dict(SPECIAL_NAMES[family])
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.add_special_tokens([AddedToken(names[k], special=True) for k in SPECIALS])
        if family == "emu3":
            tok.add_special_tokens([AddedToken(f"<|visual token{c:06d}|>", special=True)
                                    for c in range(self.codebook_size)])
        roles = {"sov": "boi_token", "eov": "eoi_token", "sot": "image_wrapper_token", "img": "image_token"}
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=names["pad"], bos_token=names["bos"],
                                       eos_token=names["eos"], unk_token="[UNK]",
                                       extra_special_tokens={roles[k]: names[k] for k in roles})
        fast.save_pretrained(path)


# the project's special tokens, named as each family's transformers processor looks them up
SPECIAL_NAMES = {
    "emu3": dict(pad="<|endoftext|>", bos="<|extra_203|>", eos="<|extra_204|>", sov="<|image start|>",
                 sot="<|image token|>", eov="<|image end|>", img="<image>"),
    "janus": dict(pad="<|pad|>", bos="<|begin_of_sentence|>", eos="<|end_of_sentence|>", sov="<begin_of_image>",
                  sot="<|image token|>", eov="<end_of_image>", img="<image_placeholder>"),
}
