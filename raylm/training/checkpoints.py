"""Checkpoint folders: what a checkpoint holds, how a worker writes it, how the driver mirrors it.

A checkpoint is one folder that is at the same time
- a Hugging Face model folder (weights, config, tokenizer, model_args.json), so
  `AutoModelFor...from_pretrained(dir)` and `LanguageModelingModel(type, dir)` both load it;
- the exact state of the run: `trainer_state.json` (step, epoch, the examples of the epoch
  consumed, running sums, early-stopping state) and the tensors `optimizer.pt`, `scheduler.pt`,
  `scaler.pt`, `rng_states.pt` (one entry per rank).
An FSDP checkpoint holds the weights and the optimizer state as every rank's DCP shards instead
(`sharded_state/`, sharded_state.py), and Hugging Face weights only with fsdp_checkpoint_hf_weights:
without them `LanguageModelingModel(type, dir)` loads it, the Auto classes do not.

Ray Train owns the checkpoints under `storage_path` (it registers one only once every rank has
reported it, so a half-uploaded checkpoint is never the one resumed from). The driver mirrors each
registered checkpoint into `output_dir` (a folder or object storage) under Simple Transformers' names
(`checkpoint-{step}`, `checkpoint-{step}-epoch-{n}`), published as storage.py publishes a folder, so
a folder with the final name and a config.json is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from raylm.data import storage
from raylm.errors import ModelError
from raylm.models.sharded_weights import SHARDED_STATE_DIR
from raylm.training import node_copies

TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng_states.pt"
CHECKPOINT_PREFIX = "checkpoint-"
# The checkpoint reports' field that Ray ranks checkpoints by under keep_best_checkpoints.
CHECKPOINT_SCORE = "checkpoint_score"
# What makes a model folder a resumable checkpoint; left out of the final model in output_dir.
# Ray's own checkpoint metadata (which train_model call wrote it, resume.RUN_ID_KEY) is run state too.
RAY_METADATA_FILE = ".metadata.json"
# An FSDP checkpoint's DCP shards (a folder) are run state too: the Hugging Face export replaces them as weights.
RUN_STATE_FILES = (
    TRAINER_STATE_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    SCALER_FILE,
    RNG_FILE,
    RAY_METADATA_FILE,
    SHARDED_STATE_DIR,
)


@dataclass
class TrainerState:
    """Everything besides tensors that a run needs to continue exactly where a checkpoint was taken."""

    objective: str = ""
    global_step: int = 0
    epoch: int = 0
    # Examples of `epoch`'s order consumed (the data position; the same for any worker count, see epoch_data.py).
    epoch_examples: int = 0
    # The lanes `epoch`'s order was cut into (its global batch when it started): a run resumed with another batch
    # size finishes the epoch in the same order, so that no example is repeated or skipped (0: not started).
    epoch_lanes: int = 0
    world_size: int = 1
    total_steps: int = 0
    train_loss_sum: float = 0.0  # sum over optimizer steps of each step's global mean loss
    train_tokens: int = 0  # the targets the loss was computed on
    train_input_tokens: int = 0  # the non-pad tokens fed to the model
    train_examples: int = 0
    train_seconds: float = 0.0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    early_stopping_counter: int = 0
    stopped_early: bool = False
    label: str = ""

    def start_next_epoch(self) -> None:
        self.epoch, self.epoch_examples, self.epoch_lanes = self.epoch + 1, 0, 0

    @property
    def train_loss(self) -> float:
        return self.train_loss_sum / max(self.global_step, 1)

    def summary(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_tokens": self.train_tokens,
            "train_input_tokens": self.train_input_tokens,
            "train_examples": self.train_examples,
            "train_seconds": self.train_seconds,
            "stopped_early": self.stopped_early,
        }


def checkpoint_label(global_step: int, epoch_end: Optional[int] = None) -> str:
    """Simple Transformers' folder names: checkpoint-{step} or checkpoint-{step}-epoch-{n}."""
    return f"{CHECKPOINT_PREFIX}{global_step}" + (f"-epoch-{epoch_end}" if epoch_end is not None else "")


def write_training_state(
    directory: str,
    state: TrainerState,
    optimizer=None,
    scheduler=None,
    scaler=None,
    rng_states: Optional[list] = None,
    in_shards: bool = False,
) -> None:
    """The run state next to the model files that `modeling.save_trained` wrote into `directory`.

    in_shards: the optimizer's state is in the checkpoint's DCP shards (sharded_state.py), not in optimizer.pt.
    """
    if optimizer is not None:
        if not in_shards:
            torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
        torch.save(scheduler.state_dict(), os.path.join(directory, SCHEDULER_FILE))
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), os.path.join(directory, SCALER_FILE))
    if rng_states is not None:
        torch.save(rng_states, os.path.join(directory, RNG_FILE))
    # Written last: a folder with trainer_state.json has everything before it.
    with open(os.path.join(directory, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(state), f, indent=2)


# A worker writes each checkpoint into a local folder that Ray uploads and (async) deletes. The folder is named by the
# worker's process id: a worker killed before its upload finished leaves its folder behind, and the next worker on the
# node deletes it (remove_dead_workers_folders), or a node whose workers crash would fill its disk with checkpoints.
_LOCAL_FOLDER = re.compile(r"^raylm-checkpoint-(\d+)-")


def local_checkpoint_folder() -> str:
    """A new local folder for this worker's next checkpoint."""
    return tempfile.mkdtemp(prefix=f"raylm-checkpoint-{os.getpid()}-")


def remove_dead_workers_folders() -> None:
    """Delete the local checkpoint folders that workers no longer alive left on this node."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        found = _LOCAL_FOLDER.match(name)
        if found and not _is_alive(int(found.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_training_checkpoint(directory: Optional[str]) -> bool:
    """Whether the folder (or URI) holds a complete checkpoint: a published model plus its trainer_state.json."""
    return (
        bool(directory)
        and storage.isfile(storage.join(directory, TRAINER_STATE_FILE))
        and storage.is_complete(directory)
    )


@contextlib.contextmanager
def local_copy(checkpoint) -> Iterator[str]:
    """A folder holding a Ray checkpoint's files: its own path when local, else this node's copy, downloaded once for
    all the ranks of the node (node_copies.py)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with node_copies.shared_copy(checkpoint) as folder:
        yield folder


def read_trainer_state(directory: str) -> TrainerState:
    with open(os.path.join(directory, TRAINER_STATE_FILE), encoding="utf-8") as f:
        values = json.load(f)
    known = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in values.items() if k in known})


def read_tensors(directory: str, name: str):
    """A tensor file of the checkpoint, or None when it was not saved (e.g. save_optimizer_and_scheduler=False)."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    # Our own files hold only tensors and plain containers, so the loader that builds nothing else reads
    # them; a file that needs more was not written by raylm, and unpickling it could run any code.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise ModelError(
            f"The checkpoint file {path!r} holds objects other than tensors{f' ({found.group(1)})' if found else ''}, "
            "so raylm did not write it and refuses to unpickle it (that could run any code)",
            "Resume only from checkpoints written by raylm runs you trust",
        ) from None


def mirror_checkpoint(checkpoint, destination: str) -> None:
    """Copy a Ray checkpoint (local or remote storage) to `destination` (a folder or URI), which appears complete or
    not at all."""
    with storage.publishing(destination) as staging:
        checkpoint.to_directory(staging)


def checkpoint_score(args, metrics: dict) -> float:
    """How Ray ranks a checkpoint under keep_best_checkpoints: its metric if it was a new best, else the worst value.

    Only new bests get their value: raylm's best (which must improve by early_stopping_delta) then
    ranks first for Ray too. Ties among the rest go to the newer checkpoint.
    """
    if metrics.get("is_best"):
        return float(metrics[args.early_stopping_metric])
    return math.inf if args.early_stopping_metric_minimize else -math.inf


def prune_mirrored(output_dir: str, mirrored_labels: set[str], kept_labels: list[str]) -> set[str]:
    """Delete the copies in output_dir (a folder or URI) that this run mirrored and whose checkpoint Ray no longer
    keeps; the labels left."""
    for label in mirrored_labels - set(kept_labels):
        storage.delete(storage.join(output_dir, label))
    return mirrored_labels & set(kept_labels)
