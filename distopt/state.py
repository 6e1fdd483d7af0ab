"""Nested optimizer state (dicts and lists of tensors, as torch.optim and block states keep it)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


def tree_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested state on this rank (sums of tensor sizes, not allocator figures;
    a DTensor counts its local shard)."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tree_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tree_bytes(v) for v in value)
    return 0


def tree_to(value: Any, device: torch.device) -> Any:
    """A copy of a nested state with every tensor on `device` (dtypes kept: state is fp32 or fp64
    whatever the parameters' dtype, so a resumed run stays bit-identical)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    if isinstance(value, dict):
        return {k: tree_to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [tree_to(v, device) for v in value]
    return value
