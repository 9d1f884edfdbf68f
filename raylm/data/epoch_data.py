"""Each rank's examples, step by step: one order of the whole store per epoch, whatever the worker count, in which
a rank reads about its share of the store.

An epoch's order is a pure function of the store's layout, the seed, the epoch and the global batch:
the store's blocks (64-row Parquet row groups) in an order permuted per epoch, each block's rows
shuffled, make one sequence; that sequence is cut into `lanes` (the global batch) contiguous lanes of
equal length (the first ones one longer where the count does not divide: spread evenly, see
`_long_lane`), and optimizer step k takes the k-th example of every lane, in lane order. Step k's
global batch thus holds one example from each of `lanes` places spread over the whole corpus (a
corpus sorted by topic or date is mixed in every batch), and every epoch sees another order.

The step's examples are cut into contiguous, even parts, one per rank, each in micro-batches of
train_batch_size: rank r of W takes lanes [r * lanes / W, (r + 1) * lanes / W), step after step,
so it reads the blocks of its own lanes, about 1/W of the store, and a node its ranks' share
(bench/data_scale.py measures it). The data position is one number, the examples of the epoch
consumed so far, which means the same for any worker count: a restarted (or resized) run reads on
from there instead of replaying the epoch, and every example of an epoch is used once.

A weighted mixture of sources (`Mixture`) is one such sequence too, drawn from each source's own order.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from raylm.data.example_store import BlockReader
from raylm.data.sources import MAX_MIXTURE_SOURCES

MIXTURE_PERIOD = 10_000  # positions per repetition of a mixture's pattern: weights count in steps of 1e-4
# A mixture's example ids carry their source above the store's own ids, below the int64's sign bit.
SOURCE_ID_SHIFT = 63 - MAX_MIXTURE_SOURCES.bit_length()
READ_AHEAD_STEPS = 16
_ROW_ORDERS_KEPT = 4096  # blocks whose shuffled rows an order keeps (a rank's lanes are in about lanes / W at a time)
_EMPTY = np.zeros(0, dtype=np.int64)


class EpochOrder:
    """The order of an epoch's examples: blocks permuted and rows shuffled by (seed, epoch), read across `lanes`."""

    def __init__(self, block_rows: Sequence[int], seed: int, epoch: int, lanes: int = 1, stream: tuple[int, ...] = ()):
        """lanes: the global batch (examples per optimizer step); stream: more seed words, so that the sources of a
        mixture are shuffled independently."""
        self._rows = np.asarray(block_rows, dtype=np.int64)
        self._seed = [seed, *stream, epoch]
        self.blocks = np.random.default_rng(self._seed).permutation(len(self._rows))
        self._starts = np.concatenate([[0], np.cumsum(self._rows[self.blocks])])
        self.num_examples = int(self._starts[-1])
        self.lanes = max(1, min(int(lanes), self.num_examples))
        self._lane_length, self._long_lanes = divmod(self.num_examples, self.lanes)
        self._row_orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, row in block) of the examples at positions [start, stop) of the epoch."""
        index = self._sequence_index(np.arange(start, stop, dtype=np.int64))
        slot = np.searchsorted(self._starts, index, side="right") - 1
        blocks = self.blocks[slot]
        rows = index - self._starts[slot]
        by_block = np.argsort(blocks, kind="stable")
        bounds = np.flatnonzero(np.diff(blocks[by_block])) + 1
        for members in np.split(by_block, bounds) if len(by_block) else ():
            rows[members] = self._row_order(int(blocks[members[0]]))[rows[members]]
        return blocks, rows

    def _sequence_index(self, positions: np.ndarray) -> np.ndarray:
        """Where each position of the epoch is in the sequence of shuffled blocks: lane `position % lanes`, its
        `position // lanes`-th example; the last, short step takes the long lanes' last examples."""
        lanes, length, long_lanes = self.lanes, self._lane_length, self._long_lanes
        full = positions < lanes * length
        lane = np.where(full, positions % lanes, 0)
        within = np.where(full, positions // lanes, length)
        extra = positions[~full] - lanes * length  # the extra-th long lane
        lane[~full] = -(-(extra + 1) * lanes // max(long_lanes, 1)) - 1
        return lane * length + lane * long_lanes // lanes + within

    def _row_order(self, block: int) -> np.ndarray:
        if block in self._row_orders:
            self._row_orders.move_to_end(block)
        else:
            rng = np.random.default_rng([*self._seed, block])
            self._row_orders[block] = rng.permutation(int(self._rows[block]))
            if len(self._row_orders) > _ROW_ORDERS_KEPT:
                self._row_orders.popitem(last=False)
        return self._row_orders[block]


def rank_range(position: int, num_examples: int, global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """The part [start, stop) of the epoch's sequence that `rank` trains on in the step starting at `position`.

    The step takes the next global_batch examples (fewer at the end of the epoch), in parts that differ by one
    example at most. In the last, short step a rank's part is the long lanes among its own (EpochOrder).
    """
    step = step_examples(position, num_examples, global_batch)
    return position + rank * step // world_size, position + (rank + 1) * step // world_size


def largest_rank_part(position: int, num_examples: int, global_batch: int, world_size: int) -> int:
    return -(-step_examples(position, num_examples, global_batch) // world_size)


def step_examples(position: int, num_examples: int, global_batch: int) -> int:
    return min(global_batch, num_examples - position)


def blocks_in_use(lanes: int, world_size: int) -> int:
    """The blocks a rank holds at once: each of its lanes is in one block, or two while it crosses into the next
    within READ_AHEAD_STEPS (a BlockReader that holds fewer reads some of them again at every step)."""
    return 2 * -(-lanes // world_size) + 8


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return max(1, math.ceil(num_examples / global_batch))


class Mixture:
    """Sources drawn in proportion to their weights, each in its own shuffled order, as one sequence per epoch.

    The draws follow a fixed pattern of MIXTURE_PERIOD positions in which source s holds its share of
    slots (weights rounded to 1e-4), spread by always serving the source furthest behind its share:
    every prefix of the sequence holds each source's share to within one example per period start.
    Source s's k-th draw is example k mod n_s of its own pass k // n_s (a pass is one EpochOrder of
    that source), so a small source is repeated and a large one is read on across epochs, never
    restarted. An epoch lasts until the first source has been read through once (its first pass ends),
    and the next epoch goes on where the sequence stopped. A source's pass has as many lanes as the
    source has draws in a step, so that a rank's part of a step reads its share of each source's lanes.
    """

    def __init__(
        self,
        block_rows: Sequence[Sequence[int]],
        weights: Sequence[float],
        seed: int,
        epoch: int,
        global_batch: int = 1,
    ):
        self._rows = [list(rows) for rows in block_rows]
        self._seed, self._epoch = seed, epoch
        self.sizes = np.array([sum(rows) for rows in self._rows], dtype=np.int64)
        self.quotas = mixture_quotas(weights)
        self._lanes = [max(1, round(global_batch * int(quota) / MIXTURE_PERIOD)) for quota in self.quotas]
        self.pattern = _spread(self.quotas)
        # Each slot's draw number within its source in one period.
        self._slot_rank = np.zeros(MIXTURE_PERIOD, dtype=np.int64)
        for source in range(len(self.quotas)):
            slots = np.flatnonzero(self.pattern == source)
            self._slot_rank[slots] = np.arange(len(slots))
        # The epoch ends just before the first source's draw number n_s, its second pass's first example.
        self.num_examples = int(min(self._position_of(source, int(size)) for source, size in enumerate(self.sizes)))
        self._orders: dict[tuple[int, int], EpochOrder] = {}

    def _position_of(self, source: int, draw: int) -> int:
        slots = np.flatnonzero(self.pattern == source)
        return (draw // len(slots)) * MIXTURE_PERIOD + int(slots[draw % len(slots)])

    def drawn(self, epochs: int, epoch_examples: int) -> np.ndarray:
        """Examples drawn from each source in `epochs` whole epochs and `epoch_examples` of the next."""
        total = epochs * self.num_examples + epoch_examples
        periods, rest = divmod(total, MIXTURE_PERIOD)
        return periods * self.quotas + np.bincount(self.pattern[:rest], minlength=len(self.quotas))

    def sources_at(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw number within it) of the positions [start, stop) of this epoch."""
        absolute = np.arange(start, stop, dtype=np.int64) + self._epoch * self.num_examples
        period, slot = np.divmod(absolute, MIXTURE_PERIOD)
        source = self.pattern[slot]
        return source, period * self.quotas[source] + self._slot_rank[slot]

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, block, row) of the examples at positions [start, stop) of the epoch."""
        sources, draws = self.sources_at(start, stop)
        blocks, rows = np.zeros(len(sources), dtype=np.int64), np.zeros(len(sources), dtype=np.int64)
        for source in np.unique(sources):
            here = np.flatnonzero(sources == source)
            passes, within = np.divmod(draws[here], self.sizes[source])
            for source_pass in np.unique(passes):
                picked = here[passes == source_pass]
                # A source's draws are numbered in order, so those of one pass here are consecutive.
                first = int(within[passes == source_pass][0])
                blocks[picked], rows[picked] = self._order(int(source), int(source_pass)).locate(
                    first, first + len(picked)
                )
        return sources, blocks, rows

    def _order(self, source: int, source_pass: int) -> EpochOrder:
        key = (source, source_pass)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # one pass per source at a time
            lanes = self._lanes[source]
            self._orders[key] = EpochOrder(self._rows[source], self._seed, source_pass, lanes, stream=(source,))
        return self._orders[key]


def epoch_order(
    block_rows: Sequence[Sequence[int]], weights: Optional[Sequence[float]], seed: int, epoch: int, global_batch: int
):
    """The epoch's order of one store's examples (`block_rows` holds one list), or of a weighted mixture of stores,
    read across `global_batch` lanes (EpochOrder)."""
    if weights:
        return Mixture(block_rows, weights, seed, epoch, global_batch)
    return EpochOrder(block_rows[0], seed, epoch, global_batch)


def mixture_quotas(weights: Sequence[float]) -> np.ndarray:
    """Each source's slots in MIXTURE_PERIOD: its share of the normalised weights, rounded by largest remainder."""
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * MIXTURE_PERIOD
    quotas = np.floor(shares).astype(np.int64)
    for index in np.argsort(-(shares - quotas), kind="stable")[: MIXTURE_PERIOD - int(quotas.sum())]:
        quotas[index] += 1
    return quotas


def _spread(quotas: np.ndarray) -> np.ndarray:
    """The pattern: at each slot, the source furthest behind its share (ties to the lower index)."""
    served = np.zeros(len(quotas), dtype=np.int64)
    pattern = np.zeros(MIXTURE_PERIOD, dtype=np.int64)
    for slot in range(MIXTURE_PERIOD):
        behind = quotas * (slot + 1) - served * MIXTURE_PERIOD
        source = int(np.argmax(behind))
        pattern[slot] = source
        served[source] += 1
    return pattern


class RankExamples:
    """One rank's examples for one epoch, read in the epoch's order from the store, or the stores of a mixture."""

    def __init__(self, readers: Sequence[BlockReader], order):
        self.readers, self.order = list(readers), order

    def take(self, start: int, stop: int) -> dict:
        """The examples at positions [start, stop) of the epoch's sequence (a numpy batch)."""
        if isinstance(self.order, Mixture):
            sources, blocks, rows = self.order.locate(start, stop)
            lists: dict[str, list] = {"input_ids": [None] * len(sources)}
            example_ids = np.zeros(len(sources), dtype=np.int64)
            for source in np.unique(sources):
                here = np.flatnonzero(sources == source)
                batch = self.readers[source].examples(blocks[here], rows[here])
                for name, values in batch.items():
                    if name != "example_id":
                        column = lists.setdefault(name, [None] * len(sources))
                        for index, value in zip(here, values):
                            column[index] = value
                example_ids[here] = batch["example_id"] | (int(source) << SOURCE_ID_SHIFT)
            return {**lists, "example_id": example_ids}
        blocks, rows = self.order.locate(start, stop)
        return self.readers[0].examples(blocks, rows)

    def read_ahead(self, start: int, stop: int) -> None:
        """Start reading the blocks of positions [start, stop) of the epoch, in the order they are used."""
        if isinstance(self.order, Mixture):
            sources, blocks, _ = self.order.locate(start, stop)
            for source in np.unique(sources):
                self.readers[source].read_ahead(list(dict.fromkeys(blocks[sources == source].tolist())))
        else:
            self.readers[0].read_ahead(list(dict.fromkeys(self.order.locate(start, stop)[0].tolist())))


def rank_steps(
    examples: RankExamples, position: int, global_batch: int, micro_batch: int, rank: int, world_size: int
) -> Iterator[list[dict]]:
    """This rank's micro-batches (numpy batches) for each remaining step of the epoch, from `position` on.

    A rank with no part in a step (the last, short one) gets an empty list. The blocks of the steps up to
    READ_AHEAD_STEPS ahead are being read meanwhile, so that object storage's latency per request overlaps
    the steps before (a lane moves into its next block every 64 steps or so: few blocks are new in each).
    """
    total = examples.order.num_examples
    asked = position  # the first step whose blocks were not asked for yet
    while position < total:
        horizon = min(total, position + READ_AHEAD_STEPS * global_batch)
        while asked < horizon:
            examples.read_ahead(*rank_range(asked, total, global_batch, rank, world_size))
            asked += step_examples(asked, total, global_batch)
        start, stop = rank_range(position, total, global_batch, rank, world_size)
        yield [examples.take(a, min(a + micro_batch, stop)) for a in range(start, stop, micro_batch)]
        position += step_examples(position, total, global_batch)


def rank_part(reader: BlockReader, rank: int, world_size: int, batch_size: int) -> Iterator[dict]:
    """This rank's even, contiguous part of a store in its stored order (an evaluation set), in numpy batches.

    Each example is in exactly one rank's part, for any worker count: an evaluation adds up all of them.
    """
    block_rows = np.asarray(reader.store.block_rows(), dtype=np.int64)
    total = int(block_rows.sum())
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    blocks = np.repeat(np.arange(len(block_rows)), block_rows)
    rows = np.arange(total) - np.repeat(np.cumsum(block_rows) - block_rows, block_rows)
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        yield reader.examples(blocks[first:last], rows[first:last])


def most_part_batches(num_examples: int, world_size: int, batch_size: int) -> int:
    """The most batches any rank's `rank_part` yields: the largest part holds ceil(num_examples / world_size)
    examples."""
    largest = -(-num_examples // world_size)
    return -(-largest // batch_size)


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
