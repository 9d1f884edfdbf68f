"""Run folders: args and a run's name -> where Ray Train keeps the run (under storage_path) and the example stores
(cache_dir), and what its checkpoint snapshot says (whether the run exists, its latest checkpoint's metrics).
"""

from __future__ import annotations

import json
from typing import Optional

from ray.train import RunConfig

from raylm.config import LanguageModelingArgs
from raylm.data import storage

EXAMPLE_CACHE_FOLDER = "raylm-examples"


def run_storage_path(args: LanguageModelingArgs) -> str:
    """storage_path, or Ray's default (~/ray_results) expanded as Ray expands it."""
    return args.storage_path or RunConfig().storage_path


def example_cache_root(args: LanguageModelingArgs) -> str:
    """Where the example stores live: cache_dir, or beside the runs under storage_path, which every node reaches."""
    return args.cache_dir or storage.join(run_storage_path(args), EXAMPLE_CACHE_FOLDER)


def run_folder(args: LanguageModelingArgs, name: str) -> str:
    return storage.join(run_storage_path(args), name)


def run_exists(args: LanguageModelingArgs, name: str) -> bool:
    """Whether Ray Train has a run of this name under storage_path (its checkpoint snapshot is there)."""
    return _read_snapshot(args, name) is not None


def latest_checkpoint_metrics(args: LanguageModelingArgs, name: str) -> Optional[dict]:
    """The metrics reported with the run's latest registered checkpoint (raylm's trainer-state summary), or None."""
    snapshot = _read_snapshot(args, name) or {}
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("metrics")


def _read_snapshot(args: LanguageModelingArgs, name: str) -> Optional[dict]:
    snapshot = storage.join(run_folder(args, name), RAY_CHECKPOINT_SNAPSHOT)
    return json.loads(storage.read_text(snapshot)) if storage.isfile(snapshot) else None


# Ray Train V2 rewrites this file in the run folder each time it registers a checkpoint.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
