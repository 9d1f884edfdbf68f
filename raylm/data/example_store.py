"""Stored examples: text shards -> tokenized examples written once as Parquet, keyed by what determines them.

A store is the folder `<cache root>/<key>/`: one Parquet file per text shard that gave examples
(`shard-000042.parquet`, rows {"input_ids", "example_id"} as datasets.tokenize_shard makes them, plus
"document_starts" with packing_document_mask, in
row groups of EXAMPLES_PER_BLOCK rows: the store's blocks, which a training rank reads ahead, one request each),
written by the Ray task that tokenized that shard, and `manifest.json`, written last by the driver:
the key's ingredients and each file's row count. A folder without a manifest is an unfinished build
and is never read.

The key hashes everything the examples depend on: each text file's path, size and modification time,
the shard size, the text column, the tokenizer (its serialized form), the example spec (dataset_type, block_size,
special tokens, sliding window, document starts) and the store format. A changed file or tokenizer gives another key,
so a store is never served stale, and `reprocess_input_data=False` can reuse a matching one safely.
A rebuild under the same key writes the same bytes under the same names, each file replaced whole
(a rename on local disks, one PUT on object storage), so a job still reading an earlier build of the
same key reads identical, complete files.

The store lives where every node reads it (under `storage_path` by default, see
run_folders.example_cache_root), so the training workers of a cluster read their examples from it
(epoch_data.py), later epochs and restarted workers read instead of re-tokenizing, and the epoch's
example count comes from the manifest without holding the corpus in Ray's object store.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from raylm.data import storage
from raylm.data.datasets import ExampleSpec, task_tokenizer, tokenize_shard, user_errors_from_tasks
from raylm.data.documents import TextShard
from raylm.data.node_cache import NODE_CACHE_BYTES, NodeCache, default_node_cache_root
from raylm.data.parquet_blocks import decode_row_group, footer_metadata, read_footer, row_group_range
from raylm.data.sources import plan_shards

STORE_FORMAT = 2  # 2: row groups of EXAMPLES_PER_BLOCK rows
EXAMPLES_PER_BLOCK = 64
MANIFEST = "manifest.json"
# Per-example token lists: the ids, and where documents start (packing_document_mask).
LIST_COLUMNS = ("input_ids", "document_starts")


@dataclass(frozen=True)
class StoredExamples:
    """A complete store: its Parquet files in shard order and the examples in each."""

    folder: str
    files: tuple[str, ...]  # names inside `folder`
    rows: tuple[int, ...]

    @property
    def num_examples(self) -> int:
        return sum(self.rows)

    def block_rows(self) -> list[int]:
        """The rows of each block (Parquet row group) in file order: EXAMPLES_PER_BLOCK, a file's last one shorter."""
        return [rows for _, _, rows in self.blocks()]

    def blocks(self) -> list[tuple[int, int, int]]:
        """(file index, row group, rows) of each block, in file order."""
        found = []
        for file_index, rows in enumerate(self.rows):
            for group in range(-(-rows // EXAMPLES_PER_BLOCK)):
                found.append((file_index, group, min(EXAMPLES_PER_BLOCK, rows - group * EXAMPLES_PER_BLOCK)))
        return found

    def dataset(self):
        """A lazy Ray Dataset of every example (for evaluation, where the order does not matter)."""
        import ray.data

        files = ray.data.from_items(
            [{"path": storage.join(self.folder, name)} for name in self.files],
            override_num_blocks=max(1, len(self.files)),
        )
        # read_parquet would need the storage's filesystem spelled out per scheme; storage.filesystem knows it.
        examples = files.map_batches(_read_stored_file, batch_size=1, batch_format="pyarrow")
        # Blocks of 64 rows, so that evaluation spreads a small eval file over all its actors.
        return examples.repartition(target_num_rows_per_block=EXAMPLES_PER_BLOCK, strict=False)


class BlockReader:
    """A store's blocks, read from wherever the store lives, and the examples in them.

    A block (a Parquet row group) comes in one ranged read of its bytes (parquet_blocks.py); a file's
    footer is read once. `read_ahead` starts reading blocks on a pool of `reads_in_flight` threads, so
    that object storage's latency per request (20-50 ms) overlaps the other requests' and the step's;
    `examples` waits for a block on its way rather than reading it again.

    Memory: at most `max_blocks` blocks are held, read or on their way; the least recently used read
    ones give way to new ones, never one on its way. `read_ahead` starts no more than that, so a
    caller asks ahead at most `max_blocks` minus the blocks its coming `examples` calls still need,
    or its own reads ahead give way before they are used. An `examples` call that needs more blocks
    than `max_blocks` holds them all until it returns.

    A remote store's blocks and footers go through a node cache (node_cache.py, `node_cache_bytes`
    under `node_cache_root`, 0 bytes for none) that the ranks of a node share: one rank GETs a block,
    the others read it from the node's disk. A local store is read directly.

    Thread-safe: the epoch's prefetch thread calls `examples` and `read_ahead` while the pool reads.
    """

    def __init__(
        self,
        store: StoredExamples,
        max_blocks: int = 64,
        reads_in_flight: int = 8,
        node_cache_root: Optional[str] = None,
        node_cache_bytes: int = NODE_CACHE_BYTES,
    ):
        if max_blocks < 1 or reads_in_flight < 1:
            raise ValueError(
                f"max_blocks ({max_blocks}) and reads_in_flight ({reads_in_flight}) must be at least 1: "
                "a reader holds the block it reads"
            )
        self.store = store
        self.locations = store.blocks()
        self.max_blocks, self.reads_in_flight = max_blocks, reads_in_flight
        self.blocks_read = 0  # blocks decoded here, from the store or the node cache
        self._node_cache = None
        if storage.is_remote(store.folder) and node_cache_bytes > 0:
            self._node_cache = NodeCache(node_cache_root or default_node_cache_root(), node_cache_bytes)
        self._cache_folder = node_cache_folder(store.folder)
        self._lock = threading.Lock()
        # Blocks held, least recently used first: a done future is a block read, another one is on its way.
        self._held: collections.OrderedDict[int, Future] = collections.OrderedDict()
        self._files: dict[int, Future] = {}  # open files
        self._footers: dict[int, Future] = {}  # file metadata
        self._pool: Optional[ThreadPoolExecutor] = None

    def read_ahead(self, blocks: Sequence[int]) -> int:
        """Start reading these blocks, in this order, unless held already; returns at once.

        Returns how many of `blocks`, from the first, are now held or on their way: fewer than asked
        where `max_blocks` would be passed (the rest are not started; ask again later).
        """
        asked = [int(block) for block in blocks]
        keep = set(asked)
        with self._lock:
            for taken, block in enumerate(asked):
                if block in self._held:
                    self._held.move_to_end(block)
                    continue
                self._give_way(self.max_blocks - 1, keep)
                if len(self._held) >= self.max_blocks:
                    return taken
                self._held[block] = self._submit(block)
        return len(asked)

    def examples(self, blocks: np.ndarray, rows: np.ndarray) -> dict:
        """The examples at (block, row) pairs, in that order: {"input_ids": [int32 arrays], "example_id": int64 array},
        and "document_starts" ([int32 arrays]) when the store holds them."""
        wanted = dict.fromkeys(blocks.tolist())
        with self._lock:
            for block in wanted:
                future = self._held.get(block)
                if future is not None and not _failed(future):
                    self._held.move_to_end(block)
                    continue
                # Not held, or a read ahead that failed: read now (the error comes back if it fails again).
                self._give_way(self.max_blocks - 1, wanted)
                self._held[block] = self._submit(block)
            futures = {block: self._held[block] for block in wanted}
        found = {block: self._result(block, future) for block, future in futures.items()}
        with self._lock:
            self._give_way(self.max_blocks, ())
        example_ids = np.empty(len(blocks), dtype=np.int64)
        lists: dict[str, list] = {}
        for i, (block, row) in enumerate(zip(blocks.tolist(), rows.tolist())):
            columns, ids = found[block]
            for name, (values, offsets) in columns.items():
                lists.setdefault(name, []).append(values[offsets[row] : offsets[row + 1]])
            example_ids[i] = ids[row]
        return {"input_ids": [], **lists, "example_id": example_ids}

    def close(self) -> None:
        """Stop the reads not yet started (the pool's threads end once their reads do)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _give_way(self, limit: int, keep) -> None:
        """Drop the least recently used blocks read (not those in `keep`) until at most `limit` are held."""
        for block in [block for block, future in self._held.items() if future.done() and block not in keep]:
            if len(self._held) <= limit:
                return
            del self._held[block]

    def _submit(self, block: int) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.reads_in_flight, thread_name_prefix="raylm-block-read")
        return self._pool.submit(self._read_block, block)

    def _result(self, block: int, future: Future):
        try:
            return future.result()
        except BaseException:
            with self._lock:
                if self._held.get(block) is future:
                    del self._held[block]
            raise

    def _read_block(self, block: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        file_index, group, _ = self.locations[block]
        metadata = self._once(self._footers, file_index, lambda: self._read_metadata(file_index))
        start, stop = row_group_range(metadata, group)
        data = self._cached(
            f"{self.store.files[file_index]}.group-{group}", lambda: self._file(file_index).read_at(stop - start, start)
        )
        table = decode_row_group(metadata, group, start, data)
        columns = {}
        for name in LIST_COLUMNS:
            if name in table.column_names:
                column = table.column(name).combine_chunks()
                # The offsets index the unsliced values, wherever the first row starts.
                columns[name] = (column.values.to_numpy(), column.offsets.to_numpy())
        with self._lock:
            self.blocks_read += 1
        return columns, table.column("example_id").to_numpy()

    def _read_metadata(self, file_index: int) -> pq.FileMetaData:
        footer = self._cached(f"{self.store.files[file_index]}.footer", lambda: read_footer(self._file(file_index)))
        return footer_metadata(footer)

    def _file(self, file_index: int) -> pa.NativeFile:
        def open_file() -> pa.NativeFile:
            fs, fs_path = storage.filesystem(storage.join(self.store.folder, self.store.files[file_index]))
            return fs.open_input_file(fs_path)

        return self._once(self._files, file_index, open_file)

    def _cached(self, name: str, fetch: Callable[[], bytes]) -> bytes:
        if self._node_cache is None:
            return fetch()
        return self._node_cache.read(f"{self._cache_folder}/{name}", fetch)

    def _once(self, made: dict, key: int, make: Callable):
        """`made[key]`, made by the first thread that asks (the others wait for it); made again after a failure."""
        with self._lock:
            future = made.get(key)
            is_maker = future is None
            if is_maker:
                future = made[key] = Future()
        if is_maker:
            try:
                future.set_result(make())
            except BaseException as err:
                with self._lock:
                    del made[key]
                future.set_exception(err)
        return future.result()


def node_cache_folder(store_folder: str) -> str:
    """The folder of a store's blocks and footers in a node cache: a hash of the store's location, which names its key
    and where it lives."""
    return hashlib.sha256(store_folder.encode("utf-8")).hexdigest()[:24]


def _failed(future: Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _read_stored_file(batch) -> pa.Table:
    fs, fs_path = storage.filesystem(str(batch["path"][0]))
    return pq.read_table(fs_path, filesystem=fs)


def store_key(
    files: list[str], shard_size_mb: float, text_column: str, tokenizer, spec: ExampleSpec
) -> tuple[str, dict]:
    """(key, the ingredients it hashes): everything the stored examples depend on. `tokenizer`: a task tokenizer."""
    import tokenizers

    ingredients = {
        "format": STORE_FORMAT,
        "files": [file_identity(path) for path in files],
        "shard_size_mb": shard_size_mb,
        "text_column": text_column,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizers_version": tokenizers.__version__,
        "spec": dataclasses.asdict(spec),
    }
    digest = hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode("utf-8")).hexdigest()
    return digest[:24], ingredients


def file_identity(path: str) -> dict:
    """What tells one version of a text file from another without reading it: path, size, modification time."""
    fs, fs_path = storage.filesystem(path)
    info = fs.get_file_info(fs_path)
    return {"path": path, "size": info.size, "mtime_ns": info.mtime_ns}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a task tokenizer's ids: its serialized pipeline (`tokenizers`) or vocabulary
    (slow)."""
    if isinstance(tokenizer, Tokenizer):
        text = tokenizer.to_str()
    else:
        text = json.dumps(
            {
                "class": type(tokenizer).__name__,
                "vocab": tokenizer.get_vocab(),
                "special": tokenizer.all_special_tokens,
            },
            sort_keys=True,
        )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored_examples(
    files: list[str],
    tokenizer,
    spec: ExampleSpec,
    shard_size_mb: float,
    cache_root: str,
    rebuild: bool,
    text_column: str = "text",
) -> StoredExamples:
    """The store for these files and settings under `cache_root`: reused when complete and not `rebuild`, else built."""
    # The key hashes the tokenizer the tasks run, not its wrapper (whose padding settings do not matter here).
    tokenizer = task_tokenizer(tokenizer)
    key, ingredients = store_key(files, shard_size_mb, text_column, tokenizer, spec)
    folder = storage.join(cache_root, key)
    if not rebuild:
        found = read_store(folder)
        if found is not None:
            return found
    return _build(plan_shards(files, shard_size_mb, text_column), tokenizer, spec, folder, ingredients)


def read_store(folder: str) -> Optional[StoredExamples]:
    """The complete store in `folder`, or None when it has no manifest (never built, or a build that did not finish)."""
    manifest_path = storage.join(folder, MANIFEST)
    if not storage.isfile(manifest_path):
        return None
    manifest = json.loads(storage.read_text(manifest_path))
    if manifest.get("format") != STORE_FORMAT:
        return None
    return StoredExamples(
        folder, tuple(f["name"] for f in manifest["shards"]), tuple(f["rows"] for f in manifest["shards"])
    )


def _build(shards: list[TextShard], tokenizer, spec: ExampleSpec, folder: str, ingredients: dict) -> StoredExamples:
    """Each shard tokenized and written by a Ray Data task; a lone shard here, in the driver.

    One shard has no parallelism to gain, and Ray Data's first run in a fresh Ray costs seconds of
    start-up (its coordinator actors, and worker processes importing it), more than tokenizing a
    shard of the default 4 MB.
    """
    if len(shards) < 2:
        counts = [
            {column: values[0] for column, values in _store_shard(_as_batch(shard), tokenizer, spec, folder).items()}
            for shard in shards
        ]
    else:
        counts = _store_with_ray_data(shards, tokenizer, spec, folder)
    stored = [row for row in counts if row["rows"] > 0]
    manifest = {**ingredients, "shards": [{"name": row["name"], "rows": int(row["rows"])} for row in stored]}
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    return StoredExamples(folder, tuple(row["name"] for row in stored), tuple(int(row["rows"]) for row in stored))


def _store_with_ray_data(shards: list[TextShard], tokenizer, spec: ExampleSpec, folder: str) -> list[dict]:
    import ray.data

    shard_table = ray.data.from_items([dataclasses.asdict(s) for s in shards], override_num_blocks=len(shards))
    written = shard_table.map_batches(
        _store_shard,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer": tokenizer, "spec": spec, "folder": folder},
    )
    # A DataError from a task (bad bytes past what the driver checked) reaches the driver as itself.
    written.context.raise_original_map_exception = True
    with user_errors_from_tasks():
        return sorted(written.take_all(), key=lambda row: row["index"])


def _as_batch(shard: TextShard) -> dict:
    """A shard descriptor as the one-row batch a Ray Data task gets."""
    return {column: [value] for column, value in dataclasses.asdict(shard).items()}


def _store_shard(batch: dict, tokenizer, spec: ExampleSpec, folder: str) -> dict:
    """Ray Data UDF: one shard descriptor -> its examples written to `shard-<index>.parquet`; returns the row count."""
    index = int(batch["index"][0])
    examples = tokenize_shard(batch, tokenizer, spec)
    name = f"shard-{index:06d}.parquet"
    if examples.num_rows:
        # Serialized first, then written whole: a job reading an earlier build of this key never sees part of a file.
        parquet = pa.BufferOutputStream()
        pq.write_table(examples, parquet, row_group_size=EXAMPLES_PER_BLOCK)
        storage.write_bytes(storage.join(folder, name), parquet.getvalue().to_pybytes())
    return {"index": [index], "name": [name], "rows": [examples.num_rows]}
