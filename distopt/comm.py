"""Collectives of the sharded optimizer: reduce-to-owner, parameter all-gather, small fp64 sums.

Every call is made by every rank in the same order with the same sizes (the block plan fixes
them), so collectives always match. Buckets follow plan order, one owner per bucket, at most
`bucket_numel` elements each; reductions are asynchronous (work handles) so that the caller can
compute while they travel. With one rank nothing is sent and payloads come back as they are.
`sent` counts the bytes this rank put into each kind of collective.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from distopt.plan import Plan


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class _Bucket:
    owner: int
    blocks: list[tuple[int, int, int]]  # (block index, offset, numel) inside the bucket
    buffer: torch.Tensor
    work: Optional[object] = None


class PendingReduce:
    """Reduced payloads of the blocks this rank owns, once `wait()` returns."""

    def __init__(self, buckets: list[_Bucket], rank: int, ready: Optional[dict[int, torch.Tensor]] = None):
        self.buckets, self.rank, self.ready = buckets, rank, ready

    def wait(self) -> dict[int, torch.Tensor]:
        if self.ready is not None:
            return self.ready
        out = {}
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            if bucket.owner == self.rank:
                for index, offset, numel in bucket.blocks:
                    out[index] = bucket.buffer[offset:offset + numel]
        self.ready = out
        return out


class Comm:
    def __init__(self, group: Optional[dist.ProcessGroup] = None, bucket_mb: float = 25.0):
        self.group = group
        sharded = _initialized()
        self.rank = dist.get_rank(group) if sharded else 0
        self.world = dist.get_world_size(group) if sharded else 1
        self.bucket_mb = bucket_mb
        self.sent: Counter = Counter()
        self.calls: Counter = Counter()
        self._reduce_supported = True

    def _global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def verify_plan(self, digest: str) -> None:
        """Every rank must have derived the same plan; a mismatch would pair the wrong blocks."""
        if self.world == 1:
            return
        digests = [None] * self.world
        dist.all_gather_object(digests, digest, group=self.group)
        if len(set(digests)) != 1:
            raise RuntimeError(f"block plans differ across ranks ({digests}): every rank must build the optimizer "
                               "over the same parameters, names, shapes and options")

    def reduce_to_owners(self, plan: Plan, payloads: dict[int, torch.Tensor], width: int = 1) -> PendingReduce:
        """Sum every block's flat payload (numel * width elements) over ranks onto its owner, async."""
        if self.world == 1:
            return PendingReduce([], 0, ready=payloads)
        dtype = next(iter(payloads.values())).dtype
        bucket_numel = max(1, int(self.bucket_mb * 2**20) // torch.tensor([], dtype=dtype).element_size())
        buckets: list[_Bucket] = []
        for owner in range(self.world):
            group: list[tuple[int, int, int]] = []
            size = 0
            for b in plan.owned(owner):
                n = b.numel * width
                if group and size + n > bucket_numel:
                    buckets.append(self._launch_reduce(owner, group, size, payloads, dtype))
                    group, size = [], 0
                group.append((b.index, size, n))
                size += n
            if group:
                buckets.append(self._launch_reduce(owner, group, size, payloads, dtype))
        return PendingReduce(buckets, self.rank)

    def _launch_reduce(self, owner, blocks, size, payloads, dtype) -> _Bucket:
        buffer = torch.empty(size, dtype=dtype)
        for index, offset, numel in blocks:
            buffer[offset:offset + numel].copy_(payloads[index].reshape(-1))
        bucket = _Bucket(owner, blocks, buffer)
        self.sent["reduce"] += buffer.numel() * buffer.element_size()
        self.calls["reduce"] += 1
        if self._reduce_supported:
            try:
                bucket.work = dist.reduce(buffer, dst=self._global_rank(owner), group=self.group, async_op=True)
                return bucket
            except RuntimeError:
                self._reduce_supported = False  # e.g. a backend without reduce: fall back, counted
        self.calls["reduce_fallback_all_reduce"] += 1
        bucket.work = dist.all_reduce(buffer, group=self.group, async_op=True)
        return bucket

    def all_reduce_sum(self, vector: torch.Tensor) -> torch.Tensor:
        """A small sum over ranks (fp64 scalars: FOP partials, norms, flags), blocking."""
        if self.world == 1:
            return vector
        self.sent["all_reduce"] += vector.numel() * vector.element_size()
        self.calls["all_reduce"] += 1
        dist.all_reduce(vector, group=self.group)
        return vector

    def all_gather_blocks(self, plan: Plan, values: dict[int, torch.Tensor], dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Every rank contributes its owned blocks' flat values; every rank gets all blocks."""
        if self.world == 1:
            return values
        per_rank = [plan.owned(r) for r in range(self.world)]
        width = max(1, max(sum(b.numel for b in blocks) for blocks in per_rank))
        mine = torch.zeros(width, dtype=dtype)
        offset = 0
        for b in per_rank[self.rank]:
            mine[offset:offset + b.numel].copy_(values[b.index].reshape(-1))
            offset += b.numel
        gathered = torch.empty(self.world * width, dtype=dtype)
        self.sent["all_gather"] += mine.numel() * mine.element_size()
        self.calls["all_gather"] += 1
        dist.all_gather_single(gathered, mine, group=self.group)
        out = {}
        for r, blocks in enumerate(per_rank):
            offset = r * width
            for b in blocks:
                out[b.index] = gathered[offset:offset + b.numel]
                offset += b.numel
        return out
