"""Sharded state: the ranks' model and optimizer (FSDP shards, or a DDP rank's whole copy) <-> a checkpoint's
torch.distributed.checkpoint (DCP) folder, each rank writing and reading only its own part.

An FSDP checkpoint is written without gathering anything (parallel_strategy fsdp): each rank saves its shards into
its own local checkpoint folder, and Ray merges the ranks' folders into one checkpoint (each rank's files are named
`__{rank}_{n}.distcp`; rank 0 adds DCP's `.metadata`). DCP reshards on reading, so the folder resumes on any worker
count, sharded (FSDP) or whole (DDP).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from raylm.models.sharded_weights import MODEL_KEY, OPTIMIZER_KEY, SHARDED_STATE_DIR, single_process_quietly


def save_sharded_state(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """This rank's shards of the model (and of the optimizer's state, parameters by name) into directory's
    SHARDED_STATE_DIR. Every rank must call it (DCP agrees on who writes what, and rank 0 writes the metadata)."""
    state = {MODEL_KEY: get_model_state_dict(model)}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = get_optimizer_state_dict(model, optimizer)
    with single_process_quietly():
        dcp.save(state, checkpoint_id=os.path.join(directory, SHARDED_STATE_DIR))


def load_sharded_state(directory: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """The checkpoint's model (and optimizer) state into this rank's part of the model (and optimizer), resharded
    for this run's world size and strategy. Every rank must call it."""
    state = {MODEL_KEY: get_model_state_dict(model)}
    if optimizer is not None:
        # AdamW creates its moments at the first step: torch's getter creates them (a step with zero gradients and
        # learning rate) so that DCP has tensors to read them into.
        state[OPTIMIZER_KEY] = get_optimizer_state_dict(model, optimizer)
    with single_process_quietly():
        dcp.load(state, checkpoint_id=os.path.join(directory, SHARDED_STATE_DIR))
    set_model_state_dict(model, state[MODEL_KEY])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIMIZER_KEY])
