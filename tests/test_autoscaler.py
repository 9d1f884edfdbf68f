"""cluster.yaml's node types under Ray's autoscaler: a job that asks for GPU workers gets a GPU node, which goes
when idle.

Ray's fake multi-node provider launches each node the autoscaler asks for as one more raylet on this
machine. The autoscaler's config is built from the shipped cluster.yaml (its node type names,
min_workers and max_workers), with each instance type's resources scaled to fit two cores and the
GPUs as logical resources, so the training itself runs on CPU (raylm's rule for a worker that Ray
gave a GPU that torch cannot see). ray.cluster_utils.AutoscalingCluster is not used: its start and
shutdown run `ray stop --force`, which ends every Ray on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_GPT2, RayHeadPorts, ensure_session_ray, read_trace_records, tiny_args
from process_groups import stop_process_group

REPO = Path(__file__).resolve().parents[1]
FAKE_HEAD_TYPE = "ray.head.default"  # the only head type name the fake provider accepts
# What `ray up` would detect on each of cluster.yaml's instance types, scaled to this 2-core machine:
# CPUs cut down (every fake node shares the same two cores), GPUs as many as the instance has.
SCALED_RESOURCES = {"m5.2xlarge": {"CPU": 2}, "g5.xlarge": {"CPU": 1, "GPU": 1}, "g5.48xlarge": {"CPU": 2, "GPU": 8}}
NODE_TYPE_LABEL = "raylm-node-type"
MAX_NODES_HERE = 2  # each fake node is a raylet and its workers: this machine holds two beside the head
IDLE_TIMEOUT_MINUTES = 0.2
CLUSTER_START_SECONDS = 120
IDLE_TERMINATION_SECONDS = 180
JOB_SECONDS = 420
# A throwaway head's raylet, GCS and autoscaler monitor take 10-30 s to exit on SIGTERM, which nothing here needs
# (its storage is a temporary folder): they are killed after this.
STOP_GRACE_SECONDS = 2
HEAD_START_ATTEMPTS = 2


def fake_autoscaler_config(cluster_yaml: dict, gcs_address: str) -> dict:
    """cluster.yaml's node types on Ray's fake multi-node provider, scaled to this machine."""
    node_types = {}
    for name, spec in cluster_yaml["available_node_types"].items():
        instance_type = spec["node_config"]["InstanceType"]
        resources = dict(spec.get("resources") or SCALED_RESOURCES[instance_type])
        if name == cluster_yaml["head_node_type"]:
            node_types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
        else:
            node_types[name] = {
                "resources": resources,
                "node_config": {},
                "min_workers": spec.get("min_workers", 0),
                "max_workers": min(spec["max_workers"], MAX_NODES_HERE),
                # The provider gives a node its type's labels; Ray's own node-group label is set by `ray up`'s
                # start commands only.
                "labels": {NODE_TYPE_LABEL: name},
            }
    return {
        "cluster_name": "raylm-fake",
        "max_workers": min(cluster_yaml["max_workers"], MAX_NODES_HERE),
        "upscaling_speed": cluster_yaml.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def gpu_node_types(config: dict) -> list[str]:
    return sorted(
        name
        for name, spec in config["available_node_types"].items()
        if spec["resources"].get("GPU", 0) > 0 and spec["max_workers"] > 0
    )


class AutoscalingHead:
    """`ray start --head --block --autoscaling-config` on the fake provider, in its own session, temp dir and ports.

    The fake worker nodes are started by the head's autoscaler, so ending the head's process group ends them too.
    """

    def __init__(self, cluster_yaml: dict):
        from ray._private.services import get_node_ip_address

        self.temp_dir = tempfile.mkdtemp(prefix="rlm-as-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        ports = RayHeadPorts()
        # Ray rewrites a loopback node address to the machine's own, and the fake nodes take that one.
        node_ip = get_node_ip_address()
        self.address = f"{node_ip}:{ports.gcs}"
        self.config = fake_autoscaler_config(cluster_yaml, self.address)
        self.config_path = Path(self.temp_dir) / "autoscaler.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        head = self.config["available_node_types"][FAKE_HEAD_TYPE]["resources"]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_TMPDIR=self.temp_dir,
            # Train's placement-group cleaner asks the state API, which otherwise scans this machine for a dashboard.
            RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{ports.dashboard}",
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        )
        command = ports.start_command(
            node_ip, self.temp_dir, head["CPU"], head.get("GPU", 0), f"--autoscaling-config={self.config_path}"
        )
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_until_up(self) -> bool:
        """Whether the head came up (`ray start` writes its address file last) before it exited or the time ran out."""
        deadline = time.monotonic() + CLUSTER_START_SECONDS
        while not (Path(self.temp_dir) / "ray_current_cluster").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True

    def stop(self) -> None:
        stop_process_group(self.process, STOP_GRACE_SECONDS)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def autoscaling_cluster(ray_session):
    """The autoscaling head, started after the session's Ray, so this process and the cluster share its token
    authentication."""
    with open(REPO / "cluster.yaml", encoding="utf-8") as f:
        cluster_yaml = yaml.safe_load(f)
    for attempt in range(HEAD_START_ATTEMPTS):
        head = AutoscalingHead(cluster_yaml)
        if head.wait_until_up():
            break
        # On a loaded machine the head may miss Ray's own start-up deadline ("Failed to get node info").
        failure = head.log_path.read_text()[-3000:]
        head.stop()
    else:
        pytest.fail(f"ray start --head did not come up in {HEAD_START_ATTEMPTS} attempts:\n{failure}")
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def on_autoscaling_cluster(autoscaling_cluster):
    """This module's driver joins the autoscaling cluster (as under `ray job submit`), with its autoscaler
    config where raylm looks for it; the session's local Ray comes back after."""
    import ray

    from raylm import LanguageModelingArgs
    from raylm.cluster import capacity, launcher

    ray.shutdown()
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", capacity.AUTOSCALER_CONFIG_ENV)}
    os.environ["RAY_ADDRESS"] = autoscaling_cluster.address
    os.environ[capacity.AUTOSCALER_CONFIG_ENV] = str(autoscaling_cluster.config_path)
    try:
        launcher.ensure_ray(LanguageModelingArgs())
        yield autoscaling_cluster
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray.shutdown()
        ensure_session_ray()


class NodeWatch:
    """The worker nodes seen alive while it runs (polled twice a second), with their node types and resources."""

    def __init__(self):
        self.seen: set[str] = set()
        self.node_types: dict[str, str] = {}
        self.resources: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(timeout=10)

    def alive_workers(self) -> set[str]:
        import ray

        return {
            node["NodeID"]
            for node in ray.nodes()
            if node["Alive"] and not node["Resources"].get("node:__internal_head__")
        }

    def _poll(self) -> None:
        import ray

        while not self._stop.is_set():
            for node in ray.nodes():
                if node["Alive"] and not node["Resources"].get("node:__internal_head__"):
                    node_id = node["NodeID"]
                    self.seen.add(node_id)
                    self.node_types[node_id] = _node_type(node)
                    self.resources[node_id] = node["Resources"]
            self._stop.wait(0.5)


def _node_type(node: dict) -> str:
    return (node.get("Labels") or {}).get(NODE_TYPE_LABEL, "")


def test_the_capacity_of_cluster_yaml_counts_every_node_its_autoscaler_may_add():
    """Hand-computed from cluster.yaml with the resources `ray up` detects: GPUs from the two 8-GPU nodes
    first, then 8 one-GPU nodes (the cluster's max_workers of 10 stops there); CPUs the same way."""
    from raylm.cluster.capacity import autoscaler_capacity

    with open(REPO / "cluster.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    detected = {"m5.2xlarge": {"CPU": 8}, "g5.xlarge": {"CPU": 4, "GPU": 1}, "g5.48xlarge": {"CPU": 192, "GPU": 8}}
    for spec in config["available_node_types"].values():
        spec["resources"] = detected[spec["node_config"]["InstanceType"]]
    assert config["max_workers"] == 10
    capacity = autoscaler_capacity(config)
    assert capacity == {"CPU": 8 + 2 * 192 + 8 * 4, "GPU": 2 * 8 + 8 * 1}


def test_a_sweep_and_a_job_are_sized_by_what_the_autoscaler_can_add(on_autoscaling_cluster):
    """No GPU node is up yet. One-worker GPU trials (3 CPUs and 1 GPU each): the scaled config's nodes give
    at most 2 + 2 x 2 = 6 CPUs and 2 x 8 = 16 GPUs, so 2 trials at once by default; 3 is refused, 2 is not.
    A job of 2 workers fits (3 CPUs) though the head has 2; one of 6 (7 CPUs) never can."""
    import ray

    from raylm import ClusterError, LanguageModelingArgs
    from raylm.cluster import capacity
    from raylm.sweep.tuner import _max_concurrent_trials

    assert ray.cluster_resources().get("GPU", 0) == 0 and ray.cluster_resources()["CPU"] == 2
    args = LanguageModelingArgs()
    assert _max_concurrent_trials(args, use_gpu=True, requested=None) == 2
    assert _max_concurrent_trials(args, use_gpu=True, requested=2) == 2
    with pytest.raises(ClusterError, match="can hold at most 2 trial"):
        _max_concurrent_trials(args, use_gpu=True, requested=3)
    capacity.check_cluster_fits(LanguageModelingArgs.from_dict({"num_workers": 2}), {"CPU": 1})
    with pytest.raises(ClusterError, match="can grow to 6 CPUs"):
        capacity.check_cluster_fits(LanguageModelingArgs.from_dict({"num_workers": 6}), {"CPU": 1})
    # GPUs too: 2 workers x 8 fit the two GPU nodes it may add; 3 x 8 never can.
    capacity.check_cluster_fits(LanguageModelingArgs.from_dict({"num_workers": 2}), {"CPU": 1, "GPU": 8})
    with pytest.raises(
        ClusterError, match=r"can grow to 16 GPU, but 3 workers x 8 GPU need 24.*max_workers of its node types"
    ):
        capacity.check_cluster_fits(LanguageModelingArgs.from_dict({"num_workers": 3}), {"CPU": 1, "GPU": 8})


def test_with_only_its_head_up_a_local_storage_path_and_train_file_are_refused_before_tokenizing(
    on_autoscaling_cluster, s3_server, corpus, tmp_path
):
    """GPU nodes the autoscaler adds later cannot be probed now, and would not see the head's disk: a local
    storage_path, then (with storage_path in S3) a local train_file, is a ConfigError naming the field and the fix,
    before anything is tokenized or stored. Written as file:// URIs, shared mounts, they pass."""
    import boto3
    import ray

    from raylm import ConfigError, LanguageModelingArgs, LanguageModelingModel
    from raylm.cluster import storage_checks
    from raylm.sweep import run_sweep

    assert [node["Alive"] for node in ray.nodes()].count(True) == 1, "a worker node is up: nothing to show"
    assert storage_checks.cluster_may_gain_nodes()
    train_file = tmp_path / "train.txt"
    train_file.write_text(
        "\n".join(Path(corpus[0]).read_text(encoding="utf-8").splitlines()[:100]) + "\n", encoding="utf-8"
    )
    runs = tmp_path / "runs"
    # On the head's CPU, in one step: were the refusal gone, the test would fail fast, not wait for a GPU node.
    settings = dict(mlm=False, vocab_size=400, config=TINY_GPT2, max_steps=1, use_gpu=False, storage_path=str(runs))
    args = tiny_args(tmp_path / "out", **settings)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=str(train_file))
    fix = r"Set storage_path to object storage every node reaches \(s3://.*write it as a file:// URI"
    with pytest.raises(
        ConfigError, match=rf"storage_path '{re.escape(str(runs))}' is a local folder .*autoscaler.*{fix}"
    ):
        model.train_model(str(train_file))
    assert not runs.exists(), "the example store was built before the refusal"
    # A sweep, once for all its trials, before Tune starts one.
    sweep = {"method": "grid", "metric": {"name": "eval_loss", "goal": "minimize"}}
    sweep["parameters"] = {"learning_rate": {"values": [1e-3]}}
    with pytest.raises(ConfigError, match=rf"storage_path '{re.escape(str(runs))}' is a local folder .*autoscaler"):
        run_sweep(sweep, "gpt2", None, str(train_file), str(train_file), args=args, train_files=str(train_file))
    assert not runs.exists(), "the sweep started before the refusal"

    bucket = s3_server.bucket()
    with pytest.raises(ConfigError, match=rf"train_file '{re.escape(str(train_file))}' is a local file .*autoscaler"):
        model.train_model(str(train_file), args={"storage_path": f"s3://{bucket}/runs"})
    assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0, "something was stored"

    # The shared-mount form: nothing refused.
    shared = LanguageModelingArgs.from_dict({"storage_path": f"file://{runs}"})
    storage_checks.check_storage_reaches_every_node(shared, text_files=[("train_file", [f"file://{train_file}"])])


def test_a_gpu_job_gets_a_gpu_node_of_cluster_yaml_which_goes_when_idle(
    on_autoscaling_cluster, corpus, tmp_path, capsys
):
    """No GPU is up; the job asks for one GPU worker (use_gpu unset: the autoscaler's GPU node types decide),
    the autoscaler launches a GPU node type of cluster.yaml, the job trains there on CPU (saying so) and
    succeeds, and the node is terminated after the idle timeout."""
    import ray

    from raylm import LanguageModelingModel
    from raylm.training.parallelism import CPU_FALLBACK_NOTICE

    config = on_autoscaling_cluster.config
    gpu_types = gpu_node_types(config)
    assert gpu_types, "cluster.yaml has no GPU node types for the autoscaler to launch"
    assert ray.cluster_resources().get("GPU", 0) == 0, "a GPU node is up before the job asked for one"
    trace = tmp_path / "trace"
    trace.mkdir()
    # Two steps need 16 examples: a tenth of the corpus keeps the tokenizer and the example store quick.
    train_file = tmp_path / "train.txt"
    train_file.write_text(
        "\n".join(Path(corpus[0]).read_text(encoding="utf-8").splitlines()[:200]) + "\n", encoding="utf-8"
    )
    args = tiny_args(
        tmp_path / "out",
        mlm=False,
        vocab_size=400,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        train_batch_size=8,
        max_steps=2,
        # file://: a shared mount (the fake nodes share this machine's disk), which only the head can be probed for.
        storage_path=f"file://{tmp_path / 'runs'}",
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=str(train_file))
    with NodeWatch() as watch:
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["result"] = model.train_model(f"file://{train_file}", _diagnostics={"trace_dir": str(trace)})
            except BaseException as err:  # re-raised on the test's thread
                outcome["error"] = err

        # Without a launch the job would wait for a GPU for good: bound it.
        job = threading.Thread(target=train, daemon=True)
        job.start()
        job.join(JOB_SECONDS)
        assert not job.is_alive(), (
            f"the job did not finish in {JOB_SECONDS} s; worker nodes seen: {watch.node_types or 'none'}"
        )
        if "error" in outcome:
            raise outcome["error"]
        global_step, _ = outcome["result"]
        assert global_step == 2
        assert CPU_FALLBACK_NOTICE in capsys.readouterr().err
        starts = [record for record in read_trace_records(trace) if record.get("event") == "start"]
        worker_node = starts[-1]["node_id"]
        assert worker_node in watch.seen, "the worker ran on the head: no node was launched for it"
        assert watch.node_types[worker_node] in gpu_types, watch.node_types
        assert (
            watch.resources[worker_node]["GPU"]
            == config["available_node_types"][watch.node_types[worker_node]]["resources"]["GPU"]
        )
        deadline = time.monotonic() + IDLE_TERMINATION_SECONDS
        while watch.alive_workers() and time.monotonic() < deadline:
            time.sleep(1)
        assert not watch.alive_workers(), f"worker nodes still up {IDLE_TERMINATION_SECONDS} s after the job ended"
