"""A small VQ image tokenizer trained on real images that ship offline (scikit-learn's digits).

Each 8x8 image (pixels scaled to [0, 1]) is cut into a 4x4 grid of 2x2 patches and every patch is
replaced by the nearest of `codebook_size` centroids fitted by k-means (k-means++ init, seeded, in
float64 so a fit is bit-identical across runs). An image is then 16 codes, as a 384 px image is 576
codes for Janus' VQ tokenizer: the same interface at CPU scale. The fit uses all 1,797 digits, like
a tokenizer pretrained before the multimodal model sees any split; it is cached (atomic write) and
reused across runs, so every rank and every resume tokenizes with the same codebook.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from pathlib import Path

import torch

PATCH = 2
SIDE = 8
GRID = SIDE // PATCH  # codes per side; an image is GRID * GRID codes
CODES = GRID * GRID
FORMAT = 2  # bump when the fit changes, so stale caches are not mixed with fresh ones


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits: images FloatTensor[N, 8, 8] in [0, 1], labels LongTensor[N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 3 or tuple(images.shape[1:]) != (SIDE, SIDE):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a FloatTensor[N, {SIDE}, {SIDE}] in [0, 1], got {shape}")
    return images


def to_patches(images: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] -> [N, 16, 4], patches in row-major grid order."""
    n = images.shape[0]
    return images.reshape(n, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4).reshape(n, CODES, PATCH * PATCH)


def from_patches(patches: torch.Tensor) -> torch.Tensor:
    """[N, 16, 4] -> [N, 8, 8], the inverse of to_patches."""
    n = patches.shape[0]
    return patches.reshape(n, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, SIDE, SIDE)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, k]; explicit (not cdist) so fit and encode agree exactly."""
    return (x.square().sum(-1, keepdim=True) - 2 * x @ c.T + c.square().sum(-1)).clamp_min(0)


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of x (float64); returns centres [k, d].

    Stops early once assignments no longer change. An empty cluster is re-seeded at the point
    farthest from its centre, so the codebook never wastes codes."""
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    d2 = _sq_dist(x, centres)[:, 0]
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to squared distance
        nxt = x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, _sq_dist(x, nxt)[:, 0])
    assign = None
    for _ in range(iters):
        dist = _sq_dist(x, centres)
        new = dist.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        resid = dist.gather(1, assign[:, None])[:, 0]
        for j in (counts == 0).nonzero().flatten().tolist():
            far = resid.argmax()
            centres[j], resid[far] = x[far], -1.0
    return centres


class VQTokenizer:
    """Maps 8x8 images to 16 codes (one per 2x2 patch) and back through a k-means codebook."""

    def __init__(self, codebook: torch.Tensor):
        if codebook.dim() != 2 or codebook.shape[1] != PATCH * PATCH or not codebook.is_floating_point():
            raise ValueError(f"codebook must be a float tensor [codebook_size, {PATCH * PATCH}], "
                             f"got {codebook.dtype} {tuple(codebook.shape)}")
        self.codebook = codebook.float()

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int = 64, seed: int = 0, iters: int = 50) -> "VQTokenizer":
        """k-means on all 2x2 patches of `images` ([N, 8, 8] in [0, 1])."""
        x = to_patches(_check_images(images)).reshape(-1, PATCH * PATCH).double()
        if not 1 <= codebook_size <= len(x):
            raise ValueError(f"codebook_size={codebook_size} must be in [1, {len(x)}] (the number of patches)")
        if iters < 1:
            raise ValueError(f"iters={iters} must be >= 1")
        return cls(kmeans(x, codebook_size, seed, iters))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """FloatTensor[N, 8, 8] in [0, 1] -> LongTensor[N, 16], each the nearest codebook entry."""
        p = to_patches(_check_images(images).double())
        return _sq_dist(p.reshape(-1, PATCH * PATCH), self.codebook.double()).argmin(1).reshape(p.shape[0], CODES)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor[N, 16] -> FloatTensor[N, 8, 8]."""
        if codes.dim() != 2 or codes.shape[1] != CODES:
            raise ValueError(f"codes must be a LongTensor[N, {CODES}], got {tuple(codes.shape)}")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return from_patches(self.codebook[codes])

    def reconstruction_mse(self, images: torch.Tensor) -> float:
        """Mean squared pixel error of decode(encode(images))."""
        return float((self.decode(self.encode(images)) - images).square().mean())

    def save(self, path: str | os.PathLike) -> None:
        """Atomic: write a temp file in the same folder, then rename, so a crash never leaves half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.save({"format": FORMAT, "codebook": self.codebook.clone()}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VQTokenizer":
        try:
            state = torch.load(path, weights_only=True)
            return cls(state["codebook"])
        except Exception as e:
            raise ValueError(f"VQ codebook cache {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                             f"delete it to retrain") from e

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike, codebook_size: int = 64, seed: int = 0) -> "VQTokenizer":
        """The cached codebook for (codebook_size, seed) if present, else fit it on the digits and cache it."""
        path = Path(cache_dir) / f"vq-digits-k{codebook_size}-seed{seed}-v{FORMAT}.pt"
        if path.exists():
            vq = cls.load(path)
            if vq.codebook_size != codebook_size:
                raise ValueError(f"VQ codebook cache {path} holds {vq.codebook_size} codes, not {codebook_size}; "
                                 f"delete it to retrain")
            return vq
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cache_dir={str(cache_dir)!r} cannot be created ({e}); pick a writable folder") from e
        vq = cls.fit(digits()[0], codebook_size, seed)
        vq.save(path)
        return vq


def grid_image(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images [N, H, W] in [0, 1] tiled into one [rows * (H + 1) - 1, nrow * (W + 1) - 1] image, 1-pixel white gaps."""
    n, h, w = images.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = torch.ones(rows * (h + 1) - 1, nrow * (w + 1) - 1)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img.clamp(0, 1)
    return grid


def write_png(pixels: torch.Tensor, path: str | os.PathLike) -> None:
    """An 8-bit greyscale PNG from a uint8 [H, W] tensor, with zlib and struct only (no image library).

    Layout: signature, IHDR, one IDAT (each row prefixed by filter byte 0), IEND; every chunk is
    length, type, data, CRC-32 of type + data. Written atomically like the caches."""
    h, w = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), pixels.to(torch.uint8)], 1).contiguous()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(png)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4) -> torch.Tensor:
    """Write the images ([N, 8, 8] in [0, 1]) as one PNG grid, each pixel a scale x scale block;
    returns the unscaled grid [H, W] (for TensorBoard)."""
    if images.dim() != 3 or len(images) == 0:
        raise ValueError(f"images must be a non-empty tensor [N, H, W], got {tuple(images.shape)}")
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow={nrow} and scale={scale} must be >= 1")
    grid = grid_image(images.detach().float().cpu(), nrow)
    pixels = (grid * 255).round().to(torch.uint8).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    write_png(pixels, path)
    return grid
