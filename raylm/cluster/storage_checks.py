"""Storage checks: the local paths a run's nodes use (storage_path, cache_dir, the text files) -> refused before
anything runs where some node cannot reach them, with the field to fix.

A path is probed from every node that is up. A cluster that may gain nodes (one this driver joined, or one whose
autoscaler can add nodes) cannot be probed from nodes that are not up yet: there, with only one node up, a local
path is refused unless it is written as a file:// URI, which says it is a shared mount at the same path on every
node. raylm's local Ray, one machine, takes any local path.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Optional, Sequence

import ray

from raylm.cluster import launcher
from raylm.cluster.capacity import autoscaler_config
from raylm.cluster.run_folders import example_cache_root, run_storage_path
from raylm.config import LanguageModelingArgs
from raylm.data import storage
from raylm.errors import ConfigError

STORAGE_PROBE_SECONDS = 60
SHARED_MOUNT_FIX = (
    "or, if it is a shared mount (NFS, EFS) at the same path on every node, write it as a file:// URI "
    "(file:///mnt/shared/...) to say so"
)


def check_storage_reaches_every_node(
    args: LanguageModelingArgs, training: bool = True, text_files: Sequence[tuple[str, list[str]]] = ()
) -> None:
    """The local folders and files a job's nodes use must be shared: probed from every node, or refused.

    Ray Train's workers write their checkpoints into storage_path from their own nodes, and read their
    examples from the example store (cache_dir); Ray Data's tokenizing tasks read the text files
    (`text_files`: (field, files) pairs) on any node. A path only the driver's node has fails there,
    after start-up. `training=False` (evaluation) checks the example store and the text files only.
    """
    nodes = [node for node in ray.nodes() if node["Alive"]]
    growing = cluster_may_gain_nodes()
    if len(nodes) < 2 and not growing:
        return
    folders = _local_folders(args, training)
    files = [(field, path) for field, paths in text_files for path in paths if storage.local_path(path) is not None]
    if len(nodes) < 2:
        _refuse_unprobed(folders, files)
        return
    for field, folder, purpose in folders:
        blind = _nodes_blind_to_folder(storage.local_path(folder), nodes)
        if blind:
            raise ConfigError(
                f"{field} {folder!r} is a local folder, and {blind} of the Ray cluster's {len(nodes)} nodes cannot "
                f"see it, so the workers there could not {purpose}",
                f"Set {field} to object storage every node reaches (s3://bucket/runs, gs://bucket/runs) or to a "
                "shared mount (NFS, EFS) at the same path on every node",
            )
    for field in dict.fromkeys(field for field, _ in files):
        paths = [path for name, path in files if name == field]
        unread = _files_unread_by_some_node(paths, nodes)
        if unread:
            path, blind = unread
            raise ConfigError(
                f"{field} {path!r} is a local file, and {blind} of the Ray cluster's {len(nodes)} nodes cannot read "
                "it, so Ray Data's tokenizing tasks there would fail",
                f"Put {field} in object storage every node reaches (s3://bucket/texts/) or on a shared mount (NFS, "
                "EFS) at the same path on every node",
            )


def cluster_may_gain_nodes() -> bool:
    """Whether nodes that are not up now may join this job's cluster: anywhere but raylm's local Ray (or a Ray this
    process started itself with ray.init()), whose one machine is all there is.

    Not "whether an autoscaler can add nodes", which Ray 2.60 does not say reliably: its GCS cluster config
    (ray._private.state's get_cluster_config) is empty under autoscaler v1, every head runs a monitor that
    reports a status, and nodes may join by hand (`ray start --address`) or through KubeRay's autoscaler.
    """
    # Private in Ray 2.60: the node ray.init() started in this process (head=True), or only connected to.
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    started_here = node is not None and node.head
    return not (launcher.in_local_ray_job() or started_here)


def _local_folders(args: LanguageModelingArgs, training: bool) -> list[tuple[str, str, str]]:
    """(field, location, what the workers do there) of each local folder to check, each mount once."""
    folders = [("cache_dir", example_cache_root(args), "read the tokenized examples stored there")]
    if training:
        folders.insert(0, ("storage_path", run_storage_path(args), "write their checkpoints"))
    checked: list[tuple[str, str, str]] = []
    for field, folder, purpose in folders:
        local = storage.local_path(folder)
        # Object storage needs no check, and a folder inside one already checked (the default cache_dir) is on that
        # mount.
        inside = any(_inside(local, storage.local_path(seen)) for _, seen, _ in checked) if local else False
        if local is not None and not inside:
            checked.append((field, folder, purpose))
    return checked


def _inside(path: str, folder: str) -> bool:
    return os.path.abspath(path).startswith(os.path.join(os.path.abspath(folder), ""))


def _refuse_unprobed(folders: list[tuple[str, str, str]], files: list[tuple[str, str]]) -> None:
    """On a cluster that may gain nodes, with only this one up: no plain local path (nothing to probe it from)."""
    if autoscaler_config() is not None:
        growth = "the Ray cluster's autoscaler can add nodes while only one is up"
    else:
        growth = "this job joined a Ray cluster (it did not start it) that has one node up and may gain more"
    for field, folder, purpose in folders:
        if not storage.is_uri(folder):
            raise ConfigError(
                f"{field} {folder!r} is a local folder and {growth}, so raylm cannot check that the nodes that join "
                f"can {purpose}",
                f"Set {field} to object storage every node reaches (s3://bucket/runs, gs://bucket/runs), "
                + SHARED_MOUNT_FIX,
            )
    for field, path in files:
        if not storage.is_uri(path):
            raise ConfigError(
                f"{field} {path!r} is a local file and {growth}, so raylm cannot check that Ray Data's tokenizing "
                "tasks on the nodes that join can read it",
                f"Put {field} in object storage every node reaches (s3://bucket/texts/), " + SHARED_MOUNT_FIX,
            )


def _nodes_blind_to_folder(local: str, nodes: list[dict]) -> int:
    """How many of `nodes` cannot read a file written into the local folder `local` from here."""
    token = uuid.uuid4().hex
    probe = os.path.join(local, f".raylm-storage-probe-{token}")
    os.makedirs(local, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
        f.write(token)
    try:
        return sum(seen != token for seen in _on_every_node(_read_probe, probe, nodes))
    finally:
        os.remove(probe)


def _files_unread_by_some_node(paths: list[str], nodes: list[dict]) -> Optional[tuple[str, int]]:
    """(the first of `paths` that some node sees otherwise than here, how many nodes do), or None."""
    local_paths = [storage.local_path(path) for path in paths]
    sizes = [os.path.getsize(path) for path in local_paths]
    seen = _on_every_node(_file_sizes, local_paths, nodes)
    for index, path in enumerate(paths):
        blind = sum(node_sizes is None or node_sizes[index] != sizes[index] for node_sizes in seen)
        if blind:
            return path, blind
    return None


def _on_every_node(task: Callable, argument, nodes: list[dict]) -> list:
    """`task.remote(argument)` pinned to each node; None for a node that did not answer in STORAGE_PROBE_SECONDS."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    calls = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(argument)
        for node in nodes
    ]
    ready, _ = ray.wait(calls, num_returns=len(calls), timeout=STORAGE_PROBE_SECONDS)
    answered = set(ready)
    return [ray.get(call) if call in answered else None for call in calls]


@ray.remote(num_cpus=0, max_retries=0)
def _read_probe(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


@ray.remote(num_cpus=0, max_retries=0)
def _file_sizes(paths: list[str]) -> list[Optional[int]]:
    return [os.path.getsize(path) if os.path.isfile(path) else None for path in paths]
