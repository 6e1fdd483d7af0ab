"""Counted collectives over one process group, device-correct, with errors that name rank and call.

Every rank makes the same calls in the same order with the same sizes (the block plan fixes them),
so collectives always match. Nothing here picks a different collective after an error: a failing
call raises `CollectiveError` ("rank 3: reduce_scatter #17 failed: ...") on the rank where it failed,
and the other ranks fail in their next collective once that rank stops (gloo closes its connections;
NCCL's watchdog aborts after the process-group timeout), so every rank stops, within that bound.

`sent[kind]` counts the bytes this rank hands to each kind of collective (the input size; a ring
reduce-scatter or all-gather puts (world - 1) / world of it on the wire), `calls[kind]` the calls.
`destroy_process_group` ends a run, FSDP2's included, without leaving gloo's threads behind.

Rank agreement: `Checks` carries named values that every rank must hold equal (micro-step counts, a
code of the modality tags, ...) and named counts to sum, in one small fp64 all-reduce; the result
says which names disagree. `code` is the one hash of a name into such a value.
"""

from __future__ import annotations

import atexit
import gc
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from distopt.host import host_values


class CollectiveError(RuntimeError):
    pass


def code(text: str) -> int:
    """A small integer for a name: its square stays exact in fp64 sums over any number of ranks."""
    return zlib.crc32(text.encode()) % 2**16


@dataclass
class Checks:
    """Named values every rank must hold equal, and named counts summed over ranks: one all-reduce.

    Each equal value x travels as (x, x^2) beside a 1 per rank: summed over n ranks, sum x^2 * n ==
    (sum x)^2 exactly when every rank sent the same x (integers below 2^16 stay exact in fp64)."""

    equal: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def values(self) -> list[float]:
        """[1, (x, x^2) per equal value, counts...]: this rank's vector, on the host."""
        values = [1.0] + [v for x in self.equal.values() for v in (float(x), float(x) * float(x))]
        return values + [float(c) for c in self.counts.values()]

    def vector(self, device: torch.device) -> torch.Tensor:
        """`values()` on the device, each a fill on the device (no copy from the host: no host sync)."""
        return torch.stack([torch.full((), v, dtype=torch.float64, device=device) for v in self.values()])

    def read(self, summed: list[float]) -> Agreed:
        """What the all-reduced vector says: the names that differ, and the summed counts."""
        n, equal = summed[0], len(self.equal)
        differ = [name for i, name in enumerate(self.equal) if summed[2 + 2 * i] * n != summed[1 + 2 * i] ** 2]
        counts = dict(zip(self.counts, summed[1 + 2 * equal:], strict=True))
        return Agreed(differ, counts)

    def agree(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Agreed:
        """One blocking all-reduce and one host read."""
        return self.read(host_values(all_reduce_sum(self.vector(device)), stand_in=self.values()))


@dataclass(frozen=True)
class Agreed:
    differ: list[str]             # names of the equal values on which ranks disagreed
    counts: dict[str, float]      # each count summed over ranks


def destroy_process_group() -> None:
    """`dist.destroy_process_group()`, after dropping what keeps the groups alive past it
    (`release_destroyed_groups`). Runs and tests call it; programs that call torch's own are covered by
    the same release at interpreter exit (registered below)."""
    _clear_dtensor_caches()
    dist.destroy_process_group()
    gc.collect()  # the meshes sit in reference cycles


def release_destroyed_groups() -> None:
    """Let destroyed process groups go: a gloo group's worker threads stop only when the group is freed.

    torch 2.13's DTensor caches (sharding propagation, its C++ fast path, the redistribute planners)
    hold every device mesh they saw, and a mesh holds its groups, so after an FSDP2 run the threads
    outlive destroy_process_group. One of them may still be releasing a finished collective's tensors
    when the interpreter shuts down; it then needs the GIL, cannot take it, and the process aborts
    ("terminate called without an active exception") after the run has finished. The caches are only
    caches: emptying them is safe. Registered with atexit when distopt is imported, so that a program
    that calls torch's own destroy_process_group exits cleanly too (atexit runs before finalisation)."""
    _clear_dtensor_caches()
    gc.collect()  # the meshes sit in reference cycles


def _clear_dtensor_caches() -> None:
    from torch.distributed.tensor import _redistribute, debug

    for clear in (getattr(debug, "_clear_sharding_prop_cache", None),
                  getattr(_redistribute, "clear_redistribute_planner_cache", None),
                  getattr(getattr(_redistribute, "_gen_transform_infos", None), "cache_clear", None)):
        if clear is not None:  # torch 2.13 has all three; older releases have fewer of these caches
            clear()


atexit.register(release_destroyed_groups)


class Comm:
    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if initialised else 0
        self.world = dist.get_world_size(group) if initialised else 1
        self.sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def _call(self, kind: str, nbytes: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.sent[kind] += nbytes
        self.calls[kind] += 1
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the rank and the call
            raise CollectiveError(f"rank {self.rank}: {kind} #{self.calls[kind]} failed ({type(e).__name__}: {e}); "
                                  "if another rank stopped first, its error names the cause") from e

    def wait(self, work: Any, kind: str) -> None:
        """Wait on an async call; on a GPU this only orders the current stream after it (no host sync)."""
        try:
            work.wait()
        except Exception as e:  # noqa: BLE001
            raise CollectiveError(f"rank {self.rank}: waiting on {kind} failed ({type(e).__name__}: {e}); "
                                  "if another rank stopped first, its error names the cause") from e

    def reduce_scatter(self, output: torch.Tensor, buffer: torch.Tensor) -> Any:
        """Sum `buffer` ([world, n] flattened) over ranks; this rank receives row `rank` in `output` (async)."""
        return self._call("reduce_scatter", buffer.numel() * buffer.element_size(), dist.reduce_scatter_single,
                          output, buffer, async_op=True)

    def all_gather(self, output: torch.Tensor, mine: torch.Tensor) -> Any:
        """Every rank's `mine` (n elements) into `output` ([world, n] flattened), async."""
        return self._call("all_gather", mine.numel() * mine.element_size(), dist.all_gather_single,
                          output, mine, async_op=True)

    def all_to_all(self, output: torch.Tensor, send: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> Any:
        """Uneven all-to-all: send[in_splits[r] elements] to rank r, receive out_splits[r] from rank r (async)."""
        return self._call("all_to_all", send.numel() * send.element_size(), dist.all_to_all_single, output, send,
                          output_split_sizes=out_splits, input_split_sizes=in_splits, async_op=True)

    def all_reduce_sum(self, vector: torch.Tensor, async_op: bool = False) -> Any:
        """A small sum over ranks (fp64 scalars: FOP partials, norms, flags, checks), in place."""
        work = self._call("all_reduce", vector.numel() * vector.element_size(), dist.all_reduce, vector,
                          async_op=async_op)
        return work if async_op else vector

    def all_gather_object(self, obj: Any) -> list[Any]:
        out = [None] * self.world
        self._call("all_gather_object", 0, dist.all_gather_object, out, obj)
        return out
