"""A small VQ image tokenizer trained on real images that ship offline (scikit-learn's digits).

Each 8x8 image (pixels scaled to [0, 1]) is cut into a 4x4 grid of 2x2 patches; every patch is
replaced by the nearest of `codebook_size` centroids fitted by k-means (k-means++ init, seeded).
So an image is 16 codes, as an image is 576 codes for Janus' VQ tokenizer at 384 px: the same
interface at CPU scale. The codebook is cached (atomic write) and reused across runs.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PATCH = 2
GRID = 8 // PATCH  # codes per side; an image is GRID * GRID codes


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits: images FloatTensor[N, 8, 8] in [0, 1], labels LongTensor[N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def to_patches(images: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] -> [N, 16, 4], patches in row-major grid order."""
    n = images.shape[0]
    return images.reshape(n, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4).reshape(n, GRID * GRID, PATCH * PATCH)


def from_patches(patches: torch.Tensor) -> torch.Tensor:
    n = patches.shape[0]
    return patches.reshape(n, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, 8, 8)


class VQTokenizer:
    def __init__(self, codebook: torch.Tensor):
        self.codebook = codebook  # [codebook_size, PATCH * PATCH]

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int = 64, seed: int = 0, iters: int = 25) -> "VQTokenizer":
        """k-means on all 2x2 patches of `images`."""
        x = to_patches(images).reshape(-1, PATCH * PATCH).double()
        gen = torch.Generator().manual_seed(seed)
        centres = x[torch.randint(len(x), (1,), generator=gen)]
        for _ in range(1, codebook_size):  # k-means++: next centre with probability ~ squared distance
            d2 = torch.cdist(x, centres).min(1).values.square()
            centres = torch.cat([centres, x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            for k in range(codebook_size):
                members = x[assign == k]
                if len(members):
                    centres[k] = members.mean(0)
        return cls(centres.float())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 8, 8] -> LongTensor[N, 16]."""
        p = to_patches(images.float())
        return torch.cdist(p, self.codebook.expand(p.shape[0], -1, -1)).argmin(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor[N, 16] -> [N, 8, 8]."""
        return from_patches(self.codebook[codes])

    def reconstruction_mse(self, images: torch.Tensor) -> float:
        return float((self.decode(self.encode(images)) - images).square().mean())

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        torch.save({"codebook": self.codebook}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VQTokenizer":
        try:
            return cls(torch.load(path, weights_only=True)["codebook"])
        except Exception as e:
            raise ValueError(f"VQ codebook cache {path} is unreadable ({e}); delete it to retrain") from e

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike, codebook_size: int = 64, seed: int = 0) -> "VQTokenizer":
        path = Path(cache_dir) / f"vq-digits-{codebook_size}-{seed}.pt"
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vq = cls.fit(digits()[0], codebook_size, seed)
        vq.save(path)
        return vq


def grid_image(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images [N, H, W] in [0, 1] tiled into one [rows * H, nrow * W] image (1-pixel gaps)."""
    n, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(rows * (h + 1) - 1, nrow * (w + 1) - 1)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img.clamp(0, 1)
    return grid


def render_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10, scale: int = 8) -> torch.Tensor:
    """Write the images as one PNG grid (upscaled `scale` times); returns the grid [H, W]."""
    grid = grid_image(images, nrow)
    pixels = (grid.numpy() * 255).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").resize((pixels.shape[1] * scale, pixels.shape[0] * scale),
                                             Image.NEAREST).save(path)
    return grid
