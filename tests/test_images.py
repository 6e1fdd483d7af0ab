"""Pictures for people: the PNG writer read back by an independent minimal reader, grids and labels."""

import struct
import zlib

import pytest
import torch

from model_zoo.images import FONT, grid_image, render_grid, text_pixels
from model_zoo.vq import digits


@pytest.fixture(scope="module")
def images():
    return digits()[0]


def read_png(raw: bytes) -> tuple[int, int, torch.Tensor]:
    """An independent minimal PNG reader (8-bit greyscale, filter 0): checks every chunk's CRC."""
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + data)
        chunks[kind] = chunks.get(kind, b"") + data
        pos += 12 + length
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0) and b"IEND" in chunks
    rows = torch.frombuffer(bytearray(zlib.decompress(chunks[b"IDAT"])), dtype=torch.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    return w, h, rows[:, 1:]


def test_png_grid_is_a_valid_png_of_the_upscaled_images(images, tmp_path):
    path = tmp_path / "sub" / "grid.png"
    grid = render_grid(images[:20], path, nrow=8, scale=3)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert (int.from_bytes(raw[20:24], "big"), int.from_bytes(raw[16:20], "big")) == (3 * 26, 3 * 71)  # 3 rows, 8 cols
    w, h, pixels = read_png(raw)
    assert (h, w) == (3 * grid.shape[0], 3 * grid.shape[1])
    assert torch.equal(pixels[::3, ::3], (grid * 255).round().to(torch.uint8))
    assert torch.equal(pixels[1::3, 2::3], pixels[::3, ::3])  # each pixel is a 3x3 block
    assert torch.equal(grid[9:17, 18:26], images[10, 0])  # row 1, column 2 of the grid is image 10
    assert torch.equal(grid_image(images[:1, 0], 8), images[0, 0])


def test_each_tile_carries_its_label_above_it(images):
    labels = [str(i % 10) for i in range(12)]
    grid = grid_image(images[:12, 0], 4, labels)
    assert grid.shape == (3 * (6 + 8 + 1) - 1, 4 * 9 - 1)          # a 5-pixel label strip and a gap per tile
    for i, label in enumerate(labels):
        top, left = (i // 4) * 15, (i % 4) * 9
        glyph = torch.tensor([c != "#" for c in FONT[label]], dtype=torch.float32).reshape(5, 3)
        assert torch.equal(grid[top:top + 5, left:left + 3], glyph), label
        assert torch.equal(grid[top + 6:top + 14, left:left + 8], images[i, 0])
    assert len({tuple(text_pixels(d).flatten().tolist()) for d in "0123456789"}) == 10, "glyphs are distinct"
    with pytest.raises(ValueError, match="labels has 2 entries for 12 images"):
        grid_image(images[:12, 0], 4, ["1", "2"])
    with pytest.raises(ValueError, match=r"label 'a7' has characters \['a'\]"):
        text_pixels("a7")

