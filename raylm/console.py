"""Console: raylm's quiet logging and the one progress line the driver shows while workers train."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

logger = logging.getLogger("raylm")


def configure_logging(verbose: bool = True) -> None:
    """raylm's own messages at INFO; transformers' and Ray's chatter at ERROR."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("raylm: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("transformers", "ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


class ProgressLine:
    """One line, rewritten in place on a terminal (a new line per report otherwise)."""

    def __init__(self, total_steps: int, silent: bool = False, stream=None):
        self.total_steps = total_steps
        self.silent = silent
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.last: Optional[dict] = None

    def update(self, metrics: dict) -> None:
        self.last = metrics
        if self.silent:
            return
        step = metrics["global_step"]
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
        line = (
            f"epoch {metrics['epoch'] + 1} | step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | "
            f"lr {metrics['learning_rate']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s | ETA {eta:,.0f}s"
        )
        if self.stream.isatty():
            self.stream.write("\r" + line.ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.silent and self.last is not None and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def report_error(err: BaseException) -> None:
    """A user error as one paragraph on stderr."""
    sys.stderr.write(f"raylm: error: {err}\n")
