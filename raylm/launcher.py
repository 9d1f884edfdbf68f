"""Launcher: connect to (or start) Ray, build the `TorchTrainer`, run it, and return its `Result`.

With no cluster, a local Ray starts quietly; with RAY_ADDRESS or a running cluster, it connects.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylm.config import LanguageModelingArgs
from raylm.errors import ClusterError

logger = logging.getLogger("raylm")


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


def ensure_ray(args: LanguageModelingArgs) -> None:
    """Connect to RAY_ADDRESS or a running cluster; otherwise start a quiet local Ray sized for the job."""
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
    _quiet_ray_data()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return
    # Tokenization tasks need a CPU beside the training workers, or the data stage never starts.
    needed = int(args.num_workers * cpus_per_worker(args)) + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True, **quiet)


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
        logger.info("No GPU in the Ray cluster: training on CPU.")
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


def fit(
    train_fn: Callable[[dict], None],
    train_loop_config: dict,
    datasets: dict,
    args: LanguageModelingArgs,
    use_gpu: bool,
    name: str,
    on_progress: Optional[Callable[[dict], None]] = None,
    progress_queue=None,
):
    """Run `train_fn` on `args.num_workers` Ray Train workers and return the `Result`."""
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
            checkpoint_config=CheckpointConfig(num_to_keep=args.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
        datasets=datasets,
        dataset_config=OrderedSplitDataConfig(),
    )
    if progress_queue is None or on_progress is None:
        return trainer.fit()
    return _fit_with_progress(trainer, progress_queue, on_progress)


def _fit_with_progress(trainer: TorchTrainer, progress_queue, on_progress: Callable[[dict], None]):
    """fit() in a thread while the driver's main thread turns the workers' reports into progress."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the main thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name="raylm-fit", daemon=True)
    thread.start()
    from ray.util.queue import Empty

    while thread.is_alive() or not progress_queue.empty():
        try:
            on_progress(progress_queue.get(timeout=0.5))
        except Empty:
            pass
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
