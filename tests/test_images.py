"""Pictures for people: the one PNG writer read back by an independent minimal reader and by Pillow
(greyscale and RGB), grids with each tile under its label (digits, and captions wrapped to the tile),
and the images a model reads: antialiased resize and `data.image_fit` (crop | squash | pad)."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model_zoo.data import PAD_VALUE, fit_images
from model_zoo.images import GAP, LINE_H, caption_grid, grid_image, png_bytes, render_grid, to_uint8, wrap
from model_zoo.vq import digits


@pytest.fixture(scope="module")
def images():
    return digits()[0]


def read_png(raw: bytes) -> torch.Tensor:
    """An independent minimal PNG reader (8-bit greyscale or RGB, filter 0): checks every chunk's CRC;
    returns [C, H, W] uint8."""
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, dict[bytes, bytes]()
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + data)
        chunks[kind] = chunks.get(kind, b"") + data
        pos += 12 + length
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour in (0, 2) and b"IEND" in chunks
    c = 1 if colour == 0 else 3
    rows = torch.frombuffer(bytearray(zlib.decompress(chunks[b"IDAT"])), dtype=torch.uint8).reshape(h, w * c + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, c).permute(2, 0, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_bytes_read_back_by_two_readers(channels):
    pixels = torch.randint(0, 256, (channels, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = png_bytes(pixels)
    assert torch.equal(read_png(raw), pixels)
    import io

    pil = np.asarray(Image.open(io.BytesIO(raw)))
    assert np.array_equal(pil if channels == 3 else pil[..., None], pixels.permute(1, 2, 0).numpy())


def test_png_grid_holds_the_upscaled_images_in_place(images, tmp_path):
    path = tmp_path / "sub" / "grid.png"
    grid = render_grid(images[:20], path, nrow=8, scale=3)
    assert grid.shape == (1, 3 * (8 * 3 + GAP) - GAP, 8 * (8 * 3 + GAP) - GAP)   # 3 rows, 8 columns
    assert torch.equal(read_png(path.read_bytes()), to_uint8(grid))
    tile = grid[0, 26:26 + 24, 2 * 26:2 * 26 + 24]                                 # row 1, column 2: image 10
    assert torch.equal(tile[::3, ::3], images[10, 0]) and torch.equal(tile[2::3, 1::3], images[10, 0])
    assert torch.equal(grid_image(images[:1, 0], 8)[0], images[0, 0])


def test_each_tile_is_under_its_label(images):
    labels = [str(i % 10) for i in range(12)]
    grid = grid_image(images[:12], 4, labels, scale=4)[0]
    strip = LINE_H + GAP
    cell_h, cell_w = strip + 32 + GAP, 32 + GAP
    assert grid.shape == (3 * cell_h - GAP, 4 * cell_w - GAP)
    label_ink = []
    for i in range(12):
        top, left = (i // 4) * cell_h, (i % 4) * cell_w
        assert torch.equal(grid[top + strip:top + strip + 32, left:left + 32][::4, ::4], images[i, 0])
        label = grid[top:top + LINE_H, left:left + 32]
        assert label.min() < 0.5 and (grid[top + LINE_H:top + strip, left:left + 32] == 1).all()  # ink, then a gap
        label_ink.append(label)
    assert torch.equal(label_ink[0], label_ink[10]), "the same label, the same ink"
    assert not torch.equal(label_ink[0], label_ink[1])
    with pytest.raises(ValueError, match="labels has 2 entries for 12 images"):
        grid_image(images[:12, 0], 4, ["1", "2"])


def test_captions_wrap_to_the_tile_and_long_ones_end_with_an_ellipsis(tmp_path):
    from PIL import ImageFont

    font = ImageFont.load_default(size=11)
    text = "a red square on a white background beside a small blue circle and a green triangle"
    lines = wrap(text, 128)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(font.getlength(x) <= 128 for x in lines)
    assert " ".join(lines).rstrip("…").split() == text.split()[:len(" ".join(lines).split())]
    assert wrap("a red square", 128) == ["a red square"]
    assert all(font.getlength(x) <= 40 for x in wrap("supercalifragilistic", 40)), "a long word is broken"
    pictures = torch.rand(2 * 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = caption_grid(pictures, ["a red square", text], 3, tmp_path / "grid.png")   # tiles of 8 x 16 = 128 px
    strip = 3 * LINE_H + GAP
    assert grid.shape == (3, 2 * (strip + 128 + GAP) - GAP, 3 * (128 + GAP) - GAP)
    second_row = strip + 128 + GAP
    assert torch.equal(grid[:, second_row + strip:second_row + strip + 128:16, 130:258:16], pictures[4])
    assert (grid[:, LINE_H:3 * LINE_H, :128] == 1).all(), "a one-line caption leaves the rest of its strip white"
    assert (grid[:, second_row + 2 * LINE_H:second_row + 3 * LINE_H, :128] < 0.5).any(), "the long one fills three"


def test_downscaling_is_antialiased():
    """A 2000x2000 image of black and white stripes (two pixels each) is, at 8x8, its mean grey (0.5):
    what averaging every source pixel gives. Without antialiasing, bilinear sampling reads two source
    pixels per output pixel, and the stripes alias to stripes."""
    stripes = (torch.arange(2000) // 2 % 2).float().expand(2000, 2000)[None, None]
    small = fit_images(stripes, 1, 8)
    assert small.shape == (1, 1, 8, 8) and (small - 0.5).abs().max() < 0.01
    plain = torch.nn.functional.interpolate(stripes, size=(8, 8), mode="bilinear", align_corners=False)
    assert (plain - 0.5).abs().max() > 0.4, "the reference without antialiasing aliases"


def test_image_fit_crops_the_centre_pads_or_squashes():
    """A 4x8 image (wider than tall) whose left, middle and right quarters differ, to a 4x4 square."""
    wide = torch.cat([torch.full((4, 2), 0.0), torch.full((4, 4), 1.0), torch.full((4, 2), 0.25)], 1)[None, None]
    assert torch.equal(fit_images(wide, 1, 4), torch.ones(1, 1, 4, 4)), "crop (the default): the centre square"
    padded = fit_images(wide, 1, 8, "pad")   # 8x8: the image, with two rows of grey above and below
    assert torch.equal(padded[0, 0, 2:6], wide[0, 0]) and (padded[0, 0, :2] == PAD_VALUE).all()
    assert (padded[0, 0, 6:] == PAD_VALUE).all()
    squashed = fit_images(wide, 1, 4, "squash")
    assert squashed[0, 0, :, 0].max() < 0.3 and squashed[0, 0, :, 3].max() < 0.6 and squashed[0, 0, :, 1:3].min() > 0.6
    rgb = fit_images(torch.rand(1, 3, 6, 6), 1, 6)
    assert rgb.shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"data.image_fit: 'stretch'; choose one of \('crop', 'squash', 'pad'\)"):
        fit_images(wide, 1, 4, "stretch")
