"""Run tracking: the training events rank 0 sends to the driver -> logs, dashboards and a picture.

`RunLog` receives plain dicts (`{"kind": "train", ...}` every logging_steps, `{"kind": "eval", ...}` at
each evaluation during training, `{"kind": "preemption", ...}` at each spot reclaim; other kinds are ignored)
and writes, in output_dir:

* `training_log.jsonl`: every train, eval and preemption event, one JSON object per line; the durable record
  that `raylm.training.curves` draws from;
* `training_progress_scores.csv`: Simple Transformers' table, one row per evaluation;
* TensorBoard scalars (`loss`, `lr`, `tokens_per_second`, `eval_loss`, `eval_perplexity`, ...) in
  `tensorboard_dir`, default `output_dir/runs/<run_name>`;
* the same scalars to Weights & Biases when `wandb_project` is set, and to MLflow when mlflow is
  installed and a run is active or `MLFLOW_TRACKING_URI` is set;
* `training_curves.png` at `close()`, when matplotlib is installed.

Nothing is created before the first event, so a run that fails while starting leaves output_dir as it was;
with no_save (and not overwrite_output_dir) nothing is written there at all. RunLog writes local files
only: for an output_dir in object storage it is given the driver's working folder (storage.OutputFolder),
which the driver copies there at each checkpoint and at the end.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from typing import Any, Optional

from raylm.config import LanguageModelingArgs
from raylm.console import logger
from raylm.errors import ConfigError
from raylm.training.curves import TRAINING_CURVES_FILE, TRAINING_LOG_FILE, plot_run

PROGRESS_SCORES_FILE = "training_progress_scores.csv"
TRACKED_KINDS = ("train", "eval", "preemption")
# Simple Transformers' first columns; any further eval metrics follow in the order they first appear.
PROGRESS_SCORES_LEADING_COLUMNS = ("global_step", "train_loss", "eval_loss", "perplexity")
# Train event field -> scalar name (Simple Transformers' TensorBoard names where it has one).
_TRAIN_SCALAR_NAMES = {
    "loss": "loss",
    "learning_rate": "lr",
    "tokens_per_second": "tokens_per_second",
    # The worker adds the FLOP rate when it knows the model's FLOPs per token, and mfu on a known GPU.
    "data_wait_fraction": "data_wait_fraction",
    "model_flops_per_second": "model_flops_per_second",
    "mfu": "mfu",
    "checkpoint_stall_seconds": "checkpoint_stall_seconds",
    # torch_compile only.
    "compile_seconds": "compile_seconds",
    "recompilations": "recompilations",
}
# Event fields that say where an evaluation happened rather than what it measured.
_EVAL_CONTEXT_FIELDS = ("kind", "global_step", "epoch", "train_loss")


def check_trackers(args: LanguageModelingArgs) -> None:
    """Raise ConfigError when args ask for a tracker that is not installed (call before training starts)."""
    if args.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"wandb_project is set to {args.wandb_project!r}, but the wandb package is not installed",
            "Install it with pip install wandb (and run wandb login), or set wandb_project=None",
        )


def train_scalars(event: dict) -> dict[str, float]:
    """Scalar name -> value of a train event, named as Simple Transformers names them in TensorBoard."""
    return {name: event[key] for key, name in _TRAIN_SCALAR_NAMES.items() if _is_number(event.get(key))}


def eval_scalars(event: dict) -> dict[str, float]:
    """Scalar name -> value of an eval event: every numeric metric as eval_<metric> (eval_loss stays eval_loss)."""
    scalars = {}
    for key, value in event.items():
        if key in _EVAL_CONTEXT_FIELDS or not _is_number(value):
            continue
        scalars[key if key.startswith("eval_") else f"eval_{key}"] = value
    return scalars


class RunLog:
    """Everything a user can look at about one training run, fed one event at a time on the driver.

    Local files are flushed after every event, so a crash loses at most the line being written;
    an external tracker (W&B, MLflow) that fails mid-run is switched off with a warning, because the
    training itself matters more than a dashboard.
    """

    def __init__(self, output_dir: str, args: LanguageModelingArgs, run_name: str, resume: bool = False):
        """resume=True continues the logs of a run resumed from a checkpoint instead of starting them afresh."""
        check_trackers(args)
        self.output_dir = output_dir
        self.run_name = run_name
        self.tensorboard_dir = args.tensorboard_dir or os.path.join(output_dir, "runs", run_name)
        self.args = args
        self.resume = resume
        # no_save leaves output_dir as it was (train_model then skips its check for an existing one),
        # unless overwrite_output_dir lets the logs in: a sweep's trials keep theirs so.
        self.writes_output_dir = not args.no_save or args.overwrite_output_dir
        self._log_file: Optional[io.TextIOBase] = None
        self._tensorboard = None
        self._progress_rows: list[dict] = (
            _read_progress_scores(os.path.join(output_dir, PROGRESS_SCORES_FILE)) if resume else []
        )
        self._wandb_run = _start_wandb(args, run_name) if args.wandb_project else None
        self._mlflow, self._owns_mlflow_run = _start_mlflow(args, run_name)
        self.closed = False

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(succeeded=exc_type is None)

    def on_event(self, event: dict) -> None:
        """Record one event from the workers; kinds other than train, eval and preemption are ignored."""
        kind = event.get("kind")
        if kind not in TRACKED_KINDS or self.closed:
            return
        event = {key: _plain(value) for key, value in event.items()}
        if self.writes_output_dir:
            self._append_log_line(event)
        if kind == "preemption":
            return  # a record for the log, not a scalar
        scalars = train_scalars(event) if kind == "train" else eval_scalars(event)
        if kind == "eval":
            # A restart from a checkpoint evaluates those steps again; the later attempt's row counts.
            self._progress_rows = [row for row in self._progress_rows if row["global_step"] < event["global_step"]]
            # Numbers only: flags such as is_best are in training_log.jsonl, not in the scores table.
            self._progress_rows.append({key: value for key, value in event.items() if _is_number(value)})
            if self.writes_output_dir:
                self._rewrite_progress_scores()
        step = int(event["global_step"])
        if self.writes_output_dir or self.args.tensorboard_dir:
            self._write_tensorboard(scalars, step)
        self._log_external(scalars, step)

    def close(self, succeeded: bool = True) -> None:
        """Flush and close every sink, then draw training_curves.png (skipped quietly without matplotlib)."""
        if self.closed:
            return
        self.closed = True
        if self._log_file is not None:
            self._log_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._guard("wandb", lambda: self._wandb_run.finish(exit_code=0 if succeeded else 1))
        if self._mlflow is not None and self._owns_mlflow_run:
            self._guard("mlflow", lambda: self._mlflow.end_run(status="FINISHED" if succeeded else "FAILED"))
        if self._log_file is not None:
            self._draw_training_curves()

    # --- local files --------------------------------------------------------------------------------
    def _append_log_line(self, event: dict) -> None:
        if self._log_file is None:
            os.makedirs(self.output_dir, exist_ok=True)
            path = os.path.join(self.output_dir, TRAINING_LOG_FILE)
            if self.resume:
                _drop_partial_last_line(path)
            self._log_file = open(path, "a" if self.resume else "w", encoding="utf-8")
        # One write and one flush per event: a crash can cut only the last line, which readers skip.
        self._log_file.write(json.dumps(event) + "\n")
        self._log_file.flush()

    def _rewrite_progress_scores(self) -> None:
        # Rewritten whole (evaluations are rare) and swapped in atomically: a metric that first
        # appears in a later evaluation still gets its column, and readers never see half a file.
        columns = list(PROGRESS_SCORES_LEADING_COLUMNS)
        for row in self._progress_rows:
            columns += [key for key in row if key not in columns]
        path = os.path.join(self.output_dir, PROGRESS_SCORES_FILE)
        with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self._progress_rows)
        os.replace(path + ".tmp", path)

    def _write_tensorboard(self, scalars: dict[str, float], step: int) -> None:
        if self._tensorboard is None:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(logdir=self.tensorboard_dir)
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def _draw_training_curves(self) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            logger.debug("matplotlib is not installed; skipping %s (pip install raylm[plot])", TRAINING_CURVES_FILE)
            return
        try:
            plot_run([self.output_dir], os.path.join(self.output_dir, TRAINING_CURVES_FILE))
        except Exception as err:  # noqa: BLE001 - the picture is a convenience; the trained model matters
            logger.warning(f"Could not draw {TRAINING_CURVES_FILE}: {err}")

    # --- external trackers ------------------------------------------------------------------------
    def _log_external(self, scalars: dict[str, float], step: int) -> None:
        if self._wandb_run is not None:
            self._guard("wandb", lambda: self._wandb_run.log({**scalars, "global_step": step}, step=step))
        if self._mlflow is not None:
            self._guard("mlflow", lambda: self._mlflow.log_metrics(scalars, step=step))

    def _guard(self, tracker: str, call) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - any tracker failure; training goes on without it
            logger.warning(f"{tracker} logging failed and is switched off for this run: {err}")
            if tracker == "wandb":
                self._wandb_run = None
            else:
                self._mlflow = None


def _start_wandb(args: LanguageModelingArgs, run_name: str):
    import wandb

    return wandb.init(project=args.wandb_project, config=args.to_dict(), **{"name": run_name, **args.wandb_kwargs})


def _start_mlflow(args: LanguageModelingArgs, run_name: str) -> tuple[Any, bool]:
    """(the mlflow module, whether this RunLog started the MLflow run), or (None, False) when MLflow is not in use."""
    if importlib.util.find_spec("mlflow") is None:
        return None, False
    import mlflow

    if mlflow.active_run() is not None:
        return mlflow, False
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None, False
    mlflow.start_run(run_name=run_name)
    # MLflow params are strings of bounded length; the full args are in model_args.json anyway.
    mlflow.log_params({key: str(value)[:500] for key, value in args.to_dict().items()})
    return mlflow, True


def _drop_partial_last_line(path: str) -> None:
    """Cut a line left unfinished by a crash, so the lines appended after it stay whole."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _read_progress_scores(path: str) -> list[dict]:
    """The rows of an existing training_progress_scores.csv, numbers parsed back (empty cells left out)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [{key: _parse_number(text) for key, text in row.items() if text} for row in csv.DictReader(f)]


def _parse_number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy/torch scalars become Python numbers; NaN/inf stay floats (json writes NaN/Infinity)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
