"""The driver's side of a run: rank 0's events (progress, evaluations, checkpoints, divergence, notices) -> the
progress line, the run log, the checkpoints mirrored into output_dir, best_model, the progress scores Simple
Transformers returns, and the last good checkpoint after divergence.
"""

from __future__ import annotations

import os
from typing import Optional

from raylm.config import LanguageModelingArgs
from raylm.console import ProgressLine, logger, notice_once
from raylm.data import storage
from raylm.errors import DivergenceError
from raylm.training.checkpoints import mirror_checkpoint, prune_mirrored
from raylm.training.outputs import best_model_dir, export_weights, results_text, without_run_state
from raylm.training.tracking import RunLog


class TrainingEvents:
    """The driver's side of a run: rank 0's events become the progress line, mirrored checkpoints and scores."""

    def __init__(
        self,
        progress: ProgressLine,
        output: storage.OutputFolder,
        args: LanguageModelingArgs,
        run_log: RunLog,
        resumed_from: Optional[tuple[int, str]] = None,
    ):
        """resumed_from: (step, folder) of the checkpoint the run continues, a candidate last good one."""
        self.progress = progress
        self.run_log = run_log
        self.output = output
        self.output_dir = output.target
        self.args = args
        self.resumed_from = resumed_from
        # label -> (step, where the user finds it) for every checkpoint Ray registered, and those it still keeps.
        self.checkpoints: dict[str, tuple[int, str]] = {}
        self.kept_labels: list[str] = []
        self.diverged: Optional[dict] = None
        self.progress_scores: dict[str, list] = {}
        self.last_eval: Optional[dict] = None
        self.mirrored_labels: set[str] = set()
        # (first step, workers) each time the worker count changed (an elastic run's resizes).
        self.worker_counts: list[tuple[int, int]] = []
        # preemption.ReclaimWatch's record of each spot reclaim, in order.
        self.reclaims: list[dict] = []

    def handle(self, event: dict) -> None:
        self.run_log.on_event(event)
        kind = event.get("kind")
        if kind == "train":
            self.progress.update(event)
            if not self.worker_counts or self.worker_counts[-1][1] != event["num_workers"]:
                self.worker_counts.append((event["global_step"], event["num_workers"]))
        elif kind == "eval":
            self.last_eval = event
            for key, value in event.items():
                if key not in ("kind", "is_best"):
                    self.progress_scores.setdefault(key, []).append(value)
            if self.args.evaluate_during_training_verbose:
                logger.info(
                    f"step {event['global_step']}: eval_loss {event['eval_loss']:.4f}, perplexity "
                    f"{event['perplexity']:.2f}"
                )
        elif kind == "checkpoint":
            where = event["path"] if self.args.no_save else storage.join(self.output_dir, event["label"])
            self.checkpoints[event["label"]] = (event["global_step"], where)
            self.kept_labels = event["kept_labels"]
            if not self.args.no_save:
                self._mirror(event)
                # The logs so far go with each checkpoint, so a remote output_dir never lags far behind.
                self.output.sync()
        elif kind == "diverged":
            self.diverged = event
        elif kind == "preemption":
            self.reclaims.append(event)
            logger.info(f"Spot reclaim of {reclaim_text(event)}")
        elif kind == "notice":
            notice_once(event["message"])

    def last_good_checkpoint(self) -> Optional[str]:
        """After divergence at step k, the latest checkpoint kept at a step <= k-2 (divergence.NonfiniteLosses says
        why)."""
        last_good_step = self.diverged["global_step"] - 2
        candidates = [
            found
            for label, found in self.checkpoints.items()
            if label in self.kept_labels and found[0] <= last_good_step
        ]
        if self.resumed_from is not None and self.resumed_from[0] <= last_good_step:
            candidates.append(self.resumed_from)
        return max(candidates)[1] if candidates else None

    def divergence_error(self) -> DivergenceError:
        """What the user is told after divergence: the step, the weights it came from, the last good checkpoint."""
        step = self.diverged["global_step"]
        good = self.last_good_checkpoint()
        # A fresh run's first steps have no earlier step to name: only its starting weights precede them.
        came_from = f"the weights of step {step - 1}" if step > 1 else "the starting weights"
        none_kept = (
            f"no checkpoint from step {step - 2} or earlier is kept" if step > 2 else "no checkpoint is that early"
        )
        where = f"the last good checkpoint is {good}" if good else f"{none_kept}, so none is known to be good"
        return DivergenceError(
            f"Training diverged: the loss or a gradient became NaN or infinite at step {step}, computed from "
            f"{came_from}; {where}",
            "Lower learning_rate, raise warmup, keep max_grad_norm > 0, or use bf16 instead of fp16; resume from the "
            "last good checkpoint with LanguageModelingModel(model_type, <checkpoint folder>)",
        )

    def _mirror(self, event: dict) -> None:
        from ray.train import Checkpoint

        checkpoint = Checkpoint(path=event["path"], filesystem=event["filesystem"])
        mirror_checkpoint(checkpoint, storage.join(self.output_dir, event["label"]))
        self.mirrored_labels.add(event["label"])
        if self.args.checkpoints_to_keep:
            # Only this run's copies: the checkpoint it resumed from and other runs' stay.
            self.mirrored_labels = prune_mirrored(self.output_dir, self.mirrored_labels, event["kept_labels"])
        if event["is_best"] and self.args.save_best_model:
            self._save_best(checkpoint, event["metrics"])

    def _save_best(self, checkpoint, metrics: dict) -> None:
        with storage.publishing(best_model_dir(self.args, self.output_dir)) as staging:
            checkpoint.to_directory(staging)
            # best_model/ is a model to use, not a point to resume from: Hugging Face weights, no run state.
            export_weights(staging, staging, self.args.trust_remote_code)
            without_run_state(staging)
            with open(os.path.join(staging, "eval_results.txt"), "w", encoding="utf-8") as f:
                f.write(results_text(metrics))

    def close(self, succeeded: bool) -> None:
        self.progress.close()
        self.run_log.close(succeeded)
        self.output.sync()
        self.output.close()


def reclaim_text(event: dict) -> str:
    """One reclaim, as the console and the end-of-run table's `spot reclaim` row say it."""
    nodes = "node " + (", ".join(node[:8] for node in event["nodes"]) or "unknown")
    if event["checkpoint_step"] is not None:
        saved = f"checkpoint committed at step {event['checkpoint_step']:,} in {event['checkpoint_seconds']:.1f} s"
    else:
        saved = f"no checkpoint in time, resuming from step {event['resumes_from_step']:,}"
    return (
        f"{nodes}: notice at step {event['global_step']:,} ({event['deadline_seconds']:.1f} s before "
        f"the deadline), {saved}, {event['steps_repeated']:,} steps repeated"
    )
