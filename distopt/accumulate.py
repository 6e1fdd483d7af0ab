"""What one optimizer step's micro-steps leave on this rank, and when gradients leave it.

Gradients leave a rank only when the fold needs them (`Schedule`): a micro-step's gradient either
stays in p.grad, where autograd keeps summing (keep), or p.grad is taken and handed to the
distributor's reduction onto the block owners (reduce), or taken into a local per-tag sum (stash).
With the streaming fold only micro-step 1 and the dyadic chunk sums are needed, so a step reduces at
micro-steps 1, 2, 4, 8, ... and the tail at step(): ceil(log2 K) + 1 reductions, not K.

    schedule        fop off   keep every micro-step; step() reduces the sum once (as DDP's no_sync)
                    streaming reduce at 1, 2, 4, ...; step() reduces the tail (K not a power of two)
                    tree      reduce every micro-step (every fold pairs single micro-steps)
                    modality  stash per tag; step() reduces each tag's sum (one reduction per tag)
                    ranks     keep; step() reduces twice, once per rank-parity group

The `Accumulator` keeps the step's counts (micro-steps, the last reduction point, each tag's stash
and count) and which parameters had a gradient on this rank; the owner's side of the same step is
distopt.window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from distopt.comm import Checks, code
from distopt.distributors import Distributor
from distopt.host import host_values
from distopt.soap import Counters
from distopt.state import tree_bytes

KEEP, REDUCE, STASH = "keep", "reduce", "stash"


@dataclass(frozen=True)
class Schedule:
    """When a rank's gradient leaves it (module docstring)."""

    fop: bool
    pair_source: str
    fold_schedule: str

    def action(self, k: int) -> str:
        """What to do with the gradient of micro-step k (1-based) of the step."""
        if not self.fop or self.pair_source == "ranks":
            return KEEP
        if self.pair_source == "modality":
            return STASH
        if self.fold_schedule == "tree" or k & (k - 1) == 0:
            return REDUCE
        return KEEP

    def tail(self, k: int) -> bool:
        """Whether step() reduces what p.grad still holds after K = k micro-steps."""
        if not self.fop:
            return True
        return self.pair_source == "microstep" and self.fold_schedule == "streaming" and k & (k - 1) != 0

    def reductions(self, k: int, tags: int) -> int:
        """Reductions per step for K = k micro-steps (`tags` modality tags): the collective count formula."""
        if not self.fop:
            return 1
        if self.pair_source == "ranks":
            return 2
        if self.pair_source == "modality":
            return tags
        if self.fold_schedule == "tree":
            return k
        return max(k, 1).bit_length() if k & (k - 1) == 0 else k.bit_length() + 1


class Accumulator:
    """This rank's side of one step (module docstring): micro-step by micro-step, p.grad is kept,
    stashed or handed to the distributor; `flush` hands over what the schedule left for step()."""

    def __init__(self, params: Sequence[torch.Tensor], schedule: Schedule, distributor: Distributor,
                 counters: Counters) -> None:
        self.params, self.schedule, self.distributor, self.counters = list(params), schedule, distributor, counters
        self.reset()

    def reset(self) -> None:
        """A new step: nothing accumulated."""
        self.microsteps = 0
        self.last_reduced = 0                               # micro-step index of the last reduction
        self.present: set[int] = set()                      # parameters that had a gradient on this rank
        self.stash: dict[str, dict[int, torch.Tensor]] = {}  # tag -> parameter -> local sum
        self.stash_microsteps: dict[str, int] = {}
        self.action, self.tag = KEEP, ""
        self._taken: set[int] = set()
        self._arrived: dict[int, torch.Tensor] = {}  # this micro-step's gradients, stashed at its end

    # -- one micro-step ----------------------------------------------------------------------------

    def begin(self, tag: Optional[str]) -> None:
        k = self.microsteps + 1
        self.action, self.tag, self._taken = self.schedule.action(k), tag or "", set()
        if self.action == REDUCE:
            self._open("chunk", k, k - self.last_reduced, self.distributor.world)

    def add(self, index: int, p: torch.Tensor) -> None:
        """A parameter's gradient of this micro-step is complete: keep it, send it, or stash it. Called
        from autograd's hooks, where FSDP2 runs on its reduce-scatter stream: only references are
        taken here (the distributor's `add` and the stash hold the tensor); arithmetic waits for `end`."""
        assert p.grad is not None
        self.present.add(index)
        self._taken.add(index)
        if self.action == REDUCE:
            self.distributor.add(index, p.grad)
            p.grad = None
        elif self.action == STASH:
            self._arrived[index] = p.grad
            p.grad = None

    def end(self) -> None:
        """The backward ended: count it, and send the rest of this micro-step's reduction."""
        self.microsteps += 1
        self.counters["microsteps"] += 1
        if self.action == STASH:
            stash = self.stash.setdefault(self.tag, {})
            for index, grad in self._arrived.items():
                stash[index] = grad if index not in stash else stash[index].add_(grad)
            self._arrived = {}
            self.stash_microsteps[self.tag] = self.stash_microsteps.get(self.tag, 0) + 1
        if self.action == REDUCE:
            for i, p in enumerate(self.params):  # earlier kept micro-steps of parameters unused in this one
                if i not in self._taken and p.grad is not None:
                    self.distributor.add(i, p.grad)
                    p.grad = None
            self.distributor.close()
            self.last_reduced = self.microsteps

    # -- at step() ---------------------------------------------------------------------------------

    def close(self, touched: Sequence[str], stray: int, counts: Mapping[str, float],
              folds_microsteps: bool) -> Optional[dict[str, float]]:
        """End the step on this rank: agree with every rank, hand over what the schedule left, and
        verify the step's reductions. Returns the agreed counts (with `counts`, summed over ranks), or
        None when no rank has anything to step. `touched`: parameters whose p.grad changed after the
        last backward; `stray`: gradients no backward produced."""
        agreed = self._agree(touched, stray, counts, folds_microsteps)
        if agreed is None:
            return None
        self._flush()
        self._verify()
        return agreed

    def _agree(self, touched: Sequence[str], stray: int, counts: Mapping[str, float],
               folds_microsteps: bool) -> Optional[dict[str, float]]:
        """One small all-reduce, read on every rank alike (so every rank takes the same branch): equal
        micro-step counts, modality tags and reduction points, no p.grad edited after the last backward,
        and gradients only where a backward produced them."""
        checks = Checks(equal={"micro-step counts": self.microsteps, "reduction points": self.last_reduced,
                               "modality tags": code("\0".join(sorted(self.stash)))},
                        counts={"edited": len(touched), "stray": stray, **counts})
        agreed = checks.agree(self.distributor.all_reduce_sum, self.distributor.device)
        self.counters["host_syncs"] += 1
        if agreed.differ:
            raise RuntimeError(f"ranks disagree on the {agreed.differ[0]} of this step (this rank: {self.microsteps} "
                               f"micro-steps, tags {sorted(self.stash)}): every rank must run the same number of "
                               "backward passes, with the same modalities, between two step() calls")
        if agreed.counts["edited"]:
            raise RuntimeError(f"p.grad changed after the last backward (e.g. by clip_grad_norm_) on some rank "
                               f"(here: {list(touched)[:3]}); MLFOPSOAP consumes each micro-step's gradient as "
                               "backward produces it, so clip with MLFOPSOAP(max_grad_norm=...) instead")
        if agreed.counts["stray"] and folds_microsteps:
            raise RuntimeError("step() found gradients that no backward produced (assigned to p.grad?): ML-FOP-SOAP "
                               "folds micro-steps, which it captures during backward; run loss.backward(), or use "
                               "capture='manual' and call end_microstep() after setting p.grad")
        return agreed.counts if self.microsteps or agreed.counts["stray"] else None

    def _verify(self) -> None:
        """Every reduction of this step carried its `reduction_checks`, summed over ranks as it left: one
        host read for all of them."""
        checks = self.distributor.checks()
        if not checks:
            return
        summed = host_values(torch.stack([vector for _, vector in checks]),
                             stand_in=[v for check, _ in checks for v in check.values()])
        self.counters["host_syncs"] += 1
        width = len(summed) // len(checks)
        for j, (check, _) in enumerate(checks):
            differ = check.read(summed[j * width:(j + 1) * width]).differ
            if differ:
                raise RuntimeError(f"ranks disagree on the {differ[0]} of reduction #{j} of this step: every rank must "
                                   "run the same micro-steps, with the same modalities")

    def _flush(self) -> None:
        """What the schedule left for step(): the tail, each modality's stash, or the rank-parity groups."""
        world, rank, k, s = self.distributor.world, self.distributor.rank, self.microsteps, self.schedule
        if s.fop and s.pair_source == "modality":
            for tag in sorted(self.stash):
                self._open(tag, k, self.stash_microsteps[tag], world)
                stash = self.stash.pop(tag)  # each tag's stash is let go once it is packed to leave
                for i in range(len(self.params)):
                    self.distributor.add(i, stash.get(i))
                del stash
                self.distributor.close()
        elif s.fop and s.pair_source == "ranks":
            for parity, name in ((0, "even"), (1, "odd")):
                self._open(name, k, k, (world + 1 - parity) // 2)
                for i, p in enumerate(self.params):
                    self.distributor.add(i, p.grad if rank % 2 == parity else None)
                self.distributor.close()
            self._drop_grads()
        elif s.tail(k) or not k:
            self._open("chunk", k, k - self.last_reduced, world)
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    self.present.add(i)
                self.distributor.add(i, p.grad)
            self.distributor.close()
            self._drop_grads()

    def held_bytes(self) -> int:
        """Bytes of the modality stashes on this rank (the rest of a step's gradients is p.grad, or
        travelling); an FSDP2 gradient counts its local shard."""
        return sum(tree_bytes(x) for s in self.stash.values() for x in s.values())

    def _drop_grads(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.present.add(i)
                p.grad = None

    def _open(self, group: str, k: int, microsteps: int, ranks: int) -> None:
        self.distributor.open(group, microsteps, ranks, reduction_checks(k, microsteps, group))
        self.counters["reductions"] += 1


def reduction_checks(k: int, microsteps: int, group: str) -> Checks:
    """What every rank's reduction must share: where it is in the step, how many micro-steps it sums
    and its group (verified at step(), from the all-reduce each reduction carries)."""
    return Checks(equal={"micro-step index": k, "micro-step count": microsteps, "group (modality tag)": code(group)})
