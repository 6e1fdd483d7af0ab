"""Image tokenizers: images [N, C, H, W] in [0, 1] to codebook indices [N, h * w] and back.

- `VQTokenizer` (`data.image_tokenizer: digits_vq`): the project's own, trained on real images that
  ship offline (scikit-learn's digits). Each 8x8 image is cut into a 4x4 grid of 2x2 patches and every
  patch is replaced by the nearest of `codebook_size` centroids fitted by k-means (k-means++ init,
  seeded, float64 so a fit is bit-identical across runs): 16 codes per image, as a 384 px image is 576
  codes for Janus' VQ-VAE, the same interface at CPU scale. The fit uses all 1,797 digits, like a
  tokenizer pretrained before the multimodal model sees any split; it is cached (atomic write), so
  every rank and every resume tokenizes with the same codebook.
- `CheckpointVQ` (`data.image_tokenizer: pretrained`): a checkpoint's own VQ-VAE, transformers'
  `Emu3VQVAE` or `JanusVQVAE`, frozen. Pixels are mapped to [-1, 1] (mean 0.5, std 0.5, as the
  published preprocessor configs) on the way in and back to [0, 1] on the way out.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from model_zoo.files import atomic_write, writable_dir

PATCH = 2
SIDE = 8
GRID = SIDE // PATCH  # codes per side; an image is GRID * GRID codes
CODES = GRID * GRID
FORMAT = 2  # bump when the fit changes, so stale caches are not mixed with fresh ones


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits: images FloatTensor[N, 1, 8, 8] in [0, 1], labels LongTensor[N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target, dtype=torch.long)


def check_images(images: torch.Tensor, channels: int, size: int, name: str = "images") -> torch.Tensor:
    """`images` itself if it is a float tensor [N, channels, size, size], else an error naming `name`."""
    shape = (channels, size, size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape \
            or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a FloatTensor[N, {channels}, {size}, {size}] in [0, 1], got {got}")
    return images


def check_codes(codes: torch.Tensor, n_codes: int, codebook_size: int) -> torch.Tensor:
    if codes.dim() != 2 or codes.shape[1] != n_codes:
        raise ValueError(f"codes must be a LongTensor[N, {n_codes}], got {tuple(codes.shape)}")
    if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
    return codes


def to_patches(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, 8, 8] -> [N, 16, 4], patches in row-major grid order."""
    n = images.shape[0]
    return images.reshape(n, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4).reshape(n, CODES, PATCH * PATCH)


def from_patches(patches: torch.Tensor) -> torch.Tensor:
    """[N, 16, 4] -> [N, 1, 8, 8], the inverse of to_patches."""
    n = patches.shape[0]
    return patches.reshape(n, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, 1, SIDE, SIDE)


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
    """Maps 8x8 single-channel images to 16 codes (one per 2x2 patch) and back through a k-means codebook."""

    channels, image_size, grid = 1, SIDE, (GRID, GRID)

    def __init__(self, codebook: torch.Tensor):
        if codebook.dim() != 2 or codebook.shape[1] != PATCH * PATCH or not codebook.is_floating_point():
            raise ValueError(f"codebook must be a float tensor [codebook_size, {PATCH * PATCH}], "
                             f"got {codebook.dtype} {tuple(codebook.shape)}")
        self.codebook = codebook.float()

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int = 64, seed: int = 0, iters: int = 50) -> VQTokenizer:
        """k-means on all 2x2 patches of `images` ([N, 1, 8, 8] in [0, 1])."""
        x = to_patches(check_images(images, 1, SIDE)).reshape(-1, PATCH * PATCH).double()
        if not 1 <= codebook_size <= len(x):
            raise ValueError(f"codebook_size={codebook_size} must be in [1, {len(x)}] (the number of patches)")
        if iters < 1:
            raise ValueError(f"iters={iters} must be >= 1")
        return cls(kmeans(x, codebook_size, seed, iters))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """FloatTensor[N, 1, 8, 8] in [0, 1] -> LongTensor[N, 16], each the nearest codebook entry."""
        p = to_patches(check_images(images, 1, SIDE).double())
        return _sq_dist(p.reshape(-1, PATCH * PATCH), self.codebook.double()).argmin(1).reshape(p.shape[0], CODES)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor[N, 16] -> FloatTensor[N, 1, 8, 8]."""
        return from_patches(self.codebook[check_codes(codes, CODES, self.codebook_size)])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, lambda tmp: torch.save({"format": FORMAT, "codebook": self.codebook.clone()}, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> VQTokenizer:
        try:
            state = torch.load(path, weights_only=True)
            return cls(state["codebook"])
        except Exception as e:
            raise ValueError(f"VQ codebook cache {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                             f"delete it to retrain") from e

    @classmethod
    def load_or_train(cls, cache_dir: str | os.PathLike, codebook_size: int = 64, seed: int = 0) -> VQTokenizer:
        """The cached codebook for (codebook_size, seed) if present, else fit it on the digits and cache it."""
        path = writable_dir(cache_dir) / f"vq-digits-k{codebook_size}-seed{seed}-v{FORMAT}.pt"
        if path.exists():
            vq = cls.load(path)
            if vq.codebook_size != codebook_size:
                raise ValueError(f"VQ codebook cache {path} holds {vq.codebook_size} codes, not {codebook_size}; "
                                 f"delete it to retrain")
            return vq
        vq = cls.fit(digits()[0], codebook_size, seed)
        vq.save(path)
        return vq


class CheckpointVQ:
    """A checkpoint's own VQ-VAE (transformers' Emu3VQVAE or JanusVQVAE) at one square image size.

    Emu3's VQ-VAE takes any size divisible by its spatial factor (a video model: an image is repeated
    over its temporal window, the first decoded frame comes back); Janus' decodes a fixed grid
    (`num_patches` per side)."""

    vqmodel: Any  # transformers' Emu3VQVAE or JanusVQVAE (imported lazily): their encode and decode differ

    def __init__(self, vqmodel: torch.nn.Module, image_size: int):
        from transformers import Emu3VQVAE, JanusVQVAE

        self.vqmodel, self.image_size = vqmodel.eval().requires_grad_(False), image_size
        c = self.vqmodel.config
        self.channels = c.in_channels
        if isinstance(vqmodel, Emu3VQVAE):
            factor, self.codebook_size, self._emu3 = vqmodel.spatial_scale_factor, c.codebook_size, True
        elif isinstance(vqmodel, JanusVQVAE):
            factor, self.codebook_size, self._emu3 = 2 ** (len(c.channel_multiplier) - 1), c.num_embeddings, False
            if image_size != factor * c.num_patches:
                raise ValueError(f"image_size={image_size} is invalid for this Janus VQ-VAE: it decodes a "
                                 f"{c.num_patches}x{c.num_patches} grid, so images must be {factor * c.num_patches} px")
        else:
            raise ValueError(f"vqmodel must be an Emu3VQVAE or JanusVQVAE, got {type(vqmodel).__name__}")
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is invalid: the VQ-VAE downsamples by {factor}; "
                             f"use a multiple of {factor}")
        self.grid = (image_size // factor, image_size // factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, self.channels, self.image_size) * 2 - 1
        x = x.to(next(self.vqmodel.parameters()).dtype)
        if self._emu3:
            sizes = torch.tensor([[self.image_size, self.image_size]] * len(x))
            return torch.stack(self.vqmodel.encode(x, sizes).image_tokens).reshape(len(x), -1)
        return self.vqmodel.encode(x).image_tokens.reshape(len(x), -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        codes = check_codes(codes, h * w, self.codebook_size)
        out = self.vqmodel.decode(codes.reshape(-1, h, w) if self._emu3 else codes)
        return ((out.float() + 1) / 2).clamp(0, 1)
