"""Reading a store from object storage: one request per block, reads ahead in flight together, one fetch per node.

The store is in moto's S3 server and read through a counting proxy (tests/local_s3.py), which logs
every request the reader makes; 30 ms added per request makes requests that overlap overlap for sure.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from local_s3 import most_in_flight

from raylm.data import storage
from raylm.data.example_store import EXAMPLES_PER_BLOCK, BlockReader, StoredExamples
from raylm.data.node_cache import NodeCache
from raylm.data.parquet_blocks import (
    FOOTER_READ_BYTES,
    decode_row_group,
    footer_metadata,
    read_footer,
    row_group_range,
)

FILE_ROWS = (200, 130)  # blocks of 64, 64, 64, 8 and 64, 64, 2
DELAY_S = 0.03


def _example(file_index: int, row: int) -> np.ndarray:
    """The token ids of a file's row: of a length that varies, each id telling its file and row."""
    return np.full(1 + (row * 7) % 40, file_index * 1000 + row, dtype=np.int32)


def _document_starts(file_index: int, row: int) -> np.ndarray:
    return np.arange(0, len(_example(file_index, row)), 8, dtype=np.int32)


@pytest.fixture(scope="module")
def s3_store(s3_server) -> StoredExamples:
    """A store of two Parquet files in a bucket, written as example_store writes them (row groups of 64, the three
    columns of a store with document starts)."""
    folder = f"s3://{s3_server.bucket()}/store"
    names = []
    for file_index, rows in enumerate(FILE_ROWS):
        table = pa.table(
            {
                "input_ids": [_example(file_index, row) for row in range(rows)],
                "document_starts": [_document_starts(file_index, row) for row in range(rows)],
                "example_id": np.arange(rows, dtype=np.int64) + 1000 * file_index,
            }
        )
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=EXAMPLES_PER_BLOCK)
        names.append(f"shard-{file_index:06d}.parquet")
        storage.write_bytes(storage.join(folder, names[-1]), buffer.getvalue().to_pybytes())
    return StoredExamples(folder, tuple(names), FILE_ROWS)


def _through(store: StoredExamples, proxy) -> StoredExamples:
    return StoredExamples(f"{store.folder}?{proxy.endpoint_query}", store.files, store.rows)


def _requests_by_kind(store: StoredExamples, requests: list[dict]) -> dict[str, collections.Counter]:
    """{"block": {(file, group): GETs}, "footer": {file: GETs}, "head": {file: HEADs}, "other": {request: n}}."""
    kinds: dict[str, collections.Counter] = {
        kind: collections.Counter() for kind in ("block", "footer", "head", "other")
    }
    known = _known_ranges(store)
    for request in requests:
        kind, key = _kind(store, known, request)
        kinds[kind][key] += 1
    return kinds


def _block_requests(store: StoredExamples, requests: list[dict]) -> list[dict]:
    known = _known_ranges(store)
    return [request for request in requests if _kind(store, known, request)[0] == "block"]


def _known_ranges(store: StoredExamples) -> dict[tuple[str, str], tuple[str, object]]:
    """(file name, Range header) -> ("block", (file, group)) or ("footer", file), read from the files themselves.

    A block's GET asks for exactly its row group's bytes; a footer's GET ends at the file's last byte.
    """
    fs, fs_path = storage.filesystem(store.folder)
    known: dict[tuple[str, str], tuple[str, object]] = {}
    for file_index, name in enumerate(store.files):
        with fs.open_input_file(f"{fs_path}/{name}") as f:
            size, metadata = f.size(), pq.ParquetFile(f).metadata
        known[(name, f"bytes={size - min(size, 64 * 1024)}-{size - 1}")] = ("footer", file_index)
        for group in range(metadata.num_row_groups):
            start, stop = row_group_range(metadata, group)
            known[(name, f"bytes={start}-{stop - 1}")] = ("block", (file_index, group))
    return known


def _kind(store: StoredExamples, known: dict, request: dict) -> tuple[str, object]:
    name = request["path"].split("?")[0].rsplit("/", 1)[-1]
    if request["method"] == "HEAD" and name in store.files:
        return "head", store.files.index(name)
    if request["method"] == "GET" and (name, request["range"]) in known:
        return known[(name, request["range"])]
    return "other", (request["method"], request["path"], request["range"])


def _all_examples(reader: BlockReader) -> dict:
    block_rows = reader.store.block_rows()
    blocks = np.repeat(np.arange(len(block_rows)), block_rows)
    rows = np.concatenate([np.arange(n) for n in block_rows])
    return reader.examples(blocks, rows)


def _assert_whole_store(batch: dict) -> None:
    expected = [(file_index, row) for file_index, rows in enumerate(FILE_ROWS) for row in range(rows)]
    assert batch["example_id"].tolist() == [1000 * file_index + row for file_index, row in expected]
    assert all(np.array_equal(ids, _example(*where)) for ids, where in zip(batch["input_ids"], expected))
    assert all(np.array_equal(s, _document_starts(*where)) for s, where in zip(batch["document_starts"], expected))


def test_a_block_from_object_storage_costs_one_request(s3_store, s3_proxy):
    """One GET of the row group's bytes per block, whatever its columns; a file's footer once (a HEAD for its size,
    a GET of its tail); the blocks held are not asked for again."""
    proxy = s3_proxy()
    store = _through(s3_store, proxy)
    reader = BlockReader(store, node_cache_bytes=0)
    _assert_whole_store(_all_examples(reader))
    _assert_whole_store(_all_examples(reader))
    kinds = _requests_by_kind(s3_store, proxy.requests())
    groups = [(file_index, group) for file_index, rows in enumerate(FILE_ROWS) for group in range(-(-rows // 64))]
    assert kinds["block"] == {key: 1 for key in groups}
    assert kinds["footer"] == kinds["head"] == {0: 1, 1: 1}
    assert not kinds["other"]
    assert reader.blocks_read == len(groups) == 7


def test_read_ahead_puts_the_requests_in_flight_together(s3_store, s3_proxy):
    """Blocks read one by one wait for one request at a time; read ahead, their requests overlap, and `examples`
    waits for those on their way instead of asking again."""
    block_rows = s3_store.block_rows()
    proxy = s3_proxy(delay_s=DELAY_S)
    one_by_one = BlockReader(_through(s3_store, proxy), node_cache_bytes=0)
    for block, rows in enumerate(block_rows):
        one_by_one.examples(np.full(rows, block), np.arange(rows))
    assert most_in_flight(proxy.requests()) == 1

    proxy = s3_proxy(delay_s=DELAY_S)
    reader = BlockReader(_through(s3_store, proxy), node_cache_bytes=0, reads_in_flight=8)
    assert reader.read_ahead(range(len(block_rows))) == len(block_rows)
    assert reader.read_ahead(range(len(block_rows))) == len(block_rows)  # held or on their way: nothing more asked
    _assert_whole_store(_all_examples(reader))
    kinds = _requests_by_kind(s3_store, proxy.requests())
    assert sum(kinds["block"].values()) == len(kinds["block"]) == len(block_rows)
    block_gets = _block_requests(s3_store, proxy.requests())
    assert most_in_flight(block_gets) >= 3, block_gets


def test_read_ahead_holds_at_most_max_blocks(s3_store, s3_proxy):
    """Past max_blocks nothing more is started; the blocks already read give way to the next ones."""
    proxy = s3_proxy()
    reader = BlockReader(_through(s3_store, proxy), max_blocks=3, node_cache_bytes=0)
    assert reader.read_ahead([0, 1, 2, 3, 4]) == 3
    reader.examples(np.array([0, 1, 2]), np.array([5, 5, 5]))
    assert reader.blocks_read == 3
    assert reader.read_ahead([3, 4, 5, 6]) == 3  # 0, 1 and 2 gave way; 6 has no room beside 3, 4 and 5
    reader.examples(np.array([3, 4, 5]), np.array([0, 0, 0]))
    assert reader.blocks_read == 6
    assert sum(_requests_by_kind(s3_store, proxy.requests())["block"].values()) == 6


def test_the_ranks_of_a_node_fetch_each_block_once(s3_store, s3_proxy, tmp_path):
    """Two readers sharing a node cache, reading ahead the same blocks at the same time: each block and footer is
    fetched from the store once in all; a third reader later asks the store for nothing (not even a HEAD)."""
    proxy = s3_proxy(delay_s=DELAY_S)
    store = _through(s3_store, proxy)
    ranks = [BlockReader(store, node_cache_root=str(tmp_path / "node")) for _ in range(2)]
    for reader in ranks:
        assert reader.read_ahead(range(len(store.block_rows()))) == 7
    for reader in ranks:
        _assert_whole_store(_all_examples(reader))
    kinds = _requests_by_kind(s3_store, proxy.requests())
    assert set(kinds["block"].values()) == {1} and len(kinds["block"]) == 7
    assert kinds["footer"] == {0: 1, 1: 1}
    # A reader that fetches a file's block opens the file (a HEAD), once.
    assert set(kinds["head"]) == {0, 1} and max(kinds["head"].values()) <= len(ranks)
    assert not kinds["other"]

    answered = len(proxy.requests())
    later = BlockReader(store, node_cache_root=str(tmp_path / "node"))
    _assert_whole_store(_all_examples(later))
    assert len(proxy.requests()) == answered and later.blocks_read == 7


def test_the_node_cache_stays_within_its_size(s3_store, s3_proxy, tmp_path):
    """A cache smaller than the store keeps the blocks used last, within its size; the others are fetched again."""
    max_bytes = sum(_block_sizes(s3_store)) // 2
    root = str(tmp_path / "node")
    proxy = s3_proxy()
    store = _through(s3_store, proxy)
    blocks = list(range(len(store.block_rows())))
    for order in (blocks, blocks[::-1]):  # the second pass starts with the blocks used last
        reader = BlockReader(store, node_cache_root=root, node_cache_bytes=max_bytes)
        for block in order:
            rows = store.block_rows()[block]
            reader.examples(np.full(rows, block), np.arange(rows))
            assert NodeCache(root, max_bytes).bytes_held() <= max_bytes
    assert NodeCache(root, max_bytes).bytes_held() >= max_bytes // 4
    fetched = _requests_by_kind(s3_store, proxy.requests())["block"]
    assert len(fetched) == 7 and set(fetched.values()) == {1, 2}, fetched


def _block_sizes(store: StoredExamples) -> list[int]:
    """The bytes of each block's row group."""
    sizes = []
    fs, fs_path = storage.filesystem(store.folder)
    for name in store.files:
        with fs.open_input_file(f"{fs_path}/{name}") as f:
            metadata = pq.ParquetFile(f).metadata
        for group in range(metadata.num_row_groups):
            start, stop = row_group_range(metadata, group)
            sizes.append(stop - start)
    return sizes


def test_a_footer_longer_than_one_read_and_each_row_group_decode_from_their_bytes(tmp_path):
    """A file of many row groups has a footer past FOOTER_READ_BYTES: read in a second request, whole; every row group
    decodes from its own bytes alone."""
    rows = 1500
    table = pa.table({"input_ids": [_example(0, row) for row in range(rows)], "example_id": np.arange(rows)})
    path = str(tmp_path / "many-groups.parquet")
    pq.write_table(table, path, row_group_size=2)
    with pa.OSFile(path) as f:
        footer = read_footer(f)
        data = f.read_at(f.size(), 0)
    assert len(footer) > FOOTER_READ_BYTES
    metadata = footer_metadata(footer)
    assert metadata.equals(pq.read_metadata(path)) and metadata.num_row_groups == rows // 2
    for group in (0, 1, metadata.num_row_groups - 1):
        start, stop = row_group_range(metadata, group)
        decoded = decode_row_group(metadata, group, start, data[start:stop])
        assert decoded.equals(table.slice(2 * group, 2))
