"""Cluster capacity: the Ray cluster's resources now, and its autoscaler's config (the nodes it may add) -> whether a
job's workers can ever fit, and whether GPUs can appear (use_gpu's default).

The autoscaler's config is read on the driver's node (`ray up` leaves it on the head); a cluster whose growth cannot
be known (joined through RAY_ADDRESS, its autoscaler elsewhere) is never refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import ray

from raylm.cluster.launcher import DATA_STAGE_CPUS, on_local_ray
from raylm.config import LanguageModelingArgs
from raylm.console import notice_once
from raylm.errors import ClusterError


def resolve_use_gpu(args: LanguageModelingArgs, use_cuda: bool) -> bool:
    """use_gpu if set; otherwise GPUs when the cluster has them now or its autoscaler can add them.

    A cluster whose GPU node types start at zero nodes (cluster.yaml's) has no GPU until a job asks
    for one, so counting today's GPUs would train on the head's CPUs and never scale up. CPU only
    where no GPU can appear (said once when use_cuda allowed GPUs).
    """
    if args.use_gpu is not None:
        return bool(args.use_gpu)
    if not use_cuda:
        return False
    if ray.cluster_resources().get("GPU", 0) > 0 or autoscaler_gpu_node_types():
        return True
    notice_once("No GPU in the Ray cluster: training on CPU.")
    return False


# Where `ray up` puts the autoscaler's config on the head (with each node type's resources filled in
# from its instance type); jobs submitted with `ray job submit` run their driver there.
RAY_UP_AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
AUTOSCALER_CONFIG_ENV = "RAYLM_AUTOSCALER_CONFIG"


def autoscaler_config() -> Optional[dict]:
    """The config of this cluster's autoscaler (None on raylm's local Ray, or when there is none).

    Read from the driver's node: `RAYLM_AUTOSCALER_CONFIG`, else the file `ray up` writes (every head
    runs Ray's monitor, so its status in the GCS proves nothing, and autoscaler v1 reports no node
    types to the GCS).
    """
    import yaml

    if on_local_ray():
        return None
    path = os.path.expanduser(os.environ.get(AUTOSCALER_CONFIG_ENV, RAY_UP_AUTOSCALER_CONFIG))
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except OSError:
        return None


def _worker_node_types(config: dict) -> dict[str, dict]:
    head = config.get("head_node_type")
    return {name: spec for name, spec in (config.get("available_node_types") or {}).items() if name != head}


def autoscaler_gpu_node_types() -> list[str]:
    """The node types with GPUs that this cluster's autoscaler may launch ([] on raylm's local Ray)."""
    config = autoscaler_config() or {}
    return sorted(
        name
        for name, spec in _worker_node_types(config).items()
        if (spec.get("resources") or {}).get("GPU", 0) > 0 and spec.get("max_workers", 0) > 0
    )


@dataclass(frozen=True)
class ClusterCapacity:
    """The most of each resource (CPU, GPU, ...) the cluster can hold; `autoscaled` when that counts nodes its
    autoscaler can add."""

    resources: dict
    autoscaled: bool

    def has(self) -> str:
        return "can grow to" if self.autoscaled else "has"


def cluster_capacity() -> Optional[ClusterCapacity]:
    """What the cluster has now, or more where its autoscaler can add nodes; None when that cannot be known.

    A cluster joined through RAY_ADDRESS without an autoscaler config on the driver's node may still
    grow (KubeRay's autoscaler runs beside the head, not on it): nothing can be refused there.
    """
    now = ray.cluster_resources()
    config = autoscaler_config()
    if config is None:
        return None if os.environ.get("RAY_ADDRESS") else ClusterCapacity(dict(now), autoscaled=False)
    most = autoscaler_capacity(config)
    return ClusterCapacity({name: max(now.get(name, 0), most.get(name, 0)) for name in {*now, *most}}, autoscaled=True)


def autoscaler_capacity(config: dict) -> dict[str, float]:
    """The most of each resource an autoscaler config allows: the head's plus the worker nodes it may launch.

    Each node type counts up to its max_workers and all of them up to the cluster's max_workers; per
    resource, the nodes richest in it come first (so a resource's maximum, not one mix of nodes for all).
    """
    head = (config.get("available_node_types") or {}).get(config.get("head_node_type")) or {}
    capacity = {name: float(amount) for name, amount in (head.get("resources") or {}).items()}
    workers = [
        (spec.get("resources") or {}, int(spec.get("max_workers", 0))) for spec in _worker_node_types(config).values()
    ]
    node_limit = int(config.get("max_workers", sum(count for _, count in workers)))
    for resource in {name for resources, _ in workers for name in resources}:
        nodes_left, added = node_limit, 0.0
        for resources, count in sorted(workers, key=lambda worker: -worker[0].get(resource, 0)):
            nodes = min(count, nodes_left)
            added += nodes * resources.get(resource, 0)
            nodes_left -= nodes
        capacity[resource] = capacity.get(resource, 0.0) + added
    return capacity


def check_cluster_fits(args: LanguageModelingArgs, resources_per_worker: dict) -> None:
    """Fail before Ray Train waits forever for resources (CPUs, GPUs, custom ones) that the cluster can never have.

    An autoscaling cluster is judged by what its autoscaler can add (nodes that are not up yet come
    when the job asks), one whose growth cannot be known not at all.
    """
    capacity = cluster_capacity()
    if capacity is None:
        return
    workers = f"{args.min_workers} worker{'s' if args.min_workers != 1 else ''}"
    for resource, per_worker in resources_per_worker.items():
        most = capacity.resources.get(resource, 0)
        needed = args.min_workers * per_worker
        if resource == "CPU" and needed + DATA_STAGE_CPUS > most:
            raise ClusterError(
                f"The Ray cluster {capacity.has()} {most:g} CPUs, but {workers} x {per_worker:g} CPUs leave none for "
                "reading and tokenizing data",
                "Lower num_workers or resources_per_worker['CPU'], or add nodes to the cluster"
                + _autoscaler_hint(capacity),
            )
        if needed > most:
            fix = "Set use_gpu=False to train on CPUs, lower num_workers" if resource == "GPU" else "Lower num_workers"
            raise ClusterError(
                f"The Ray cluster {capacity.has()} {most:g} {resource}, but {workers} x {per_worker:g} {resource} need "
                f"{needed:g}",
                f"{fix} or resources_per_worker[{resource!r}], or add nodes with {resource} to the cluster"
                + _autoscaler_hint(capacity),
            )


def _autoscaler_hint(capacity: ClusterCapacity) -> str:
    return " (max_workers of its node types in the autoscaler's config)" if capacity.autoscaled else ""
