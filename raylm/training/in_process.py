"""A one-worker run on raylm's local Ray, trained in the driver's own process on Ray Train's local mode.

Ray Train's controller and its worker each start a process that imports Ray Train, torch and
transformers before the first step: about 15 s on a small machine, most of a short run. One worker
on the machine the driver runs on gains nothing from them. Ray Train's local mode (what
`ScalingConfig(num_workers=0)` runs) calls the training function in the driver instead, with the
same `ray.train` API, but it keeps only the last report in memory. `DriverTrainFnUtils` adds what the
controller would do with each checkpoint: persist it under storage_path and register it with Ray's
own CheckpointManager, which writes the run's snapshot and prunes as CheckpointConfig says. A later
run of the same name (any worker count, in the driver or on Ray Train's workers) resumes from there.
"""

from __future__ import annotations

import contextlib
import random
import threading
import warnings
from typing import Any, Callable, Optional

from pydantic import PydanticDeprecatedSince20
from ray.train import CheckpointConfig, CheckpointUploadMode
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
from ray.train.v2._internal.execution.storage import StorageContext
from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils
from ray.train.v2._internal.execution.training_report import _TrainingReport
from ray.train.v2.api.reported_checkpoint import ReportedCheckpoint, ReportedCheckpointStatus

# Ray Train's utilities are one slot per process (set_train_fn_utils), so one driver run at a time;
# a second run started meanwhile (another thread) trains on Ray Train's workers.
_DRIVER_RUN = threading.Lock()


class _DriverCheckpointManager(CheckpointManager):
    # Ray's controller runs the manager on an asyncio loop, and registering a checkpoint wakes the
    # coroutines waiting for it there; in the driver nothing waits, and there is no loop to wake.
    def _notify(self) -> None:
        pass

    # Ray 2.60 reads and writes its snapshot with pydantic's V1 methods (parse_obj, json), which warn
    # on pydantic 2. In its controller's process nobody sees that; here it would reach the user's
    # console about code that is not theirs.
    def _load_state(self, json_state: str) -> None:
        with _without_pydantic_deprecations():
            super()._load_state(json_state)

    def _save_state(self) -> str:
        with _without_pydantic_deprecations():
            return super()._save_state()


@contextlib.contextmanager
def _without_pydantic_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PydanticDeprecatedSince20)
        yield


class DriverTrainFnUtils(LocalTrainFnUtils):
    """Ray Train's local-mode utilities, with checkpoints persisted, registered and pruned as Ray Train's controller
    does."""

    def __init__(self, storage_path: str, name: str, checkpoint_config: CheckpointConfig):
        super().__init__(experiment_name=name)
        self._storage = StorageContext(storage_path=storage_path, experiment_dir_name=name)
        # Loads the run's snapshot when there is one: get_checkpoint then resumes its latest checkpoint.
        self._checkpoints = _DriverCheckpointManager(checkpoint_config, self._storage)

    def report(
        self,
        metrics: dict,
        checkpoint=None,
        checkpoint_dir_name: Optional[str] = None,
        checkpoint_upload_mode: CheckpointUploadMode = CheckpointUploadMode.SYNC,
        **_ignored,
    ) -> None:
        assert checkpoint_upload_mode == CheckpointUploadMode.SYNC, checkpoint_upload_mode
        _check_metrics(metrics)
        self._last_metrics = metrics
        if checkpoint is None:
            return
        # Uploaded here, on this thread: a run that asks for async uploads trains on Ray Train's workers
        # (runs_in_driver).
        persisted = self._storage.persist_current_checkpoint(
            checkpoint, checkpoint_dir_name or StorageContext.make_default_checkpoint_dir_name()
        )
        self._checkpoints.register_checkpoint(_TrainingReport(checkpoint=persisted, metrics=metrics, validation=False))

    def get_checkpoint(self):
        latest = self._checkpoints.latest_checkpoint_result
        return latest.checkpoint if latest is not None else None

    def get_all_reported_checkpoints(self, *_args, **_kwargs) -> list:
        # What Ray's controller answers: every checkpoint still kept (the latest among them), in its order.
        return [
            ReportedCheckpoint(
                checkpoint=result.checkpoint, metrics=result.metrics, status=ReportedCheckpointStatus.COMMITTED
            )
            for result in self._checkpoints._checkpoint_results
        ]


class DriverEvents:
    """What rank 0 sends the driver (progress, checkpoints), handed to the driver's handler as it is sent.

    The same put_nowait as the Ray queue of a run on workers. An error in the handler (a full disk, a
    storage error) is raised in the training loop, which it stops, and reaches the caller as itself.
    """

    def __init__(self, on_event: Callable[[dict], None]):
        self.on_event = on_event

    @classmethod
    def reserve(cls, on_event: Callable[[dict], None]) -> Optional["DriverEvents"]:
        """The events of a run that trains in this process, or None while another run trains here."""
        return cls(on_event) if _DRIVER_RUN.acquire(blocking=False) else None

    def release(self) -> None:
        _DRIVER_RUN.release()

    def __deepcopy__(self, memo: dict) -> "DriverEvents":
        # A channel, like the Ray queue's actor handle: the worker's job (dataclasses.asdict copies it)
        # must reach this handler, not a copy of the driver's state.
        return self

    def put_nowait(self, event: dict) -> None:
        try:
            self.on_event(event)
        except Exception as error:
            raise DriverEventError(error) from error


class DriverEventError(Exception):
    """The driver's own error while it handled an event: raised to the caller as the error it wraps."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def in_driver() -> bool:
    """Whether the training function calling this runs in the driver (a worker of Ray Train's has its own utilities)."""
    from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

    return isinstance(get_train_fn_utils(), DriverTrainFnUtils)


def run(train_fn: Callable[[dict], Any], config: dict, utils: DriverTrainFnUtils) -> None:
    """Call `train_fn(config)` in this process with `utils` as its `ray.train` API.

    What the training function sets for the whole process (torch's threads, the random generators'
    states it seeds, dynamo's configuration when it compiles) is put back afterwards, as it would be
    untouched by a run on a worker process: the caller's own code sees the process as it left it.
    """
    import numpy as np
    import torch
    import torch._dynamo
    from ray.train.v2._internal.execution.train_fn_utils import set_train_fn_utils

    threads, python_random, numpy_random = torch.get_num_threads(), random.getstate(), np.random.get_state()
    dynamo_config = torch._dynamo.config.get_config_copy()
    set_train_fn_utils(utils)
    try:
        with torch.random.fork_rng(devices=[]):
            train_fn(config)
    finally:
        set_train_fn_utils(None)
        torch.set_num_threads(threads)
        random.setstate(python_random)
        np.random.set_state(numpy_random)
        # Only what the run changed: setting every key back would warn about each deprecated one.
        for key, value in torch._dynamo.config.get_config_copy().items():
            if dynamo_config[key] != value:
                setattr(torch._dynamo.config, key, dynamo_config[key])


def _check_metrics(metrics: dict) -> None:
    # Ray Train's workers refuse tensors among the reported metrics (TrainContext.report: they fail to
    # unpickle in the controller); a run in the driver keeps that rule, so nothing passes here that fails on a cluster.
    from ray.air._internal.torch_utils import contains_tensor

    if contains_tensor(metrics):
        raise ValueError(
            "ray.train.report was given torch tensors as metrics; report Python numbers instead (tensor.item()), or "
            "save tensors in the checkpoint"
        )
