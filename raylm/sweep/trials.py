"""Sweep trials: the job with a trial's sampled values -> a raylm training run whose evaluations go to Tune; Tune's
result of a trial -> a `TrialOutcome` (how it ended, its best evaluation); the outcomes -> the sweep's table.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, TextIO

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raylm.api import LanguageModelingModel
from raylm.data import storage
from raylm.errors import DivergenceError
from raylm.sweep.space import EVAL_METRICS
from raylm.train import Job

TRIAL_OUTPUT_DIR = "raylm_run"  # each trial's logs, in its Tune working directory (synced to its trial folder)
STOPPED_EARLY = "stopped_by_scheduler"  # set on the result at which Tune stopped a trial


@dataclass(frozen=True)
class TrialSettings:
    """What every trial is told besides its sampled values (plain values: Tune ships it to trial actors)."""

    experiment_name: str
    storage_path: str
    metric: str
    mode: str
    use_gpu: bool


def run_trial(sampled: dict, job: Job, settings: TrialSettings) -> None:
    """A Tune trial: the job with the sampled values, trained by raylm; its evaluations go to Tune."""
    trial_id = tune.get_context().get_trial_id()
    trial_job = job.with_values({**sampled, **_per_trial_values(settings, trial_id)})
    model = LanguageModelingModel(**trial_job.model_kwargs())
    # A DivergenceError ends the trial as errored, with its last evaluation kept by Tune.
    model.train_model(
        trial_job.train_file, eval_file=trial_job.eval_file, callbacks=[_EvaluationsToTune(settings.metric)]
    )


def _per_trial_values(settings: TrialSettings, trial_id: str) -> dict:
    return {
        # The trial's Train run resumes from its own checkpoints when the sweep is resumed.
        "experiment_name": f"{settings.experiment_name}/trials/{trial_id}",
        "resume": True,
        "storage_path": settings.storage_path,
        # The trials share one example store (under storage_path): the first trial that needs it
        # tokenizes, the others read it. Its key (files, tokenizer, settings) makes the reuse safe.
        "reprocess_input_data": False,
        "no_cache": False,
        # Only logs land here: the best model is exported from its checkpoint when the sweep ends.
        "output_dir": os.path.abspath(TRIAL_OUTPUT_DIR),
        "overwrite_output_dir": True,
        "no_save": True,
        "silent": True,
        "evaluate_during_training": True,
        # Every new best by the sweep's metric is checkpointed, so the best evaluation has a model.
        "early_stopping_metric": settings.metric,
        "early_stopping_metric_minimize": settings.mode == "min",
        # With checkpoints_to_keep, the checkpoint the best model is exported from is not pruned.
        "keep_best_checkpoints": True,
        "use_gpu": settings.use_gpu,
    }


class _EvaluationsToTune(TuneReportCallback):
    """Rank 0's evaluation reports (with their checkpoint_path) to Tune, and only those.

    Progress and final-checkpoint reports lack the metric, and Tune rejects such results: Tune's
    results are the evaluations, which ASHA compares at their global_step.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class RecordHowTrialsEnded(tune.Callback):
    """Keep in the experiment state how each trial ended, so the table (and a resume) can tell.

    Tune marks a live result done only when the scheduler (or a stopper) ends the trial there: that
    result is flagged "stopped early". A trial that finishes by itself gets done=True afterwards,
    set in place on its last result, which leaves the JSON the trial's metadata caches stale (Ray
    2.60): when the experiment state was saved between the trial's last report and its end, the
    saved result lacks done, and a resumed sweep would call a completed trial unfinished.
    """

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):
            result[STOPPED_EARLY] = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Runs before Tune marks the trial for the next experiment-state save.
        trial.run_metadata.invalidate_cache()


# --- how trials ended ----------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """One trial as the table shows it; `best` is its best evaluation (metrics and checkpoint_path)."""

    trial_id: str
    sampled: dict
    status: str  # completed, stopped early, diverged, failed, not finished
    last_step: Optional[int]
    best: Optional[dict]
    error: Optional[str] = None


@dataclass
class SweepResult:
    """What run_sweep returns; the table shows the same."""

    experiment_path: str
    metric: str
    trials: list[TrialOutcome]
    best: Optional[TrialOutcome]  # the trial with the best evaluation of all
    finished: bool  # False when interrupted: run the same experiment again to resume it
    exported_to: Optional[str] = None

    @property
    def best_config(self) -> Optional[dict]:
        return self.best.sampled if self.best else None

    @property
    def best_checkpoint(self) -> Optional[str]:
        return self.best.best["checkpoint_path"] if self.best else None


def trial_outcome(result, metric: str, mode: str) -> TrialOutcome:
    metrics = result.metrics or {}
    history = result.metrics_dataframe
    evaluations = [] if history is None else [row for row in history.to_dict("records") if _is_number(row.get(metric))]
    with_model = [row for row in evaluations if isinstance(row.get("checkpoint_path"), str)]
    best = _best_row(with_model, metric, mode)
    last_step = int(metrics["global_step"]) if _is_number(metrics.get("global_step")) else None
    error = None
    if result.error is not None:
        status = "diverged" if isinstance(result.error, DivergenceError) else "failed"
        error = _error_message(result.error)
    elif not metrics.get("done"):
        status = "not finished"
    elif metrics.get(STOPPED_EARLY):
        status = "stopped early"
    else:
        status = "completed"
    return TrialOutcome(os.path.basename(result.path), dict(result.config or {}), status, last_step, best, error)


def _best_row(rows: list[dict], metric: str, mode: str) -> Optional[dict]:
    if not rows:
        return None
    pick = min if mode == "min" else max
    return pick(rows, key=lambda row: row[metric])


def best_trial(trials: list[TrialOutcome], metric: str, mode: str) -> Optional[TrialOutcome]:
    if not trials:
        return None
    pick = min if mode == "min" else max
    return pick(trials, key=lambda trial: trial.best[metric])


def evaluation_numbers(row: dict) -> dict:
    """The numbers a table or file shows for one evaluation."""
    keys = ("global_step", "epoch", *EVAL_METRICS)
    return {
        key: (int(row[key]) if key in ("global_step", "epoch") else float(row[key]))
        for key in keys
        if _is_number(row.get(key))
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _error_message(error: BaseException) -> str:
    """The message of what the trial raised: Ray hands it over wrapped (RayTaskError, traceback first)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause)
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def print_table(outcome: SweepResult, parameter_names: list[str], stream: TextIO) -> None:
    """trial | sampled values | metric (eval_loss, perplexity) at the trial's best evaluation | steps run | status."""
    metric_columns = list(dict.fromkeys([outcome.metric, "eval_loss", "perplexity"]))
    header = ["trial", *parameter_names, *metric_columns, "steps", "status"]
    rows = []
    for trial in outcome.trials:
        best = trial.best or {}
        marker = " *" if outcome.best is trial else ""
        rows.append(
            [
                trial.trial_id + marker,
                *(_format(trial.sampled.get(name)) for name in parameter_names),
                *(_format(best.get(name)) for name in metric_columns),
                "" if trial.last_step is None else str(trial.last_step),
                trial.status,
            ]
        )
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        stream.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    if outcome.best is not None and outcome.finished:
        best = outcome.best.best
        stream.write(
            f"best: {outcome.best.trial_id}, {outcome.metric} {best[outcome.metric]:.4f} at step "
            f"{int(best['global_step'])}; model in {outcome.exported_to}; "
            f"best_config.json and best_checkpoint.json in {outcome.experiment_path}\n"
        )
    for trial in outcome.trials:
        if trial.error:
            stream.write(
                f"{trial.trial_id} {trial.status}: {trial.error} (traceback in "
                f"{storage.join(outcome.experiment_path, trial.trial_id)}/error.txt)\n"
            )
    stream.flush()


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
