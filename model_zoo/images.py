"""Pictures for people, and the one PNG writer: image grids with a caption above each tile (the digits'
sample grid labels each tile with its digit, a user's corpus with its caption), and the PNG bytes
`prepare` stores. PNGs are written with zlib and struct; captions are drawn with Pillow's default
font (Pillow ships it, so the same text gives the same pixels on every machine)."""

from __future__ import annotations

import functools
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from model_zoo.files import atomic_write

FONT_PX = 11           # Pillow's default font at this size: ascent 11, descent 3
LINE_H = 14            # pixels per caption line
MAX_LINES = 3          # a longer caption is cut and ends with an ellipsis
GAP = 2                # white pixels between tiles, and between a caption and its image


def png_bytes(pixels: torch.Tensor) -> bytes:
    """An 8-bit PNG of a uint8 tensor: [H, W] or [1, H, W] greyscale, [3, H, W] RGB.

    Layout: signature, IHDR, one IDAT (each row prefixed by filter byte 0), IEND; every chunk is
    length, type, data, CRC-32 of type + data."""
    if pixels.dim() == 2:
        pixels = pixels[None]
    if pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"pixels must be [H, W], [1, H, W] or [3, H, W], got {tuple(pixels.shape)}")
    c, h, w = pixels.shape
    rows = pixels.to(torch.uint8).permute(1, 2, 0).reshape(h, w * c)  # each row: pixel after pixel, channels inside

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rows], 1).contiguous()
    colour = 0 if c == 1 else 2
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)) + chunk(b"IEND", b""))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to 0..255 bytes, rounded."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def write_png(pixels: torch.Tensor, path: str | os.PathLike) -> None:
    """png_bytes written atomically."""
    data = png_bytes(pixels)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@functools.lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_PX)


def wrap(text: str, width: int, max_lines: int = MAX_LINES) -> list[str]:
    """`text` in lines of at most `width` pixels of the caption font, broken between words (a word
    wider than a line is broken between characters); past `max_lines`, the last line ends with '…'."""
    font, lines, line = _font(), [], ""
    for word in " ".join(text.split()).split(" "):
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while font.getlength(line) > width and len(line) > 1:  # a word wider than the tile
            cut = 1
            while font.getlength(line[:cut + 1]) <= width:
                cut += 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "…"]
    return lines


def caption_pixels(lines: Sequence[str], width: int, n_lines: int) -> torch.Tensor:
    """[n_lines * LINE_H, width] in [0, 1]: the lines drawn dark on white, left-aligned."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, n_lines * LINE_H), 255)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((0, i * LINE_H), line, font=_font(), fill=0)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(n_lines * LINE_H, width) / 255.0


def grid_image(images: torch.Tensor, nrow: int, labels: Optional[Sequence[str]] = None,
               scale: int = 1) -> torch.Tensor:
    """Images [N, C, H, W] (or [N, H, W]) in [0, 1], each scaled up `scale` times (nearest), tiled
    row-major with GAP white pixels between tiles; with `labels`, each tile has its label above it,
    wrapped to the tile's width (every tile's strip as tall as the longest label's). Returns [C, H', W']."""
    if images.dim() == 3:
        images = images[:, None]
    n, c, h, w = images.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} images; give one per image")
    tiles = images.detach().float().cpu().clamp(0, 1).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    wrapped = [wrap(label, w) for label in labels] if labels is not None else None
    lines = max((len(x) for x in wrapped), default=0) if wrapped is not None else 0
    strip = lines * LINE_H + GAP if lines else 0
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    cell_h, cell_w = strip + h + GAP, w + GAP
    grid = torch.ones(c, rows * cell_h - GAP, nrow * cell_w - GAP)
    for i in range(n):
        top, left = (i // nrow) * cell_h, (i % nrow) * cell_w
        if lines and wrapped is not None:
            grid[:, top:top + lines * LINE_H, left:left + w] = caption_pixels(wrapped[i], w, lines)
        grid[:, top + strip:top + strip + h, left:left + w] = tiles[i]
    return grid


def render_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4,
                labels: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Write images ([N, H, W] or [N, C, H, W] in [0, 1], C 1 or 3) as one PNG grid (grid_image), and
    return that grid [C, H', W'] in [0, 1] (for TensorBoard)."""
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4 or len(images) == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be a non-empty tensor [N, H, W] or [N, 1 | 3, H, W], got {tuple(images.shape)}")
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow={nrow} and scale={scale} must be >= 1")
    grid = grid_image(images, nrow, labels, scale)
    write_png(to_uint8(grid), Path(path))
    return grid


def caption_grid(images: torch.Tensor, captions: Sequence[str], per_caption: int, path: str | os.PathLike,
                 min_width: int = 128) -> torch.Tensor:
    """`per_caption` images per caption ([N, C, H, W], caption by caption), one row per caption, each
    tile under its caption; tiles scaled up to at least `min_width` pixels so that a caption fits."""
    scale = max(1, -(-min_width // images.shape[-1]))
    labels = [c for c in captions for _ in range(per_caption)]
    return render_grid(images, path, nrow=per_caption, scale=scale, labels=labels)
