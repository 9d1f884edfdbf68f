"""`train_fn_per_worker`: the training loop each Ray Train worker runs, from stored examples to reported checkpoint.

Each optimizer step trains on the next global batch of the epoch's order of the stored examples (epoch_data.py), split
evenly over the ranks; every rank runs the same number of steps. Each step, the ranks agree (one tiny all-reduce on a
CPU process group, so no GPU sync) on the global numbers of target and input tokens (and on a spot reclaim's notice). A
rank with no part in the epoch's last, short step takes part with an empty batch, so no example is dropped to even the
ranks out and none is repeated. Losses are sums divided by the global counts, so the gradient is the token-weighted mean
over the whole global batch.

Resuming is exact: a checkpoint records the examples of the epoch consumed so far, a position that does not depend on
the worker count, and the restarted loop starts reading there. Optimizer, scheduler, scaler and every rank's RNG state
come back too, so the steps after a resume repeat the uninterrupted run's (resume.py).

What the loop uses lives beside it (parallelism, torch_compile, optim, step_batches, collectives, divergence,
evaluation, reports, checkpoint_reports, preemption, diagnostics, store_access).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import ray
import ray.train
import torch

from raylm.config import LanguageModelingArgs
from raylm.data.collators import CollatorSpec
from raylm.data.epoch_data import Prefetched, blocks_in_use, epoch_order
from raylm.data.example_store import BlockReader
from raylm.models.modeling import combine_loss, forward_loss_sums
from raylm.training import collectives, parallelism
from raylm.training.checkpoint_reports import CheckpointReports
from raylm.training.checkpoints import checkpoint_label
from raylm.training.diagnostics import Diagnostics
from raylm.training.divergence import NonfiniteLosses
from raylm.training.evaluation import judge_for_early_stopping, rank_eval_sums, summarize
from raylm.training.model_setup import set_up_training
from raylm.training.optim import clip_gradients
from raylm.training.preemption import ReclaimWatch
from raylm.training.reports import ProgressReports, SessionTotals, plain
from raylm.training.step_batches import as_empty, empty_batch, micro_batches_needed, rank_step_batches, to_device
from raylm.training.store_access import readable_store


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
    model_skeleton_ref: object = None  # model_setup.meta_skeleton of the model under builds_on_meta


def seed_rank(seed: int, rank: int) -> None:
    """Seed this worker's torch generator from the job's seed and its rank: dropout differs per rank but is
    reproducible."""
    torch.manual_seed(seed + rank)


def train_fn_per_worker(config: dict) -> None:
    run = _Run(WorkerJob(**config))
    run.train()


class _Run:
    """One worker's training run: set up from the job (model, optimizer, restored state), then the loop."""

    def __init__(self, job: WorkerJob):
        self.job, self.args = job, LanguageModelingArgs.from_dict(job.args)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        in_use = blocks_in_use(self.args.global_batch_size, self.world_size)
        self.readers = [BlockReader(readable_store(fields, self.rank), in_use) for fields in job.train_examples]
        self.eval_reader = BlockReader(readable_store(job.eval_examples, self.rank)) if job.eval_examples else None
        self.device = parallelism.worker_device()
        if parallelism.falls_back_to_cpu(self.device) and job.progress_queue is not None:
            job.progress_queue.put_nowait({"kind": "notice", "message": parallelism.CPU_FALLBACK_NOTICE})
        # torch's threads follow the CPUs reserved for this worker, whatever OMP_NUM_THREADS the environment carries.
        torch.set_num_threads(job.torch_threads)
        self.diagnostics = Diagnostics(**(job.diagnostics or {}))
        self.ranks = collectives.Ranks.of_this_worker(self.rank, self.world_size, self.device)
        self.collator_spec = CollatorSpec(**job.collator)
        seed_rank(self.args.seed, self.rank)

        self.use_amp = self.device.type == "cuda" and (self.args.fp16 or self.args.bf16)
        self.amp_dtype = torch.bfloat16 if self.args.bf16 else torch.float16
        self.fsdp = self.args.parallel_strategy == "fsdp"
        setup = set_up_training(job, self.args, self.ranks, self.amp_dtype if self.use_amp else None)
        self.model, self.optimizer, self.scheduler = setup.model, setup.optimizer, setup.scheduler
        self.scaler, self.state, self.compile_stats = setup.scaler, setup.state, setup.compile_stats
        self.reduce_per_micro_batch = parallelism.reduces_every_micro_batch(self.model, self.args)
        self.resumed_from = setup.resumed_from
        compute_dtype = self.amp_dtype if self.use_amp else torch.float32
        self.progress = ProgressReports(self.model, self.args, self.ranks, compute_dtype, self.compile_stats)
        strategy = {"param_memory_mb": self.progress.param_memory_mb, "parallel_strategy": self.args.parallel_strategy}
        self.diagnostics.trace_start(self.rank, self.world_size, self.resumed_from, strategy)

        self.checkpoints = CheckpointReports(
            self.args, self.ranks, job.tokenizer_ref, job.run_id, job.progress_queue, self.diagnostics
        )
        self.reclaims = ReclaimWatch(self.checkpoints, self.args.preemption_grace_s, self.resumed_from or 0)
        self.totals = SessionTotals(self.device)  # this rank's share, not yet added to state
        self.dummy: Optional[dict] = None  # an empty batch shaped like a real one, for a step without data
        self.nonfinite = NonfiniteLosses.for_scaler(self.device, self.scaler)
        self.last_checkpoint_step = self.state.global_step if self.resumed_from is not None else -1
        self.diverged_at: Optional[int] = None
        # The epoch of the latest step, counted from 1 as the progress line and training_log.jsonl show it
        # (state.epoch counts completed epochs, so it is already one up when an end-of-epoch evaluation runs).
        self.step_epoch = max(self.state.epoch, 1)

    # --- the loop ------------------------------------------------------------------------------------
    def train(self) -> None:
        args, state, readers = self.args, self.state, self.readers
        while not self._finished() and self.diverged_at is None and not state.stopped_early:
            state.epoch_lanes = state.epoch_lanes or args.global_batch_size
            rows = [reader.store.block_rows() for reader in readers]
            order = epoch_order(rows, self.job.mixture_weights, args.seed, state.epoch, state.epoch_lanes)
            spec = self.collator_spec
            steps = rank_step_batches(readers, order, state.epoch, state.epoch_examples, args, spec, self.ranks)
            try:
                epoch_complete = self._train_epoch(steps, readers, order.num_examples)
            finally:
                steps.close()
            if epoch_complete:
                state.start_next_epoch()
                self._after_epoch()
        # The last steps since the previous logging_steps report: without this the log and the curve stop short of
        # the end. Every rank took as many steps, so all of them make this report (a barrier) or none does.
        if self.diverged_at is None and self.progress.window.steps and self._check_finite():
            self._report_progress()
        if self.diverged_at is None and self.last_checkpoint_step != state.global_step:
            self._checkpoint(checkpoint_label(state.global_step), {})
        if self.rank == 0:
            self.checkpoints.announce_registered()

    def _finished(self) -> bool:
        args, state = self.args, self.state
        return state.global_step >= args.max_steps if args.max_steps > 0 else state.epoch >= args.num_train_epochs

    def _train_epoch(self, steps: Prefetched, readers: list[BlockReader], num_examples: int) -> bool:
        """The epoch's remaining optimizer steps; True when it ran to its end (not stopped by max_steps, early
        stopping or divergence)."""
        args, state, window = self.args, self.state, self.progress.window
        while not (args.max_steps > 0 and state.global_step >= args.max_steps):
            if state.epoch_examples >= num_examples:
                return True
            waiting_since = time.perf_counter()
            step_batches = [to_device(batch, self.device) for batch in next(steps)]
            window.data_wait_seconds += time.perf_counter() - waiting_since
            targets, inputs, reclaim = collectives.agree_on_step(self.ranks, step_batches, *self.reclaims.notice())
            if reclaim is not None:  # a node is being reclaimed: checkpoint the steps done if there is time, then wait
                self.reclaims.checkpoint_and_wait(
                    reclaim, state.global_step, self.last_checkpoint_step, self._checkpoint
                )
            needed = micro_batches_needed(self.fsdp, state.epoch_examples, num_examples, args, self.world_size)
            state.epoch_examples += min(args.global_batch_size, num_examples - state.epoch_examples)
            examples = sum(len(b["labels"]) for b in step_batches)
            step_batches += [self.dummy or empty_batch(self.collator_spec, self.device)] * (needed - len(step_batches))
            with self.compile_stats.step() if self.compile_stats is not None else contextlib.nullcontext():
                step_loss = self._optimizer_step(step_batches, targets, inputs)
            self.totals.add(step_loss, examples)
            window.add(step_loss, inputs)
            self.dummy = as_empty(step_batches[-1])
            state.global_step += 1
            state.train_tokens += targets
            state.train_input_tokens += inputs
            self.step_epoch = state.epoch + 1
            if self.diagnostics.trace_dir:  # float(step_loss) is a host sync: only when tracing
                record = {"step": state.global_step, "epoch": state.epoch, "loss": float(step_loss)}
                record["example_ids"] = [int(i) for b in step_batches for i in b["example_id"]]
                record.update(lr=self.scheduler.get_last_lr()[0], steps_prepared=steps.prepared)
                record.update(blocks_read=sum(r.blocks_read for r in readers), world_size=self.world_size)
                self.diagnostics.trace(self.rank, {**record, "resumed_from": self.resumed_from})
            self.diagnostics.after_step(self.rank, state.global_step)
            if self._after_step():
                return False
        return False

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def _optimizer_step(self, step_batches: list[dict], global_targets: int, global_inputs: int) -> torch.Tensor:
        step_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(step_batches):
            is_accumulating = index < len(step_batches) - 1
            sync = parallelism.gradient_sync(self.model, self.world_size, is_accumulating, self.reduce_per_micro_batch)
            with sync, self._autocast():
                sums = forward_loss_sums(self.model, batch, self.job.objective)
                loss = combine_loss(sums, global_targets, global_inputs, self.args.discriminator_loss_weight)
                # DDP (and FSDP's reduce-scatter) average gradients over ranks: scaled by world_size, the global mean.
                self.scaler.scale(loss * self.world_size).backward()
            step_loss += loss.detach()
        parallelism.require_every_gradient(self.model)
        grad_norm = clip_gradients(self.model, self.optimizer, self.scaler, self.args.max_grad_norm)
        self.nonfinite.record(self.state.global_step + 1, step_loss, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _after_step(self) -> bool:
        """Logging, evaluation and checkpoints due after this optimizer step; True to stop the epoch."""
        args, step = self.args, self.state.global_step
        if step % args.logging_steps == 0 and self._check_finite():
            self._report_progress()
        if self.diverged_at is not None:
            return True
        every = args.evaluate_during_training_steps
        metrics: dict = {}
        if self.eval_reader is not None and args.evaluate_during_training and every > 0 and step % every == 0:
            metrics = self._evaluate(counts_for_early_stopping=True)
        saves = (args.save_steps > 0 and step % args.save_steps == 0) or (
            metrics and (args.save_eval_checkpoints or metrics.get("is_best"))
        )
        self._checkpoint_or_report(saves, checkpoint_label(step), metrics)
        return self.diverged_at is not None or self.state.stopped_early

    def _after_epoch(self) -> None:
        args, state = self.args, self.state
        metrics: dict = {}
        if self.eval_reader is not None and args.evaluate_during_training and args.evaluate_each_epoch:
            metrics = self._evaluate(counts_for_early_stopping=args.early_stopping_consider_epochs)
        saves = args.save_model_every_epoch or metrics.get("is_best")
        self._checkpoint_or_report(saves, checkpoint_label(state.global_step, state.epoch), metrics)

    def _evaluate(self, counts_for_early_stopping: bool) -> dict:
        module, spec, batch_size = parallelism.unwrap(self.model), self.collator_spec, self.args.eval_batch_size
        totals = rank_eval_sums(
            module, self.eval_reader, spec, self.job.objective, batch_size, self.ranks, self._autocast(), self.fsdp
        )
        metrics = summarize(totals, self.job.objective, self.args.discriminator_loss_weight)
        step, train_loss = self.state.global_step, self.progress.loss_peek()
        metrics = {"global_step": step, "epoch": self.step_epoch, "train_loss": train_loss, **metrics}
        judge_for_early_stopping(self.state, self.args, metrics, counts_for_early_stopping)
        if self.rank == 0 and self.job.progress_queue is not None:
            self.job.progress_queue.put_nowait({"kind": "eval", **plain(metrics)})
        return metrics

    # --- reports and checkpoints ------------------------------------------------------------------
    def _check_finite(self) -> bool:
        """Whether every rank's losses stayed finite; else remember the first bad step (all ranks agree)."""
        if self.diverged_at is not None:
            return False
        step = self.nonfinite.agreed_first_step(self.scaler, self.state.global_step, self.world_size)
        if step < 0:
            return True
        self.diverged_at = step
        if self.rank == 0 and self.job.progress_queue is not None:
            self.job.progress_queue.put_nowait({"kind": "diverged", "global_step": step})
        return False

    def _checkpoint_or_report(self, saves: bool, label: str, metrics: dict) -> None:
        """The checkpoint when one is due (and the losses are finite), else the evaluation's metrics if any."""
        if saves and self._check_finite():
            self._checkpoint(label, metrics)
        elif metrics:
            ray.train.report(plain(metrics))

    def _checkpoint(self, label: str, metrics: dict) -> None:
        stall_started = time.perf_counter()
        self.totals.fold_into(self.state, self.ranks)
        self.checkpoints.report(label, metrics, self.state, self.model, self.optimizer, self.scheduler, self.scaler)
        self.last_checkpoint_step = self.state.global_step
        self.progress.window.checkpoint_seconds += time.perf_counter() - stall_started

    def _report_progress(self) -> None:
        learning_rate = self.scheduler.get_last_lr()[0]
        metrics, reports_to_ray = self.progress.metrics(self.state, self.step_epoch, learning_rate, self.totals.started)
        if self.rank == 0 and self.job.progress_queue is not None:
            self.job.progress_queue.put_nowait({"kind": "train", **metrics})
        # A barrier that waits for Ray's controller: at most once per its poll (ProgressReports.metrics).
        if reports_to_ray:
            ray.train.report(metrics)
