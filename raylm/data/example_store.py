"""Stored examples: text shards -> tokenized examples written once as Parquet, keyed by what determines them.

A store is the folder `<cache root>/<key>/`: one Parquet file per text shard that gave examples
(`shard-000042.parquet`, rows {"input_ids", "example_id"} as datasets.tokenize_shard makes them, plus
"document_starts" with packing_document_mask, in
row groups of EXAMPLES_PER_BLOCK rows: the store's blocks, which a training rank reads one by one),
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
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from raylm.data import storage
from raylm.data.datasets import ExampleSpec, task_tokenizer, tokenize_shard, user_errors_from_tasks
from raylm.data.documents import TextShard
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
    """A store's blocks, read one row group at a time from wherever the store lives, and the examples in them.

    Holds the open files (their footers read once) and the `cached_blocks` blocks used last (a
    training rank reads from one or two blocks per lane of its at a time, epoch_data.blocks_in_use). Used from one
    thread at a time.
    """

    def __init__(self, store: StoredExamples, cached_blocks: int = 32):
        self.store = store
        self.locations = store.blocks()
        self._files: dict[int, pq.ParquetFile] = {}
        self._blocks: collections.OrderedDict[int, tuple[dict, np.ndarray]] = collections.OrderedDict()
        self._cached_blocks = cached_blocks
        self.blocks_read = 0

    def examples(self, blocks: np.ndarray, rows: np.ndarray) -> dict:
        """The examples at (block, row) pairs, in that order: {"input_ids": [int32 arrays], "example_id": int64 array},
        and "document_starts" ([int32 arrays]) when the store holds them."""
        example_ids = np.empty(len(blocks), dtype=np.int64)
        lists: dict[str, list] = {}
        for i, (block, row) in enumerate(zip(blocks.tolist(), rows.tolist())):
            columns, ids = self._block(block)
            for name, (values, offsets) in columns.items():
                lists.setdefault(name, []).append(values[offsets[row] : offsets[row + 1]])
            example_ids[i] = ids[row]
        return {"input_ids": [], **lists, "example_id": example_ids}

    def _block(self, block: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        if block in self._blocks:
            self._blocks.move_to_end(block)
        else:
            file_index, group, _ = self.locations[block]
            if file_index not in self._files:
                fs, fs_path = storage.filesystem(storage.join(self.store.folder, self.store.files[file_index]))
                self._files[file_index] = pq.ParquetFile(fs.open_input_file(fs_path))
            table = self._files[file_index].read_row_group(group)
            columns = {}
            for name in LIST_COLUMNS:
                if name in table.column_names:
                    column = table.column(name).combine_chunks()
                    # The offsets index the unsliced values, wherever the first row starts.
                    columns[name] = (column.values.to_numpy(), column.offsets.to_numpy())
            self._blocks[block] = (columns, table.column("example_id").to_numpy())
            self.blocks_read += 1
            if len(self._blocks) > self._cached_blocks:
                self._blocks.popitem(last=False)
        return self._blocks[block]


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
