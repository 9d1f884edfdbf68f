"""`train_fn_per_worker`: the training loop each Ray Train worker runs, from stored examples to reported checkpoint.

Each optimizer step trains on the next global batch of the epoch's order of the stored examples
(epoch_data.py), split evenly over the ranks; every rank runs the same number of steps. Each step,
the ranks agree (one tiny all-reduce on a CPU process group, so no GPU sync) on the global numbers
of target and input tokens. A rank with no part in the epoch's last, short step takes part with an
empty batch, so no example is dropped to even the ranks out and none is repeated. Losses are sums
divided by the global counts, so the gradient is the token-weighted mean over the whole global batch.

Resuming is exact: a checkpoint records the examples of the epoch consumed so far, a position that
does not depend on the worker count, and the restarted loop starts reading there. Optimizer,
scheduler, scaler and every rank's RNG state come back too, so the steps after a resume repeat the
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import resource
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from raylm.config import LanguageModelingArgs
from raylm.data.collators import EVAL_STREAM, CollatorSpec, collate
from raylm.data.epoch_data import (
    Prefetched,
    RankExamples,
    epoch_order,
    most_part_batches,
    rank_part,
    rank_range,
    rank_steps,
)
from raylm.data.example_store import BlockReader, StoredExamples
from raylm.models.flops import model_training_flops_per_token, peak_flops_per_second
from raylm.models.modeling import (
    combine_loss,
    forward_loss_sums,
    install_remote_code,
    load_trained,
    resolve_block_size,
    save_trained,
)
from raylm.training import in_process
from raylm.training.checkpoints import (
    CHECKPOINT_SCORE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    TrainerState,
    checkpoint_label,
    checkpoint_score,
    local_copy,
    read_tensors,
    read_trainer_state,
    write_training_state,
)
from raylm.training.evaluation import batch_eval_sums, summarize

# Checkpoint metadata: the WorkerJob.run_id of the train_model call that wrote it.
RUN_ID_KEY = "raylm_run_id"
# fp16 only. The scaler halves its scale at each overflow (from 65536): 24 overflows in a row leave it
# below 2**-8, where no gradient survives; a NaN loss that many steps running will not recover either.
FP16_NONFINITE_STEPS_TOLERATED = 24
FP16_MIN_LOSS_SCALE = 2.0**-8
HOLD_SECONDS = 120


@dataclass
class Diagnostics:
    """Test hooks: a per-step trace of consumed examples and losses, and injected worker deaths."""

    trace_dir: Optional[str] = None
    kill_rank: Optional[int] = None
    kill_at_step: Optional[int] = None  # SIGKILL after this optimizer step...
    kill_while_saving: bool = False  # ...or in the middle of writing this step's checkpoint
    raise_at_step: Optional[int] = None  # a bug in the loop: every rank raises after this step
    holds: Optional[list] = None  # [step, release file]: every rank waits after that step until the file exists

    def trace(self, rank: int, record: dict) -> None:
        if self.trace_dir:
            with open(os.path.join(self.trace_dir, f"rank{rank}.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def maybe_raise(self, step: int) -> None:
        if step == self.raise_at_step:
            # Two lines, as Ray's own errors often are: the first announces, the second explains.
            raise RuntimeError(f"injected failure after step {step}\nbecause the test asked for it")

    def maybe_hold(self, step: int) -> None:
        """Give a test time to act on the cluster (remove or add a node) at known points of the run."""
        for hold_step, release in self.holds or []:
            if step == hold_step:
                deadline = time.monotonic() + HOLD_SECONDS
                while not os.path.exists(release) and time.monotonic() < deadline:
                    time.sleep(0.2)

    def maybe_kill(self, rank: int, step: int, saving: bool) -> None:
        if rank != self.kill_rank or step != self.kill_at_step or saving != self.kill_while_saving:
            return
        marker = os.path.join(self.trace_dir, f"killed-rank{rank}-step{step}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class WorkerJob:
    """What the driver hands each worker (plain values and object refs only)."""

    args: dict
    objective: str
    collator: dict
    total_steps: int
    model_ref: object
    tokenizer_ref: object
    train_examples: list  # the fields of each source's example_store.StoredExamples (one, unless a mixture)
    mixture_weights: Optional[list] = None  # each source's weight, for a mixture
    progress_queue: object = None
    eval_examples: Optional[dict] = None  # the fields of the evaluation set's example_store.StoredExamples
    resume_from: Optional[str] = None  # a checkpoint folder or URI every worker can read
    run_id: str = ""  # names this train_model call's checkpoints (a Ray run of the same name may hold older ones)
    remote_code: Optional[dict] = None  # modeling.remote_code_sources of a trust_remote_code model
    diagnostics: Optional[dict] = None
    torch_threads: int = 1  # the CPUs each worker reserves (launcher.worker_resources)


class _Run:
    """One worker's training run: the loop state plus the helpers that read and write it."""

    def __init__(self, job: WorkerJob):
        self.job = job
        self.args = LanguageModelingArgs.from_dict(job.args)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = worker_device()
        if (
            self.device.type == "cpu"
            and not in_process.in_driver()
            and ray.get_gpu_ids()
            and job.progress_queue is not None
        ):
            job.progress_queue.put_nowait({"kind": "notice", "message": CPU_FALLBACK_NOTICE})
        # torch's threads follow the CPUs reserved for this worker, whatever OMP_NUM_THREADS the
        # environment carries.
        torch.set_num_threads(job.torch_threads)
        self.diagnostics = Diagnostics(**(job.diagnostics or {}))
        self.control_group = _control_group(self.world_size)
        self.collator_spec = CollatorSpec(**job.collator)
        self.eval_reader = BlockReader(StoredExamples(**job.eval_examples)) if job.eval_examples else None
        # Dropout differs per rank but is reproducible.
        torch.manual_seed(self.args.seed + self.rank)

        install_remote_code(job.remote_code)
        model = ray.get(job.model_ref)
        self.state = TrainerState(objective=job.objective, world_size=self.world_size, total_steps=job.total_steps)
        restored: dict = {}
        checkpoint = ray.train.get_checkpoint()
        if job.resume_from and (checkpoint is None or (checkpoint.get_metadata() or {}).get(RUN_ID_KEY) != job.run_id):
            # A run continuing a checkpoint folder (LanguageModelingModel(type, "outputs/checkpoint-N")): that
            # checkpoint, unless this very run has checkpointed since (a restart after a worker died).
            checkpoint = ray.train.Checkpoint(job.resume_from)
        if checkpoint is not None:
            with local_copy(checkpoint) as directory:
                model = load_trained(job.objective, directory, self.args.trust_remote_code)
                self.state = read_trainer_state(directory)
                restored = {
                    name: read_tensors(directory, name)
                    for name in (OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE, RNG_FILE)
                }
        # from_pretrained hands models over in eval mode; dropout must be on while training.
        model.train()
        self.use_amp = self.device.type == "cuda" and (self.args.fp16 or self.args.bf16)
        self.amp_dtype = torch.bfloat16 if self.args.bf16 else torch.float16
        self.fsdp = self.args.parallel_strategy == "fsdp"
        if self.fsdp:
            self.model = shard_model(
                model, self.device, self.amp_dtype if self.use_amp else None, self.args.fsdp_cpu_offload
            )
        else:
            self.model = ray.train.torch.prepare_model(model, move_to_device=self.device)
        self.compile_stats = _CompileStats() if self.args.torch_compile else None
        if self.compile_stats is not None:
            compile_model(self.model)
        self.optimizer = build_optimizer(self.model, self.args, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.args, job.total_steps)
        scales_fp16 = self.use_amp and self.amp_dtype == torch.float16
        # Each FSDP rank sees only its shard of the gradients: ShardedGradScaler all-reduces "found an
        # overflow", so every rank skips the same steps (torch's GradScaler would let the shards part ways).
        self.scaler = (
            ShardedGradScaler("cuda", enabled=scales_fp16)
            if self.fsdp
            else torch.amp.GradScaler("cuda", enabled=scales_fp16)
        )
        # At block_size tokens per example: an upper bound on the attention term for shorter examples.
        config = model.discriminator.config if hasattr(model, "discriminator") else model.config
        self.flops_per_token = model_training_flops_per_token(model, resolve_block_size(self.args, config))
        self.peak_flops_per_second = peak_flops_per_second(
            self.device, self.amp_dtype if self.use_amp else torch.float32
        )
        if checkpoint is not None:
            self._restore(restored)
        self.resumed_from = self.state.global_step if checkpoint is not None else None
        self.param_memory_mb = parameter_bytes(self.model) / 2**20
        self.diagnostics.trace(
            self.rank,
            {
                "event": "start",
                "resumed_from": self.resumed_from,
                "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "world_size": self.world_size,
                "torch_threads": torch.get_num_threads(),
                "param_memory_mb": self.param_memory_mb,
                "parallel_strategy": self.args.parallel_strategy,
            },
        )

        self.window = _Window()
        self.unannounced: list[
            tuple
        ] = []  # rank 0: (label, step, is_best, metrics) of checkpoints reported, not yet announced
        self.pending_loss = torch.zeros((), device=self.device)  # this rank's share, not yet added to state
        self.pending_examples = 0
        self.dummy: Optional[dict] = None  # an empty batch shaped like a real one, for a step without data
        # fp16: the gradient scaler skips a step whose loss or gradients overflow; only a run of them is divergence.
        self.nonfinite = NonfiniteLosses(
            self.device, tolerated_in_a_row=FP16_NONFINITE_STEPS_TOLERATED if self.scaler.is_enabled() else 0
        )
        self.session_started = time.perf_counter()
        self.last_checkpoint_step = self.state.global_step if checkpoint is not None else -1
        self.diverged_at: Optional[int] = None
        self.last_reported_loss = float("nan")
        # The epoch of the latest step, counted from 1 as the progress line and training_log.jsonl show it
        # (state.epoch counts completed epochs, so it is already one up when an end-of-epoch evaluation runs).
        self.step_epoch = max(self.state.epoch, 1)

    def _restore(self, restored: dict) -> None:
        if restored[OPTIMIZER_FILE] is not None:
            load_optimizer_state(self.model, self.optimizer, restored[OPTIMIZER_FILE])
            self.scheduler.load_state_dict(restored[SCHEDULER_FILE])
        else:
            # The checkpoint has no optimizer state: start it fresh but keep the schedule's position.
            for _ in range(self.state.global_step):
                self.scheduler.step()
        if restored[SCALER_FILE] is not None:
            self.scaler.load_state_dict(restored[SCALER_FILE])
        rng_states = restored[RNG_FILE]
        if rng_states is not None and len(rng_states) == self.world_size:
            torch.set_rng_state(rng_states[self.rank]["cpu"])
            if self.device.type == "cuda" and rng_states[self.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(rng_states[self.rank]["cuda"], self.device)

    # --- the loop ------------------------------------------------------------------------------------
    def train(self) -> None:
        args, state = self.args, self.state
        stores = [StoredExamples(**fields) for fields in self.job.train_examples]
        readers = [BlockReader(store) for store in stores]
        while not self._finished() and self.diverged_at is None and not state.stopped_early:
            order = epoch_order(
                [store.block_rows() for store in stores], self.job.mixture_weights, args.seed, state.epoch
            )
            steps = self._steps(readers, order)
            epoch_complete = False
            try:
                while True:
                    if args.max_steps > 0 and state.global_step >= args.max_steps:
                        break
                    if state.epoch_examples >= order.num_examples:
                        epoch_complete = True
                        break
                    waiting_since = time.perf_counter()
                    step_batches = [_to_device(batch, self.device) for batch in next(steps)]
                    self.window.data_wait_seconds += time.perf_counter() - waiting_since
                    global_targets, global_inputs = _agree(self.control_group, self.world_size, step_batches)
                    # No part for this rank in the epoch's last step: take part in the gradient all-reduce with zero loss.
                    # FSDP all-gathers each block's weights in every forward and backward, so there each rank runs
                    # as many micro-batches as rank 0, whose part of a step is the largest (epoch_data.rank_range),
                    # the shorter parts filled up with empty ones.
                    needed = 1
                    if self.fsdp:
                        rank0_start, rank0_stop = rank_range(
                            state.epoch_examples, order.num_examples, args.global_batch_size, 0, self.world_size
                        )
                        needed = -(-(rank0_stop - rank0_start) // args.train_batch_size)
                    state.epoch_examples += min(args.global_batch_size, order.num_examples - state.epoch_examples)
                    self.pending_examples += sum(len(b["labels"]) for b in step_batches)
                    step_batches += [self.dummy or _empty_batch(self.collator_spec, self.device)] * (
                        needed - len(step_batches)
                    )
                    with self.compile_stats.step() if self.compile_stats is not None else contextlib.nullcontext():
                        step_loss = self._optimizer_step(step_batches, global_targets, global_inputs)
                    self.window.add(step_loss, global_inputs)
                    self.dummy = _as_empty(step_batches[-1])
                    state.global_step += 1
                    state.train_tokens += global_targets
                    state.train_input_tokens += global_inputs
                    self.step_epoch = state.epoch + 1
                    if self.diagnostics.trace_dir:
                        # float(step_loss) is a host sync: only when tracing.
                        self.diagnostics.trace(
                            self.rank,
                            {
                                "step": state.global_step,
                                "epoch": state.epoch,
                                "example_ids": [int(i) for b in step_batches for i in b["example_id"]],
                                "loss": float(step_loss),
                                "lr": self.scheduler.get_last_lr()[0],
                                "steps_prepared": steps.prepared,
                                "blocks_read": sum(r.blocks_read for r in readers),
                                "world_size": self.world_size,
                                "resumed_from": self.resumed_from,
                            },
                        )
                    self.diagnostics.maybe_kill(self.rank, state.global_step, saving=False)
                    self.diagnostics.maybe_raise(state.global_step)
                    self.diagnostics.maybe_hold(state.global_step)
                    if self._after_step():
                        break
            finally:
                steps.close()
            if epoch_complete:
                state.epoch += 1
                state.epoch_examples = 0
                self._after_epoch()
        # The last steps since the previous logging_steps report: without this the log and the curve stop short of the end.
        # Every rank took as many steps, so all of them make this report (a barrier) or none does.
        if self.diverged_at is None and self.window.steps and self._check_finite():
            self._report_progress()
        if self.diverged_at is None and self.last_checkpoint_step != state.global_step:
            self._checkpoint(checkpoint_label(state.global_step), {})
        if self.rank == 0:
            self._announce_registered()

    def _finished(self) -> bool:
        if self.args.max_steps > 0:
            return self.state.global_step >= self.args.max_steps
        return self.state.epoch >= self.args.num_train_epochs

    def _optimizer_step(self, step_batches: list[dict], global_targets: int, global_inputs: int) -> torch.Tensor:
        args, model = self.args, self.model
        step_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(step_batches):
            is_accumulating = index < len(step_batches) - 1
            with (
                _gradient_sync(model, self.world_size, is_accumulating),
                torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp),
            ):
                sums = forward_loss_sums(model, batch, self.job.objective)
                loss = combine_loss(sums, global_targets, global_inputs, args.discriminator_loss_weight)
                # DDP (and FSDP's reduce-scatter) average gradients over ranks, so scale by world_size to get the global mean.
                self.scaler.scale(loss * self.world_size).backward()
            step_loss += loss.detach()
        if args.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        else:
            # Only to tell a NaN/inf gradient (which would turn every weight NaN) from a finite one: one
            # fused pass over the gradients (still scaled under fp16, which overflows the same way), no host sync.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if isinstance(grad_norm, DTensor):
            # FSDP: each rank holds the norm of its shards; the whole gradient's norm is one all-reduce away.
            grad_norm = grad_norm.full_tensor()
        self.nonfinite.record(self.state.global_step + 1, step_loss, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_loss += step_loss
        return step_loss

    def _after_step(self) -> bool:
        """Logging, evaluation and checkpoints due after this optimizer step; True to stop the epoch."""
        args, state = self.args, self.state
        step = state.global_step
        if step % args.logging_steps == 0 and self._check_finite():
            self._report_progress()
        if self.diverged_at is not None:
            return True
        metrics: dict = {}
        if (
            self.eval_reader is not None
            and args.evaluate_during_training
            and args.evaluate_during_training_steps > 0
            and step % args.evaluate_during_training_steps == 0
        ):
            metrics = self._evaluate(counts_for_early_stopping=True)
        wants_checkpoint = (args.save_steps > 0 and step % args.save_steps == 0) or (
            metrics and (args.save_eval_checkpoints or metrics.get("is_best"))
        )
        if wants_checkpoint and self._check_finite():
            self._checkpoint(checkpoint_label(step), metrics)
        elif metrics:
            ray.train.report(_plain(metrics))
        return self.diverged_at is not None or state.stopped_early

    def _after_epoch(self) -> None:
        args, state = self.args, self.state
        metrics: dict = {}
        if self.eval_reader is not None and args.evaluate_during_training and args.evaluate_each_epoch:
            metrics = self._evaluate(counts_for_early_stopping=args.early_stopping_consider_epochs)
        if (args.save_model_every_epoch or metrics.get("is_best")) and self._check_finite():
            self._checkpoint(checkpoint_label(state.global_step, state.epoch), metrics)
        elif metrics:
            ray.train.report(_plain(metrics))

    # --- data ------------------------------------------------------------------------------------------
    def _steps(self, readers: list[BlockReader], order) -> Prefetched:
        """This rank's collated micro-batches for each remaining step of the epoch, prepared `prefetch_batches` steps ahead."""
        args = self.args
        items = rank_steps(
            RankExamples(readers, order),
            self.state.epoch_examples,
            args.global_batch_size,
            args.train_batch_size,
            self.rank,
            self.world_size,
        )
        prepare = functools.partial(
            _collate_step, spec=self.collator_spec, stream=self.state.epoch, pin_memory=self.device.type == "cuda"
        )
        return Prefetched(items, prepare, ahead=args.prefetch_batches)

    # --- evaluation and early stopping ---------------------------------------------------------------
    def _evaluate(self, counts_for_early_stopping: bool) -> dict:
        args, state = self.args, self.state
        module = _unwrap(self.model)
        module.eval()
        totals: dict[str, float] = {}
        batches = (
            collate(batch, self.collator_spec, EVAL_STREAM)
            for batch in rank_part(self.eval_reader, self.rank, self.world_size, args.eval_batch_size)
        )
        if self.fsdp and self.world_size > 1:
            # Each forward of a sharded model all-gathers weights with the other ranks, and the parts differ by
            # one example at most: every rank runs as many batches as the largest part, the shorter padded with empty ones.
            count = most_part_batches(self.eval_reader.store.num_examples, self.world_size, args.eval_batch_size)
            batches = itertools.islice(
                itertools.chain(batches, itertools.repeat(_empty_batch(self.collator_spec, torch.device("cpu")))), count
            )
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            for batch in batches:
                for key, value in batch_eval_sums(module, _to_device(batch, self.device), self.job.objective).items():
                    totals[key] = totals.get(key, 0.0) + value
        module.train()
        totals = _sum_dicts(self.control_group, self.world_size, totals)
        metrics = summarize(totals, self.job.objective, args.discriminator_loss_weight)
        metrics = {
            "global_step": state.global_step,
            "epoch": self.step_epoch,
            "train_loss": self._window_loss_peek(),
            **metrics,
        }

        value = metrics.get(args.early_stopping_metric)
        if value is None:
            raise KeyError(
                f"early_stopping_metric {args.early_stopping_metric!r} is not among the evaluation metrics {sorted(metrics)}"
            )
        improved = state.best_metric is None or (
            value < state.best_metric - args.early_stopping_delta
            if args.early_stopping_metric_minimize
            else value > state.best_metric + args.early_stopping_delta
        )
        if improved:
            state.best_metric, state.best_step = float(value), state.global_step
            state.early_stopping_counter = 0
            metrics["is_best"] = True
        elif counts_for_early_stopping:
            state.early_stopping_counter += 1
            if args.use_early_stopping and state.early_stopping_counter >= args.early_stopping_patience:
                state.stopped_early = True
        if self.rank == 0 and self.job.progress_queue is not None:
            self.job.progress_queue.put_nowait({"kind": "eval", **_plain(metrics)})
        return metrics

    # --- reports and checkpoints ------------------------------------------------------------------
    def _check_finite(self) -> bool:
        """Whether every rank's losses stayed finite; else remember the first bad step (all ranks agree)."""
        if self.diverged_at is not None:
            return False
        first_bad = self.nonfinite.first_diverged_step.clone()
        if self.scaler.is_enabled() and self.scaler.get_scale() < FP16_MIN_LOSS_SCALE:
            # Overflowing gradients at every step: the scaler halved its scale to nothing, and the steps it
            # takes now apply gradients scaled to zero.
            first_bad = torch.where(first_bad < 0, self.state.global_step, first_bad)
        if self.world_size > 1:
            first_bad = torch.where(first_bad < 0, torch.iinfo(torch.int64).max, first_bad)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            first_bad = torch.where(first_bad == torch.iinfo(torch.int64).max, -1, first_bad)
        step = int(first_bad)
        if step < 0:
            return True
        self.diverged_at = step
        if self.rank == 0 and self.job.progress_queue is not None:
            self.job.progress_queue.put_nowait({"kind": "diverged", "global_step": step})
        return False

    def _sync_state(self) -> None:
        """Fold this session's device-side running sums into the (global) trainer state."""
        self.state.train_loss_sum += _all_reduce_sum(self.pending_loss, self.world_size)
        self.pending_loss.zero_()
        self.state.train_examples += int(
            _all_reduce_sum(torch.tensor(float(self.pending_examples), device=self.device), self.world_size)
        )
        self.pending_examples = 0
        now = time.perf_counter()
        self.state.train_seconds += now - self.session_started
        self.session_started = now

    def _checkpoint(self, label: str, metrics: dict) -> None:
        stall_started = time.perf_counter()
        state = self.state
        self._sync_state()
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        gathered = _gather(self.control_group, self.world_size, rng)
        state.label = label
        report = {**_plain(metrics), **state.summary(), "checkpoint_label": label}
        if self.args.keep_best_checkpoints:
            report[CHECKPOINT_SCORE] = checkpoint_score(self.args, metrics)
        upload_async = self.args.checkpoint_upload_mode == "async"
        if self.rank == 0 and upload_async:
            # The previous checkpoint's upload has had a whole save interval: announce it (waiting for
            # the rest of its upload only if it is slower than training).
            self._announce_registered()
        keep_optimizer = self.args.save_optimizer_and_scheduler
        model_state = optimizer_state = None
        if self.fsdp:
            # Collectives: every rank takes part, rank 0 receives the whole (unsharded) tensors, on its CPU.
            model_state = full_model_state(self.model)
            if keep_optimizer:
                optimizer_state = get_optimizer_state_dict(
                    self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                )
        folder, checkpoint = None, None
        if self.rank == 0:
            folder = tempfile.mkdtemp(prefix="raylm-checkpoint-")
            save_trained(_unwrap(self.model), ray.get(self.job.tokenizer_ref), folder, model_state)
            self.args.save(folder)
            self.diagnostics.maybe_kill(self.rank, state.global_step, saving=True)
            write_training_state(
                folder,
                state,
                self.optimizer if keep_optimizer else None,
                self.scheduler if keep_optimizer else None,
                self.scaler,
                gathered,
                optimizer_state=optimizer_state,
            )
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            checkpoint.set_metadata({RUN_ID_KEY: self.job.run_id})
            self.unannounced.append((label, state.global_step, bool(metrics.get("is_best")), _plain(metrics)))
        try:
            # ASYNC: Ray uploads the folder on a thread of its own, registers it when done and deletes it.
            ray.train.report(
                report,
                checkpoint=checkpoint,
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload_async else CheckpointUploadMode.SYNC,
            )
        finally:
            if folder is not None and not upload_async:
                shutil.rmtree(folder, ignore_errors=True)
        self.last_checkpoint_step = state.global_step
        if self.rank == 0 and not upload_async:
            self._announce_registered()
        self.window.checkpoint_seconds += time.perf_counter() - stall_started

    def _announce_registered(self) -> None:
        """Tell the driver (which mirrors them into output_dir) of the checkpoints Ray has registered since the last call.

        Only what Ray has registered is announced: that is what a restart would resume from.
        get_all_reported_checkpoints waits for the reports still being uploaded.
        """
        if not self.unannounced:
            return
        registered = ray.train.get_all_reported_checkpoints()
        # Ray lists its checkpoints by score under keep_best_checkpoints, by age otherwise.
        kept_labels = [r.metrics.get("checkpoint_label") for r in registered]
        for label, step, is_best, metrics in self.unannounced:
            this_one = next(
                (r.checkpoint for r in reversed(registered) if r.metrics.get("checkpoint_label") == label), None
            )
            if this_one is not None and self.job.progress_queue is not None:
                self.job.progress_queue.put_nowait(
                    {
                        "kind": "checkpoint",
                        "label": label,
                        "global_step": step,
                        "is_best": is_best,
                        "path": this_one.path,
                        "filesystem": this_one.filesystem,
                        "metrics": metrics,
                        "kept_labels": kept_labels,
                    }
                )
        self.unannounced = []

    def _window_loss_peek(self) -> float:
        """The training loss since the last report (the last reported one right after a report)."""
        if not self.window.steps:
            return self.last_reported_loss
        return _all_reduce_sum(self.window.loss_sum, self.world_size) / self.window.steps

    def _report_progress(self) -> None:
        # The only host sync of the loss: once per logging window.
        window, state = self.window, self.state
        loss = _all_reduce_sum(window.loss_sum, self.world_size) / max(window.steps, 1)
        self.last_reported_loss = loss
        seconds = max(time.perf_counter() - window.started, 1e-9)
        # Non-pad input tokens of the whole global batch.
        tokens_per_second = window.inputs / seconds
        metrics = {
            "global_step": state.global_step,
            "epoch": self.step_epoch,
            "loss": loss,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_second": tokens_per_second,
            # This rank's time blocked on its data iterator, as a share of the window's wall time.
            "data_wait_fraction": window.data_wait_seconds / seconds,
            "elapsed_seconds": state.train_seconds + time.perf_counter() - self.session_started,
            "num_workers": self.world_size,  # changes over an elastic run
            # Seconds this window's checkpoints held training up (writing, and uploading unless async).
            "checkpoint_stall_seconds": window.checkpoint_seconds,
            "param_memory_mb": self.param_memory_mb,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.compile_stats is not None:
            metrics.update(self.compile_stats.metrics())
        if self.flops_per_token is not None:
            metrics["model_flops_per_second"] = tokens_per_second * self.flops_per_token
            if self.peak_flops_per_second is not None:
                metrics["mfu"] = metrics["model_flops_per_second"] / (self.world_size * self.peak_flops_per_second)
        # The next window starts now, so it pays for this report: ray.train.report blocks until Ray's
        # controller has taken the previous report, which it polls for every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s, 0.5 s on raylm's local Ray), so
        # logging windows shorter than that stall the loop.
        window.reset()
        if self.rank == 0 and self.job.progress_queue is not None:
            self.job.progress_queue.put_nowait({"kind": "train", **metrics})
        ray.train.report(metrics)


class NonfiniteLosses:
    """Where the loss or the gradient went NaN/inf for good, tracked on the device (read at reports only: no host sync per step).

    A step is non-finite when its loss or its gradient norm is. It diverges when `tolerated_in_a_row`
    steps before it were non-finite too; the run of them is reported from its first step.

    Which checkpoint is good then: step k computes its loss and gradients from the weights that
    checkpoint k-1 holds, then updates them. So checkpoint j is good when step j+1 was finite, and if
    k is the first non-finite step, checkpoint k-1 holds the weights that produced the NaN (weights of
    1e30 are finite but overflow the next forward pass), and the last good one is the latest at a step
    <= k-2 (api._TrainingEvents.last_good_checkpoint). Under fp16 the scaler skips the steps whose
    gradients overflow, leaving the weights as they were before the run, so the same rule holds with k
    the run's first step.
    """

    def __init__(self, device: torch.device, tolerated_in_a_row: int):
        self.tolerated_in_a_row = tolerated_in_a_row
        self.run_length = torch.zeros((), dtype=torch.int64, device=device)
        self.run_start = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_diverged_step = torch.full((), -1, dtype=torch.int64, device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.run_length = torch.where(bad, self.run_length + 1, 0)
        self.run_start = torch.where(bad, torch.where(self.run_start < 0, step, self.run_start), -1)
        diverged = (self.run_length > self.tolerated_in_a_row) & (self.first_diverged_step < 0)
        self.first_diverged_step = torch.where(diverged, self.run_start, self.first_diverged_step)


CPU_FALLBACK_NOTICE = "Ray gave the workers GPUs, but torch sees no CUDA device on their nodes: training on CPU."


def worker_device() -> torch.device:
    """Ray's device for this worker; the CPU when Ray gave it a GPU that torch cannot use.

    A GPU in Ray is a resource count, which a node can offer without a device torch can use (a
    CPU-only torch build, a broken driver, logical GPUs on a test cluster); Ray Train would still
    hand out cuda:0. The run then trains on the CPU (launcher.DeviceAwareTorchConfig keeps its
    process group off NCCL) and the driver says so. A run in the driver (in_process.py) is a CPU run,
    whatever devices the driver's machine has.
    """
    if in_process.in_driver():
        return torch.device("cpu")
    device = ray.train.torch.get_device()
    return device if device.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")


def train_fn_per_worker(config: dict) -> None:
    run = _Run(WorkerJob(**config))
    run.train()


def _collate_step(step: list[dict], spec: CollatorSpec, stream: int, pin_memory: bool) -> list[dict]:
    return [collate(batch, spec, stream, pin_memory) for batch in step]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _empty_batch(spec: CollatorSpec, device: torch.device) -> dict:
    one = torch.tensor([[spec.pad_id]], device=device)
    return {
        "input_ids": one,
        "attention_mask": torch.ones_like(one),
        "labels": torch.full_like(one, -100),
        "example_id": torch.empty(0, dtype=torch.int64),
        "target_positions": torch.empty(0, dtype=torch.int64, device=device),
        "n_targets": 0,
        "n_input_tokens": 0,
    }


def _as_empty(batch: dict) -> dict:
    return {
        **batch,
        "labels": torch.full_like(batch["labels"], -100),
        "example_id": torch.empty(0, dtype=torch.int64),
        "target_positions": torch.empty(0, dtype=torch.int64, device=batch["labels"].device),
        "n_targets": 0,
        "n_input_tokens": 0,
    }


def _control_group(world_size: int):
    if world_size == 1:
        return None
    # Step agreement is host-side bookkeeping: keep it on gloo so NCCL runs never sync on it.
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _agree(group, world_size: int, step_batches: list[dict]) -> tuple[int, int]:
    """(global target tokens, global input tokens) of this optimizer step."""
    local = [sum(b["n_targets"] for b in step_batches), sum(b["n_input_tokens"] for b in step_batches)]
    if world_size == 1:
        return local[0], local[1]
    counts = torch.tensor(local, dtype=torch.int64)
    dist.all_reduce(counts, group=group)
    return int(counts[0]), int(counts[1])


def _gather(group, world_size: int, value: object) -> list:
    if world_size == 1:
        return [value]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _sum_dicts(group, world_size: int, totals: dict[str, float]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for part in _gather(group, world_size, totals):
        for key, value in part.items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


def _all_reduce_sum(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def _plain(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


class _Window:
    """Loss since the last report (it stays on the device until then), tokens, and seconds waited for data."""

    def __init__(self):
        self.loss_sum, self.inputs, self.steps, self.started = None, 0, 0, time.perf_counter()
        self.data_wait_seconds = self.checkpoint_seconds = 0.0

    def add(self, step_loss: torch.Tensor, inputs: int) -> None:
        self.loss_sum = step_loss if self.loss_sum is None else self.loss_sum + step_loss
        self.inputs += inputs
        self.steps += 1

    def reset(self) -> None:
        self.__init__()


class _CompileStats:
    """torch_compile: wall seconds of the steps during which dynamo compiled a graph, and the graphs compiled after the first step.

    A step that compiles is almost all compile (host work), so its wall time stands for the compile
    cost. dynamo's counters are per process; these count from the loop's start, so the graphs the process
    compiled before (an earlier run in the driver, in_process.py) are not this run's.
    """

    def __init__(self):
        self.compile_seconds = 0.0
        self.graphs_before = self._graphs()
        self.graphs_after_first_step: Optional[int] = None

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    @contextlib.contextmanager
    def step(self):
        graphs, started = self._graphs(), time.perf_counter()
        yield
        if self._graphs() > graphs:
            self.compile_seconds += time.perf_counter() - started
        if self.graphs_after_first_step is None:
            self.graphs_after_first_step = self._graphs()

    def metrics(self) -> dict:
        graphs = self._graphs()
        return {
            "compile_seconds": self.compile_seconds,
            "compiled_graphs": graphs - self.graphs_before,
            # Graphs compiled after this session's first step: new shapes, or evaluation's eval/inference mode.
            "recompilations": graphs
            - (self.graphs_after_first_step if self.graphs_after_first_step is not None else graphs),
        }


def compile_model(model: torch.nn.Module) -> None:
    """torch_compile: compile the (maybe DDP-wrapped) model in place.

    In place, on the module DDP wraps (not torch.compile(ddp)): its state_dict keeps plain names for the
    checkpoint (no `_orig_mod.`), evaluation (which runs the unwrapped module) uses the same compiled code,
    and the helpers that look through DDP's `.module` see the model as before. The cost: under DDP the
    gradients' all-reduce waits for the whole compiled backward instead of overlapping it bucket by bucket.
    dynamic=True: the last step of an epoch has a shorter batch, and static shapes would recompile for it.
    """
    import torch._dynamo

    # An MLM step's masked positions reach the model through the output layer's pre-hook closure
    # (modeling._rows_selected), which dynamo counts as a module property and, by default, keeps static:
    # their count, new each batch, recompiled every step (seen: 30 -> 41 -> 37 targets, one graph each)
    # until dynamo's cache limit sent the model back to eager.
    torch._dynamo.config.force_nn_module_property_static_shapes = False
    _unwrap(model).compile(dynamic=True)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # FSDP2 shards the model in place: it has no wrapper to look through.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _gradient_sync(model: torch.nn.Module, world_size: int, is_accumulating: bool):
    """The context of one micro-batch's backward: no gradient reduction while accumulating (the last micro-batch reduces the sum)."""
    if isinstance(model, FSDPModule):
        # FSDP keeps the accumulating gradients unsharded (whole-model size) until the last micro-batch reduce-scatters them.
        model.set_requires_gradient_sync(not is_accumulating)
        return contextlib.nullcontext()
    return model.no_sync() if world_size > 1 and is_accumulating else contextlib.nullcontext()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers of a model (each member of a ModuleList of one class: GPT-2's transformer.h, BERT's and
    both ELECTRA towers' encoder.layer), less any that holds a parameter also used outside it.

    transformers' `_no_split_modules` would name them, but BERT and ELECTRA leave it None. A block
    sharing a parameter with the rest of the model must not become an FSDP unit of its own: the
    shared tensor would then belong to two units.
    """
    owners: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    blocks = []
    for list_name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len({type(child) for child in module}) != 1:
            continue
        for index, block in enumerate(module):
            prefix = f"{list_name}.{index}."
            if all(name.startswith(prefix) for param in block.parameters() for name in owners[id(param)]):
                blocks.append(block)
    return blocks


def shard_model(
    model: torch.nn.Module, device: torch.device, param_dtype: Optional[torch.dtype], cpu_offload: bool
) -> torch.nn.Module:
    """parallel_strategy fsdp: FSDP2's fully_shard on each transformer block, then on the whole model (in place).

    The root unit holds what no block does: the embeddings, the final norm and the output layer, so tied
    weights (GPT-2's output layer and token embeddings, ELECTRA's embeddings shared by both towers) stay
    one tensor in one unit. Each block's weights are all-gathered just before it runs and freed after.
    param_dtype (bf16/fp16 on GPU): the gathered weights are cast to it; gradients are reduced in float32.
    """
    precision = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    # On the device first, buffers included; under CPU offload fully_shard then moves the shards back to the CPU.
    model.to(device)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=precision, offload_policy=offload)
    # The root casts no inputs: ELECTRA's sampling uniforms must keep float32's resolution.
    fully_shard(model, mp_policy=dataclasses.replace(precision, cast_forward_inputs=False), offload_policy=offload)
    return model


def full_model_state(model: torch.nn.Module) -> dict:
    """The sharded model's whole state dict on rank 0's CPU (empty on the other ranks); every rank must call it.

    The gathered tensors are copies, so tied weights come back as separate tensors; they are made one
    again, so save_pretrained writes (and drops the tied names) exactly as for an unsharded model.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            primary = first_name.setdefault(id(param), name)
            if primary != name and name in state:
                state[name] = state[primary]
    return state


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state, in either form: torch's own (parameters by index, written by a DDP run) or
    the full state dict by parameter name (written by an FSDP run, for any world size)."""
    if not isinstance(model, FSDPModule) and not _keyed_by_name(saved):
        optimizer.load_state_dict(saved)
        return
    if not _keyed_by_name(saved):
        # build_optimizer orders the parameters the same way whatever the strategy, so index i names the same one.
        names = {id(param): name for name, param in model.named_parameters()}
        ordered = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
        saved = {
            "state": {ordered[i]: value for i, value in saved["state"].items()},
            "param_groups": [
                {**group, "params": [ordered[i] for i in group["params"]]} for group in saved["param_groups"]
            ],
        }
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(optimizer_state: dict) -> bool:
    return any(isinstance(key, str) for key in optimizer_state["state"])


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards under FSDP, the whole model under DDP (a tied weight once)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())


def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak memory so far: torch's allocations on a GPU, else the process's peak resident set (everything, the interpreter included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=tuple(args.adam_betas), eps=args.adam_epsilon, fused=device.type == "cuda"
    )


def build_scheduler(optimizer: torch.optim.Optimizer, args: LanguageModelingArgs, total_steps: int):
    import transformers

    warmup = args.warmup_steps_for(total_steps)
    name = args.scheduler
    if name == "constant_schedule":
        return transformers.get_constant_schedule(optimizer)
    if name == "constant_schedule_with_warmup":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "cosine_schedule_with_warmup":
        return transformers.get_cosine_schedule_with_warmup(
            optimizer, warmup, total_steps, num_cycles=args.cosine_schedule_num_cycles
        )
    if name == "cosine_with_hard_restarts_schedule_with_warmup":
        return transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, warmup, total_steps, num_cycles=int(args.cosine_schedule_num_cycles)
        )
    if name == "polynomial_decay_schedule_with_warmup":
        return transformers.get_polynomial_decay_schedule_with_warmup(
            optimizer,
            warmup,
            total_steps,
            lr_end=args.polynomial_decay_schedule_lr_end,
            power=args.polynomial_decay_schedule_power,
        )
    return transformers.get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
