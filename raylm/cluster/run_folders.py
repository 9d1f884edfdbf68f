"""Run folders: args and a run's name -> where Ray Train keeps the run (under storage_path) and the example stores
(cache_dir), what its checkpoint snapshot says (whether the run exists, its latest checkpoint's metrics), and the
step a run resumes at.
"""

from __future__ import annotations

import json
from typing import Optional

from ray.train import RunConfig

from raylm.config import LanguageModelingArgs
from raylm.console import logger
from raylm.data import storage
from raylm.errors import ConfigError
from raylm.training.checkpoints import is_training_checkpoint, read_trainer_state

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


def resume_step(
    args: LanguageModelingArgs, name: str, model_folder: Optional[str], model_name: Optional[str]
) -> Optional[int]:
    """The step the run `name` resumes at (None for a fresh run); ConfigError for a run that cannot start.

    model_folder: model_name's folder on this machine (a download when model_name is in object storage).

    A checkpoint given as model_name resumes that checkpoint, whatever Ray has under the run's
    name. Otherwise an existing run of that name is resumed only when args.resume asks for it:
    Ray Train would resume it silently, even for another model with other settings.
    """
    if is_training_checkpoint(model_folder):
        source, state = model_name, read_trainer_state(model_folder)
        step, epoch = state.global_step, state.epoch
    elif run_exists(args, name):
        folder = run_folder(args, name)
        if not args.resume:
            raise ConfigError(
                f"experiment_name {name!r} names a run that already exists ({folder}), and resume is False",
                "Set resume=True to continue that run from its latest checkpoint, or choose another experiment_name "
                "(unset, each run gets a new one)",
            )
        latest = latest_checkpoint_metrics(args, name)
        if latest is None:
            return None
        source, step, epoch = f"the latest checkpoint of {folder}", int(latest["global_step"]), int(latest["epoch"])
    else:
        return None
    if (args.max_steps > 0 and step >= args.max_steps) or (args.max_steps <= 0 and epoch >= args.num_train_epochs):
        end = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"num_train_epochs {args.num_train_epochs}"
        raise ConfigError(
            f"{source} is at step {step:,} after {epoch} complete epoch(s), where this job already ends ({end}), so "
            "resuming would train nothing",
            "Raise max_steps (or num_train_epochs) above what the run reached to train on, or start a new run",
        )
    logger.info(f"Resuming from {source} (step {step:,}).")
    return step
