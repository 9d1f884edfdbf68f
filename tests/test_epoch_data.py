"""Each rank's examples: one order per epoch over the whole store, the same global batches for any worker count, seeking on resume."""

import collections
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.epoch_data import SHUFFLE_WINDOW_BLOCKS, EpochOrder, Prefetched, RankExamples, rank_steps
from raylm.example_store import EXAMPLES_PER_BLOCK, BlockReader, StoredExamples


def _store(folder, file_rows) -> StoredExamples:
    """A store written as example_store writes one: a file per shard, 64-row row groups, ids shard << 32 | row."""
    names = []
    for shard, rows in enumerate(file_rows):
        ids = [[shard, row % 50, 7] for row in range(rows)]
        table = pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32())), "example_id": pa.array([(shard << 32) + r for r in range(rows)], type=pa.int64())})
        names.append(f"shard-{shard:06d}.parquet")
        pq.write_table(table, str(folder / names[-1]), row_group_size=EXAMPLES_PER_BLOCK)
    return StoredExamples(str(folder), tuple(names), tuple(file_rows))


# 20 files of 100 rows (2 blocks each, the second short) and a small one: 41 blocks, 3 windows.
FILE_ROWS = [100] * 20 + [7]


def _epoch_steps(store, epoch, world_size, global_batch, micro_batch, position=0, reader=None):
    """[[example ids of rank 0's micro-batches], [rank 1's], ...] for each step of the epoch from `position`."""
    order = EpochOrder(store.block_rows(), seed=42, epoch=epoch)
    ranks = []
    for rank in range(world_size):
        examples = RankExamples(reader or BlockReader(store), order)
        ranks.append([[batch["example_id"].tolist() for batch in step] for step in rank_steps(examples, position, global_batch, micro_batch, rank, world_size)])
    return [list(step) for step in zip(*ranks)]


def test_every_worker_count_trains_each_step_on_the_same_examples_and_each_example_once(tmp_path):
    store = _store(tmp_path, FILE_ROWS)
    assert store.num_examples == 2007
    one = _epoch_steps(store, 0, world_size=1, global_batch=24, micro_batch=24)
    assert len(one) == -(-2007 // 24)
    every = [i for step in one for batch in step[0] for i in batch]
    assert sorted(every) == sorted((shard << 32) + row for shard, rows in enumerate(FILE_ROWS) for row in range(rows))
    for world_size, micro_batch in ((2, 4), (3, 8), (4, 6)):
        steps = _epoch_steps(store, 0, world_size, global_batch=24, micro_batch=micro_batch)
        assert len(steps) == len(one)
        for step, reference in zip(steps, one):
            # Rank by rank, in order, the global batch of the one-worker run; micro-batches of micro_batch at most.
            assert [i for rank in step for batch in rank for i in batch] == [i for batch in reference[0] for i in batch]
            assert all(len(batch) <= micro_batch for rank in step for batch in rank)
        last = steps[-1]  # 2007 = 83 * 24 + 15: the last step is split as evenly as it goes
        sizes = [sum(len(b) for b in rank) for rank in last]
        assert sum(sizes) == 15 and max(sizes) - min(sizes) <= -(-15 // world_size)


def test_each_epoch_has_its_own_order_mixing_the_whole_corpus(tmp_path):
    store = _store(tmp_path, FILE_ROWS)
    epochs = [[i for step in _epoch_steps(store, epoch, 1, 50, 50) for i in step[0][0]] for epoch in (0, 1)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    in_file_order = sorted(epochs[0])
    assert epochs[0] != in_file_order
    # The last quarter of the corpus makes up a fair share of the first tenth of each epoch (a quarter, on average).
    tail = set(in_file_order[-500:])
    for order in epochs:
        assert len(tail.intersection(order[:200])) >= 20
    # Within a window the examples of its blocks are mixed, not read block after block.
    first_window = epochs[0][: SHUFFLE_WINDOW_BLOCKS * EXAMPLES_PER_BLOCK]
    runs = sum(1 for a, b in zip(first_window, first_window[1:]) if b == a + 1)
    assert runs < len(first_window) // 10


def test_a_resumed_rank_starts_reading_at_its_position(tmp_path):
    store = _store(tmp_path, FILE_ROWS)
    full = _epoch_steps(store, 1, world_size=2, global_batch=32, micro_batch=8)
    order = EpochOrder(store.block_rows(), seed=42, epoch=1)
    resumed_step = int(order.window_starts[2]) // 32 + 2  # a few steps into the third, last window
    position = resumed_step * 32
    assert order.window_of(position) == 2 and len(order.window_starts) == 4
    reader = BlockReader(store)
    assert _epoch_steps(store, 1, 2, 32, 8, position=position, reader=reader) == full[resumed_step:]
    # Only the last window's blocks were read (once, though both ranks read them), not the epoch's.
    assert reader.blocks_read == len(order.window_blocks(2)) < len(store.block_rows()) // 2


def test_other_worker_counts_resume_at_the_same_position(tmp_path):
    """The data position is examples consumed, so a run resized at a checkpoint neither repeats nor skips an example."""
    store = _store(tmp_path, FILE_ROWS)
    before = _epoch_steps(store, 0, world_size=4, global_batch=32, micro_batch=8)[:30]
    after = _epoch_steps(store, 0, world_size=2, global_batch=32, micro_batch=16, position=30 * 32)
    used = collections.Counter(i for step in before + after for rank in step for batch in rank for i in batch)
    assert len(used) == store.num_examples and set(used.values()) == {1}


def test_prefetching_keeps_the_order_hands_over_errors_and_stops_when_closed():
    assert list(Prefetched(iter(range(50)), lambda x: x * 2, ahead=3)) == [x * 2 for x in range(50)]
    assert list(Prefetched(iter(range(5)), lambda x: x, ahead=0)) == list(range(5))

    def failing():
        yield 1
        raise ValueError("bad bytes in shard 3")

    items = Prefetched(failing(), lambda x: x, ahead=2)
    assert next(items) == 1
    with pytest.raises(ValueError, match="shard 3"):
        next(items)

    threads = threading.active_count()
    endless = Prefetched(iter(range(10**9)), lambda x: x, ahead=2)
    assert next(endless) == 0 and threading.active_count() == threads + 1
    endless.close()
    assert endless.prepared <= 5 and threading.active_count() == threads
