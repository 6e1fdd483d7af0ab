"""Pictures for people: image grids with a label above each tile, written as PNG with zlib and struct
only (no image library), and a 3x5 pixel font for the labels."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from model_zoo.files import atomic_write

# 3x5 glyphs, one string of 15 pixels per character, row-major ('#' = ink)
FONT = {
    "0": "####.##.##.####", "1": ".#.##..#..#.###", "2": "###..#####..###", "3": "###..###..#####",
    "4": "#.##.####..#..#", "5": "####..###..####", "6": "####..####.####", "7": "###..#..#..#..#",
    "8": "####.#####.####", "9": "####.####..####", " ": "...............",
}
GLYPH_H, GLYPH_W = 5, 3


def text_pixels(text: str) -> torch.Tensor:
    """[5, 4 * len(text) - 1] in [0, 1]: dark glyphs (0) on white (1), one blank column between them."""
    bad = sorted(set(text) - set(FONT))
    if bad:
        raise ValueError(f"label {text!r} has characters {bad} the font lacks; use digits and spaces")
    out = torch.ones(GLYPH_H, max(1, 4 * len(text) - 1))
    for i, ch in enumerate(text):
        glyph = torch.tensor([c != "#" for c in FONT[ch]], dtype=torch.float32).reshape(GLYPH_H, GLYPH_W)
        out[:, 4 * i:4 * i + GLYPH_W] = glyph
    return out


def grid_image(images: torch.Tensor, nrow: int, labels: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Images [N, H, W] in [0, 1] tiled row-major into one greyscale image with 1-pixel white gaps;
    with `labels`, each tile gets its label drawn above it (a 5-pixel strip and a 1-pixel gap), left-aligned."""
    n, h, w = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} images; give one per image")
    strip = GLYPH_H + 1 if labels is not None else 0
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    cell_h, cell_w = strip + h + 1, w + 1
    grid = torch.ones(rows * cell_h - 1, nrow * cell_w - 1)
    for i, img in enumerate(images):
        top, left = (i // nrow) * cell_h, (i % nrow) * cell_w
        if labels is not None:
            text = text_pixels(labels[i])[:, :w]
            grid[top:top + GLYPH_H, left:left + text.shape[1]] = text
        grid[top + strip:top + strip + h, left:left + w] = img.clamp(0, 1)
    return grid


def png_bytes(pixels: torch.Tensor) -> bytes:
    """An 8-bit greyscale PNG of a uint8 [H, W] tensor.

    Layout: signature, IHDR, one IDAT (each row prefixed by filter byte 0), IEND; every chunk is
    length, type, data, CRC-32 of type + data."""
    h, w = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.to(torch.uint8)], 1).contiguous()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 9)) + chunk(b"IEND", b""))


def write_png(pixels: torch.Tensor, path: str | os.PathLike) -> None:
    """png_bytes written atomically."""
    data = png_bytes(pixels)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def render_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4,
                labels: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Write images ([N, H, W] or [N, 1, H, W] in [0, 1]) as one PNG grid, each pixel a scale x scale
    block, labels above the tiles; returns the unscaled grid [H, W] (for TensorBoard)."""
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or len(images) == 0:
        raise ValueError(f"images must be a non-empty tensor [N, H, W], got {tuple(images.shape)}")
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow={nrow} and scale={scale} must be >= 1")
    grid = grid_image(images.detach().float().cpu(), nrow, labels)
    pixels = (grid * 255).round().to(torch.uint8).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    write_png(pixels, Path(path))
    return grid
