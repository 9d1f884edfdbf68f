"""`train_fn_per_worker`: the training loop each Ray Train worker runs, from dataset shard to reported checkpoint.

Every rank runs the same number of optimizer steps. Each step, the ranks agree (one tiny all-reduce on
a CPU process group, so no GPU sync) on whether any rank still has data and on the global number of
target tokens. A rank whose shard ran out takes part with an empty batch, so no example is dropped
to even the shards out and none is repeated. Losses are summed per token and divided by the global
count, so the gradient is the token-weighted mean over the whole global batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.collators import CollatorSpec, collate
from raylm.config import LanguageModelingArgs
from raylm.modeling import combine_loss, forward_loss_sums

TRAINER_STATE_FILE = "trainer_state.json"
MODEL_SUBDIR = "model"


@dataclass
class WorkerJob:
    """What the driver hands each worker (plain values and object refs only)."""

    args: dict
    objective: str
    collator: dict
    total_steps: int
    model_ref: object
    tokenizer_ref: object
    progress_queue: object = None

    @classmethod
    def from_dict(cls, values: dict) -> "WorkerJob":
        return cls(**values)


def train_fn_per_worker(config: dict) -> None:
    job = WorkerJob.from_dict(config)
    args = LanguageModelingArgs.from_dict(job.args)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Dropout differs per rank but is reproducible.
    torch.manual_seed(args.seed + rank)

    model = ray.train.torch.prepare_model(ray.get(job.model_ref))
    optimizer = build_optimizer(model, args, device)
    scheduler = build_scheduler(optimizer, args, job.total_steps)
    use_amp = device.type == "cuda" and (args.fp16 or args.bf16)
    amp_dtype = torch.bfloat16 if args.bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    control_group = _control_group(world_size)
    collator_spec = CollatorSpec(**job.collator)
    shard = ray.train.get_dataset_shard("train")

    global_step, epoch = 0, 0
    window = _Window()
    run_loss_sum, run_targets, run_examples = torch.zeros((), device=device), 0, 0
    started = time.perf_counter()
    while not _finished(args, global_step, epoch):
        micro_batches = _micro_batches(shard, collator_spec, args, epoch, device)
        dummy: Optional[dict] = None
        while not (args.max_steps > 0 and global_step >= args.max_steps):
            step_batches = [b for _, b in zip(range(args.gradient_accumulation_steps), micro_batches)]
            has_data, global_targets, global_inputs = _agree(control_group, world_size, step_batches)
            if not has_data:
                break
            run_examples += sum(len(b["labels"]) for b in step_batches)
            if not step_batches:
                # This rank's shard is exhausted; take part in the gradient all-reduce with zero loss.
                step_batches = [dummy or _empty_batch(collator_spec, device)]
            step_loss_sum = torch.zeros((), device=device)
            for index, batch in enumerate(step_batches):
                is_accumulating = index < len(step_batches) - 1
                sync_context = model.no_sync() if (world_size > 1 and is_accumulating) else contextlib.nullcontext()
                with sync_context, torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = combine_loss(forward_loss_sums(model, batch, job.objective), global_targets, global_inputs, args.discriminator_loss_weight)
                    # DDP averages gradients over ranks, so scale by world_size to get the global mean.
                    scaler.scale(loss * world_size).backward()
                step_loss_sum += loss.detach() * max(global_targets, 1)
            dummy = _as_empty(step_batches[-1])
            _optimizer_step(model, optimizer, scheduler, scaler, args)
            global_step += 1
            window.add(step_loss_sum, global_targets, global_inputs)
            run_loss_sum += step_loss_sum
            run_targets += global_targets
            if global_step % args.logging_steps == 0:
                _report_progress(job, window, global_step, epoch, scheduler, started, world_size, rank)
        epoch += 1

    mean_loss = _all_reduce_sum(run_loss_sum, world_size) / max(run_targets, 1)
    final = {"global_step": global_step, "epoch": epoch, "train_loss": mean_loss, "train_tokens": run_targets,
             "train_examples": int(_all_reduce_sum(torch.tensor(float(run_examples), device=device), world_size)),
             "train_seconds": time.perf_counter() - started}
    if window.steps:
        # The loop has already counted the epoch it finished in.
        _report_progress(job, window, global_step, max(epoch - 1, 0), scheduler, started, world_size, rank, report=False)
    tokenizer = ray.get(job.tokenizer_ref) if rank == 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _unwrap(model).save_pretrained(os.path.join(tmp, MODEL_SUBDIR))
            tokenizer.save_pretrained(os.path.join(tmp, MODEL_SUBDIR))
            with open(os.path.join(tmp, TRAINER_STATE_FILE), "w") as f:
                json.dump(final, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)


def _finished(args: LanguageModelingArgs, global_step: int, epoch: int) -> bool:
    if args.max_steps > 0:
        return global_step >= args.max_steps
    return epoch >= args.num_train_epochs


def _micro_batches(shard, spec: CollatorSpec, args: LanguageModelingArgs, epoch: int, device: torch.device) -> Iterator[dict]:
    pin = device.type == "cuda"
    batches = shard.iter_torch_batches(
        batch_size=args.train_batch_size,
        collate_fn=functools.partial(collate, spec=spec, stream=epoch, pin_memory=pin),
        prefetch_batches=args.prefetch_batches,
        # Deterministic given the (deterministic) shard order, so a restarted epoch replays exactly.
        local_shuffle_buffer_size=max(args.train_batch_size * 16, 256),
        local_shuffle_seed=args.seed * 1000 + epoch,
    )
    for batch in batches:
        yield _to_device(batch, device)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _empty_batch(spec: CollatorSpec, device: torch.device) -> dict:
    one = torch.tensor([[spec.pad_id]], device=device)
    return {"input_ids": one, "attention_mask": torch.ones_like(one), "labels": torch.full_like(one, -100), "n_targets": 0, "n_input_tokens": 0}


def _as_empty(batch: dict) -> dict:
    return {**batch, "labels": torch.full_like(batch["labels"], -100), "n_targets": 0, "n_input_tokens": 0}


def _control_group(world_size: int):
    if world_size == 1:
        return None
    # Step agreement is host-side bookkeeping: keep it on gloo so NCCL runs never sync on it.
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _agree(group, world_size: int, step_batches: list[dict]) -> tuple[bool, int, int]:
    """(any rank has data, global target tokens, global input tokens) for this optimizer step."""
    local = [1 if step_batches else 0, sum(b["n_targets"] for b in step_batches), sum(b["n_input_tokens"] for b in step_batches)]
    if world_size == 1:
        return bool(local[0]), local[1], local[2]
    counts = torch.tensor(local, dtype=torch.int64)
    dist.all_reduce(counts, group=group)
    return bool(counts[0]), int(counts[1]), int(counts[2])


def _all_reduce_sum(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def _optimizer_step(model, optimizer, scheduler, scaler, args: LanguageModelingArgs) -> None:
    if args.max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class _Window:
    """Loss and token counts since the last report; the loss stays on the device until then."""

    def __init__(self):
        self.loss_sum, self.targets, self.inputs, self.steps, self.started = None, 0, 0, 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, targets: int, inputs: int) -> None:
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum
        self.targets += targets
        self.inputs += inputs
        self.steps += 1

    def reset(self) -> None:
        self.__init__()


def _report_progress(job: WorkerJob, window: _Window, global_step: int, epoch: int, scheduler, started: float, world_size: int, rank: int, report: bool = True) -> None:
    # The only host sync of the loss: once per logging window.
    loss = _all_reduce_sum(window.loss_sum, world_size) / max(window.targets, 1)
    seconds = time.perf_counter() - window.started
    metrics = {
        "global_step": global_step,
        "epoch": epoch,
        "loss": loss,
        "learning_rate": scheduler.get_last_lr()[0],
        "tokens_per_second": window.inputs / max(seconds, 1e-9),
        "elapsed_seconds": time.perf_counter() - started,
    }
    if rank == 0 and job.progress_queue is not None:
        job.progress_queue.put_nowait(metrics)
    if report:
        ray.train.report(metrics)
    window.reset()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def build_optimizer(model: torch.nn.Module, args: LanguageModelingArgs, device: torch.device) -> torch.optim.Optimizer:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_")
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if any(n in name for n in no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if args.optimizer == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=args.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=tuple(args.adam_betas), eps=args.adam_epsilon, fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, args: LanguageModelingArgs, total_steps: int):
    import transformers

    warmup = args.warmup_steps_for(total_steps)
    name = args.scheduler
    if name == "constant_schedule":
        return transformers.get_constant_schedule(optimizer)
    if name == "constant_schedule_with_warmup":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "cosine_schedule_with_warmup":
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total_steps, num_cycles=args.cosine_schedule_num_cycles)
    if name == "cosine_with_hard_restarts_schedule_with_warmup":
        return transformers.get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total_steps, num_cycles=int(args.cosine_schedule_num_cycles))
    if name == "polynomial_decay_schedule_with_warmup":
        return transformers.get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, lr_end=args.polynomial_decay_schedule_lr_end, power=args.polynomial_decay_schedule_power
        )
    return transformers.get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def steps_per_epoch(num_examples: int, args: LanguageModelingArgs) -> int:
    """Optimizer steps in one epoch: the busiest rank holds about ceil(N / workers) examples."""
    per_rank = math.ceil(num_examples / args.num_workers)
    return max(1, math.ceil(math.ceil(per_rank / args.train_batch_size) / args.gradient_accumulation_steps))
