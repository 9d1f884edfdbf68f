"""Model set-up: a worker's job -> its model on the device (DDP-wrapped or FSDP-sharded), optimizer, schedule and
gradient scaler, and, for a run that starts from a checkpoint, the trainer state with all of them put back as the
checkpoint left them.

A checkpoint is read in the form its run wrote it: a Hugging Face folder with `optimizer.pt` (a DDP run's, or an
older raylm's FSDP checkpoint), or an FSDP checkpoint's DCP shards (sharded_state.py; preferred when the checkpoint
also holds Hugging Face weights), which every rank reads its own part of, whatever the world size and strategy of the
run that resumes it. Under FSDP the ranks shard a meta skeleton of the model first (builds_on_meta), so that only
rank 0 ever holds the whole model, and no rank when the weights come from the shards.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Optional

import ray
import torch

from raylm.config import LanguageModelingArgs
from raylm.models.modeling import install_remote_code, load_trained
from raylm.models.sharded_weights import holds_sharded_state
from raylm.training import parallelism
from raylm.training.checkpoints import SCHEDULER_FILE, TrainerState, local_copy
from raylm.training.collectives import Ranks
from raylm.training.optim import build_optimizer, build_scheduler
from raylm.training.resume import read_run_state, restore_optimizer, restore_rng, starting_checkpoint
from raylm.training.sharded_state import load_sharded_state
from raylm.training.torch_compile import CompileStats, compile_model


@dataclass
class TrainingSetup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    state: TrainerState
    resumed_from: Optional[int]  # the step of the checkpoint the run started from; None for a fresh run
    compile_stats: Optional[CompileStats]


def builds_on_meta(args: LanguageModelingArgs) -> bool:
    """Whether the FSDP ranks build the model from a skeleton (meta_skeleton) and shard it before it has weights, so
    that only rank 0 ever holds the whole model (and no rank does when the weights come from a sharded checkpoint).

    Not under fsdp_cpu_offload, whose shards must end up in CPU memory while to_empty allocates them on the device,
    nor for trust_remote_code models, whose modules may keep tensors that are neither parameters nor buffers and
    that to_empty would leave behind on the CPU: those take the whole model on every rank, as DDP does.
    """
    return args.parallel_strategy == "fsdp" and not args.fsdp_cpu_offload and not args.trust_remote_code


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device (shapes, no storage) and whose buffers are real: what
    an FSDP rank shards before any weights exist (builds_on_meta). Tied parameters stay one tensor."""
    memo = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def set_up_training(job, args: LanguageModelingArgs, ranks: Ranks, param_dtype: Optional[torch.dtype]) -> TrainingSetup:
    """The training objects of this rank for `job` (worker.WorkerJob), restored from its starting checkpoint if any.
    Every rank must call it (sharding and reading a sharded checkpoint are collectives)."""
    install_remote_code(job.remote_code)
    state = TrainerState(objective=job.objective, world_size=ranks.world_size, total_steps=job.total_steps)
    checkpoint = starting_checkpoint(job.resume_from, job.run_id)
    # The checkpoint's files stay readable (a node's shared copy of a remote one, locked) until everything is restored.
    with local_copy(checkpoint) if checkpoint is not None else contextlib.nullcontext() as directory:
        sharded = directory is not None and holds_sharded_state(directory)
        if directory is not None:
            state, saved_tensors = read_run_state(directory)
        on_meta = job.model_skeleton_ref is not None
        # The whole model, on the ranks that need it: every rank without a skeleton, rank 0 alone with one (to
        # broadcast from); none when the weights come from the checkpoint's shards.
        whole = None
        if not sharded and (not on_meta or ranks.rank == 0):
            whole = (
                load_trained(job.objective, directory, args.trust_remote_code) if directory else ray.get(job.model_ref)
            )
        if on_meta:
            model = ray.get(job.model_skeleton_ref)
        else:
            # Under a sharded checkpoint the job's model gives the architecture; the shards replace its weights.
            model = whole if whole is not None else ray.get(job.model_ref)
        # from_pretrained hands models over in eval mode; dropout must be on while training.
        model.train()
        model = parallelism.parallelize(model, args, ranks.device, param_dtype)
        if on_meta and not sharded:
            parallelism.load_from_rank0(model, whole)
        del whole
        optimizer = build_optimizer(model, args, ranks.device)
        scheduler = build_scheduler(optimizer, args, job.total_steps)
        fp16 = param_dtype == torch.float16
        scaler = parallelism.gradient_scaler(args.parallel_strategy == "fsdp", enabled=fp16)
        if directory is not None:
            if sharded:
                # The optimizer's shards were saved with the schedule (save_optimizer_and_scheduler).
                with_optimizer = saved_tensors[SCHEDULER_FILE] is not None
                load_sharded_state(directory, model, optimizer if with_optimizer else None)
            restore_optimizer(saved_tensors, model, optimizer, scheduler, scaler, state.global_step)
            restore_rng(saved_tensors, ranks)
    compile_stats = compile_model(model) if args.torch_compile else None
    resumed_from = state.global_step if checkpoint is not None else None
    return TrainingSetup(model, optimizer, scheduler, scaler, state, resumed_from, compile_stats)
