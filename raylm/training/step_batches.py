"""A rank's part of each optimizer step: the epoch's order of the stored examples -> this rank's collated
micro-batches, prepared ahead of the loop, moved to the device, and filled up with empty batches where every rank
must run as many.
"""

from __future__ import annotations

import functools

import torch

from raylm.config import LanguageModelingArgs
from raylm.data.collators import CollatorSpec, collate
from raylm.data.epoch_data import EpochOrder, Prefetched, RankExamples, largest_rank_part, rank_steps
from raylm.data.example_store import BlockReader
from raylm.training.collectives import Ranks


def rank_step_batches(
    readers: list[BlockReader],
    order: EpochOrder,
    epoch: int,
    epoch_examples: int,
    args: LanguageModelingArgs,
    spec: CollatorSpec,
    ranks: Ranks,
) -> Prefetched:
    """This rank's collated micro-batches for each remaining step of the epoch (from `epoch_examples` of its order),
    prepared `prefetch_batches` steps ahead."""
    examples = RankExamples(readers, order)
    batch_sizes = args.global_batch_size, args.train_batch_size
    items = rank_steps(examples, epoch_examples, *batch_sizes, ranks.rank, ranks.world_size)
    prepare = functools.partial(_collate_step, spec=spec, stream=epoch, pin_memory=ranks.device.type == "cuda")
    return Prefetched(items, prepare, ahead=args.prefetch_batches)


def micro_batches_needed(
    fsdp: bool, epoch_examples: int, num_examples: int, args: LanguageModelingArgs, world_size: int
) -> int:
    """How many micro-batches every rank runs in the step that starts at `epoch_examples` of the epoch's order.

    A rank with no part in the epoch's last step takes part in the gradient all-reduce with one empty
    batch (zero loss). FSDP all-gathers each block's weights in every forward and backward, so there
    each rank runs as many micro-batches as the largest part of the step needs (epoch_data.rank_range), the
    shorter parts filled up with empty ones.
    """
    if not fsdp:
        return 1
    largest = largest_rank_part(epoch_examples, num_examples, args.global_batch_size, world_size)
    return -(-largest // args.train_batch_size)


def _collate_step(step: list[dict], spec: CollatorSpec, stream: int, pin_memory: bool) -> list[dict]:
    return [collate(batch, spec, stream, pin_memory) for batch in step]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def empty_batch(spec: CollatorSpec, device: torch.device) -> dict:
    one = torch.tensor([[spec.pad_id]], device=device)
    return {
        "input_ids": one,
        "attention_mask": torch.ones_like(one),
        "labels": torch.full_like(one, -100),
        "example_id": torch.empty(0, dtype=torch.int64),
        "target_positions": torch.empty(0, dtype=torch.int64, device=device),
        "n_targets": 0,
        "n_input_tokens": 0,
    }


def as_empty(batch: dict) -> dict:
    """A batch shaped like `batch` with nothing in it to predict or count: the filler for a step without data."""
    return {
        **batch,
        "labels": torch.full_like(batch["labels"], -100),
        "example_id": torch.empty(0, dtype=torch.int64),
        "target_positions": torch.empty(0, dtype=torch.int64, device=batch["labels"].device),
        "n_targets": 0,
        "n_input_tokens": 0,
    }
