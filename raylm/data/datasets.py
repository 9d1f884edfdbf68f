"""Examples: the lines of a text shard -> tokenized, packed examples with stable ids (pure functions Ray tasks run).

Rows are {"input_ids": list<int32>, "example_id": int64}, and with `ExampleSpec.document_mask`
"document_starts": list<int32>, where each document (or a document's part) begins in the row
(packing.py). `text` with document_mask: blocks cut from the joined lines, their documents kept apart.
`simple` / `line_by_line` with document_mask: each row holds several whole lines (`packed_lines`), each
a document of its own, so a row carries about block_size tokens of short lines. An example id is
`shard_index << 32 | position in shard`, so it depends only on the text and the settings, never on
scheduling; the masks of an example are hashed from it (collators.py).
The example-forming functions are pure and run inside Ray tasks, one shard per task.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import itertools
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from raylm.data.documents import TextShard, read_shard_lines
from raylm.errors import RaylmUserError, root_cause

EXAMPLE_ID_SHIFT = 32


@dataclass(frozen=True)
class ExampleSpec:
    """How token ids become examples: the dataset_type and the ids around each example."""

    dataset_type: str  # simple | line_by_line | text
    block_size: int
    prefix: tuple[int, ...]  # e.g. [CLS] or <s>
    suffix: tuple[int, ...]  # e.g. [SEP], </s>, or eos for causal LMs
    sliding_window: bool = False
    stride: float = 0.8
    # Store where each document starts in its row: text keeps the documents of a block apart; simple and
    # line_by_line pack several whole lines into each row (packed_lines).
    document_mask: bool = False


def line_examples(token_lists: list[list[int]], spec: ExampleSpec) -> list[list[int]]:
    """One example per line: prefix + ids + suffix, truncated to block_size (or windowed, with sliding_window)."""
    room = spec.block_size - len(spec.prefix) - len(spec.suffix)
    prefix, suffix = list(spec.prefix), list(spec.suffix)
    examples = []
    for ids in token_lists:
        if spec.sliding_window and spec.dataset_type == "simple" and len(ids) > room:
            step = max(1, int(room * spec.stride))
            starts = range(0, max(1, len(ids) - room + step), step)
            examples.extend(prefix + ids[s : s + room] + suffix for s in starts if ids[s : s + room])
        elif (
            ids or prefix or suffix
        ):  # a line of nothing but removed characters, with no specials around it, is no example
            examples.append(prefix + ids[:room] + suffix)
    return examples


def packed_lines(token_lists: list[list[int]], spec: ExampleSpec) -> tuple[np.ndarray, ...]:
    """The examples of `line_examples`, several whole lines per row of at most block_size tokens, in Arrow's
    list layout: (ids end to end, row offsets, where each line starts in its row end to end, their row offsets).

    Best fit decreasing: the longest line first, each into the fullest row it still fits in. Rows of short lines
    come out ~99% full (next fit in file order leaves ~half a line free per row). Rows are then ordered by
    their first line's place in the shard, and a row's lines by theirs, so that rows read in file order.
    """
    lines = line_examples(token_lists, spec)
    lengths = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
    row_of = _best_fit_rows(lengths, spec.block_size)
    # Lines grouped by row, rows by their first line, lines within a row in file order.
    first_line = np.full(int(row_of.max()) + 1 if len(row_of) else 0, len(lines), dtype=np.int64)
    np.minimum.at(first_line, row_of, np.arange(len(lines)))
    row_rank = np.empty_like(first_line)
    row_rank[np.argsort(first_line, kind="stable")] = np.arange(len(first_line))
    order = np.lexsort((np.arange(len(lines)), row_rank[row_of]))
    ordered_rows = row_rank[row_of][order]
    values = np.fromiter(
        itertools.chain.from_iterable(lines[i] for i in order.tolist()), dtype=np.int32, count=int(lengths.sum())
    )
    line_ends = np.cumsum(lengths[order])
    row_ends = line_ends[np.flatnonzero(np.diff(ordered_rows, append=len(first_line)))]
    offsets = np.concatenate([[0], row_ends]).astype(np.int32)
    # A line starts where the one before it in its row ends; the first of a row at 0.
    row_start_of_line = np.concatenate([[0], row_ends])[ordered_rows]
    starts = (line_ends - lengths[order] - row_start_of_line).astype(np.int32)
    start_offsets = np.searchsorted(ordered_rows, np.arange(len(first_line) + 1)).astype(np.int32)
    return values, offsets, starts, start_offsets


def _best_fit_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Each item's row, best fit decreasing: the longest first, each into the row with the least room that fits it."""
    row_of = np.empty(len(lengths), dtype=np.int64)
    rows_with_room: dict[int, list[int]] = {}  # room left -> the rows with exactly that much room
    rooms: list[int] = []  # the keys of rows_with_room, sorted
    n_rows = 0
    for item in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[item])
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            row = rows_with_room[room].pop()
            if not rows_with_room[room]:
                del rows_with_room[room]
                rooms.pop(at)
        else:
            room, row, n_rows = capacity, n_rows, n_rows + 1
        row_of[item] = row
        left = room - length
        if left > 0:
            if left not in rows_with_room:
                rows_with_room[left] = []
                bisect.insort(rooms, left)
            rows_with_room[left].append(row)
    return row_of


def packed_examples(token_lists: list[list[int]], spec: ExampleSpec) -> list[list[int]]:
    """All lines joined (each followed by the suffix: [SEP], eos, or nothing without document_separator) and cut into
    blocks of block_size.

    Every block but the last is full, and the last keeps the remainder rather than dropping text.
    """
    values, offsets = packed_blocks(token_lists, spec)
    return [values[start:end].tolist() for start, end in zip(offsets[:-1], offsets[1:])]


def packed_blocks(token_lists: list[list[int]], spec: ExampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """`packed_examples` in Arrow's list layout: the blocks' ids end to end (int32) and the row offsets.

    Vectorised: packing a few MB of text token by token in Python cost as much as tokenizing it.
    """
    prefix, suffix = np.asarray(spec.prefix, dtype=np.int32), list(spec.suffix)
    n_tokens = sum(len(ids) for ids in token_lists) + len(suffix) * len(token_lists)
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(ids, suffix) for ids in token_lists),
        dtype=np.int32,
        count=n_tokens,
    )
    room = spec.block_size - len(prefix)
    n_blocks = -(-n_tokens // room)
    rows = np.zeros((n_blocks, spec.block_size), dtype=np.int32)
    rows[:, : len(prefix)] = prefix
    text = np.zeros(n_blocks * room, dtype=np.int32)
    text[:n_tokens] = stream
    rows[:, len(prefix) :] = text.reshape(n_blocks, room)
    # Row-major rows hold the blocks end to end; the last block stops where the text does.
    n_values = n_blocks * len(prefix) + n_tokens
    offsets = np.minimum(np.arange(n_blocks + 1, dtype=np.int32) * spec.block_size, n_values).astype(np.int32)
    return rows.reshape(-1)[:n_values], offsets


def document_starts(token_lists: list[list[int]], spec: ExampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """Where each document begins in the blocks of `packed_blocks`, in the same list layout (values, row offsets).

    A document is one entry of `token_lists` (a non-blank line or a record) and its suffix. Every
    block starts with a segment at 0: the rest of a document from the block before, or, when one
    begins right after the block's prefix, that document with the prefix.
    """
    room, block_size, prefix = spec.block_size - len(spec.prefix), spec.block_size, len(spec.prefix)
    lengths = np.fromiter((len(ids) + len(spec.suffix) for ids in token_lists), dtype=np.int64, count=len(token_lists))
    n_blocks = -(-int(lengths.sum()) // room)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    inside = starts[starts % room != 0]
    # Positions in the blocks laid end to end, so one sort orders them by block, then position.
    flat = np.unique(
        np.concatenate(
            [np.arange(n_blocks, dtype=np.int64) * block_size, (inside // room) * block_size + prefix + inside % room]
        )
    )
    offsets = np.searchsorted(flat, np.arange(n_blocks + 1, dtype=np.int64) * block_size).astype(np.int32)
    return (flat % block_size).astype(np.int32), offsets


def encode_lines(tokenizer, lines: list[str]) -> list[list[int]]:
    """Each line's token ids, without special tokens (`tokenizer`: a `tokenizers.Tokenizer` or a transformers
    tokenizer)."""
    if isinstance(tokenizer, Tokenizer):
        return [encoding.ids for encoding in tokenizer.encode_batch(lines, add_special_tokens=False)]
    return tokenizer(lines, add_special_tokens=False)["input_ids"]


def task_tokenizer(tokenizer):
    """What the tokenizing tasks receive: a fast tokenizer's `tokenizers` backend, as the wrapper calls it.

    The backend unpickles in ~0.05 s; the transformers wrapper imports transformers first (~1 s in
    each fresh worker process) and its per-call bookkeeping about doubled the cost of tokenizing.
    """
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenize_shard(batch: dict, tokenizer, spec: ExampleSpec) -> pa.Table:
    """Ray Data UDF: a batch of shard descriptors -> the examples of those shards."""
    id_arrays, example_ids, start_arrays = [], [], []
    for index, path, start, end, text_column in zip(
        batch["index"], batch["path"], batch["start"], batch["end"], batch["text_column"]
    ):
        lines = read_shard_lines(TextShard(int(index), str(path), int(start), int(end), str(text_column)))
        if not lines:
            continue
        token_lists = encode_lines(tokenizer, lines)
        if spec.dataset_type == "text":
            values, offsets = packed_blocks(token_lists, spec)
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            if spec.document_mask:
                start_values, start_offsets = document_starts(token_lists, spec)
                start_arrays.append(pa.ListArray.from_arrays(pa.array(start_offsets), pa.array(start_values)))
        elif spec.document_mask:
            values, offsets, start_values, start_offsets = packed_lines(token_lists, spec)
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            start_arrays.append(pa.ListArray.from_arrays(pa.array(start_offsets), pa.array(start_values)))
        else:
            ids = pa.array(line_examples(token_lists, spec), type=pa.list_(pa.int32()))
        id_arrays.append(ids)
        example_ids.append((int(index) << EXAMPLE_ID_SHIFT) + np.arange(len(ids), dtype=np.int64))
    columns = {
        "input_ids": pa.concat_arrays(id_arrays) if id_arrays else pa.array([], type=pa.list_(pa.int32())),
        "example_id": pa.array(np.concatenate(example_ids) if example_ids else np.array([], dtype=np.int64)),
    }
    if spec.document_mask:
        columns["document_starts"] = (
            pa.concat_arrays(start_arrays) if start_arrays else pa.array([], type=pa.list_(pa.int32()))
        )
    return pa.table(columns)


class _HoldBackErrors(logging.Filter):
    """Keeps ERROR records off a handler, for later."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def user_errors_from_tasks():
    """Run Ray Data from the driver (building a store, take_all) so that a raylm error raised in a task surfaces as
    itself.

    The driver checks the head of large or remote files only; bad bytes further in raise DataError
    in a tokenizing task, which Ray Data hands back as RayTaskError(UserCodeException) after logging
    the failed task at ERROR on the console. The error is unwrapped here as a failed training run's
    is (errors.root_cause), and Ray Data's console lines are held back: dropped when the error is
    the user's, written after all when it is not.
    """
    held = _HoldBackErrors()
    consoles = [
        handler for handler in logging.getLogger("ray.data").handlers if isinstance(handler, logging.StreamHandler)
    ]
    for handler in consoles:
        handler.addFilter(held)
    user_error = None
    try:
        yield
    except Exception as err:
        cause = root_cause(err)
        if not isinstance(cause, RaylmUserError):
            raise
        user_error = cause
    finally:
        for handler in consoles:
            handler.removeFilter(held)
        if user_error is None:
            for record in held.records:
                for handler in consoles:
                    handler.handle(record)
    if user_error is not None:
        raise user_error from None
