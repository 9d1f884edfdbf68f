"""Launcher: connect to (or start) Ray, build the `TorchTrainer`, run it, and return its `Result`.

With no cluster, a local Ray starts quietly; with RAY_ADDRESS or a running cluster, it connects.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from typing import Callable, Optional

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train import TrainingFailedError
from ray.train.torch import TorchTrainer

from raylm.checkpoints import CHECKPOINT_SCORE
from raylm.config import LanguageModelingArgs
from raylm.console import notice_once
from raylm.errors import ClusterError, RaylmUserError, TrainingFailed, root_cause


class OrderedSplitDataConfig(DataConfig):
    """Split each dataset across workers deterministically and without dropping rows.

    Ray's default split (`equal=True`) drops up to workers-1 rows per epoch and hands blocks to
    whichever worker is free. With `preserve_order` and `equal=False` each worker receives the same
    examples in the same order on every run, which exact resume and exact example counts rely on.
    The loop evens out the ragged end itself (see worker.py).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            options = self._resolve_execution_options(name)
            options.preserve_order = True
            dataset.context.execution_options = options
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output


def cpus_per_worker(args: LanguageModelingArgs) -> float:
    return float((args.resources_per_worker or {}).get("CPU", 1))


def ensure_ray(args: LanguageModelingArgs, extra_cpus: int = 0) -> None:
    """Connect to RAY_ADDRESS or a running cluster; otherwise start a quiet local Ray sized for the job.

    `extra_cpus`: CPUs a local Ray needs beyond the workers and the data stage (a sweep's trial driver).
    """
    _quiet_ray_data()
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    # Inside `ray job submit` Ray sets RAY_ADDRESS. Without it, a cluster that `ray start` left
    # running on this machine is joined as plain ray.init() would, but only while its GCS is alive
    # (a stale address file after a crash must not block a local run). Joining takes no num_cpus.
    from ray._private import services

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        started_here = services.find_bootstrap_address(None)
        address = started_here if started_here in services.find_gcs_addresses() else None
    if address:
        ray.init(address=address, **quiet)
        return
    # Tokenization tasks need a CPU beside the training workers, or the data stage never starts.
    needed = int(args.num_workers * cpus_per_worker(args)) + 1 + extra_cpus
    # Ray's state API finds the dashboard by scanning this machine for Ray instances and gives up
    # when it finds several. Train's PlacementGroupCleaner asks it whether a Tune-stopped trial's
    # controller is gone before freeing that trial's workers, so without this a sweep hangs for
    # good on a machine that runs another Ray. Only this job's workers get the variable (the
    # driver's own environment stays as it was).
    dashboard_port = _free_port()
    env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    # Ray Train's controller polls its workers every 2 s by default, and a run's end and each
    # checkpoint's registration wait for a poll: seconds lost per short run. One machine is never
    # preempted, so its preemption watcher (an actor per run) only costs start-up time.
    for name, value in (("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
        env_vars[name] = os.environ.get(name, value)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, needed),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": env_vars},
        **quiet,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def resolve_use_gpu(args: LanguageModelingArgs, use_cuda: bool) -> bool:
    """use_gpu if set; otherwise GPUs when the cluster has them and use_cuda allows (said once when it has none)."""
    if args.use_gpu is not None:
        return bool(args.use_gpu)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if use_cuda and not has_gpus:
        notice_once("No GPU in the Ray cluster: training on CPU.")
    return use_cuda and has_gpus


def check_cluster_fits(args: LanguageModelingArgs) -> None:
    """Fail before Ray Train waits forever for CPUs that the cluster does not have.

    Only a fixed-size cluster can be judged: an autoscaling one adds nodes when the job asks.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    total_cpus = ray.cluster_resources().get("CPU", 0)
    needed = args.num_workers * cpus_per_worker(args)
    if needed + 1 > total_cpus:
        raise ClusterError(
            f"The Ray cluster has {total_cpus:g} CPUs, but {args.num_workers} workers x {cpus_per_worker(args):g} CPUs leave none for reading and tokenizing data",
            "Lower num_workers or resources_per_worker['CPU'], or add nodes to the cluster",
        )


def checkpoint_config(args: LanguageModelingArgs) -> CheckpointConfig:
    if not args.keep_best_checkpoints:
        return CheckpointConfig(num_to_keep=args.checkpoints_to_keep)
    # Ray keeps the best-scored checkpoints and, whatever its score, the latest one.
    return CheckpointConfig(
        num_to_keep=args.checkpoints_to_keep,
        checkpoint_score_attribute=CHECKPOINT_SCORE,
        checkpoint_score_order="min" if args.early_stopping_metric_minimize else "max",
    )


def fit(
    train_fn: Callable[[dict], None],
    train_loop_config: dict,
    datasets: dict,
    args: LanguageModelingArgs,
    use_gpu: bool,
    name: str,
    on_event: Optional[Callable[[dict], None]] = None,
    event_queue=None,
    callbacks: Optional[list] = None,
):
    """Run `train_fn` on `args.num_workers` Ray Train workers and return the `Result`.

    After a worker failure Ray restarts the group, which resumes from the latest registered checkpoint.
    """
    resources = dict(args.resources_per_worker or {"CPU": 1})
    if use_gpu:
        resources.setdefault("GPU", 1)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=args.storage_path,
            checkpoint_config=checkpoint_config(args),
            failure_config=FailureConfig(max_failures=args.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=OrderedSplitDataConfig(),
    )
    try:
        if event_queue is None or on_event is None:
            return trainer.fit()
        return _fit_with_events(trainer, event_queue, on_event)
    except TrainingFailedError as failure:
        raise explain_failure(failure, run_folder(args, name)) from None


def run_folder(args: LanguageModelingArgs, name: str) -> str:
    return os.path.join(args.storage_path or RunConfig().storage_path, name)


def explain_failure(failure: TrainingFailedError, folder: str) -> Exception:
    """Ray's nested failure -> the user's own error (a RaylmUserError raised in a worker) or one paragraph.

    The full traceback goes to `raylm-error.log` in the run folder, which the paragraph names.
    """
    causes = dict(getattr(failure, "worker_failures", {}) or {})
    if not causes and getattr(failure, "controller_failure", None) is not None:
        causes = {"controller": failure.controller_failure}
    roots = {where: root_cause(error) for where, error in causes.items()}
    for root in roots.values():
        if isinstance(root, RaylmUserError):
            return root
    log_path = os.path.join(folder, "raylm-error.log")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(failure)))
    except OSError:
        log_path = "(could not be written)"
    where, root = next(iter(roots.items()), ("worker", failure))
    message = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    origin = "the Ray Train controller" if where == "controller" else f"worker rank {where}"
    return TrainingFailed(f"Training failed in {origin}: {type(root).__name__}: {message}. The full traceback is in {log_path}.")


def _fit_with_events(trainer: TorchTrainer, event_queue, on_event: Callable[[dict], None]):
    """fit() in a thread while the driver's main thread handles the events rank 0 sends (progress, checkpoints)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the main thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name="raylm-fit", daemon=True)
    thread.start()
    from ray.util.queue import Empty

    while thread.is_alive() or not event_queue.empty():
        try:
            on_event(event_queue.get(timeout=0.5))
        except Empty:
            pass
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
