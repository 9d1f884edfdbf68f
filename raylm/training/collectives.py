"""Collectives between the ranks: each rank's numbers -> the global ones (a step's token counts and a reclaim notice,
summed evaluation statistics, losses, gathered objects).

The host-side agreement (counts, metrics, RNG states) runs on a gloo control group, so an NCCL run never syncs its
GPU stream for bookkeeping. A world of one rank skips every collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This worker among the training ranks: its rank, their number, its device, and the process group of their
    host-side agreement (None for a world of one)."""

    rank: int
    world_size: int
    device: torch.device
    control_group: object = None

    @classmethod
    def of_this_worker(cls, rank: int, world_size: int, device: torch.device) -> "Ranks":
        return cls(rank, world_size, device, _control_group(world_size))


def _control_group(world_size: int):
    if world_size == 1:
        return None
    # Step agreement is host-side bookkeeping: keep it on gloo so NCCL runs never sync on it.
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


@dataclass(frozen=True)
class ReclaimNotice:
    """A drain for preemption, as every rank agreed on it: the earliest deadline any rank was told (UNIX ms), the
    latest clock among the ranks then (UNIX ms), and the slowest checkpoint any rank has taken (ms, None before the
    first)."""

    deadline_ms: int
    now_ms: int
    slowest_checkpoint_ms: Optional[int]


class StepAgreement(NamedTuple):
    """What the ranks agree on before an optimizer step."""

    targets: int  # global target tokens of the step
    inputs: int  # global input tokens of the step
    reclaim: Optional[ReclaimNotice]  # set when any rank's node is being drained for preemption


def agree_on_step(
    ranks: Ranks, step_batches: list[dict], local_deadline_ms: Optional[int], slowest_checkpoint_ms: Optional[int]
) -> StepAgreement:
    """The step's global token counts, and whether any rank's node is being reclaimed (local_deadline_ms: this rank's
    notice, None if it has none).

    The notice rides on the token counts' all-reduce, so a step without one costs no extra collective; a
    second one, only at the notice, agrees on the deadline and the clock, so every rank decides alike.
    """
    local = [sum(b["n_targets"] for b in step_batches), sum(b["n_input_tokens"] for b in step_batches)]
    local.append(int(local_deadline_ms is not None))
    if ranks.world_size > 1:
        counts = torch.tensor(local, dtype=torch.int64)
        dist.all_reduce(counts, group=ranks.control_group)
        local = [int(count) for count in counts]
    targets, inputs, ranks_noticed = local
    if not ranks_noticed:
        return StepAgreement(targets, inputs, None)
    no_deadline = torch.iinfo(torch.int64).max
    # One MIN reduce: the earliest deadline, and (negated) the latest clock and the slowest checkpoint.
    timing = torch.tensor(
        [
            no_deadline if local_deadline_ms is None else local_deadline_ms,
            -int(time.time() * 1000),
            -(-1 if slowest_checkpoint_ms is None else slowest_checkpoint_ms),
        ],
        dtype=torch.int64,
    )
    if ranks.world_size > 1:
        dist.all_reduce(timing, op=dist.ReduceOp.MIN, group=ranks.control_group)
    slowest = -int(timing[2])
    return StepAgreement(
        targets, inputs, ReclaimNotice(int(timing[0]), -int(timing[1]), None if slowest < 0 else slowest)
    )


def gather(ranks: Ranks, value: object) -> list:
    if ranks.world_size == 1:
        return [value]
    gathered: list = [None] * ranks.world_size
    dist.all_gather_object(gathered, value, group=ranks.control_group)
    return gathered


def sum_dicts(ranks: Ranks, totals: dict[str, float]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for part in gather(ranks, totals):
        for key, value in part.items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


def all_reduce_sum(value: torch.Tensor, world_size: int) -> float:
    """The sum over the ranks of a device tensor, on the host (a sync with the device)."""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def all_reduce_sums(values: torch.Tensor, world_size: int) -> list[float]:
    """The sums over the ranks of a device tensor's elements, on the host (one collective, one sync)."""
    if world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values.tolist()


def earliest_step(step: torch.Tensor, world_size: int) -> int:
    """The smallest of the ranks' step numbers, -1 (none) ignored; -1 when no rank has one."""
    if world_size > 1:
        step = torch.where(step < 0, torch.iinfo(torch.int64).max, step)
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
        step = torch.where(step == torch.iinfo(torch.int64).max, -1, step)
    return int(step)
