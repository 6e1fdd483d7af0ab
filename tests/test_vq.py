"""The VQ tokenizer on scikit-learn's real digits: quality against independent references (the
mean image, scikit-learn's KMeans, brute-force nearest codes), the cache, and the PNG writer."""

import struct
import zlib

import pytest
import torch
from sklearn.cluster import KMeans

from model_zoo.vq import VQTokenizer, digits, from_patches, grid_image, render_grid, to_patches


@pytest.fixture(scope="module")
def images():
    return digits()[0]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vq-cache")
    return cache, VQTokenizer.load_or_train(cache, codebook_size=64, seed=0)


def test_reconstruction_beats_the_mean_image_and_improves_with_codebook_size(images, cached):
    baseline = float((images - images.mean(0)).square().mean())
    mse = {k: VQTokenizer.fit(images, k, seed=0).reconstruction_mse(images) for k in (4, 16)}
    mse[64] = cached[1].reconstruction_mse(images)
    assert mse[64] < 0.1 * baseline, (mse, baseline)
    assert baseline > mse[4] > mse[16] > mse[64]


def test_kmeans_matches_scikit_learn_inertia(images, cached):
    x = to_patches(images).reshape(-1, 4).double()
    ours = float(torch.cdist(x, cached[1].codebook.double()).min(1).values.square().sum())
    ref = KMeans(64, n_init=1, random_state=0, max_iter=100).fit(x.numpy()).inertia_
    assert ours < 1.05 * ref


def test_encode_picks_the_nearest_code_and_decode_inverts_patching(images, cached):
    vq = cached[1]
    codes = vq.encode(images[:50])
    assert codes.shape == (50, 16) and codes.dtype == torch.long
    brute = torch.cdist(to_patches(images[:50]), vq.codebook.expand(50, -1, -1)).argmin(-1)
    assert torch.equal(codes, brute)
    out = vq.decode(codes)
    assert out.shape == (50, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out[:, :2, :2].reshape(50, 4), vq.codebook[codes[:, 0]])  # code 0 is the top-left patch
    assert torch.equal(from_patches(to_patches(images)), images)


def test_fit_is_deterministic_per_seed(images):
    a, b, c = (VQTokenizer.fit(images[:300], 16, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)


def test_cache_round_trip_is_bit_identical_and_not_refitted(cached, tmp_path):
    cache, vq = cached
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and not files[0].startswith("."), files  # no temp file left behind
    mtime = (cache / files[0]).stat().st_mtime_ns
    again = VQTokenizer.load_or_train(cache, codebook_size=64, seed=0)
    assert torch.equal(again.codebook, vq.codebook) and (cache / files[0]).stat().st_mtime_ns == mtime
    vq.save(tmp_path / "vq.pt")
    assert torch.equal(VQTokenizer.load(tmp_path / "vq.pt").codebook, vq.codebook)


def test_corrupt_cache_names_the_file_and_the_fix(cached, tmp_path):
    name = next(cached[0].iterdir()).name
    (tmp_path / name).write_bytes(b"not a codebook")
    with pytest.raises(ValueError, match=f"(?s){name}.*corrupt.*delete it to retrain"):
        VQTokenizer.load_or_train(tmp_path, codebook_size=64, seed=0)


def test_bad_input_names_the_argument(images, cached, tmp_path):
    vq = cached[1]
    with pytest.raises(ValueError, match="images"):
        vq.encode(images.reshape(-1, 64))
    with pytest.raises(ValueError, match="codes"):
        vq.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match="codebook_size"):
        VQTokenizer.fit(images[:2], 100)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache_dir"):
        VQTokenizer.load_or_train(tmp_path / "file" / "sub", codebook_size=4)


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
    assert torch.equal(grid[9:17, 18:26], images[10])  # row 1, column 2 of the grid is image 10
    assert torch.equal(grid_image(images[:1], 8), images[0])
