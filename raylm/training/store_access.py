"""Example stores on a worker: the fields of a store the driver built -> the store, once this node has read its
manifest.

The driver checks before training that every node up then reaches cache_dir (cluster/storage_checks.py), but a
node can join later (an autoscaled or replacement node without the shared mount), and a store can be removed
while a run goes on. Such a worker fails at its start, in one paragraph naming the store, the node and the fix,
rather than at its first block with a file-not-found from deep inside pyarrow.
"""

from __future__ import annotations

import ray

from raylm.data import storage
from raylm.data.example_store import MANIFEST, StoredExamples, read_store
from raylm.errors import ConfigError


def readable_store(fields: dict, rank: int) -> StoredExamples:
    """The store of `fields` (example_store.StoredExamples'), or a ConfigError when this node cannot read its
    manifest."""
    store = StoredExamples(**fields)
    manifest = storage.join(store.folder, MANIFEST)
    try:
        problem = None if read_store(store.folder) is not None else f"finds no complete {manifest!r}"
    except (OSError, ValueError) as error:  # pyarrow's storage errors are OSErrors; a garbled manifest a ValueError
        problem = f"cannot read {manifest!r} ({type(error).__name__}: {' '.join(str(error).split())})"
    if problem is None:
        return store
    node = f"{ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()[:12]})"
    raise ConfigError(
        f"Training worker rank {rank} on node {node} {problem}: it cannot read the example store "
        f"{store.folder!r} that the driver built, so that node does not see the storage the driver's node does",
        "Set cache_dir (default: raylm-examples under storage_path) to object storage every node reaches "
        "(s3://bucket/cache) or to a shared mount (NFS, EFS) at the same path on every node, and give nodes that "
        "join later the same mount",
    )
