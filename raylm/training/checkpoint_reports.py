"""Checkpoint reports: the ranks' model, optimizer and trainer state at a step -> one checkpoint folder (rank 0 writes
it; under FSDP each rank adds its shards, sharded_state.py) reported to Ray with the step's metrics; the checkpoints Ray
has registered -> rank 0's checkpoint events, which the driver mirrors into output_dir.
"""

from __future__ import annotations

import shutil
import time
from typing import Optional

import ray
import ray.train
import torch
from ray.train import CheckpointUploadMode

from raylm.config import LanguageModelingArgs
from raylm.models.modeling import save_trained
from raylm.training import parallelism
from raylm.training.checkpoints import (
    CHECKPOINT_SCORE,
    TrainerState,
    checkpoint_score,
    local_checkpoint_folder,
    remove_dead_workers_folders,
    write_training_state,
)
from raylm.training.collectives import Ranks, gather
from raylm.training.diagnostics import Diagnostics
from raylm.training.reports import plain
from raylm.training.resume import RUN_ID_KEY, rng_state
from raylm.training.sharded_state import save_sharded_state


class CheckpointReports:
    """One worker's checkpoints: written and reported at each save, announced to the driver once Ray registered
    them."""

    def __init__(
        self,
        args: LanguageModelingArgs,
        ranks: Ranks,
        tokenizer_ref,
        run_id: str,
        progress_queue,
        diagnostics: Diagnostics,
    ):
        self.args, self.ranks, self.tokenizer_ref, self.run_id = args, ranks, tokenizer_ref, run_id
        self.progress_queue, self.diagnostics = progress_queue, diagnostics
        # rank 0: (label, step, is_best, metrics) of checkpoints reported, not yet announced
        self.unannounced: list[tuple] = []
        # Every rank: whether an async upload was reported since the ranks last waited for Ray to register them.
        self.uploads_unchecked = False
        # The longest a checkpoint has held up training on this rank (ms), what a reclaim's deadline is judged by.
        self.slowest_ms: Optional[int] = None
        remove_dead_workers_folders()

    def report(
        self,
        label: str,
        metrics: dict,
        state: TrainerState,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        scaler: torch.amp.GradScaler,
    ) -> None:
        """Every rank: the checkpoint of `state` (its running totals up to date) reported to Ray, rank 0's with the
        folder it wrote."""
        args, rank = self.args, self.ranks.rank
        started = time.perf_counter()
        rng_states = gather(self.ranks, rng_state(self.ranks.device))
        state.label = label
        report = {**plain(metrics), **state.summary(), "checkpoint_label": label}
        if args.keep_best_checkpoints:
            report[CHECKPOINT_SCORE] = checkpoint_score(args, metrics)
        upload_async = args.checkpoint_upload_mode == "async"
        if upload_async and self.uploads_unchecked:
            # The previous checkpoint's upload has had a whole save interval. Every rank waits here for the rest of
            # it (if slower than training), in Ray's call and not in a collective: a rank waiting while the others
            # sat in the checkpoint's collectives would hold them there past their timeout for a slow upload.
            registered = ray.train.get_all_reported_checkpoints()
            if rank == 0:
                self.announce_registered(registered)
        sharded = args.parallel_strategy == "fsdp"
        keep_optimizer = args.save_optimizer_and_scheduler
        # Under FSDP every rank writes its shards into a folder of its own, which Ray merges with rank 0's.
        folder = local_checkpoint_folder() if rank == 0 or sharded else None
        model_state = None
        if sharded:
            # Collectives: each rank writes only its shards; only the Hugging Face export gathers the weights
            # (rank 0 receives the whole, unsharded tensors on its CPU).
            save_sharded_state(folder, model, optimizer if keep_optimizer else None)
            if args.fsdp_checkpoint_hf_weights:
                model_state = parallelism.full_model_state(model)
        checkpoint = None
        if rank == 0:
            with_weights = not sharded or args.fsdp_checkpoint_hf_weights
            save_trained(parallelism.unwrap(model), ray.get(self.tokenizer_ref), folder, model_state, with_weights)
            args.save(folder)
            self.diagnostics.maybe_kill(rank, state.global_step, saving=True)
            optimizer, scheduler = (optimizer, scheduler) if keep_optimizer else (None, None)
            write_training_state(folder, state, optimizer, scheduler, scaler, rng_states, in_shards=sharded)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            checkpoint.set_metadata({RUN_ID_KEY: self.run_id})
            self.unannounced.append((label, state.global_step, bool(metrics.get("is_best")), plain(metrics)))
        elif folder is not None:
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        try:
            # ASYNC: Ray uploads the folder on a thread of its own, registers it when done and deletes it.
            mode = CheckpointUploadMode.ASYNC if upload_async else CheckpointUploadMode.SYNC
            ray.train.report(report, checkpoint=checkpoint, checkpoint_upload_mode=mode)
        finally:
            if folder is not None and not upload_async:
                shutil.rmtree(folder, ignore_errors=True)
        self.uploads_unchecked = upload_async
        if rank == 0 and not upload_async:
            self.announce_registered()
        self.slowest_ms = max(self.slowest_ms or 0, int((time.perf_counter() - started) * 1000))

    def announce_registered(self, registered: Optional[list] = None) -> None:
        """Tell the driver (which mirrors them into output_dir) of the checkpoints Ray has registered since the last
        call (`registered`: Ray's list, when the caller has it).

        Only what Ray has registered is announced: that is what a restart would resume from.
        get_all_reported_checkpoints waits for the reports still being uploaded.
        """
        if not self.unannounced:
            return
        registered = ray.train.get_all_reported_checkpoints() if registered is None else registered
        # Ray lists its checkpoints by score under keep_best_checkpoints, by age otherwise.
        kept_labels = [r.metrics.get("checkpoint_label") for r in registered]
        for label, step, is_best, metrics in self.unannounced:
            this_one = next(
                (r.checkpoint for r in reversed(registered) if r.metrics.get("checkpoint_label") == label), None
            )
            if this_one is not None and self.progress_queue is not None:
                self.progress_queue.put_nowait(
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
