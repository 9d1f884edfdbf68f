"""Sweep search spaces: raylm's sweep mapping (the `sweep:` section of a job) or a W&B sweep_config -> a checked
`SweepConfig` of `Parameter`s (Tune's search space and how Tune judges the trials); a job and its sweep -> refused
before Ray starts when a trial would fail.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Optional

from ray import tune

from raylm.config import FIELD_TYPES, unknown_fields_error
from raylm.data import storage
from raylm.errors import ConfigError, OutputDirError
from raylm.train import Job

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
                "Add `parameters:` with at least one field, "
                "e.g. learning_rate: {distribution: loguniform, min: 1e-5, max: 1e-3}",
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
    """A W&B sweep_config (method, metric {name, goal}, parameters, early_terminate, run_cap) as raylm's sweep
    mapping."""
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
            "Write e.g. {values: [8, 16]}, {grid: [1, 2]}, {value: 3} "
            "or {distribution: loguniform, min: 1e-5, max: 1e-3}",
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
            "Sweep LanguageModelingArgs fields (python -m raylm.train --help lists them); a dotted name sets one entry "
            "of a dict field, e.g. config.n_layer",
        )
    fixed = [name for name in names if name.partition(".")[0] in NOT_SWEPT]
    if fixed:
        raise ConfigError(
            f"sweep.parameters names {', '.join(map(repr, fixed))}, which the sweep sets for every trial "
            "or which fixes a trial's resources",
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
