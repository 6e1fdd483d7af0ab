"""The offline demo corpus (`data.source: digits`): scikit-learn's 1,797 real handwritten digits, each
with a caption, split into train and validation, and fresh augmented views for training.

Two text formats share one tokenizer: `plain` (pretraining: descriptive captions, loss on every
token) and `instruct` (instruction tuning: an instruction to draw for generation, an answer for
understanding, and the loss on the response only).
"""

from __future__ import annotations

import random

import datasets
import torch

from model_zoo.vq import SIDE, digits

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {d} written by hand", "a small image of a {w}",
             "handwriting showing the digit {w}", "a scanned picture of the number {w}",
             "a {w} drawn with a pen", "the digit {d}, handwritten"]
INSTRUCT = {"generation": ["please draw the digit {w}", "draw a {w} for me", "can you sketch the number {d}"],
            "understanding": ["the picture shows a {w}", "it is the digit {w}", "i see the number {d}"]}
FORMATS = ("plain", "instruct")
GRID_TEXT = ["4*4"]  # the Emu3 size text of the digits' 4x4 code grid, so the WordPiece knows it


def caption(digit: int, index: int, text_format: str = "plain", task: str = "generation") -> str:
    """The text of sample `index` showing `digit`: a template picked by a generator seeded with the
    index, so it is fixed per sample but not tied to the digits' cyclic 0..9 order (index % k would be).
    `plain`: a caption (either task); `instruct`: the task's instruction or answer."""
    if text_format not in FORMATS:
        raise ValueError(f"text_format={text_format!r} is invalid: choose one of {FORMATS}")
    templates = TEMPLATES if text_format == "plain" else INSTRUCT[task]
    return templates[random.Random(index).randrange(len(templates))].format(w=WORDS[digit], d=digit)


def caption_corpus() -> list[str]:
    """Every text any sample can get in either format, plus the grid text: what the project's
    WordPiece is trained on (so pretraining and instruction tuning share one vocabulary)."""
    templates = TEMPLATES + [t for ts in INSTRUCT.values() for t in ts]
    return [t.format(w=w, d=d) for d, w in enumerate(WORDS) for t in templates] + GRID_TEXT


def split(seed: int = 0, val_fraction: float = 0.1) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation): a seeded split of the 1,797 digits, stratified by digit. Columns: `image`
    (64 floats in [0, 1], row-major 8x8), `digit` (ClassLabel), `index` (the row in scikit-learn's
    digits, which fixes the caption)."""
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    images, labels = digits()
    if round(val_fraction * len(images)) < 10 or round((1 - val_fraction) * len(images)) < 10:
        raise ValueError(f"val_fraction={val_fraction!r} leaves fewer than 10 samples (one per digit) in a split")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"image": images.reshape(-1, SIDE * SIDE).tolist(), "digit": labels.tolist(),
                                     "index": list(range(len(labels)))}).class_encode_column("digit")
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column="digit")
    return parts["train"], parts["test"]


def augment(images: torch.Tensor, gen: torch.Generator, noise: float = 0.03) -> torch.Tensor:
    """Fresh views of [N, 1, 8, 8] images in [0, 1]: a random shift of up to one pixel per axis (the
    uncovered border is 0, the background) plus Gaussian noise of std `noise`, clipped to [0, 1]."""
    n = len(images)
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    padded = torch.nn.functional.pad(images[:, 0], (1, 1, 1, 1))  # [N, 10, 10]
    rows = (torch.arange(SIDE)[None, :] + 1 - shifts[:, :1])  # [N, 8]: source row of each output row
    cols = (torch.arange(SIDE)[None, :] + 1 - shifts[:, 1:])
    out = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return (out + noise * torch.randn(out.shape, generator=gen)).clamp(0, 1).unsqueeze(1)
