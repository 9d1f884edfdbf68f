"""Launcher: args -> a connected (or started) Ray; a train function and its config -> a `TorchTrainer` run (or a run
in the driver's process) -> its `Result`, with rank 0's events handed to the driver as they come.

With no cluster, a local Ray starts quietly; with RAY_ADDRESS or a running cluster, it connects.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
from typing import Callable, Optional

import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

# Private in Ray 2.60: the backend whose on_start sets up the workers' process group.
from ray.train.torch.config import _TorchBackend

# Private in Ray 2.60: default callbacks that start an actor for each run (_Trainer).
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

# Private in Ray 2.60, and the only hook that runs inside the controller (for _AnnounceController).
from ray.train.v2._internal.execution.callback import ControllerCallback

from raylm.cluster.failures import explain_failure, one_paragraph
from raylm.cluster.run_folders import run_folder, run_storage_path
from raylm.config import LanguageModelingArgs
from raylm.data import storage
from raylm.errors import RaylmUserError
from raylm.training import in_process
from raylm.training.checkpoints import CHECKPOINT_SCORE

# Ray Data's reading and tokenizing beside the training workers. On raylm's local Ray it is one logical
# CPU on top of the machine's cores: the epoch is tokenized before training starts and the workers read
# the stored examples themselves, so during training this stage needs almost nothing.
DATA_STAGE_CPUS = 1
# Under fsdp_cpu_offload the optimizer step runs on the CPU shards, with as many torch threads as the worker's CPUs.
OFFLOAD_WORKER_CPUS = 4


def cpus_per_worker(args: LanguageModelingArgs) -> float:
    """The CPUs a worker asks for wherever the machine is not known (a cluster, a sweep's trials):
    resources_per_worker's, else OFFLOAD_WORKER_CPUS under fsdp_cpu_offload, else 1."""
    return float((args.resources_per_worker or {}).get("CPU", OFFLOAD_WORKER_CPUS if args.fsdp_cpu_offload else 1))


def worker_resources(args: LanguageModelingArgs, use_gpu: bool) -> dict:
    """What each training worker reserves: resources_per_worker if given; else, on raylm's local Ray, the machine's
    cores shared among the workers; else cpus_per_worker. +1 GPU with use_gpu.

    A worker runs as many torch threads as it has CPUs, so one CPU per worker would leave a laptop's
    other cores idle while Simple Transformers uses them all. On a cluster the node types decide.
    """
    if args.resources_per_worker:
        resources = dict(args.resources_per_worker)
    elif on_local_ray():
        machine_cpus = ray.cluster_resources().get("CPU", 1) - DATA_STAGE_CPUS
        resources = {"CPU": max(1, int(machine_cpus // args.max_workers))}
    else:
        resources = {"CPU": int(cpus_per_worker(args))}
    if use_gpu:
        resources.setdefault("GPU", 1)
    return resources


def ensure_ray(args: LanguageModelingArgs, extra_cpus: int = 0, for_sweep: bool = False) -> None:
    """Connect to RAY_ADDRESS or a running cluster; otherwise start a quiet local Ray sized for the job.

    `extra_cpus`: CPUs a local Ray needs beyond the workers and the data stage (a sweep's trial driver).
    `for_sweep`: the local Ray gets Ray's dashboard, whose state API a sweep's trials need (below). A training run's
    local Ray goes without it, and without prestarted workers: together 2 s of a 24 s run on 2 cores (the dashboard's
    processes start and poll beside the training). raylm's own local Ray without the dashboard is restarted with it
    when a sweep comes after a training run in the same process.
    """
    global _LOCAL_GCS_ADDRESS, _LOCAL_RAY_HAS_DASHBOARD
    _quiet_ray_data()
    if ray.is_initialized():
        if not (for_sweep and on_local_ray() and not _LOCAL_RAY_HAS_DASHBOARD):
            return
        ray.shutdown()
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
    needed = int(args.max_workers * cpus_per_worker(args)) + DATA_STAGE_CPUS + extra_cpus
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
    env_vars[LOCAL_RAY_ENV] = "1"
    _require_token_auth()
    # address="local": plain ray.init() would read a stale address file (a killed `ray start`) and try
    # to join that dead cluster, refusing num_cpus.
    ray.init(
        address="local",
        num_cpus=max((os.cpu_count() or 1) + DATA_STAGE_CPUS, needed),
        include_dashboard=for_sweep,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": env_vars},
        # Ray Train's actors and Ray Data's tasks start the workers they need; prestarted idle ones would only
        # compete with the training's first steps for the cores.
        _system_config={"prestart_worker_first_driver": False},
        **quiet,
    )
    _LOCAL_GCS_ADDRESS = ray.get_runtime_context().gcs_address
    _LOCAL_RAY_HAS_DASHBOARD = for_sweep


# The Ray this process started on its own machine, where every path the driver sees, the workers see.
_LOCAL_GCS_ADDRESS: Optional[str] = None
_LOCAL_RAY_HAS_DASHBOARD = False


def on_local_ray() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().gcs_address == _LOCAL_GCS_ADDRESS


# Set in every process of raylm's local Ray: a sweep's trials are drivers of their own there, on the same machine.
LOCAL_RAY_ENV = "RAYLM_LOCAL_RAY"


def in_local_ray_job() -> bool:
    """Whether this process runs on raylm's local Ray: the driver that started it, or a process of its job."""
    return on_local_ray() or os.environ.get(LOCAL_RAY_ENV) == "1"


def stage_for_workers(local_dir: str, args: LanguageModelingArgs, name: str) -> str:
    """A copy of a driver-local folder in the run's storage, where workers on any node can read it.

    On the local Ray the folder itself is returned: the workers share the driver's disk.
    """
    if on_local_ray():
        return os.path.abspath(local_dir)
    destination = storage.join(run_folder(args, name), STAGED_FOLDER, os.path.basename(os.path.normpath(local_dir)))
    storage.upload(local_dir, destination)
    return destination


# Under the run folder: checkpoints a run continues from that were on the driver's disk only.
STAGED_FOLDER = "resumed-from"


def _require_token_auth() -> None:
    """Token authentication for the local Ray about to start, whatever RAY_AUTH_MODE says, with a token only the user
    can read.

    The dashboard (which Tune needs, see ensure_ray) serves Ray's jobs API, and that runs any code it is
    sent (ShadowRay, CVE-2023-48022): without a token every local user could run code as this one.
    Ray 2.60 reads the mode from RAY_AUTH_MODE (its processes inherit it) and the token from
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, a file it would write readable by
    everyone (0644); writing it first, 0600, keeps Ray from writing its own, and the Ray CLI
    (ray status, ray job submit) still finds it there. The override stays in this process's
    environment, which only matters for connecting later to a cluster without authentication.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    # Ray caches its configuration at import: re-read it so this process runs in token mode too.
    Config.initialize("")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def checkpoint_config(args: LanguageModelingArgs) -> CheckpointConfig:
    if not args.keep_best_checkpoints:
        return CheckpointConfig(num_to_keep=args.checkpoints_to_keep)
    # Ray keeps the best-scored checkpoints and, whatever its score, the latest one.
    return CheckpointConfig(
        num_to_keep=args.checkpoints_to_keep,
        checkpoint_score_attribute=CHECKPOINT_SCORE,
        checkpoint_score_order="min" if args.early_stopping_metric_minimize else "max",
    )


def failure_config(args: LanguageModelingArgs) -> FailureConfig:
    """Restarts: max_failures for failures, max_preemption_failures for reclaims Ray was told of (counted apart)."""
    return FailureConfig(
        max_failures=args.max_failures,
        max_preemption_failures=args.max_preemption_failures,
        preemption_grace_s=args.preemption_grace_s,
    )


def fit(
    train_fn: Callable[[dict], None],
    train_loop_config: dict,
    args: LanguageModelingArgs,
    use_gpu: bool,
    resources_per_worker: dict,
    name: str,
    on_event: Optional[Callable[[dict], None]] = None,
    event_queue=None,
    callbacks: Optional[list] = None,
):
    """Run `train_fn` on `args.num_workers` Ray Train workers and return the `Result`.

    After a worker failure Ray restarts the group, which resumes from the latest registered checkpoint;
    an elastic run ([min, max]) restarts with as many workers as fit, and grows the same way. A run
    whose `event_queue` is the driver's own (event_queue() decides, runs_in_driver) trains in this process instead.
    """
    if isinstance(event_queue, in_process.DriverEvents):
        return _fit_in_driver(train_fn, train_loop_config, args, name)
    trainer = (_LocalTrainer if on_local_ray() else _Trainer)(
        train_fn,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(
            num_workers=(args.min_workers, args.max_workers) if args.is_elastic else args.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources_per_worker,
            elastic_resize_monitor_interval_s=args.elastic_resize_check_s,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=args.storage_path,
            checkpoint_config=checkpoint_config(args),
            failure_config=failure_config(args),
            callbacks=[*(callbacks or []), *([_AnnounceController(event_queue)] if event_queue is not None else [])],
        ),
        torch_config=DeviceAwareTorchConfig(backend=process_group_backend(args, use_gpu)),
    )
    groups_before = _live_placement_groups() if isinstance(trainer, _LocalTrainer) else set()
    try:
        try:
            if event_queue is None or on_event is None:
                return trainer.fit()
            return _fit_with_events(trainer, event_queue, on_event)
        except (TrainingFailedError, ray.exceptions.RayActorError) as failure:
            # RayActorError: the controller itself could not start (e.g. it cannot write to storage_path).
            raise explain_failure(failure, run_folder(args, name)) from None
    except BaseException:
        if isinstance(trainer, _LocalTrainer):
            _remove_placement_groups(_live_placement_groups() - groups_before)
        raise


def runs_in_driver(args: LanguageModelingArgs, use_gpu: bool, callbacks: Optional[list] = None) -> bool:
    """Whether a run trains in the driver's process (in_process.py) rather than on a Ray Train worker.

    One CPU worker on raylm's local Ray that is never restarted: the driver's machine is the worker's,
    and a worker process would only add its start-up. Ray Train's workers keep what needs them:
    restarts after a failure (max_failures), elastic and multi-worker runs, FSDP's process group, GPUs
    (Ray assigns those to worker processes), Ray Train callbacks (a sweep's trials), async checkpoint
    uploads (Ray's uploader thread on the worker), and any cluster.
    """
    return (
        on_local_ray()
        and not args.is_elastic
        and args.num_workers == 1
        and args.max_failures == 0
        and args.parallel_strategy == "ddp"
        and not use_gpu
        and not callbacks
        and args.checkpoint_upload_mode == "sync"
    )


def _fit_in_driver(
    train_fn: Callable[[dict], None], train_loop_config: dict, args: LanguageModelingArgs, name: str
) -> Result:
    try:
        # Reads the run's snapshot, if any, from storage_path: a failure there is this run's too.
        utils = in_process.DriverTrainFnUtils(run_storage_path(args), name, checkpoint_config(args))
        in_process.run(train_fn, train_loop_config, utils)
    except in_process.DriverEventError as failure:
        raise failure.error from None
    except RaylmUserError:
        raise
    except Exception as failure:
        raise one_paragraph(failure, {"driver": failure}, run_folder(args, name)) from None
    return Result(
        metrics=utils._get_last_metrics(), checkpoint=utils.get_checkpoint(), error=None, path=run_folder(args, name)
    )


class _Trainer(TorchTrainer):
    """TorchTrainer without Ray Data's part: the ranks read their examples from the stores themselves (epoch_data.py).

    Ray Train starts a DatasetManager actor for every run, with datasets or without: a process that
    imports Ray Train and Ray Data, seconds of each run's start-up on a small machine, for nothing.
    """

    def _create_default_callbacks(self):
        return [
            callback for callback in super()._create_default_callbacks() if not isinstance(callback, DatasetsCallback)
        ]


class _LocalTrainer(_Trainer):
    """_Trainer for raylm's local Ray, without the PlacementGroupCleaner actor that Ray Train starts for every run.

    The cleaner frees a run's workers if its controller dies without shutting them down (a Tune trial
    stopped early, a controller killed or out of memory), or the next run would wait for them for
    good. On the local Ray, where the driver runs one fit at a time, `fit` frees what a failed fit
    left itself; the cleaner would be one more process per run, importing Ray Train and pandas on a
    small machine. Sweep trials are drivers of their own (not on_local_ray there) and keep it.
    """

    def _create_default_callbacks(self):
        return [
            callback
            for callback in super()._create_default_callbacks()
            if not isinstance(callback, PlacementGroupCleanerCallback)
        ]


def _live_placement_groups() -> set[str]:
    return {group_id for group_id, group in ray.util.placement_group_table().items() if group["state"] != "REMOVED"}


def _remove_placement_groups(group_ids: set[str]) -> None:
    """Free the workers' reservations of a fit whose controller ended without removing them (killed, out of memory)."""
    from ray.util.placement_group import PlacementGroup

    for group_id in group_ids:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def process_group_backend(args: LanguageModelingArgs, use_gpu: bool) -> Optional[str]:
    """The workers' torch.distributed backend; None lets Ray pick (NCCL with GPUs, else gloo).

    Under fsdp_cpu_offload the gradients are CPU DTensors: clipping's total norm and fp16's found-inf check
    all-reduce them on the CPU, which NCCL cannot do, so CPU tensors go through gloo.
    """
    return "cpu:gloo,cuda:nccl" if use_gpu and args.fsdp_cpu_offload else None


class DeviceAwareTorchConfig(TorchConfig):
    """Ray's process group setup, on gloo rather than NCCL when a worker that Ray gave GPUs sees no CUDA device.

    A GPU in Ray is a resource count: a node can offer GPUs that torch cannot use (a CPU-only torch
    build, a broken driver, logical GPUs on a test cluster). Such a worker trains on the CPU
    (parallelism.worker_device, and the driver says so), and NCCL would not even start there.
    """

    @property
    def backend_cls(self):
        return _DeviceAwareTorchBackend


class _DeviceAwareTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        # TorchTrainer picks NCCL for every use_gpu run, before any worker exists to ask.
        if "nccl" in backend_config.backend and not all(worker_group.execute(_sees_cuda)):
            backend_config = dataclasses.replace(backend_config, backend="gloo")
        super().on_start(worker_group, backend_config)


def _sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _AnnounceController(ControllerCallback):
    """Hands the driver the Train controller's actor, so that an error on the driver can abort the run."""

    def __init__(self, event_queue):
        self.event_queue = event_queue

    def after_controller_start(self, train_run_context) -> None:
        self.event_queue.put({"kind": CONTROLLER_EVENT, "controller": ray.get_runtime_context().current_actor})


CONTROLLER_EVENT = "controller"
ABORT_SECONDS = 60


def event_queue(
    args: LanguageModelingArgs, use_gpu: bool, on_event: Callable[[dict], None], callbacks: Optional[list] = None
):
    """What rank 0 sends its events (progress, checkpoints) through to the driver: a Ray queue, or `on_event` itself in
    a run that trains in the driver.

    A run trains in the driver when it runs_in_driver and no other run of this process trains there
    meanwhile (in_process.DriverEvents.reserve); close_event_queue ends that reservation.

    The Ray queue is pinned to the driver's node, as Ray Train pins its controller: a queue actor left to the scheduler
    can land on a worker node, and losing that node would then end a run that could have continued.
    """
    driver_events = in_process.DriverEvents.reserve(on_event) if runs_in_driver(args, use_gpu, callbacks) else None
    if driver_events is not None:
        return driver_events
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node})


def close_event_queue(queue) -> None:
    if isinstance(queue, in_process.DriverEvents):
        queue.release()
    else:
        ray.kill(queue.actor)


def _fit_with_events(trainer: _Trainer, event_queue, on_event: Callable[[dict], None]):
    """fit() in a thread while the driver's main thread handles the events rank 0 sends (progress, checkpoints).

    An exception while handling an event (a full disk, a storage error) aborts the run through its
    controller, which stops the workers, and is then raised here: nothing keeps training behind it.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the main thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name="raylm-fit", daemon=True)
    thread.start()
    from ray.util.queue import Empty

    controller = None
    try:
        while thread.is_alive() or not event_queue.empty():
            try:
                event = event_queue.get(timeout=0.5)
            except Empty:
                continue
            if event.get("kind") == CONTROLLER_EVENT:
                controller = event["controller"]
            else:
                on_event(event)
    except BaseException:
        _abort(controller, thread)
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _abort(controller, thread: threading.Thread) -> None:
    if controller is not None:
        try:
            ray.get(controller.abort.remote(), timeout=ABORT_SECONDS)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # abort() ends the controller's process, so its call fails by design
    thread.join(timeout=ABORT_SECONDS)
