"""`python -m raylm.tune JOB.yaml [key=value ...]`: a job with a `sweep:` section -> a Ray Tune sweep.

Everything outside `sweep:` is a raylm.train job (same keys, same checks); `sweep.key=value`
overrides reach into the sweep (`sweep.num_samples=4`, `sweep.scheduler.grace_period=3`). The job
and the sweep are checked before Ray starts. Exit status: 0 when the sweep finished, 2 for a user
error (one paragraph), 130 when it was interrupted (running the same command again resumes it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import yaml

from raylm.config import YamlLoader
from raylm.errors import ConfigError, RaylmUserError
from raylm.train import Job, read_job_file, resolve_job

SWEEP_PREFIX = "sweep."
INTERRUPTED_EXIT_CODE = 130  # as a shell reports a command stopped by Ctrl-C


def load_sweep_job(job_file: str, overrides: list[str]) -> tuple[Job, dict]:
    """(the checked job, the sweep mapping) from a job file with a `sweep:` section, overrides applied."""
    job = read_job_file(job_file)
    sweep = job.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise ConfigError(
            f"The job file {job_file!r} has no `sweep:` section",
            "Add one (see jobs/sweep_gpt2.yaml), or train the job with python -m raylm.train",
        )
    job_overrides = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if key.strip().startswith(SWEEP_PREFIX) and sep:
            sweep = _with_entry(sweep, key.strip()[len(SWEEP_PREFIX) :], _parse_value(text, item))
        else:
            job_overrides.append(item)
    return Job.from_mapping(resolve_job(job, job_overrides)), sweep


def _parse_value(text: str, item: str) -> Any:
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"Could not read the override {item!r} as YAML: {' '.join(str(err).split())}",
            "Fix the YAML syntax (quote strings that contain ': ')",
        ) from None


def _with_entry(mapping: dict, dotted_key: str, value: Any) -> dict:
    """A copy of `mapping` with the entry at `dotted_key` ("a.b" -> mapping["a"]["b"]) set to value."""
    head, _, rest = dotted_key.partition(".")
    updated = dict(mapping)
    inner = updated.get(head) if isinstance(updated.get(head), dict) else {}
    updated[head] = _with_entry(inner, rest, value) if rest else value
    return updated


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raylm.tune",
        description="Sweep a raylm job's hyperparameters with Ray Tune: the job's `sweep:` section gives the search "
        "space.",
        epilog="Job keys are raylm.train's (python -m raylm.train --help). "
        "sweep keys: parameters, num_samples, metric, mode, "
        "scheduler {type: asha|none, grace_period | grace_period_steps, reduction_factor}, max_concurrent_trials, "
        "search_alg (random, grid, optuna). Running the same experiment_name again resumes the sweep.",
    )
    parser.add_argument("job", help="YAML job file with a sweep: section")
    parser.add_argument("overrides", nargs="*", help="key=value overrides; sweep.key=value for the sweep")
    parser.add_argument("--print-config", action="store_true", help="print the resolved job and sweep and exit")
    options = parser.parse_args(argv)

    from raylm.console import configure_logging, report_error, write_result
    from raylm.sweep.space import SweepConfig, check_sweep
    from raylm.sweep.tuner import sweep_job

    configure_logging()
    try:
        job, sweep = load_sweep_job(options.job, list(options.overrides))
        sweep_config = SweepConfig.from_dict(sweep)
        check_sweep(job, sweep_config)
        if options.print_config:
            write_result(yaml.safe_dump({**job.to_dict(), "sweep": sweep}, sort_keys=False))
            return 0
        result = sweep_job(job, sweep_config)
    except RaylmUserError as err:
        report_error(err)
        return 2
    return 0 if result.finished else INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
