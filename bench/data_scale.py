"""What each rank and node of a cluster reads per epoch of a large example store, against its share.

No Ray and no data: the store's block layout only (a 10B-token corpus of 1,024-token examples in
64-row blocks, one Parquet file per 4 MB text shard), the epoch order of raylm/data/epoch_data.py and
its split into ranks (rank_range), at 1, 8, 64 and 512 workers, 8 per node, global batch 512. The
baseline, in the same run, is the order this replaced: blocks permuted, examples shuffled within
windows of 16 blocks, each step's examples cut into contiguous parts, so that every rank read every
window its part touched (all of them). For each size:

- read/share: bytes a rank (a node: its ranks together, sharing one node cache) reads per epoch over
  its share of the store, the worst rank (node);
- GET/s: the cluster's ranged GETs per second at 400k tokens/s per GPU, one GET per block and node
  (the baseline: 3 per block and rank, its footer and column chunks, without a node cache);
- imbalance: the most examples by which two ranks' parts of one step differ.

Then the shuffle: over sampled steps, the mean distance in the corpus between two examples of one
global batch, over a full shuffle's (1.0 is as spread as a full shuffle), the distinct blocks in a
batch over its size, and how the batches' mean place in the corpus scatters over the epoch, over a full
shuffle's (about 1; a corpus sorted by topic and trained in its order scores sqrt(512) = 22.6).

    python bench/data_scale.py
"""

from __future__ import annotations

import common
import numpy as np

TOKENS = 10_000_000_000
EXAMPLE_TOKENS = 1024
FILE_EXAMPLES = 977  # a 4 MB text shard: about 1M tokens
BYTES_PER_TOKEN = 4  # int32 ids
GLOBAL_BATCH = 512
RANKS_PER_NODE = 8
GPU_TOKENS_PER_SECOND = 400_000
OLD_WINDOW_BLOCKS = 16
OLD_GETS_PER_BLOCK = 3
SAMPLED_STEPS = 200


def block_layout(tokens: int) -> np.ndarray:
    """Rows of each block, in file order: files of FILE_EXAMPLES examples in 64-row blocks, each file's last shorter."""
    from raylm.data.example_store import EXAMPLES_PER_BLOCK

    files, rest = divmod(tokens // EXAMPLE_TOKENS, FILE_EXAMPLES)
    full, last = divmod(FILE_EXAMPLES, EXAMPLES_PER_BLOCK)
    per_file = [EXAMPLES_PER_BLOCK] * full + ([last] if last else [])
    tail = [EXAMPLES_PER_BLOCK] * (rest // EXAMPLES_PER_BLOCK) + ([rest % EXAMPLES_PER_BLOCK] if rest % 64 else [])
    return np.asarray(per_file * files + tail, dtype=np.int64)


def position_ranks(num_examples: int, world_size: int) -> np.ndarray:
    """The rank that trains on each position of the epoch (epoch_data.rank_range, vectorized)."""
    positions = np.arange(num_examples, dtype=np.int64)
    step_start = positions // GLOBAL_BATCH * GLOBAL_BATCH
    step_size = np.minimum(GLOBAL_BATCH, num_examples - step_start)
    within = positions - step_start
    # The rank r with r * step // W <= within < (r + 1) * step // W.
    return ((within + 1) * world_size - 1) // step_size


def unique_reads(reader: np.ndarray, blocks: np.ndarray, readers: int, block_bytes: np.ndarray) -> np.ndarray:
    """Bytes each reader (rank or node) reads: every distinct block it takes an example from, once."""
    pairs = np.unique(reader * len(block_bytes) + blocks)
    return np.bincount(pairs // len(block_bytes), weights=block_bytes[pairs % len(block_bytes)], minlength=readers)


def old_windows(rows: np.ndarray, num_examples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replaced order (seed 42, epoch 0, as EpochOrder permuted blocks): each position's window, each window's
    bytes' worth of rows, and where each window starts in the epoch."""
    permuted = np.random.default_rng([42, 0]).permutation(len(rows))
    window_of_block = np.arange(len(rows)) // OLD_WINDOW_BLOCKS
    window_rows = np.bincount(window_of_block, weights=rows[permuted]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(window_rows)])
    window_of_position = np.searchsorted(starts, np.arange(num_examples), side="right") - 1
    return window_of_position, window_rows.astype(np.float64), starts


def shuffle_quality(corpus_place: np.ndarray, rows: np.ndarray, block_of: np.ndarray, steps: np.ndarray) -> tuple:
    """(mean pairwise corpus distance in a batch over a full shuffle's, distinct blocks per example, over the
    sampled steps; the scatter of the batches' mean place in the corpus over the epoch, over a full shuffle's)."""
    num_examples = len(corpus_place)
    spread, distinct = [], []
    for step in steps:
        batch = slice(step * GLOBAL_BATCH, min((step + 1) * GLOBAL_BATCH, num_examples))
        places = np.sort(corpus_place[batch]).astype(np.float64)
        n = len(places)
        pair_sum = float((places * (2 * np.arange(n) - n + 1)).sum())
        spread.append(pair_sum / (n * (n - 1) / 2) / (num_examples / 3))  # a uniform pair is N/3 apart
        distinct.append(len(np.unique(block_of[batch])) / n)
    full_steps = np.arange(num_examples // GLOBAL_BATCH * GLOBAL_BATCH) // GLOBAL_BATCH
    means = np.bincount(full_steps, weights=corpus_place[: len(full_steps)]) / GLOBAL_BATCH
    # A full shuffle's batch means scatter by N / sqrt(12 B) around the middle; one sorted by topic, by N / sqrt(12).
    drift = float(means.std()) / (num_examples / np.sqrt(12 * GLOBAL_BATCH))
    return float(np.mean(spread)), float(np.mean(distinct)), drift


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    options = parser.parse_args()
    common.begin_measuring(options)
    from raylm.data.epoch_data import EpochOrder

    tokens = TOKENS // 1000 if options.smoke else TOKENS
    rows = block_layout(tokens)
    block_bytes = rows * EXAMPLE_TOKENS * BYTES_PER_TOKEN
    total_bytes = float(block_bytes.sum())
    order = EpochOrder(rows, seed=42, epoch=0, lanes=GLOBAL_BATCH)
    num_examples = order.num_examples
    blocks, in_block = order.locate(0, num_examples)
    old_window, old_window_rows, old_starts = old_windows(rows, num_examples)
    old_window_bytes = old_window_rows * EXAMPLE_TOKENS * BYTES_PER_TOKEN
    print(
        f"# {tokens / 1e9:g}B tokens: {num_examples:,} examples of {EXAMPLE_TOKENS} tokens in {len(rows):,} blocks "
        f"({total_bytes / 1e9:.1f} GB), global batch {GLOBAL_BATCH}, {RANKS_PER_NODE} workers per node"
    )
    worst = (0.0, 0)
    for world_size in (1, 8, 64, 512):
        ranks = position_ranks(num_examples, world_size)
        nodes = -(-world_size // RANKS_PER_NODE)
        rank_bytes = unique_reads(ranks, blocks, world_size, block_bytes)
        node_bytes = unique_reads(ranks // RANKS_PER_NODE, blocks, nodes, block_bytes)
        old_rank_bytes = unique_reads(ranks, old_window, world_size, old_window_bytes)
        rank_ratio, node_ratio = rank_bytes.max() / (total_bytes / world_size), node_bytes.max() / (total_bytes / nodes)
        old_ratio = old_rank_bytes.max() / (total_bytes / world_size)
        epoch_seconds = num_examples / world_size / (GPU_TOKENS_PER_SECOND / EXAMPLE_TOKENS)
        gets = (node_bytes.sum() / block_bytes.mean()) / epoch_seconds
        old_gets = (old_rank_bytes.sum() / block_bytes.mean()) * OLD_GETS_PER_BLOCK / epoch_seconds
        steps = -(-num_examples // GLOBAL_BATCH)
        step_parts = np.bincount(
            np.arange(num_examples) // GLOBAL_BATCH * world_size + ranks, minlength=steps * world_size
        ).reshape(steps, world_size)
        imbalance = int((step_parts.max(1) - step_parts.min(1)).max())
        print(
            f"{world_size} workers on {nodes} node(s): rank read/share {rank_ratio:.2f}x (was {old_ratio:.1f}x), "
            f"node read/share {node_ratio:.2f}x, {gets:,.0f} GET/s (was {old_gets:,.0f}), "
            f"imbalance {imbalance} example(s) per step"
        )
        worst = max(worst, (float(node_ratio), world_size))
    file_starts = np.concatenate([[0], np.cumsum(rows)])
    corpus_place = file_starts[blocks] + in_block
    sampled = np.linspace(0, num_examples // GLOBAL_BATCH - 1, SAMPLED_STEPS).astype(np.int64)
    spread, distinct, drift = shuffle_quality(corpus_place, rows, blocks, sampled)
    # The baseline's batches: its positions in window order, examples shuffled within each window.
    old_place = np.empty(num_examples, dtype=np.int64)
    permuted = np.random.default_rng([42, 0]).permutation(len(rows))
    sequence_place = np.concatenate([np.arange(file_starts[b], file_starts[b + 1]) for b in permuted])
    rng = np.random.default_rng(0)
    for start, stop in zip(old_starts[:-1], old_starts[1:]):
        old_place[start:stop] = rng.permutation(sequence_place[start:stop])
    old_block = np.searchsorted(file_starts, old_place, side="right") - 1
    old_spread, old_distinct, old_drift = shuffle_quality(old_place, rows, old_block, sampled)
    print(
        f"shuffle: batch spread {spread:.3f} of a full shuffle's (was {old_spread:.3f}), distinct blocks "
        f"{distinct:.3f} per example (was {old_distinct:.3f}), batch means' scatter {drift:.2f} of a full shuffle's "
        f"(was {old_drift:.2f}; 22.6 for a corpus trained in its order)"
    )
    common.print_load("end")  # before the summary, which is the last line
    print(f"data-scale: worst node read {worst[0]:.2f}x its share ({worst[1]} workers)")


if __name__ == "__main__":
    main()
