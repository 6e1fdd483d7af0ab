"""Distributors: where each owned block's reduced gradient comes from and where its update goes
(the interface: distopt.distributors.base). `make_distributor` is the one place that chooses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distopt.distributors.base import BlockStates, Distributor, Meter
from distopt.distributors.fsdp2 import FSDP2Distributor, rows_of
from distopt.distributors.local import LocalDistributor
from distopt.distributors.owner import OwnerDistributor
from distopt.options import COMM_DTYPES, MLFOPOptions
from distopt.soap import state_dtype

__all__ = ["BlockStates", "Distributor", "FSDP2Distributor", "LocalDistributor", "Meter", "OwnerDistributor",
           "make_distributor", "rows_of"]


def make_distributor(params: Sequence[torch.Tensor], options: MLFOPOptions,
                     process_group: Optional[dist.ProcessGroup] = None) -> Distributor:
    """FSDP2-sharded parameters (DTensors) get the FSDP2 distributor (over their mesh); replicated
    parameters get owners over the group (default: the world) when torch.distributed is initialised
    with more than one rank; else one process. Reductions run in `options.comm_dtype`, fp64 parameters
    in fp64."""
    comm_dtype = COMM_DTYPES[options.comm_dtype]
    if any(state_dtype(p) == torch.float64 for p in params):
        comm_dtype = torch.float64  # fp64 parameters reduce in fp64
    sharded = [isinstance(p, DTensor) for p in params]
    distributor: Distributor
    if any(sharded):
        if not all(sharded):
            raise ValueError("some parameters are FSDP2-sharded (DTensor) and some are not: apply fully_shard to the "
                             "root module too, so that every parameter the optimizer gets is sharded")
        # FSDP2 has reduced already (in its reduce_dtype) and hands over gradients in the parameters'
        # dtype: the all-to-all only moves them, so a wider wire would carry nothing more
        narrowest = min((p.dtype for p in params), key=lambda d: d.itemsize)
        wire = narrowest if narrowest.itemsize < comm_dtype.itemsize else comm_dtype
        distributor = FSDP2Distributor([p for p in params if isinstance(p, DTensor)], wire)
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        distributor = OwnerDistributor(process_group, options.bucket_mb, comm_dtype)
    else:
        distributor = LocalDistributor()
    return distributor
