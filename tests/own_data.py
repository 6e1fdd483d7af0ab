"""What a new user brings, built offline: a tiny Emu3 checkpoint made the transformers way (its own
byte-level BPE tokenizer with the special and visual tokens transformers' Emu3Processor expects, an
RGB VQ-VAE, the embedding padded by `resize_token_embeddings(pad_to_multiple_of=64)` as released
checkpoints often are), and a folder of captioned, non-square RGB pictures of shapes."""

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Emu3Config, Emu3ForConditionalGeneration, PreTrainedTokenizerFast

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("square", "circle")
# the names transformers' Emu3Processor and model_zoo's Vocab look the special tokens up by
SPECIALS = ("<|extra_203|>", "<|extra_204|>", "<|image start|>", "<|image token|>", "<|image end|>",
            "<|extra_200|>", "<|extra_201|>")
CODES = 64


def caption(i: int) -> str:
    colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    return f"a {colour} {shape} on white"


def shapes_folder(folder: Path, n: int = 24, size: tuple[int, int] = (12, 10)) -> Path:
    """n pictures (PNG, `size` = width x height, not square) of a coloured shape on white, each with a
    same-named caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        picture = Image.new("RGB", size, (255, 255, 255))
        draw = ImageDraw.Draw(picture)
        box = (size[0] // 2 - 3 + i % 3 - 1, 2, size[0] // 2 + 3 + i % 3 - 1, 8)
        fill = COLOURS[list(COLOURS)[i % len(COLOURS)]]
        (draw.rectangle if "square" in caption(i) else draw.ellipse)(box, fill=fill)
        picture.save(folder / f"shape{i:03d}.png")
        (folder / f"shape{i:03d}.txt").write_text(caption(i))
    return folder


def bpe_tokenizer(merges: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the shapes' captions (and the size text Emu3 writes), then the
    special tokens and the image codes' visual tokens, as Emu3's own tokenizer orders them."""
    words = [caption(i) for i in range(16)] + ["4*4", "8*8", "a picture of a shape"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(words * 10, trainers.BpeTrainer(vocab_size=merges, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.add_special_tokens([AddedToken(f"<|visual token{c:06d}|>", special=True) for c in range(CODES)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>",
                                   pad_token="<|endoftext|>")


def emu3_checkpoint(folder: Path, pad_to: int = 64, seed: int = 0) -> Path:
    """A tiny Emu3ForConditionalGeneration with its tokenizer, saved with save_pretrained; its embedding
    padded to a multiple of `pad_to` rows (more rows than the tokenizer has ids)."""
    tok = bpe_tokenizer()
    vocabulary_map = {k: v for k, v in tok.get_vocab().items() if k.startswith("<|")}
    text = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vq = dict(codebook_size=CODES, embed_dim=4, latent_channels=4, in_channels=3, out_channels=3, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[], hidden_size=64,
              temporal_downsample_factor=2)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocabulary_map))
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad_to, mean_resizing=False)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
