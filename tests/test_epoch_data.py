"""Each rank's examples: one order per epoch over the whole store, the same global batches for any worker count,
a rank reading about its share of the store, seeking on resume."""

import collections
import threading
import time

import numpy as np
import pytest

from raylm import LanguageModelingArgs
from raylm.data import example_store
from raylm.data.datasets import ExampleSpec, task_tokenizer
from raylm.data.epoch_data import (
    MIXTURE_PERIOD,
    READ_AHEAD_STEPS,
    SOURCE_ID_SHIFT,
    EpochOrder,
    Mixture,
    Prefetched,
    RankExamples,
    blocks_in_use,
    mixture_quotas,
    most_part_batches,
    rank_part,
    rank_range,
    rank_steps,
)
from raylm.data.example_store import BlockReader, StoredExamples
from raylm.data.sources import plan_shards
from raylm.data.tokenization import train_tokenizer


@pytest.fixture(scope="module")
def line_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the stores' lines ("s<shard> r<row % 50> end"), which it decodes back exactly."""
    path = tmp_path_factory.mktemp("tokenizer") / "lines.txt"
    path.write_text("".join(f"s{shard} r{row} end\n" for shard in range(21) for row in range(50)), encoding="utf-8")
    return train_tokenizer("gpt2", [str(path)], LanguageModelingArgs.from_dict({"vocab_size": 300}), is_causal=True)


def _store(folder, file_rows, tokenizer) -> StoredExamples:
    """A store written by example_store's own writer: a text file per shard, one example per line ("simple"),
    the line "s<shard> r<row % 50> end"; 64-row row groups, ids shard << 32 | row.

    Each shard goes through the function every Ray Data task of a store build runs (`_store_shard`), in
    this process: a store of many shards would otherwise need Ray.
    """
    files = []
    for shard, rows in enumerate(file_rows):
        path = folder / f"part-{shard:03d}.txt"
        path.write_text("".join(f"s{shard} r{row % 50} end\n" for row in range(rows)), encoding="utf-8")
        files.append(str(path))
    shards = plan_shards(files, shard_size_mb=1)
    assert [shard.index for shard in shards] == list(range(len(file_rows)))
    spec = ExampleSpec("simple", block_size=16, prefix=(), suffix=())
    written = [
        example_store._store_shard(example_store._as_batch(shard), task_tokenizer(tokenizer), spec, str(folder))
        for shard in shards
    ]
    store = StoredExamples(str(folder), tuple(w["name"][0] for w in written), tuple(w["rows"][0] for w in written))
    assert store.rows == tuple(file_rows)
    return store


# 20 files of 100 rows (2 blocks each, the second short) and a small one: 41 blocks.
FILE_ROWS = [100] * 20 + [7]


def _epoch_steps(store, epoch, world_size, global_batch, micro_batch, position=0, readers=None, lanes=None):
    """[[example ids of rank 0's micro-batches], [rank 1's], ...] for each step of the epoch from `position`.

    readers: one BlockReader per rank (to count what each read); lanes: the order's, if not the global batch."""
    order = EpochOrder(store.block_rows(), seed=42, epoch=epoch, lanes=lanes or global_batch)
    ranks = []
    for rank in range(world_size):
        examples = RankExamples([readers[rank] if readers else BlockReader(store)], order)
        ranks.append(
            [
                [batch["example_id"].tolist() for batch in step]
                for step in rank_steps(examples, position, global_batch, micro_batch, rank, world_size)
            ]
        )
    return [list(step) for step in zip(*ranks)]


def test_every_worker_count_trains_each_step_on_the_same_examples_and_each_example_once(tmp_path, line_tokenizer):
    store = _store(tmp_path, FILE_ROWS, line_tokenizer)
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
        assert sum(sizes) == 15 and max(sizes) - min(sizes) <= 1


def test_an_evaluation_set_is_split_into_even_parts_that_hold_each_example_once(tmp_path, line_tokenizer):
    store = _store(tmp_path, FILE_ROWS, line_tokenizer)
    stored_order = [(shard << 32) + row for shard, rows in enumerate(FILE_ROWS) for row in range(rows)]
    for world_size in (1, 2, 3, 4, 2008):
        parts = [
            [
                i
                for batch in rank_part(BlockReader(store), rank, world_size, batch_size=10)
                for i in batch["example_id"].tolist()
            ]
            for rank in range(world_size)
        ]
        # Rank after rank, the store in its stored order: every example once, parts differing by one at most.
        assert [i for part in parts for i in part] == stored_order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        # What FSDP pads every rank's evaluation to, known without asking the other ranks.
        assert most_part_batches(store.num_examples, world_size, 10) == max(-(-len(part) // 10) for part in parts)
    batches = list(rank_part(BlockReader(store), 1, 2, batch_size=10))
    assert [len(b["example_id"]) for b in batches] == [10] * 100 + [4]
    # Rank 1 starts at position 2007 // 2 = 1003: row 3 of shard 10.
    assert line_tokenizer.decode(batches[0]["input_ids"][0].tolist()) == "s10 r3 end"


def test_each_epoch_has_its_own_order_mixing_the_whole_corpus(tmp_path, line_tokenizer):
    store = _store(tmp_path, FILE_ROWS, line_tokenizer)
    epochs = [[i for step in _epoch_steps(store, epoch, 1, 50, 50) for i in step[0][0]] for epoch in (0, 1)]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    in_file_order = sorted(epochs[0])
    assert epochs[0] != in_file_order
    # The last quarter of the corpus makes up a fair share of the first tenth of each epoch (a quarter, on average).
    tail = set(in_file_order[-500:])
    for order in epochs:
        assert len(tail.intersection(order[:200])) >= 20
    # Every global batch draws from all over the corpus: its 50 examples come from far more blocks than the 16 of
    # one shuffle window (the order this replaced), and its examples' mean place in the corpus (files are in the
    # corpus' order: a corpus sorted by topic) stays near the middle in every step.
    place = {example: index for index, example in enumerate(in_file_order)}
    order = EpochOrder(store.block_rows(), seed=42, epoch=0, lanes=50)
    for start in range(0, 50 * 40, 50):
        assert len(set(order.locate(start, start + 50)[0].tolist())) >= 25
        batch = epochs[0][start : start + 50]
        assert abs(np.mean([place[i] for i in batch]) - 1003) < 2007 * 0.15


def test_each_rank_reads_about_its_share_of_the_store(tmp_path, line_tokenizer):
    store = _store(tmp_path, [640] * 8, line_tokenizer)  # 80 blocks of 64
    for world_size in (1, 2, 4, 8):
        readers = [BlockReader(store, max_blocks=blocks_in_use(64, world_size)) for _ in range(world_size)]
        steps = _epoch_steps(store, 0, world_size, global_batch=64, micro_batch=64 // world_size, readers=readers)
        assert sorted(i for step in steps for rank in step for batch in rank for i in batch) == sorted(
            (shard << 32) + row for shard in range(8) for row in range(640)
        )
        # A rank's 64 / W lanes hold 80 / W blocks; a lane that starts inside a block shares it with the lane before.
        assert max(reader.blocks_read for reader in readers) <= 80 / world_size + 1, world_size


def test_a_rank_reads_the_blocks_of_the_steps_ahead_while_it_trains(tmp_path, line_tokenizer):
    store = _store(tmp_path, FILE_ROWS, line_tokenizer)  # 2007 examples in 41 blocks, cut into 24 lanes
    order = EpochOrder(store.block_rows(), seed=42, epoch=0, lanes=24)
    reader = BlockReader(store, max_blocks=blocks_in_use(24, 2))
    steps = rank_steps(RankExamples([reader], order), 0, global_batch=24, micro_batch=6, rank=1, world_size=2)
    next(steps)
    # Handed its first step, rank 1 is already reading the blocks its lanes move into within READ_AHEAD_STEPS steps.
    parts = [rank_range(step * 24, 2007, 24, 1, 2) for step in range(READ_AHEAD_STEPS)]
    ahead = {int(block) for part in parts for block in order.locate(*part)[0]}
    assert len(ahead) > len(set(order.locate(12, 24)[0].tolist()))
    deadline = time.monotonic() + 10
    while reader.blocks_read < len(ahead) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.blocks_read == len(ahead)


def test_a_resumed_rank_starts_reading_at_its_position(tmp_path, line_tokenizer):
    store = _store(tmp_path, FILE_ROWS, line_tokenizer)
    full = _epoch_steps(store, 1, world_size=2, global_batch=32, micro_batch=8)
    order = EpochOrder(store.block_rows(), seed=42, epoch=1, lanes=32)
    resumed_step = 55  # of 63
    position = resumed_step * 32
    readers = [BlockReader(store), BlockReader(store)]
    assert _epoch_steps(store, 1, 2, 32, 8, position=position, readers=readers) == full[resumed_step:]
    # Each rank read the blocks of what was left of its lanes only, once each, not the epoch's.
    for rank, reader in enumerate(readers):
        left = [order.locate(*rank_range(p, 2007, 32, rank, 2))[0] for p in range(position, 2007, 32)]
        assert reader.blocks_read == len(set(np.concatenate(left).tolist())) < len(store.block_rows()) // 2


def test_other_worker_counts_resume_at_the_same_position(tmp_path, line_tokenizer):
    """The data position is examples consumed, so a run resized at a checkpoint neither repeats nor skips an example."""
    store = _store(tmp_path, FILE_ROWS, line_tokenizer)
    before = _epoch_steps(store, 0, world_size=4, global_batch=32, micro_batch=8)[:30]
    after = _epoch_steps(store, 0, world_size=2, global_batch=32, micro_batch=16, position=30 * 32)
    used = collections.Counter(i for step in before + after for rank in step for batch in rank for i in batch)
    assert len(used) == store.num_examples and set(used.values()) == {1}
    # Resumed with another global batch, the epoch keeps the lanes it started with (TrainerState.epoch_lanes).
    after = _epoch_steps(store, 0, world_size=2, global_batch=24, micro_batch=12, position=30 * 32, lanes=32)
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


def test_every_prefix_of_a_mixture_holds_each_source_to_its_weight_within_one_example():
    for weights in ([0.7, 0.3], [5, 3, 2], [0.9999, 0.0001]):
        quotas = mixture_quotas(weights)
        assert quotas.sum() == MIXTURE_PERIOD and (quotas > 0).all()
        order = Mixture([[64] * 200] * len(weights), weights, seed=42, epoch=0)
        sources, _ = order.sources_at(0, 3 * MIXTURE_PERIOD)
        shares = np.asarray(weights) / sum(weights)
        for source, share in enumerate(shares):
            drawn = np.cumsum(sources == source)
            assert np.abs(drawn - share * np.arange(1, len(sources) + 1)).max() <= 1.0, (weights, source)


def test_a_mixture_epoch_reads_the_first_exhausted_source_once_and_goes_on_with_the_others(tmp_path, line_tokenizer):
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = _store(tmp_path / "small", [300, 400], line_tokenizer)  # 700 examples
    large = _store(tmp_path / "large", [1000, 1000], line_tokenizer)
    readers = [BlockReader(small), BlockReader(large)]
    epochs = []
    for epoch in (0, 1):
        order = Mixture([small.block_rows(), large.block_rows()], [0.7, 0.3], seed=42, epoch=epoch, global_batch=40)
        assert order.num_examples == 1000  # the 700 examples of the small source are 70% of it
        steps = rank_steps(RankExamples(readers, order), 0, 40, 20, rank=0, world_size=1)
        epochs.append([i for step in steps for batch in step for i in batch["example_id"].tolist()])
    for ids in epochs:
        by_source = collections.Counter(i >> SOURCE_ID_SHIFT for i in ids)
        assert by_source == {0: 700, 1: 300}
        small_ids = [i for i in ids if i >> SOURCE_ID_SHIFT == 0]
        assert len(set(small_ids)) == 700  # the whole small source, each example once
    # The large source goes on in the second epoch where the first stopped: 600 distinct examples so far.
    large_ids = [i for ids in epochs for i in ids if i >> SOURCE_ID_SHIFT == 1]
    assert len(set(large_ids)) == 600
    # Its examples come from its whole length, not from its first file only (its own shuffled order).
    assert {(i & ((1 << SOURCE_ID_SHIFT) - 1)) >> 32 for i in large_ids} == {0, 1}


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"a.txt": 0.7, "b.txt": -0.3}, "weight -0.3"),
        ({"a.txt": 0.7, "b.txt": "0.3"}, "weight '0.3'"),
        ({"a.txt": 1.0}, "needs two or more"),
        ({"a.txt": 1.0, "b.txt": 1e-6}, "less than 1/10,000"),
        ({f"{i}.txt": 1.0 for i in range(128)}, "names 128 sources; a mixture takes at most 127"),
    ],
)
def test_a_bad_mixture_is_refused_naming_train_file(spec, problem):
    from raylm.data.sources import text_sources
    from raylm.errors import DataError

    with pytest.raises(DataError, match=f"train_file mixture.*{problem}"):
        text_sources(spec)
    assert text_sources({"a.txt": 7, "b.txt": 3}) == (["a.txt", "b.txt"], [7.0, 3.0])
    assert text_sources("a.txt") == (["a.txt"], None)
