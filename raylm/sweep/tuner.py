"""The sweep's Tuner: a raylm job and a `SweepConfig` -> Ray Tune trials (resumed when the experiment exists) -> the
trials' table, best_config.json and best_checkpoint.json, and the best evaluation's model in output_dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Optional, TextIO, Union

import ray
import ray.train
from ray import tune
from ray.train.constants import DEFAULT_STORAGE_PATH
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from raylm.cluster import launcher
from raylm.cluster.capacity import cluster_capacity, resolve_use_gpu
from raylm.cluster.storage_checks import check_storage_reaches_every_node
from raylm.config import LanguageModelingArgs
from raylm.console import configure_logging, logger
from raylm.data import storage
from raylm.data.sources import resolve_text_files, text_sources
from raylm.errors import ClusterError, ConfigError
from raylm.sweep.space import SweepConfig, check_sweep
from raylm.sweep.trials import (
    RecordHowTrialsEnded,
    SweepResult,
    TrialOutcome,
    TrialSettings,
    best_trial,
    evaluation_numbers,
    print_table,
    run_trial,
    trial_outcome,
)
from raylm.train import Job, resolve_job
from raylm.training.outputs import publish_model

PathSpec = Union[str, os.PathLike, list, dict]

TRIAL_DRIVER_CPUS = 1  # the trial actor builds datasets and drives its run; Train reserves its workers
# ASHA needs a horizon; trials end by themselves (max_steps or epochs), so it must never be reached.
UNREACHED_MAX_STEPS = 2**40
SWEEP_FILE = "raylm_sweep.json"
BEST_CONFIG_FILE = "best_config.json"
BEST_CHECKPOINT_FILE = "best_checkpoint.json"


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
    """Run (or resume) the sweep of a raylm.train job (a mapping, checked here, or a Job); print the trials' table;
    export the best model."""
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

    launcher.ensure_ray(args, extra_cpus=TRIAL_DRIVER_CPUS, for_sweep=True)
    _check_storage(job, args, storage_path)
    use_gpu = resolve_use_gpu(args, use_cuda=True)
    settings = TrialSettings(experiment_name, storage_path, sweep.metric, sweep.mode, use_gpu)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=job, settings=settings), {"CPU": TRIAL_DRIVER_CPUS}
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
                callbacks=[RecordHowTrialsEnded(), *(callbacks or [])],
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
    best = best_trial([trial for trial in trials if trial.best is not None], sweep.metric, sweep.mode)
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
                    **evaluation_numbers(best.best),
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


def _check_storage(job: Job, args: LanguageModelingArgs, storage_path: str) -> None:
    """What each trial's train_model checks of the storage (storage_checks.py), once, before any trial starts."""
    trial_args = args.copy()
    trial_args.storage_path = storage_path
    train_sources, _ = text_sources(job.train_file, role="train_file")
    text_files = [("train_file", resolve_text_files(source, role="train_file")) for source in train_sources]
    text_files.append(("eval_file", resolve_text_files(job.eval_file, role="eval_file")))
    check_storage_reaches_every_node(trial_args, text_files=text_files)


def _max_concurrent_trials(args: LanguageModelingArgs, use_gpu: bool, requested: Optional[int]) -> int:
    """How many trials run at once: what the cluster can hold, unless asked; asking for more than it can ever hold is an
    error.

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
            f"sweep.max_concurrent_trials is {requested}, but the Ray cluster "
            f"{'can hold at most' if capacity.autoscaled else 'holds'} {fits} trial(s) at once "
            f"({cpus_per_trial:g} CPUs{f' and {gpus_per_trial:g} GPUs' if gpus_per_trial else ''} each: driver, "
            f"{args.max_workers} worker(s), data)",
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


# --- the best model -----------------------------------------------------------------------------------------


def _export(best: TrialOutcome, job: Job, storage_path: str, output_dir: str) -> None:
    """The best evaluation's checkpoint, without the run state, as a Hugging Face folder with the winning args."""
    filesystem, _ = storage.filesystem(storage_path)
    args = job.with_values(best.sampled).args
    checkpoint = ray.train.Checkpoint(path=best.best["checkpoint_path"], filesystem=filesystem)
    with checkpoint.as_directory() as checkpoint_dir:
        # The checkpoint's model_args.json is the trial's (no_save, its run folder); a user continues from these.
        publish_model(checkpoint_dir, output_dir, args, eval_results=evaluation_numbers(best.best))


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
            f"The experiment {experiment_path} was started with a different job or sweep, and running it again would "
            "resume that one",
            "Run the same job and sweep to resume it, or set another experiment_name for a new sweep",
        )
