"""Each rank's examples, step by step: one order of the whole store per epoch, whatever the worker count.

An epoch is one sequence of all stored examples, a pure function of the store's layout, the seed and
the epoch: the store's blocks (64-row Parquet row groups) in an order permuted per epoch, cut into
windows of SHUFFLE_WINDOW_BLOCKS blocks whose examples are shuffled together. So a corpus sorted by
topic or date is mixed across its whole length, and every epoch sees another order.

Optimizer step k of an epoch trains on the next `global_batch` examples of that sequence, cut into
contiguous, even parts, one per rank, each in micro-batches of train_batch_size. The data position is
then one number, the examples of the epoch consumed so far, and it means the same for any worker
count: a restarted (or resized) run reads from the window that holds its position instead of
replaying the epoch, and every example of an epoch is used once.

Every rank reads the blocks of the windows it takes examples from, which are all of them: a run
reads the store once per rank and epoch. Token ids decode from Parquet at ~50M tokens/s on one core
and weigh 2 KB per 512-token example, far below what the model step costs.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from raylm.example_store import BlockReader

SHUFFLE_WINDOW_BLOCKS = 16


class EpochOrder:
    """The order of an epoch's examples: blocks permuted by (seed, epoch), examples shuffled within windows of blocks."""

    def __init__(self, block_rows: Sequence[int], seed: int, epoch: int, window_blocks: int = SHUFFLE_WINDOW_BLOCKS):
        self._rows = np.asarray(block_rows, dtype=np.int64)
        self._seed, self._epoch, self._window_blocks = seed, epoch, window_blocks
        self.blocks = np.random.default_rng([seed, epoch]).permutation(len(self._rows))
        self.num_examples = int(self._rows.sum())
        window_rows = np.add.reduceat(self._rows[self.blocks], np.arange(0, len(self.blocks), window_blocks)) if len(self.blocks) else np.zeros(0, dtype=np.int64)
        self.window_starts = np.concatenate([[0], np.cumsum(window_rows)])

    def window_blocks(self, window: int) -> np.ndarray:
        return self.blocks[window * self._window_blocks : (window + 1) * self._window_blocks]

    def window_examples(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, row in block) of each example of the window, in the epoch's order."""
        blocks = self.window_blocks(window)
        counts = self._rows[blocks]
        block_of = np.repeat(blocks, counts)
        row_of = np.arange(len(block_of)) - np.repeat(np.cumsum(counts) - counts, counts)
        shuffled = np.random.default_rng([self._seed, self._epoch, window]).permutation(len(block_of))
        return block_of[shuffled], row_of[shuffled]

    def window_of(self, position: int) -> int:
        return int(np.searchsorted(self.window_starts, position, side="right")) - 1


def rank_range(position: int, num_examples: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """The part [start, stop) of the epoch's sequence that `rank` trains on in the step starting at `position`.

    The step takes the next global_batch examples (fewer at the end of the epoch), in even parts.
    """
    step = min(global_batch, num_examples - position)
    share = -(-step // world_size)
    return position + min(rank * share, step), position + min((rank + 1) * share, step)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return max(1, math.ceil(num_examples / global_batch))


class RankExamples:
    """One rank's examples for one epoch, from a position on, read from the store in the epoch's order."""

    def __init__(self, reader: BlockReader, order: EpochOrder):
        self.reader, self.order = reader, order
        self._window, self._window_examples = -1, (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def take(self, start: int, stop: int) -> dict:
        """The examples at positions [start, stop) of the epoch's sequence (a numpy batch)."""
        blocks, rows = [], []
        position = start
        while position < stop:
            window = self.order.window_of(position)
            if window != self._window:
                # Positions only move forward: the blocks of earlier windows are not needed again.
                self._window, self._window_examples = window, self.order.window_examples(window)
                self.reader.keep(self.order.window_blocks(window))
            offset = position - int(self.order.window_starts[window])
            end = min(stop, int(self.order.window_starts[window + 1])) - int(self.order.window_starts[window])
            blocks.append(self._window_examples[0][offset:end])
            rows.append(self._window_examples[1][offset:end])
            position += end - offset
        return self.reader.examples(np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64), np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))


def rank_steps(examples: RankExamples, position: int, global_batch: int, micro_batch: int, rank: int, world_size: int) -> Iterator[list[dict]]:
    """This rank's micro-batches (numpy batches) for each remaining step of the epoch, from `position` on.

    A rank with no part in a step (the last, short one) gets an empty list.
    """
    total = examples.order.num_examples
    while position < total:
        start, stop = rank_range(position, total, global_batch, rank, world_size)
        yield [examples.take(a, min(a + micro_batch, stop)) for a in range(start, stop, micro_batch)]
        position += min(global_batch, total - position)


class Prefetched:
    """Runs an iterator `ahead` items ahead on a thread, mapping each item through `prepare` there (collating, pinning).

    `close` stops the thread when the consumer leaves early (max_steps, early stopping, divergence).
    `ahead=0` runs everything on the caller's thread.
    """

    _END = object()

    def __init__(self, items: Iterator, prepare: Callable, ahead: int):
        self._items, self._prepare, self.prepared = items, prepare, 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if ahead > 0 else None
        if self._thread is not None:
            self._thread.start()

    def _prepared(self, item):
        result = self._prepare(item)
        self.prepared += 1
        return result

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(self._prepared(item)):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, which raises it as its own
            self._put(err)

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return self._prepared(next(self._items))
        value = self._queue.get()
        if value is self._END:
            self._queue.put(self._END)
            raise StopIteration
        if isinstance(value, BaseException):
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
