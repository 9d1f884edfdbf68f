"""Shared fixtures: one S3 server, one Ray instance, one sample corpus, and tiny models trained once per session."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from local_s3 import MotoServer, S3Proxy
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.data.epoch_data import steps_per_epoch
from raylm.data.sample_corpus import write_sample_corpus

# The tests' tiny models: every run of the suite trains one of these unless it says why not.
TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}
TINY_BERT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
# ELECTRA's two halves share args.config; the generator is half the discriminator's width, as the paper advises.
TINY_ELECTRA = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "embedding_size": 64,
}
TINY_GENERATOR = {"hidden_size": 32, "num_attention_heads": 1, "intermediate_size": 64}
# Dropout off, where runs must agree step by step (another worker count draws other dropout masks).
GPT2_NO_DROPOUT = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
ELECTRA_NO_DROPOUT = {**TINY_ELECTRA, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Llama-style decoders (Qwen2, Mistral alike): grouped-query attention, 4 query heads over 2 key/value heads, as the
# full-size models use.
TINY_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
SMALL_ENCODER = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def small_config(model_type: str, vocab_size: int, positions: int, pad_id: int = 0, **overrides):
    """A two-layer, 32-wide config of `model_type` whose positions hold `positions` tokens, for the tests that compare
    one model's logits or masks across code paths (no training). RoBERTa-style models count positions from
    pad_token_id + 1, so they get two more."""
    if model_type in ("gpt2", "openai-gpt"):
        sizes = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": positions}
    elif model_type == "distilbert":
        sizes = {"n_layers": 2, "dim": 32, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": positions}
        sizes["pad_token_id"] = pad_id
    elif model_type in ("roberta", "camembert", "xlm-roberta"):
        sizes = {**SMALL_ENCODER, "max_position_embeddings": positions + 2, "pad_token_id": pad_id}
    elif model_type == "electra":
        sizes = {**SMALL_ENCODER, "embedding_size": 16, "max_position_embeddings": positions}
    else:
        sizes = {**SMALL_ENCODER, "max_position_embeddings": positions}
    return CONFIG_MAPPING[model_type](vocab_size=vocab_size, **{**sizes, **overrides})


@dataclass
class S3Server:
    """moto's S3 API on loopback; `endpoint` is what AWS_ENDPOINT_URL holds, `log` the server's request log."""

    endpoint: str
    log: str

    @property
    def endpoint_query(self) -> str:
        """The same endpoint as a URI query, for paths read by processes that did not get the environment."""
        host_port = self.endpoint.split("://", 1)[1]
        return f"endpoint_override={host_port}&scheme=http"

    def requests(self, method: str, path: str) -> int:
        """How many `method` requests for `path` (bucket/key) the server has answered so far, from its log."""
        # The server colours some lines (a 206's) with terminal escapes inside the quotes.
        request = re.compile(rf'"(?:\x1b\[[\d;]*m)*{method} /{re.escape(path)}[ ?]')
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return sum(bool(request.search(line)) for line in f)

    def bucket(self) -> str:
        """A new, empty bucket's name."""
        import boto3

        name = f"raylm-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name


class RayHeadPorts:
    """Every port of a `ray start --head` of the tests' own, picked free (another Ray may hold the defaults)."""

    def __init__(self):
        self.gcs, self.dashboard, *self._others = free_loopback_ports(9)

    def start_command(self, node_ip: str, temp_dir: str, num_cpus: int, num_gpus: int, *extra: str) -> list[str]:
        """`ray start --head --block` on these ports, its dashboard on 127.0.0.1 and its session files in temp_dir."""
        agent_http, agent_grpc, runtime_env_agent, metrics, client, node_manager, object_manager = self._others
        return [
            RAY_CLI,
            "start",
            "--head",
            "--block",
            *extra,
            f"--node-ip-address={node_ip}",
            f"--port={self.gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            f"--object-store-memory={300 * 2**20}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]


RAY_CLI = str(Path(sys.executable).with_name("ray"))


def free_loopback_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all held open together while they are picked, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server in a process session of its own, on a free loopback port, configured the standard way.

    AWS_ENDPOINT_URL and the credentials go into os.environ before any Ray starts (ray_session depends on
    this fixture): Ray's worker processes inherit the environment of the driver at ray.init, not later changes.
    """
    server = MotoServer(str(tmp_path_factory.mktemp("s3") / "moto.log"))
    settings = server.client_environment
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield S3Server(server.endpoint, server.log_path)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture
def s3_proxy(s3_server, tmp_path):
    """Starts counting proxies in front of the S3 server, `s3_proxy(delay_s=0.03)` -> S3Proxy (tests/local_s3.py); a
    store path ending in `?{proxy.endpoint_query}` is read through it. Each is stopped after the test."""
    started: list[S3Proxy] = []

    def start(delay_s: float = 0.0) -> S3Proxy:
        started.append(S3Proxy(s3_server.endpoint, str(tmp_path / f"proxy-{len(started)}.jsonl"), delay_s))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray

    ensure_session_ray()
    yield
    ray.shutdown()


def ensure_session_ray() -> None:
    """The local Ray the session's tests share, (re)started by raylm as it starts one: sized for two training workers
    plus the data stage, and with the dashboard, as for a sweep, so that neither a sweep nor a test that leaves a
    cluster (which starts it again) costs a restart of the Ray every other test shares."""
    from raylm.cluster import launcher

    launcher.ensure_ray(LanguageModelingArgs.from_dict({"num_workers": 2}), for_sweep=True)


@pytest.fixture
def state_api(ray_session) -> str:
    """The address of Ray's state API (the dashboard's) on the local Ray this test runs on. A test before it may have
    left the local Ray that a training run starts, which has no dashboard: ensure_ray restarts it with one, as it
    does for a sweep."""
    import ray

    ensure_session_ray()
    return "http://" + ray._private.worker.get_dashboard_url()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(train.txt, test.txt) from Python's docstrings: ~2,000 training and ~230 held-out paragraphs."""
    return write_sample_corpus(str(tmp_path_factory.mktemp("corpus")))


def tiny_args(output_dir: str, **overrides) -> LanguageModelingArgs:
    args = LanguageModelingArgs()
    args.output_dir = str(output_dir)
    args.overwrite_output_dir = True
    args.silent = True
    args.logging_steps = 1000
    args.update_from_dict(overrides)
    return args


@pytest.fixture(scope="session")
def gpt2_trained(ray_session, corpus, tmp_path_factory):
    """A tiny GPT-2 trained from scratch (packed text, 8 epochs); its untrained eval, the training loop's own
    evaluation of its weights at the last step ("in_training"), and the final eval of the model loaded back."""
    out = tmp_path_factory.mktemp("gpt2")
    args = tiny_args(
        out,
        mlm=False,
        vocab_size=1000,
        dataset_type="text",
        config=TINY_GPT2,
        learning_rate=6e-3,
        train_batch_size=16,
        num_train_epochs=8,
        warmup_ratio=0.05,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    before = model.eval_model(corpus[1], output_dir=str(out / "eval_before"))
    trace = tmp_path_factory.mktemp("gpt2_trace")
    examples = model._stored_examples([corpus[0]], model.args, model.block_size)
    total_steps = 8 * steps_per_epoch(examples.num_examples, 16)
    global_step, scores = model.train_model(
        corpus[0],
        eval_file=corpus[1],
        _diagnostics={"trace_dir": str(trace)},
        args={
            "evaluate_during_training": True,
            "evaluate_during_training_steps": total_steps,
            "evaluate_each_epoch": False,
        },
    )
    assert scores["global_step"] == [total_steps]
    after = model.eval_model(corpus[1])
    return {
        "model": model,
        "dir": str(out),
        "before": before,
        "after": after,
        "in_training": scores,
        "global_step": global_step,
        "train_loss": model._last_state.train_loss,
        "trace": trace,
    }


@pytest.fixture(scope="session")
def bert_trained(ray_session, corpus, tmp_path_factory):
    """A tiny BERT trained from scratch with MLM (packed text, 12 epochs: at 10 its test perplexity over the
    unigram's was 0.93, 0.68 and 0.72 for seeds 42, 1 and 2, so a change of the data order alone could fail
    test_mlm_from_scratch_beats_untrained_and_unigram's 0.9; at 12, seed 42 gives 0.73)."""
    out = tmp_path_factory.mktemp("bert")
    args = tiny_args(
        out,
        vocab_size=1000,
        dataset_type="text",
        config=TINY_BERT,
        learning_rate=4e-3,
        train_batch_size=16,
        num_train_epochs=12,
        warmup_ratio=0.05,
    )
    model = LanguageModelingModel("bert", None, args=args, train_files=corpus[0])
    before = model.eval_model(corpus[1], output_dir=str(out / "eval_before"))
    global_step, train_loss = model.train_model(corpus[0])
    after = model.eval_model(corpus[1])
    return {"model": model, "dir": str(out), "before": before, "after": after, "global_step": global_step}


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if Ray is started: for bad input that must be reported before anything runs."""
    from raylm.cluster import launcher

    def refuse(*_, **__):
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(launcher, "ensure_ray", refuse)


# --- readers for what a run leaves behind -----------------------------------------------------------------
def read_trace_records(trace_dir, rank: int = 0) -> list[dict]:
    """Every record of one rank's trace (`_diagnostics={"trace_dir": ...}`), in the order written."""
    with open(os.path.join(trace_dir, f"rank{rank}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_trace(trace_dir) -> tuple[dict[int, dict[int, dict]], dict[int, list[dict]]]:
    """({rank: {step: record}}, {rank: [start record, ...]}) of every rank's trace.

    A step's last record wins: a restarted run repeats the steps after its checkpoint.
    """
    steps: dict[int, dict[int, dict]] = {}
    starts: dict[int, list[dict]] = {}
    for name in sorted(os.listdir(trace_dir)):
        if not (name.startswith("rank") and name.endswith(".jsonl")):
            continue
        rank = int(name[len("rank") : -len(".jsonl")])
        for record in read_trace_records(trace_dir, rank):
            if record.get("event") == "start":
                starts.setdefault(rank, []).append(record)
            else:
                steps.setdefault(rank, {})[record["step"]] = record
    return steps, starts


def read_trace_steps(trace_dir) -> dict[int, dict[int, dict]]:
    """{rank: {step: record}} of every rank's trace (see read_trace)."""
    return read_trace(trace_dir)[0]


def read_training_log(output_dir, kind: str | None = None) -> list[dict]:
    """The events of output_dir/training_log.jsonl, or those of one kind ("train", "eval")."""
    with open(os.path.join(output_dir, "training_log.jsonl"), encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    return [event for event in events if kind is None or event.get("kind") == kind]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_same_weights(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Two GPT-2 state dicts equal within float tolerance, but for the attention key bias: its true gradient
    is 0 (it adds one constant to every score of a query's softmax), so AdamW turns float noise into
    steps of the learning rate's size there, which rounding order alone (another worker count, sharding,
    kernel) moves by ~1e-5."""
    import torch

    for name, tensor in expected.items():
        ours = actual[name]
        if name.endswith("attn.c_attn.bias"):
            width = tensor.numel() // 3
            ours, tensor = (
                torch.cat([ours[:width], ours[2 * width :]]),
                torch.cat([tensor[:width], tensor[2 * width :]]),
            )
        torch.testing.assert_close(ours, tensor, rtol=rtol, atol=atol, msg=name)


def read_tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TFRecord event files in log_dir, checking every record's CRCs."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    paths = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert paths, f"no event file in {log_dir}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        position = 0
        while position < len(data):
            header = data[position : position + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[position + 8 : position + 12])
            record = data[position + 12 : position + 12 + length]
            (record_crc,) = struct.unpack("<I", data[position + 12 + length : position + 16 + length])
            assert length_crc == masked_crc32c(header) and record_crc == masked_crc32c(record), (
                f"corrupt record in {path}"
            )
            position += 16 + length
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG format requires to come first."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# --- a simulated multi-node cluster and an S3 server -----------------------------------------------------
# Worker nodes carry this resource and the head does not, so a job that asks for it trains off the head.
TRAINER_NODE = "trainer_node"
# Two slots of it on the head: the same job on a single node, for comparisons.
HEAD_TRAINER = "head_trainer"
NODE_START_ATTEMPTS = 2
# The GCS declares a removed node dead after this many failed health checks this far apart (Ray's
# defaults, 5 x 3 s, are made for real networks): a lost node's workers count as lost only then.
NODE_DEATH_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class SimulatedCluster:
    """ray.cluster_utils.Cluster: a head (driver, data, controller) and worker nodes with TRAINER_NODE.

    Its nodes keep their session files in a private short temp dir, so no other ray.init() on this
    machine finds its address file, and each node gets its own ports (another Ray may hold the defaults).
    Each worker node's processes have a temp dir of their own (TMPDIR, `node_temp_dirs[node_id]`), as the
    nodes of a real cluster have disks of their own: what a node keeps there (its node cache of the store's
    blocks, its copies of resumed checkpoints) is that node's alone.
    """

    def __init__(self, temp_dir: str, worker_nodes: int):
        from ray.cluster_utils import Cluster

        self.temp_dir = temp_dir
        self.cluster = Cluster()
        self._start(
            lambda: self.cluster.add_node(
                **self._node_args(
                    num_cpus=3,
                    resources={HEAD_TRAINER: 2},
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=free_loopback_ports(1)[0],
                    object_store_memory=400 * 2**20,
                    _system_config=NODE_DEATH_DETECTION,
                )
            )
        )
        self.workers: list = []
        self.node_temp_dirs: dict[str, str] = {}
        self._nodes_started = 0
        for _ in range(worker_nodes):
            self.add_worker_node()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker_node(self):
        self._nodes_started += 1
        node_temp_dir = os.path.join(self.temp_dir, f"node-{self._nodes_started}")
        os.makedirs(node_temp_dir)
        node = self._start(
            lambda: self.cluster.add_node(**self._node_args(num_cpus=1, resources={TRAINER_NODE: 1})), node_temp_dir
        )
        self.workers.append(node)
        self.node_temp_dirs[node.node_id] = node_temp_dir
        return node

    def _start(self, add_node, node_temp_dir: Optional[str] = None):
        # A node must register within 30 s (Ray's own limit, TimeoutError or "timed out during startup");
        # on a loaded machine it may not, the first time.
        for attempt in range(NODE_START_ATTEMPTS):
            try:
                with self._private_temp_dir(node_temp_dir):
                    return add_node()
            except Exception as err:
                if attempt == NODE_START_ATTEMPTS - 1 or not (isinstance(err, TimeoutError) or "timed out" in str(err)):
                    raise

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def node_by_id(self, node_id: str):
        return next(node for node in self.workers if node.node_id == node_id)

    def shutdown(self) -> None:
        with self._private_temp_dir():
            self.cluster.shutdown()

    def top_up(self, worker_nodes: int = 3) -> None:
        """Back to `worker_nodes` worker nodes: a test that removes nodes leaves the next one a full cluster even
        when it failed before adding them back (a run waiting for a second trainer node would wait forever)."""
        while len(self.workers) < worker_nodes:
            self.add_worker_node()

    @staticmethod
    def _node_args(**overrides) -> dict:
        from ray._private.services import get_node_ip_address

        # Ray replaces a loopback node address by the machine's own, so every node uses that one. The three ports
        # are taken together: probed one after another, the system handed the same free port out twice, and the
        # node refused to start ("trying to use a port number ... used by other components").
        agent, metrics, runtime_env = free_loopback_ports(3)
        return {
            "node_ip_address": get_node_ip_address(),
            "dashboard_agent_listen_port": agent,
            "metrics_export_port": metrics,
            "runtime_env_agent_port": runtime_env,
            **overrides,
        }

    @contextlib.contextmanager
    def _private_temp_dir(self, node_temp_dir: Optional[str] = None):
        """Ray's session files in the cluster's temp dir; with node_temp_dir, the TMPDIR that a node started here
        hands its processes (a raylet starts with the environment of the moment)."""
        settings = {"RAY_TMPDIR": self.temp_dir, **({"TMPDIR": node_temp_dir} if node_temp_dir else {})}
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each probe stays bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


@pytest.fixture(scope="module")
def sim_cluster(s3_server):
    """A head and 3 one-CPU worker nodes, started after the S3 server so that every node has its settings.

    Module-scoped: one module (test_multinode) uses it, and its idle nodes (a raylet and agents each)
    would take ~8% of this 2-core machine from every test after it.
    """
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rlm-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    cluster = SimulatedCluster(temp_dir, worker_nodes=3)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def on_sim_cluster(sim_cluster):
    """This module's driver joins the simulated cluster (as under `ray job submit`); the session's local Ray
    comes back after."""
    import ray

    from raylm.cluster import launcher

    ray.shutdown()
    os.environ["RAY_ADDRESS"] = sim_cluster.address
    try:
        launcher.ensure_ray(LanguageModelingArgs())
        yield sim_cluster
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ray.shutdown()
        ensure_session_ray()
