"""Blocks per second read from object storage 30 ms away: one block at a time (the old way) against reading ahead.

A store of 300 blocks (64 examples of 128 token ids each, in 10 Parquet files of about 1 MB: moto
reads a whole object for each ranged GET, so larger files measure moto) in moto's S3 server, read
through a proxy that adds 30 ms to every request (tests/local_s3.py), in a shuffled block order as
an epoch reads them:
- sequential: `examples` of one block after the other, each waiting for its request, as a rank read
  before read_ahead;
- read-ahead: `read_ahead` of the next blocks before each block's `examples`, no node cache; and the
  same with no delay added, what the S3 server on loopback serves on this machine (the ceiling);
- the first and a second rank of a node: the same through one node cache, the second rank reading
  what the first fetched.
Each row counts the requests the proxy answered (a file's footer costs a HEAD and a GET, once).

    python bench/read_ahead.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import common

sys.path.insert(0, os.path.join(common.REPO, "tests"))

FILES, BLOCKS_PER_FILE, TOKENS = 10, 30, 128
SMOKE_FILES, SMOKE_BLOCKS_PER_FILE, SMOKE_TOKENS = 2, 3, 16


def write_store(endpoint: str, files: int, blocks_per_file: int, tokens: int):
    """A store of random token ids in a new bucket, written straight to the server (not through the proxy)."""
    import boto3
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.data import storage
    from raylm.data.example_store import EXAMPLES_PER_BLOCK, StoredExamples

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="read-ahead-bench")
    folder = "s3://read-ahead-bench/store"
    rng = np.random.default_rng(0)
    rows = blocks_per_file * EXAMPLES_PER_BLOCK
    names = []
    for file_index in range(files):
        ids = rng.integers(0, 50_000, size=(rows, tokens), dtype=np.int32)
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(
                    np.arange(0, rows * tokens + 1, tokens, dtype=np.int32), ids.ravel()
                ),
                "example_id": np.arange(rows, dtype=np.int64) + file_index * rows,
            }
        )
        parquet = pa.BufferOutputStream()
        pq.write_table(table, parquet, row_group_size=EXAMPLES_PER_BLOCK)
        names.append(f"shard-{file_index:06d}.parquet")
        storage.write_bytes(storage.join(folder, names[-1]), parquet.getvalue().to_pybytes())
    return StoredExamples(folder, tuple(names), (rows,) * files)


def read_blocks(reader, order, ahead: int) -> float:
    """Seconds to read every block in `order` through `examples`; ahead > 0 asks read_ahead of the next ones first."""
    import numpy as np

    rows = reader.store.block_rows()
    started = time.perf_counter()
    for index, block in enumerate(order):
        if ahead:
            reader.read_ahead(order[index : index + ahead])
        reader.examples(np.full(rows[block], block), np.arange(rows[block]))
    return time.perf_counter() - started


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=30.0, help="added to every request to the store")
    parser.add_argument("--ahead", type=int, default=32, help="blocks asked ahead of the one being read")
    parser.add_argument("--reads-in-flight", type=int, default=16)
    options = parser.parse_args()
    import numpy as np
    from local_s3 import MotoServer, S3Proxy, most_in_flight

    from raylm.data.example_store import BlockReader, StoredExamples

    sizes = (SMOKE_FILES, SMOKE_BLOCKS_PER_FILE, SMOKE_TOKENS) if options.smoke else (FILES, BLOCKS_PER_FILE, TOKENS)
    work = tempfile.mkdtemp(prefix="raylm-read-ahead-")
    server = MotoServer(os.path.join(work, "moto.log"))
    proxies = []
    try:
        os.environ.update(server.client_environment)
        stored = write_store(server.endpoint, *sizes)
        order = np.random.default_rng(1).permutation(len(stored.block_rows())).tolist()
        for delay_ms in (options.delay_ms, 0):
            proxies.append(S3Proxy(server.endpoint, os.path.join(work, f"proxy-{delay_ms}.jsonl"), delay_ms / 1000))
        far, near = proxies
        node_cache = os.path.join(work, "node-cache")
        ahead = f"read-ahead {options.ahead} blocks"
        runs = [
            ("sequential", far, 0, {"node_cache_bytes": 0}),
            (ahead, far, options.ahead, {"node_cache_bytes": 0}),
            (f"{ahead}, no added delay (what loopback S3 serves)", near, options.ahead, {"node_cache_bytes": 0}),
            # Through one proxy, so that the ranks of the node read the store at one location, as in a run.
            (f"{ahead}, a node's first rank", far, options.ahead, {"node_cache_root": node_cache}),
            (f"{ahead}, a node's second rank", far, options.ahead, {"node_cache_root": node_cache}),
        ]
        common.begin_measuring(options)
        rates = {}
        for label, proxy, blocks_ahead, cache in runs:
            store = StoredExamples(f"{stored.folder}?{proxy.endpoint_query}", stored.files, stored.rows)
            answered = len(proxy.requests())
            reader = BlockReader(
                store, max_blocks=2 * options.ahead + 1, reads_in_flight=options.reads_in_flight, **cache
            )
            seconds = read_blocks(reader, order, blocks_ahead)
            reader.close()
            requests = proxy.requests()[answered:]
            rates[label] = len(order) / seconds
            gets = sum(request["method"] == "GET" for request in requests)
            heads = sum(request["method"] == "HEAD" for request in requests)
            print(
                f"{label}: {len(order)} blocks in {seconds:.2f} s, {rates[label]:.1f} blocks/s; "
                f"{gets} GETs, {heads} HEADs; at most {most_in_flight(requests)} in flight",
                flush=True,
            )
        speedup = rates[ahead] / rates["sequential"]
        print(f"read-ahead: {speedup:.2f}x the sequential read rate ({options.delay_ms:.0f} ms per request)")
        common.print_load("end")
    finally:
        for proxy in proxies:
            proxy.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
