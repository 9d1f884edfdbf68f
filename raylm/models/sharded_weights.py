"""Sharded weights: an FSDP checkpoint's torch.distributed.checkpoint (DCP) shards -> the weights of a whole model in
one process (the driver's, or a tool's), and the clear error where a reader expects Hugging Face weights instead.

An FSDP run checkpoints without gathering the model (parallel_strategy fsdp, fsdp_checkpoint_hf_weights): every rank
writes its own shards of the model and optimizer state into `SHARDED_STATE_DIR`, which DCP can read back at any world
size, but which transformers' Auto classes cannot read. raylm reads it wherever it loads a checkpoint folder.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch

from raylm.errors import ModelError

# The checkpoint's subfolder of DCP shards: `__{rank}_{n}.distcp` files and rank 0's `.metadata`.
SHARDED_STATE_DIR = "sharded_state"
# DCP's keys: the model's state dict under "model", the optimizer's (parameters by name) under "optimizer".
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def holds_sharded_state(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, SHARDED_STATE_DIR))


def holds_hf_weights(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in _WEIGHT_FILES)


def reads_from_shards(directory: str) -> bool:
    """Whether a model folder's weights are only DCP shards (an FSDP checkpoint without the Hugging Face export)."""
    return holds_sharded_state(directory) and not holds_hf_weights(directory)


def load_sharded_weights(model: torch.nn.Module, directory: str) -> None:
    """The checkpoint's weights copied into `model` (whole, unsharded), in this process alone.

    DCP reads each tensor's shards from whichever rank's files hold them; tied weights are saved
    under each of their names and land in the one tensor they share.
    """
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    with single_process_quietly():
        # no_dist: one process reads every rank's shards, whatever process group this process belongs to.
        dcp.load({MODEL_KEY: state}, checkpoint_id=os.path.join(directory, SHARDED_STATE_DIR), no_dist=True)


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP without a process group (the driver, a one-worker run in it) warns that it works "in a single process",
    which is what raylm means there: keep that off the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_configs(model, directory: str) -> None:
    """What save_pretrained writes besides the weights: the config, the generation config, and the custom code of a
    trust_remote_code model."""
    from transformers.dynamic_module_utils import custom_object_save

    os.makedirs(directory, exist_ok=True)
    if getattr(model, "_auto_class", None) is not None:
        custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def check_not_sharded_half(source: str, field_name: str) -> None:
    """A folder inside a sharded checkpoint (an ELECTRA half's generator_model/ or discriminator_model/) holds a config
    but no weights: say so and how to get weights, rather than transformers' missing-file error."""
    if not os.path.isdir(source) or holds_hf_weights(source):
        return
    parent = os.path.dirname(os.path.normpath(source))
    if holds_sharded_state(source) or holds_sharded_state(parent):
        raise ModelError(
            f"The {field_name} {source!r} is part of an FSDP checkpoint whose weights are torch.distributed.checkpoint "
            "shards, which Hugging Face's from_pretrained cannot read",
            "Pass the checkpoint folder itself as model_name (raylm reads its shards), use the run's output_dir "
            "(always a whole Hugging Face folder), or train with fsdp_checkpoint_hf_weights=True so checkpoints hold "
            "the Hugging Face weights too",
        )
