"""Hyperparameter sweeps: a raylm job plus a search space -> Ray Tune trials -> the best model.

job (raylm.train's schema) + sweep (raylm's schema, or a W&B `sweep_config`, translated) ->
`SweepConfig` -> a Tuner whose trials each run the job with the sampled values through
`LanguageModelingModel.train_model`. That is Ray Train inside Tune as Train V2 wants it: the trial
is the run's driver and fits its own TorchTrainer, and `TuneReportCallback` hands rank 0's
evaluation reports to Tune, so ASHA can stop poor trials early. Checkpoints are the runs' own
(`<storage_path>/<experiment>/trials/<trial id>/`). At the end: a table of the trials,
best_config.json and best_checkpoint.json in the experiment folder, and the best evaluation's
model in Hugging Face format in output_dir. Running the same experiment again resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional, TextIO, Union

import ray
import ray.train
from ray import tune
from ray.train.constants import DEFAULT_STORAGE_PATH
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from raylm.api import LanguageModelingModel
from raylm.cluster import launcher
from raylm.cluster.capacity import cluster_capacity, resolve_use_gpu
from raylm.config import FIELD_TYPES, LanguageModelingArgs, unknown_fields_error
from raylm.console import configure_logging, logger
from raylm.data import storage
from raylm.errors import ClusterError, ConfigError, DivergenceError, OutputDirError
from raylm.train import Job, resolve_job
from raylm.training.checkpoints import RUN_STATE_FILES

PathSpec = Union[str, os.PathLike, list, dict]

# What a trial reports: the evaluation metrics (ELECTRA adds the discriminator's) and the window loss.
EVAL_METRICS = (
    "eval_loss",
    "perplexity",
    "train_loss",
    "generator_loss",
    "discriminator_loss",
    "discriminator_accuracy",
    "discriminator_precision",
    "discriminator_recall",
    "discriminator_f1",
    "discriminator_auc",
)
SEARCH_ALGS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "none")
# Sampling distributions; W&B's names are accepted too. Integer and float bounds are inclusive.
DISTRIBUTIONS = ("uniform", "loguniform", "randint")
WANDB_DISTRIBUTIONS = {"log_uniform_values": "loguniform", "int_uniform": "randint"}
# The sweep sets these for every trial, or they fix what a trial occupies on the cluster.
NOT_SWEPT = (
    "output_dir",
    "overwrite_output_dir",
    "no_save",
    "silent",
    "storage_path",
    "experiment_name",
    "evaluate_during_training",
    "early_stopping_metric",
    "early_stopping_metric_minimize",
    "num_workers",
    "resources_per_worker",
    "use_gpu",
)
SWEEP_KEYS = ("parameters", "num_samples", "metric", "mode", "scheduler", "max_concurrent_trials", "search_alg")
SCHEDULER_KEYS = ("type", "grace_period", "grace_period_steps", "reduction_factor")
PARAMETER_KEYS = ("values", "grid", "value", "distribution", "min", "max")
# W&B sweep keys that describe the W&B project rather than the search.
WANDB_METADATA_KEYS = ("name", "description", "project", "entity", "program", "command")

DEFAULT_RANDOM_SAMPLES = 10
TRIAL_DRIVER_CPUS = 1  # the trial actor builds datasets and drives its run; Train reserves its workers
# ASHA needs a horizon; trials end by themselves (max_steps or epochs), so it must never be reached.
UNREACHED_MAX_STEPS = 2**40
TRIAL_OUTPUT_DIR = "raylm_run"  # each trial's logs, in its Tune working directory (synced to its trial folder)
STOPPED_EARLY = "stopped_by_scheduler"  # set on the result at which Tune stopped a trial
SWEEP_FILE = "raylm_sweep.json"
BEST_CONFIG_FILE = "best_config.json"
BEST_CHECKPOINT_FILE = "best_checkpoint.json"


# --- the search space --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """One swept field (a dotted name sets one entry of a dict field, e.g. config.n_layer).

    kind: choice / grid (`values`), constant (`values` holds the one value), or uniform /
    loguniform / randint between `low` and `high`, both included.
    """

    name: str
    kind: str
    values: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None

    def candidates(self) -> list:
        """The values to check before anything starts: every choice, or both bounds."""
        return list(self.values) if self.values else [self.low, self.high]

    def to_tune(self):
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(self.low, self.high + 1)  # Tune's upper bound is exclusive


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: the search space and how Tune runs and judges it. Trial resources are the job's
    num_workers, resources_per_worker and use_gpu."""

    parameters: tuple[Parameter, ...]
    num_samples: int = DEFAULT_RANDOM_SAMPLES  # trials to sample (grid: times the whole grid is run)
    metric: str = "eval_loss"
    mode: str = "min"
    search_alg: str = "random"
    scheduler: str = "asha"
    grace_period: Optional[int] = None  # ASHA: evaluations before a trial can be stopped (default 1)
    grace_period_steps: Optional[int] = None  # ...or optimizer steps
    reduction_factor: float = 4
    max_concurrent_trials: Optional[int] = (
        None  # default: as many as the cluster can hold at once (with the nodes its autoscaler can add)
    )

    @classmethod
    def from_dict(cls, values: dict) -> "SweepConfig":
        """raylm's sweep mapping (the `sweep:` section of a job), or a W&B sweep_config."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"The sweep must be a mapping, got {type(values).__name__}",
                "Write the sweep as `parameters:`, `metric:`, ... (see jobs/sweep_gpt2.yaml)",
            )
        if _is_wandb_sweep(values):
            values = _from_wandb(values)
        _reject_unknown(values, SWEEP_KEYS, "sweep")
        search_alg = values.get("search_alg", "random")
        if search_alg not in SEARCH_ALGS:
            raise ConfigError(f"sweep.search_alg {search_alg!r} is unknown", f"Use one of {', '.join(SEARCH_ALGS)}")
        raw_parameters = values.get("parameters")
        if not isinstance(raw_parameters, dict) or not raw_parameters:
            raise ConfigError(
                "The sweep has no parameters",
                "Add `parameters:` with at least one field, e.g. learning_rate: {distribution: loguniform, min: 1e-5, max: 1e-3}",
            )
        parameters = tuple(_parse_parameter(name, spec, search_alg) for name, spec in raw_parameters.items())
        scheduler = values.get("scheduler", {"type": "asha"})
        if isinstance(scheduler, str):
            scheduler = {"type": scheduler}
        if not isinstance(scheduler, dict):
            raise ConfigError(
                f"sweep.scheduler must be a mapping or a name, got {scheduler!r}",
                "Write e.g. scheduler: {type: asha, grace_period: 2}, or scheduler: none",
            )
        _reject_unknown(scheduler, SCHEDULER_KEYS, "sweep.scheduler")
        grid_only = all(p.kind in ("grid", "constant") for p in parameters)
        config = cls(
            parameters=parameters,
            num_samples=values.get("num_samples", 1 if grid_only else DEFAULT_RANDOM_SAMPLES),
            metric=values.get("metric", "eval_loss"),
            mode=values.get("mode", "min"),
            search_alg=search_alg,
            scheduler=str(scheduler.get("type", "asha")).lower(),
            grace_period=scheduler.get("grace_period"),
            grace_period_steps=scheduler.get("grace_period_steps"),
            reduction_factor=scheduler.get("reduction_factor", 4),
            max_concurrent_trials=values.get("max_concurrent_trials"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        if self.metric not in EVAL_METRICS:
            raise ConfigError(
                f"sweep.metric {self.metric!r} is not reported at evaluations", f"Use one of {', '.join(EVAL_METRICS)}"
            )
        if self.mode not in ("min", "max"):
            raise ConfigError(
                f"sweep.mode must be min or max, got {self.mode!r}", "Use mode: min for losses and perplexity"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"sweep.scheduler type {self.scheduler!r} is unknown", f"Use one of {', '.join(SCHEDULERS)}"
            )
        if self.grace_period is not None and self.grace_period_steps is not None:
            raise ConfigError(
                "sweep.scheduler sets both grace_period (evaluations) and grace_period_steps", "Keep one of them"
            )
        for name in ("num_samples", "grace_period", "grace_period_steps", "max_concurrent_trials"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"sweep {name} must be a positive integer, got {value!r}", f"Set {name} to 1 or more")
        if not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor <= 1:
            raise ConfigError(
                f"sweep.scheduler.reduction_factor must be a number above 1, got {self.reduction_factor!r}",
                "Use e.g. reduction_factor: 3 (ASHA keeps the best third at each rung)",
            )
        if self.search_alg == "optuna":
            if any(p.kind == "grid" for p in self.parameters):
                raise ConfigError(
                    "search_alg optuna cannot run grid parameters",
                    "Use `values:` (a choice) instead of `grid:`, or search_alg: grid",
                )
            if importlib.util.find_spec("optuna") is None:
                raise ConfigError(
                    "search_alg optuna needs the optuna package, which is not installed",
                    "pip install optuna, or use search_alg: random",
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_wandb_sweep(values: dict) -> bool:
    return (
        "method" in values
        or "early_terminate" in values
        or "run_cap" in values
        or isinstance(values.get("metric"), dict)
    )


def _from_wandb(sweep_config: dict) -> dict:
    """A W&B sweep_config (method, metric {name, goal}, parameters, early_terminate, run_cap) as raylm's sweep mapping."""
    known = ("method", "metric", "parameters", "early_terminate", "run_cap", *WANDB_METADATA_KEYS)
    _reject_unknown(sweep_config, known, "W&B sweep_config")
    methods = {"grid": "grid", "random": "random", "bayes": "optuna"}
    method = sweep_config.get("method", "random")
    if method not in methods:
        raise ConfigError(
            f"W&B sweep method {method!r} is unknown", "Use method grid, random or bayes (which runs Optuna)"
        )
    translated: dict[str, Any] = {
        "search_alg": methods[method],
        "parameters": sweep_config.get("parameters"),
        "scheduler": {"type": "none"},
    }
    metric = sweep_config.get("metric", {"name": "eval_loss", "goal": "minimize"})
    if not isinstance(metric, dict) or metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise ConfigError(
            f"W&B sweep metric must be {{name, goal: minimize|maximize}}, got {metric!r}",
            "Write e.g. metric: {name: eval_loss, goal: minimize}",
        )
    translated["metric"] = metric.get("name", "eval_loss")
    translated["mode"] = "min" if metric.get("goal", "minimize") == "minimize" else "max"
    early_terminate = sweep_config.get("early_terminate")
    if early_terminate is not None:
        # W&B's hyperband counts logged evaluations, as grace_period does; eta is ASHA's reduction factor.
        if not isinstance(early_terminate, dict) or early_terminate.get("type") != "hyperband":
            raise ConfigError(
                f"W&B early_terminate {early_terminate!r} is not supported",
                "Use early_terminate: {type: hyperband, min_iter: N, eta: 3}",
            )
        _reject_unknown(early_terminate, ("type", "min_iter", "eta", "s"), "W&B early_terminate")
        translated["scheduler"] = {
            "type": "asha",
            "grace_period": early_terminate.get("min_iter", 1),
            "reduction_factor": early_terminate.get("eta", 3),
        }
    if "run_cap" in sweep_config:
        translated["num_samples"] = sweep_config["run_cap"]
    return translated


def _parse_parameter(name: str, spec: Any, search_alg: str) -> Parameter:
    where = f"sweep.parameters.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where} must be a mapping, got {spec!r}",
            "Write e.g. {values: [8, 16]}, {grid: [1, 2]}, {value: 3} or {distribution: loguniform, min: 1e-5, max: 1e-3}",
        )
    if "parameters" in spec:
        raise ConfigError(
            f"{where} nests parameters, which raylm does not support",
            "Sweep one entry of a dict field with a dotted name, e.g. config.n_layer",
        )
    _reject_unknown(spec, PARAMETER_KEYS, where)
    distribution = spec.get("distribution")
    for key in ("values", "grid"):
        if key in spec:
            values = spec[key]
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"{where}.{key} must be a non-empty list, got {values!r}", f"Write e.g. {key}: [8, 16]"
                )
            is_grid = key == "grid" or search_alg == "grid" or distribution == "grid"
            return Parameter(name, "grid" if is_grid else "choice", tuple(values))
    if "value" in spec or distribution == "constant":
        return Parameter(name, "constant", (spec.get("value"),))
    if "min" not in spec or "max" not in spec:
        raise ConfigError(
            f"{where} gives neither values, grid, value nor min and max",
            "Write e.g. {distribution: uniform, min: 0.0, max: 0.1}",
        )
    low, high = spec["min"], spec["max"]
    if not all(isinstance(bound, (int, float)) and not isinstance(bound, bool) for bound in (low, high)) or low > high:
        raise ConfigError(f"{where} needs numbers min <= max, got min {low!r} and max {high!r}", "Correct the bounds")
    if distribution is None:
        # W&B's rule: integer bounds sample integers.
        distribution = "randint" if isinstance(low, int) and isinstance(high, int) else "uniform"
    if distribution == "log_uniform":
        # W&B's log_uniform takes natural-log bounds.
        low, high, distribution = math.exp(low), math.exp(high), "loguniform"
    distribution = WANDB_DISTRIBUTIONS.get(distribution, distribution)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where} distribution {spec.get('distribution')!r} is not supported",
            f"Use {', '.join(DISTRIBUTIONS)} (or W&B's int_uniform, log_uniform_values, log_uniform), or values / grid",
        )
    if search_alg == "grid":
        raise ConfigError(
            f"search_alg grid cannot enumerate {where} (a {distribution} distribution)",
            "List its values, or use search_alg random",
        )
    if distribution == "loguniform" and low <= 0:
        raise ConfigError(f"{where} is loguniform with min {low!r}", "Give a loguniform distribution a positive min")
    if distribution == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where} is randint with bounds {low!r} and {high!r}", "Give randint integer bounds")
    return Parameter(name, distribution, low=low, high=high)


def _reject_unknown(values: dict, known: tuple, where: str) -> None:
    unknown = [key for key in values if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"Unknown key{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(hints)}", f"Use {', '.join(known)}"
        )


# --- checking a sweep before anything starts -----------------------------------------------------------


def check_sweep(job: Job, sweep: SweepConfig) -> None:
    """Reject what would fail in a trial (unknown or fixed fields, values a field refuses) before Ray starts."""
    if not job.eval_file:
        raise ConfigError(
            "A sweep judges trials by evaluating during training, but the job has no eval_file",
            "Add `eval_file: data/test.txt` to the job",
        )
    names = [p.name for p in sweep.parameters]
    unknown = [name for name in names if name.partition(".")[0] not in FIELD_TYPES]
    if unknown:
        error = unknown_fields_error(unknown)
        raise ConfigError(
            f"sweep.parameters: {error.problem}",
            "Sweep LanguageModelingArgs fields (python -m raylm.train --help lists them); a dotted name sets one entry of a dict field, e.g. config.n_layer",
        )
    fixed = [name for name in names if name.partition(".")[0] in NOT_SWEPT]
    if fixed:
        raise ConfigError(
            f"sweep.parameters names {', '.join(map(repr, fixed))}, which the sweep sets for every trial or which fixes a trial's resources",
            "Set it in the job instead",
        )
    if sweep.grace_period is not None and "evaluate_during_training_steps" in names:
        raise ConfigError(
            "sweep.scheduler.grace_period counts evaluations, but evaluate_during_training_steps is swept",
            "Give the grace period in optimizer steps with grace_period_steps",
        )
    for parameter in sweep.parameters:
        for value in parameter.candidates():
            try:
                job.with_values({parameter.name: value})
            except ConfigError as err:
                raise ConfigError(f"sweep.parameters.{parameter.name} = {value!r}: {err.problem}", err.fix) from None
    output_dir = job.args.output_dir
    if storage.isdir(output_dir) and storage.listdir(output_dir) and not job.args.overwrite_output_dir:
        raise OutputDirError(
            f"output_dir {output_dir!r}, where the best model goes, is not empty, and overwrite_output_dir is False",
            "Set overwrite_output_dir=True, or choose another output_dir",
        )


# --- one trial --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrialSettings:
    """What every trial is told besides its sampled values (plain values: Tune ships it to trial actors)."""

    experiment_name: str
    storage_path: str
    metric: str
    mode: str
    use_gpu: bool


def _run_trial(sampled: dict, job: Job, settings: _TrialSettings) -> None:
    """A Tune trial: the job with the sampled values, trained by raylm; its evaluations go to Tune."""
    trial_id = tune.get_context().get_trial_id()
    trial_job = job.with_values({**sampled, **_per_trial_values(settings, trial_id)})
    model = LanguageModelingModel(**trial_job.model_kwargs())
    # A DivergenceError ends the trial as errored, with its last evaluation kept by Tune.
    model.train_model(
        trial_job.train_file, eval_file=trial_job.eval_file, callbacks=[_EvaluationsToTune(settings.metric)]
    )


def _per_trial_values(settings: _TrialSettings, trial_id: str) -> dict:
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


class _RecordHowTrialsEnded(tune.Callback):
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


# --- the sweep ----------------------------------------------------------------------------------------


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


def run_sweep(
    sweep: Union[dict, SweepConfig],
    model_type: str,
    model_name: Optional[str],
    train_file: PathSpec,
    eval_file: PathSpec,
    args: Union[dict, LanguageModelingArgs, None] = None,
    train_files: Optional[PathSpec] = None,
    generator_name: Optional[str] = None,
    discriminator_name: Optional[str] = None,
    callbacks: Optional[list] = None,
    verbose: bool = True,
) -> SweepResult:
    """Sweep LanguageModelingModel(model_type, model_name, args=args).train_model(train_file, eval_file=eval_file).

    `sweep` is raylm's sweep mapping (parameters, num_samples, metric, mode, scheduler,
    max_concurrent_trials, search_alg) or a W&B sweep_config, which runs unchanged. The best model
    goes to args.output_dir; args.experiment_name names the sweep (running it again resumes it).
    `callbacks`: extra Ray Tune callbacks (e.g. a W&B or MLflow logger).
    """
    values = args.to_dict() if isinstance(args, LanguageModelingArgs) else dict(args or {})
    constructor = {
        "model_type": model_type,
        "model_name": model_name,
        "train_file": train_file,
        "eval_file": eval_file,
        "train_files": train_files,
        "generator_name": generator_name,
        "discriminator_name": discriminator_name,
    }
    job = {**{k: _plain_path(v) for k, v in constructor.items() if v is not None or k == "model_name"}, **values}
    return sweep_job(job, sweep, callbacks=callbacks, verbose=verbose)


def sweep_job(
    job: Union[dict, Job],
    sweep: Union[dict, SweepConfig],
    callbacks: Optional[list] = None,
    verbose: bool = True,
    stream: Optional[TextIO] = None,
) -> SweepResult:
    """Run (or resume) the sweep of a raylm.train job (a mapping, checked here, or a Job); print the trials' table; export the best model."""
    configure_logging()
    sweep = sweep if isinstance(sweep, SweepConfig) else SweepConfig.from_dict(sweep)
    # Trials run in their own working directories: local paths must not depend on this one.
    job = _absolute_paths(job if isinstance(job, Job) else Job.from_mapping(resolve_job(job, [])))
    check_sweep(job, sweep)
    args = job.args
    storage_path = _absolute_path(args.storage_path) if args.storage_path else DEFAULT_STORAGE_PATH
    experiment_name = args.experiment_name or f"sweep-{os.path.basename(os.path.normpath(args.output_dir))}"
    experiment_path = storage.join(storage_path, experiment_name)
    fingerprint = {"job": job.to_dict(), "sweep": sweep.to_dict()}
    resuming = tune.Tuner.can_restore(experiment_path)
    if resuming:
        _check_same_sweep(experiment_path, fingerprint)

    launcher.ensure_ray(args, extra_cpus=TRIAL_DRIVER_CPUS)
    use_gpu = resolve_use_gpu(args, use_cuda=True)
    settings = _TrialSettings(experiment_name, storage_path, sweep.metric, sweep.mode, use_gpu)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, job=job, settings=settings), {"CPU": TRIAL_DRIVER_CPUS}
    )
    if resuming:
        logger.info(f"Resuming the sweep in {experiment_path} (trials that ended are not run again).")
        tuner = tune.Tuner.restore(
            experiment_path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
    else:
        max_concurrent = _max_concurrent_trials(args, use_gpu, sweep.max_concurrent_trials)
        storage.write_text(storage.join(experiment_path, SWEEP_FILE), json.dumps(fingerprint, indent=2))
        tuner = tune.Tuner(
            trainable,
            param_space={p.name: p.to_tune() for p in sweep.parameters},
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=_search_alg(sweep, args.seed, max_concurrent),
                scheduler=_scheduler(sweep, args),
                num_samples=sweep.num_samples,
                max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=experiment_name,
                storage_path=storage_path,
                verbose=0,
                callbacks=[_RecordHowTrialsEnded(), *(callbacks or [])],
                # The trials' working directories (raylm's training_log.jsonl, TensorBoard) go to their trial folders.
                sync_config=tune.SyncConfig(sync_artifacts=True),
            ),
        )
    with _quiet_tune():
        results = tuner.fit()

    # Trial ids count up in the order Tune created the trials (a restored grid lists them otherwise).
    trials = sorted(
        (trial_outcome(result, sweep.metric, sweep.mode) for result in results), key=lambda trial: trial.trial_id
    )
    best = _best_of([trial for trial in trials if trial.best is not None], sweep.metric, sweep.mode)
    outcome = SweepResult(
        experiment_path, sweep.metric, trials, best, finished=all(t.status != "not finished" for t in trials)
    )
    if outcome.finished and best is not None:
        storage.write_text(storage.join(experiment_path, BEST_CONFIG_FILE), json.dumps(best.sampled, indent=2))
        storage.write_text(
            storage.join(experiment_path, BEST_CHECKPOINT_FILE),
            json.dumps(
                {
                    "trial_id": best.trial_id,
                    "checkpoint": storage.uri_for(storage_path, best.best["checkpoint_path"]),
                    **_evaluation(best.best),
                },
                indent=2,
            ),
        )
        _export(best, job, storage_path, args.output_dir)
        outcome.exported_to = args.output_dir
    if verbose:
        print_table(outcome, [p.name for p in sweep.parameters], stream or sys.stdout)
    if not outcome.finished:
        logger.info(f"The sweep was interrupted; run it again with experiment_name {experiment_name!r} to resume it.")
    return outcome


def _max_concurrent_trials(args: LanguageModelingArgs, use_gpu: bool, requested: Optional[int]) -> int:
    """How many trials run at once: what the cluster can hold, unless asked; asking for more than it can ever hold is an error.

    A trial occupies its driver's CPU, its workers and a CPU for Ray Data. Tune only reserves the
    driver (Train reserves the workers when the run starts), so without a limit Tune would start
    drivers for every CPU and their workers would wait for good. On an autoscaling cluster the
    nodes its autoscaler can add count: trials wait for them rather than run one at a time because
    no GPU node is up yet.
    """
    cpus_per_trial = TRIAL_DRIVER_CPUS + args.max_workers * launcher.cpus_per_worker(args) + launcher.DATA_STAGE_CPUS
    gpus_per_trial = args.max_workers * float((args.resources_per_worker or {}).get("GPU", 1)) if use_gpu else 0.0
    capacity = cluster_capacity()
    resources = capacity.resources if capacity is not None else ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // cpus_per_trial)
    if gpus_per_trial:
        fits = min(fits, int(resources.get("GPU", 0) // gpus_per_trial))
    if requested is None:
        return max(1, fits)
    # A cluster whose growth cannot be known (see capacity.cluster_capacity) may add nodes for waiting trials.
    if capacity is not None and requested > fits:
        raise ClusterError(
            f"sweep.max_concurrent_trials is {requested}, but the Ray cluster {'can hold at most' if capacity.autoscaled else 'holds'} {fits} trial(s) at once "
            f"({cpus_per_trial:g} CPUs{f' and {gpus_per_trial:g} GPUs' if gpus_per_trial else ''} each: driver, {args.max_workers} worker(s), data)",
            f"Set max_concurrent_trials to {max(fits, 1)} or less, or give the trials fewer workers"
            + (", or raise max_workers of the autoscaler's node types" if capacity.autoscaled else ""),
        )
    return requested


def _search_alg(sweep: SweepConfig, seed: int, max_concurrent: int):
    if sweep.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # TuneConfig.max_concurrent_trials wraps a Searcher such as Optuna's in a ConcurrencyLimiter.
        return OptunaSearch(seed=seed)
    # Tune ignores TuneConfig.max_concurrent_trials for a search algorithm passed in: it goes here.
    # Random and grid sweeps draw from the job's seed, so a sweep samples the same values when re-run.
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)


def _scheduler(sweep: SweepConfig, args: LanguageModelingArgs):
    if sweep.scheduler == "none":
        return FIFOScheduler()
    # Time is the optimizer step, which a resumed trial continues from (Tune's iteration count restarts).
    grace_period_steps = sweep.grace_period_steps or (sweep.grace_period or 1) * args.evaluate_during_training_steps
    return ASHAScheduler(
        time_attr="global_step",
        max_t=UNREACHED_MAX_STEPS,
        grace_period=grace_period_steps,
        reduction_factor=sweep.reduction_factor,
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


class _TrialErrorsInTheTable(logging.Filter):
    """Drop Tune's log records about failed trials: a traceback per diverged trial, then a list of Trial objects.

    The table reports each such trial (and its error.txt has the traceback); other Tune errors pass.
    """

    MESSAGES = ("Trial task failed for trial", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGES)


@contextlib.contextmanager
def _quiet_tune():
    """Tune without its console output: no experiment banner, no progress tables, no failed-trial logs.

    The new output engine prints its banner whatever the verbosity; the legacy one, at verbose=0,
    prints nothing. Ray's loggers are at ERROR already (console.configure_logging).
    """
    noisy_loggers = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune.execution.tune_controller")]
    trial_errors = _TrialErrorsInTheTable()
    saved_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for noisy in noisy_loggers:
        noisy.addFilter(trial_errors)
    try:
        yield
    finally:
        for noisy in noisy_loggers:
            noisy.removeFilter(trial_errors)
        if saved_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_output


# --- results ----------------------------------------------------------------------------------------------


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


def _best_of(trials: list[TrialOutcome], metric: str, mode: str) -> Optional[TrialOutcome]:
    if not trials:
        return None
    pick = min if mode == "min" else max
    return pick(trials, key=lambda trial: trial.best[metric])


def _evaluation(row: dict) -> dict:
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
            f"best: {outcome.best.trial_id}, {outcome.metric} {best[outcome.metric]:.4f} at step {int(best['global_step'])}; "
            f"model in {outcome.exported_to}; best_config.json and best_checkpoint.json in {outcome.experiment_path}\n"
        )
    for trial in outcome.trials:
        if trial.error:
            stream.write(
                f"{trial.trial_id} {trial.status}: {trial.error} (traceback in {storage.join(outcome.experiment_path, trial.trial_id)}/error.txt)\n"
            )
    stream.flush()


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- the best model -----------------------------------------------------------------------------------------


def _export(best: TrialOutcome, job: Job, storage_path: str, output_dir: str) -> None:
    """The best evaluation's checkpoint, without the run state, as a Hugging Face folder with the winning args."""
    filesystem, _ = storage.filesystem(storage_path)
    args = job.with_values(best.sampled).args
    checkpoint = ray.train.Checkpoint(path=best.best["checkpoint_path"], filesystem=filesystem)
    with checkpoint.as_directory() as checkpoint_dir, storage.publishing(output_dir, merge=True) as staging:
        for name in os.listdir(checkpoint_dir):
            source, target = os.path.join(checkpoint_dir, name), os.path.join(staging, name)
            if name in RUN_STATE_FILES:
                continue
            if os.path.isdir(source):
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        # The checkpoint's model_args.json is the trial's (no_save, its run folder); a user continues from these.
        args.save(staging)
        with open(os.path.join(staging, "eval_results.txt"), "w", encoding="utf-8") as f:
            for key, value in sorted(_evaluation(best.best).items()):
                f.write(f"{key} = {value}\n")


# --- paths and files ------------------------------------------------------------------------------------------


def _plain_path(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain_path(v) for v in value]
    return value


def _absolute_path(path: str) -> str:
    return path if storage.is_uri(path) else os.path.abspath(os.path.expanduser(path))


def _absolute_paths(job: Job) -> Job:
    """The job with local data paths made absolute; model, tokenizer and config names only when they are local folders.

    Tune runs each trial in its own working directory, on any node: as for a single run's workers,
    local paths must exist on every node of a multi-node cluster (or be URIs).
    """

    def absolute(value):
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, dict):  # a mixture: {source: weight}
            return {absolute(source): weight for source, weight in value.items()}
        return _absolute_path(value) if isinstance(value, str) else value

    def absolute_folder(value):
        return (
            os.path.abspath(value)
            if isinstance(value, str) and not storage.is_uri(value) and os.path.exists(value)
            else value
        )

    job = dataclasses.replace(
        job,
        train_file=absolute(job.train_file),
        eval_file=absolute(job.eval_file),
        train_files=absolute(job.train_files),
        model_name=absolute_folder(job.model_name),
        generator_name=absolute_folder(job.generator_name),
        discriminator_name=absolute_folder(job.discriminator_name),
    )
    folders = {name: absolute_folder(getattr(job.args, name)) for name in ("tokenizer_name", "config_name")}
    return job.with_values(folders)


def _read_text(path: str) -> Optional[str]:
    return storage.read_text(path) if storage.isfile(path) else None


def _check_same_sweep(experiment_path: str, fingerprint: dict) -> None:
    """Tune resumes the search space it saved; a changed job or sweep would be silently ignored."""
    saved = _read_text(storage.join(experiment_path, SWEEP_FILE))
    if saved is not None and json.loads(saved) != json.loads(json.dumps(fingerprint)):
        raise ConfigError(
            f"The experiment {experiment_path} was started with a different job or sweep, and running it again would resume that one",
            "Run the same job and sweep to resume it, or set another experiment_name for a new sweep",
        )
