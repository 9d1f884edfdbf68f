"""Console: raylm's quiet logging, the one progress line the driver shows while workers train, and the run summary."""

from __future__ import annotations

import atexit
import logging
import sys
import time
from typing import Optional

logger = logging.getLogger("raylm")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message is logged, not the one at setup.

    pytest's capsys, contextlib.redirect_stderr and notebooks swap sys.stderr after raylm was
    imported; a handler holding the first one would write past them (logging.lastResort does the same).
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _ignored) -> None:
        pass


def configure_logging(verbose: bool = True) -> None:
    """raylm's own messages at INFO; transformers' and Ray's chatter at ERROR."""
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("raylm: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    _no_colour_reset_at_exit()
    for name in ("transformers", "ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def _no_colour_reset_at_exit() -> None:
    """Undo colorama's exit hook: Ray Train's import loads Ray's CLI logger, which calls colorama.init(), and
    colorama then writes ESC[0m to a terminal's stdout when Python exits, after raylm's last line.

    raylm prints no colours, so there is nothing to reset. Called by configure_logging, which every entry
    point runs after importing Ray (LanguageModelingModel, the sweep).
    """
    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None:
        atexit.unregister(initialise.reset_all)


_said_once: set[str] = set()


def notice_once(message: str) -> None:
    """Log `message` the first time only: a notice about the cluster holds for the whole process (training, then
    evaluation)."""
    if message not in _said_once:
        _said_once.add(message)
        logger.info(message)


class ProgressLine:
    """One line, rewritten in place on a terminal (a new line per report otherwise)."""

    def __init__(self, total_steps: int, silent: bool = False, stream=None, show_workers: bool = False):
        self.total_steps = total_steps
        self.silent = silent
        self.show_workers = show_workers  # an elastic run's worker count changes
        self._stream = stream
        self.started = time.perf_counter()
        self.last: Optional[dict] = None

    @property
    def stream(self):
        # Looked up at each write, like the log handler, so a redirected stderr gets the progress too.
        return self._stream or sys.stderr

    def update(self, metrics: dict) -> None:
        self.last = metrics
        if self.silent:
            return
        step = metrics["global_step"]
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
        line = (
            f"epoch {metrics['epoch']} | step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | "
            f"lr {metrics['learning_rate']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s | ETA {eta:,.0f}s"
        )
        if self.show_workers:
            line += f" | {metrics['num_workers']} workers"
        if self.stream.isatty():
            self.stream.write("\r" + line.ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.silent and self.last is not None and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def log_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A title and label/value rows through the raylm logger, the values aligned in one column."""
    logger.info(title)
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        logger.info(f"  {label.ljust(width)}  {value}")


def format_seconds(seconds: float) -> str:
    """A duration as people read it: 42 s, 3 min 07 s, 2 h 05 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_bytes(size: int) -> str:
    """A size as people read it: 512 B, 3.4 MB, 1.2 GB (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024


def write_result(text: str) -> None:
    """A command's result (a file it wrote, a resolved job) on stdout, where a pipe or script reads it; everything
    else goes to stderr."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def report_error(err: BaseException) -> None:
    """A user error as one paragraph on stderr."""
    sys.stderr.write(f"raylm: error: {err}\n")
