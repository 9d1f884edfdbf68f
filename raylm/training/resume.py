"""Resuming on a worker: the checkpoint a run starts from (its own latest after a restart, or the folder it continues)
-> the trainer state, and the optimizer, scheduler, scaler and RNG states put back as they were (model_setup.py loads
the model, and the state a sharded checkpoint holds in its shards).
"""

from __future__ import annotations

from typing import Optional

import ray.train
import torch

from raylm.training.checkpoints import (
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    TrainerState,
    read_tensors,
    read_trainer_state,
)
from raylm.training.collectives import Ranks
from raylm.training.parallelism import load_optimizer_state

# Checkpoint metadata: the WorkerJob.run_id of the train_model call that wrote it.
RUN_ID_KEY = "raylm_run_id"


def starting_checkpoint(resume_from: Optional[str], run_id: str) -> Optional[ray.train.Checkpoint]:
    """The checkpoint this worker starts from: None for a fresh run.

    A run continuing a checkpoint folder (LanguageModelingModel(type, "outputs/checkpoint-N")) starts
    from that checkpoint, unless this very run has checkpointed since (a restart after a worker died).
    """
    checkpoint = ray.train.get_checkpoint()
    if resume_from and (checkpoint is None or (checkpoint.get_metadata() or {}).get(RUN_ID_KEY) != run_id):
        return ray.train.Checkpoint(resume_from)
    return checkpoint


def read_run_state(directory: str) -> tuple[TrainerState, dict]:
    """(the trainer state, {file name: the tensors of the optimizer, scheduler, scaler and RNG files, None where the
    checkpoint has none}) of a checkpoint folder."""
    tensors = {name: read_tensors(directory, name) for name in (OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE, RNG_FILE)}
    return read_trainer_state(directory), tensors


def restore_optimizer(
    tensors: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, global_step: int
) -> None:
    """Put read_run_state's tensors back into the optimizer (unless its state is in the checkpoint's shards,
    sharded_state.py), the scheduler and the gradient scaler."""
    if tensors[OPTIMIZER_FILE] is not None:
        load_optimizer_state(model, optimizer, tensors[OPTIMIZER_FILE])
    if tensors[SCHEDULER_FILE] is not None:
        scheduler.load_state_dict(tensors[SCHEDULER_FILE])
    else:
        # The checkpoint has no optimizer state: start it fresh but keep the schedule's position.
        for _ in range(global_step):
            scheduler.step()
    if tensors[SCALER_FILE] is not None:
        scaler.load_state_dict(tensors[SCALER_FILE])


def restore_rng(tensors: dict, ranks: Ranks) -> None:
    """Put this rank's RNG state (rng_state, gathered from every rank) back."""
    rng_states = tensors[RNG_FILE]
    # The states are per rank: under another world size they stay as the seed made them.
    if rng_states is not None and len(rng_states) == ranks.world_size:
        torch.set_rng_state(rng_states[ranks.rank]["cpu"])
        if ranks.device.type == "cuda" and rng_states[ranks.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng_states[ranks.rank]["cuda"], ranks.device)


def rng_state(device: torch.device) -> dict:
    """This rank's RNG state, as restore_run_state puts it back."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
