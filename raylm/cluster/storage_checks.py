"""Storage checks: the local folders a run's workers use (storage_path, cache_dir) -> probed from every node of a
multi-node cluster before training starts, so a folder only the driver's node has fails with the field to fix.
"""

from __future__ import annotations

import os
import uuid
from typing import Optional

import ray

from raylm.cluster.run_folders import example_cache_root, run_storage_path
from raylm.config import LanguageModelingArgs
from raylm.data import storage
from raylm.errors import ConfigError


def check_storage_reaches_every_node(args: LanguageModelingArgs, training: bool = True) -> None:
    """On a multi-node cluster, the local folders the workers use must be shared mounts: probe them from every node.

    Ray Train's workers write their checkpoints into storage_path from their own nodes, and read their
    examples from the example store (cache_dir); a folder only the driver's node has fails there, after
    start-up. `training=False` (evaluation) checks the example store only.
    """
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    folders = [("cache_dir", example_cache_root(args), "read the tokenized examples stored there")]
    if training:
        folders.insert(0, ("storage_path", run_storage_path(args), "write their checkpoints"))
    probed: list[str] = []
    for field, folder, purpose in folders:
        local = storage.local_path(folder)
        # Object storage needs no probe, and a folder inside one already probed (the default cache_dir) is on that
        # mount.
        if local is None or any(os.path.abspath(local).startswith(os.path.join(seen, "")) for seen in probed):
            continue
        probed.append(os.path.abspath(local))
        blind = _nodes_blind_to(local, nodes)
        if blind:
            raise ConfigError(
                f"{field} {folder!r} is a local folder, and {blind} of the Ray cluster's {len(nodes)} nodes cannot "
                f"see it, so the workers there could not {purpose}",
                f"Set {field} to object storage every node reaches (s3://bucket/runs, gs://bucket/runs) or to a "
                "shared mount (NFS, EFS) at the same path on every node",
            )


def _nodes_blind_to(local: str, nodes: list[dict]) -> int:
    """How many of `nodes` cannot read a file written into the local folder `local` from here."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = os.path.join(local, f".raylm-storage-probe-{token}")
    os.makedirs(local, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
        f.write(token)
    try:
        reads = [
            _read_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
                probe
            )
            for node in nodes
        ]
        ready, _ = ray.wait(reads, num_returns=len(reads), timeout=STORAGE_PROBE_SECONDS)
        seen = [ray.get(ref) == token for ref in ready]
    finally:
        os.remove(probe)
    return len(nodes) - sum(seen)


STORAGE_PROBE_SECONDS = 60


@ray.remote(num_cpus=0, max_retries=0)
def _read_probe(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None
