"""Training curves: the training_log.jsonl of one or more runs -> a PNG of loss and learning rate against steps.

One run redraws RUN_DIR/training_curves.png (what training writes at its end); several runs are drawn
on the same axes, one colour per run, into training_curves_comparison.png in the current folder.
matplotlib is an optional extra (pip install raylm[plot]); it is only imported when drawing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from raylm.errors import ConfigError, DataError

# What training writes in output_dir and draws from (raylm.training.tracking writes them; this module reads them).
TRAINING_LOG_FILE = "training_log.jsonl"
TRAINING_CURVES_FILE = "training_curves.png"
# Every picture is 1000 x 700 pixels: 10 x 7 inches at 100 dots per inch (saved without a tight bbox,
# which would change the size).
FIGURE_SIZE_INCHES = (10.0, 7.0)
FIGURE_DPI = 100
FIGURE_SIZE_PIXELS = (1000, 700)
COMPARISON_FILE = "training_curves_comparison.png"


@dataclass
class RunHistory:
    """The train and eval series of one run, in the order they were logged."""

    name: str
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.train_steps and not self.eval_steps


def read_run(run_dir: str, name: Optional[str] = None) -> RunHistory:
    """The series in RUN_DIR/training_log.jsonl (or in the .jsonl file given directly).

    A line cut short by a crash is skipped when it is the last one; a broken line anywhere else is a
    DataError. Steps logged again after a restart from a checkpoint replace the earlier attempt's.
    """
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, TRAINING_LOG_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{run_dir!r} has no {TRAINING_LOG_FILE}",
            "Point to the output_dir of a raylm training run (it is written while training)",
        )
    history = RunHistory(name or os.path.basename(os.path.normpath(run_dir)))
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(
                f"Line {number} of {path!r} is not valid JSON", "Remove the line, or rerun training to rewrite the log"
            ) from None
        step = event.get("global_step")
        if event.get("kind") == "train":
            _drop_from(step, history.train_steps, history.train_loss, history.learning_rate)
            history.train_steps.append(step)
            history.train_loss.append(event["loss"])
            history.learning_rate.append(event["learning_rate"])
        elif event.get("kind") == "eval" and "eval_loss" in event:
            _drop_from(step, history.eval_steps, history.eval_loss)
            history.eval_steps.append(step)
            history.eval_loss.append(event["eval_loss"])
    return history


def _drop_from(step: int, steps: list[int], *series: list[float]) -> None:
    """Forget points at or after `step`: a run restarted from a checkpoint logs those steps again, and the later
    attempt counts."""
    while steps and steps[-1] >= step:
        steps.pop()
        for values in series:
            values.pop()


def plot_run(run_dirs: Sequence[str], out_path: str) -> str:
    """Draw train loss, eval loss and learning rate against global steps for each run; returns out_path.

    Top panel: loss (train as a line, eval as dashed markers); bottom panel: learning rate. The PNG
    is FIGURE_SIZE_PIXELS (1000 x 700) and replaces out_path atomically.
    """
    figure_class, canvas_class = _require_matplotlib()
    histories = [read_run(run_dir, name) for run_dir, name in zip(run_dirs, _run_labels(run_dirs))]
    if all(history.is_empty for history in histories):
        raise DataError(
            f"{TRAINING_LOG_FILE} holds no train or eval events in {', '.join(map(repr, run_dirs))}",
            "Draw a run that logged at least one step (lower logging_steps for short runs)",
        )

    figure = figure_class(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    canvas_class(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    comparing = len(histories) > 1
    for index, history in enumerate(histories):
        colour = f"C{index % 10}"
        prefix = f"{history.name}: " if comparing else ""
        if history.train_steps:
            loss_axes.plot(history.train_steps, history.train_loss, color=colour, label=f"{prefix}train loss")
            lr_axes.plot(history.train_steps, history.learning_rate, color=colour)
        if history.eval_steps:
            loss_axes.plot(
                history.eval_steps,
                history.eval_loss,
                color=colour,
                linestyle="--",
                marker="o",
                label=f"{prefix}eval loss",
            )
    loss_axes.set_title(
        " vs ".join(h.name for h in histories) if comparing else f"Training curves: {histories[0].name}"
    )
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper right")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for axes in (loss_axes, lr_axes):
        axes.grid(alpha=0.3)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    partial_path = out_path + ".partial"
    figure.savefig(partial_path, format="png", dpi=FIGURE_DPI)
    os.replace(partial_path, out_path)
    return out_path


def _require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "Drawing training curves needs matplotlib, which is not installed",
            "Install it with pip install raylm[plot] (or pip install 'matplotlib>=3.7')",
        ) from None
    # Agg without pyplot: no display needed and no global figure state.
    return Figure, FigureCanvasAgg


def _run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(run_dir)) for run_dir in run_dirs]
    return [name if names.count(name) == 1 else run_dir for name, run_dir in zip(names, run_dirs)]
