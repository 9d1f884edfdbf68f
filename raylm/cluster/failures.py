"""Failures: what Ray raises when a run fails (a worker's, the controller's or the driver's error, nested) -> the
user's own error when it is one, else one paragraph naming the root cause, with the full traceback in the run folder.
"""

from __future__ import annotations

import traceback

from ray.train import TrainingFailedError

from raylm.data import storage
from raylm.errors import RaylmUserError, TrainingFailed, root_cause


def explain_failure(failure: TrainingFailedError, folder: str) -> Exception:
    """Ray's nested failure -> the user's own error (a RaylmUserError raised in a worker) or one paragraph.

    The full traceback goes to `raylm-error.log` in the run folder, which the paragraph names.
    """
    causes = dict(getattr(failure, "worker_failures", {}) or {})
    if not causes:
        causes = {"controller": getattr(failure, "controller_failure", None) or failure}
    return one_paragraph(failure, causes, folder)


def one_paragraph(failure: BaseException, causes: dict, folder: str) -> Exception:
    """The user's own error among `causes` ({where: error}), else one paragraph naming the first root cause and the
    log."""
    roots = {where: root_cause(error) for where, error in causes.items()}
    for root in roots.values():
        if isinstance(root, RaylmUserError):
            return root
    log_path = storage.join(folder, "raylm-error.log")
    try:
        storage.write_text(log_path, "".join(traceback.format_exception(failure)))
    except OSError:
        log_path = "(could not be written)"
    where, root = next(iter(roots.items()), ("worker", failure))
    # All of what Ray said, on one line per paragraph: its first line often only announces the cause.
    message = " ".join(str(root).split()) or type(root).__name__
    origin = {"controller": "the Ray Train controller", "driver": "the training loop"}.get(
        where, f"worker rank {where}"
    )
    return TrainingFailed(
        f"Training failed in {origin}: {type(root).__name__}: {message}. The full traceback is in {log_path}."
    )
