"""A multi-node cluster that shares nothing but object storage: ray.cluster_utils.Cluster plus moto's S3.

The driver joins the simulated cluster as a `ray job submit` driver joins a real one (RAY_ADDRESS).
Training workers ask for TRAINER_NODE, which only the worker nodes have, so they run off the head;
the text, the tokenizer's corpus and storage_path are in S3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray
from conftest import HEAD_TRAINER, TINY_GPT2, TRAINER_NODE, read_trace, tiny_args

from raylm import ConfigError, LanguageModelingModel
from raylm.data import storage
from raylm.data.epoch_data import EpochOrder, rank_range
from raylm.data.example_store import MANIFEST, StoredExamples, node_cache_folder, read_store
from raylm.data.node_cache import LOCK_SUFFIX, PARTIAL_SUFFIX, default_node_cache_root
from raylm.training.checkpoints import is_training_checkpoint, read_trainer_state

MAX_STEPS = 12
SAVE_STEPS = 4
WATCH_SECONDS = 240
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _upload(local_path: str, uri: str) -> None:
    import boto3

    bucket, key = uri[len("s3://") :].split("/", 1)
    boto3.client("s3").upload_file(local_path, bucket, key)


@pytest.fixture(scope="module")
def bucket(on_sim_cluster, s3_server, corpus, tmp_path_factory):
    """The corpus in S3 as two training files in a folder and one eval file; a tokenizer trained once."""
    bucket = f"s3://{s3_server.bucket()}"
    lines = open(corpus[0], encoding="utf-8").read().splitlines()[:400]
    parts = tmp_path_factory.mktemp("parts")
    for index, chunk in enumerate((lines[:200], lines[200:])):
        path = parts / f"part-{index}.txt"
        path.write_text("\n".join(chunk) + "\n", encoding="utf-8")
        _upload(str(path), f"{bucket}/corpus/train/part-{index}.txt")
    _upload(corpus[1], f"{bucket}/corpus/test.txt")
    # One tokenizer for every run (trained from the S3 folder), so runs differ only where the test says.
    tokenizer_dir = str(tmp_path_factory.mktemp("tokenizer"))
    model = LanguageModelingModel(
        "gpt2",
        None,
        args=_args(tokenizer_dir, tokenizer_name=None, vocab_size=400),
        train_files=f"{bucket}/corpus/train/",
    )
    model.tokenizer.save_pretrained(tokenizer_dir)
    return {
        "uri": bucket,
        "train": f"{bucket}/corpus/train/",
        "eval": f"{bucket}/corpus/test.txt",
        "tokenizer": tokenizer_dir,
    }


def _args(output_dir, **overrides):
    values = dict(
        mlm=False,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        learning_rate=3e-3,
        train_batch_size=8,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        logging_steps=SAVE_STEPS,
        num_workers=2,
        resources_per_worker={"CPU": 1, TRAINER_NODE: 1},
    )
    values.update(overrides)
    return tiny_args(output_dir, **values)


def _train(bucket, output_dir, trace_dir, model_name=None, diagnostics=None, eval_file=None, **overrides):
    os.makedirs(trace_dir, exist_ok=True)
    args = _args(output_dir, tokenizer_name=bucket["tokenizer"], **overrides)
    model = LanguageModelingModel("gpt2", model_name, args=args)
    result = model.train_model(
        bucket["train"], eval_file=eval_file, _diagnostics={"trace_dir": str(trace_dir), **(diagnostics or {})}
    )
    return model, result, read_trace(str(trace_dir))


@pytest.fixture(autouse=True)
def three_worker_nodes(request):
    """Each test that uses the simulated cluster starts with its 3 worker nodes, whatever a test before it left."""
    if "sim_cluster" in request.fixturenames:
        request.getfixturevalue("sim_cluster").top_up()


@pytest.fixture(scope="module")
def two_node_run(bucket, s3_server, sim_cluster, tmp_path_factory):
    """The reference: 2 workers on 2 worker nodes, text from S3, checkpoints to S3; the workers evaluate their
    weights after the last step (after every step the other runs compare, so it changes none of them).

    What it read of the training store is taken as soon as it ends, before other runs read the same store:
    the server's GETs of each of the store's files, and the blocks in each worker node's cache."""
    root = tmp_path_factory.mktemp("two-node")
    model, (global_step, scores), (steps, starts) = _train(
        bucket,
        root / "out",
        root / "trace",
        eval_file=bucket["eval"],
        storage_path=f"{bucket['uri']}/runs",
        experiment_name="two-node",
        evaluate_during_training=True,
        evaluate_during_training_steps=MAX_STEPS,
        evaluate_each_epoch=False,
    )
    assert scores["global_step"] == [MAX_STEPS]
    store = _train_store(bucket)
    return {
        "store": store,
        "store_gets": {name: s3_server.requests("GET", _bucket_path(store, name)) for name in store.files},
        "node_caches": _node_caches(store, sim_cluster),
        "model": model,
        "out": str(root / "out"),
        "steps": steps,
        "starts": starts,
        "global_step": global_step,
        "in_training": scores,
    }


def _train_store(bucket) -> StoredExamples:
    """The example store that the runs built from the training folder, found by its manifest under storage_path."""
    import boto3

    name = bucket["uri"][len("s3://") :]
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=name, Prefix="runs/")
    manifests = [e["Key"] for page in pages for e in page.get("Contents", []) if e["Key"].endswith(f"/{MANIFEST}")]
    for key in manifests:
        manifest = json.loads(storage.read_text(f"{bucket['uri']}/{key}"))
        if all(source["path"].startswith(bucket["train"]) for source in manifest["files"]):
            return read_store(f"{bucket['uri']}/{key[: -len(MANIFEST) - 1]}")
    raise AssertionError(f"no store of {bucket['train']} among {manifests}")


def _bucket_path(store: StoredExamples, name: str) -> str:
    return f"{store.folder[len('s3://') :]}/{name}"


def _node_caches(store: StoredExamples, sim_cluster) -> dict[str, list[str]]:
    """{worker node id: the names of `store`'s blocks and footers in that node's cache} (a node GETs each once, into
    its cache; each simulated node has a temp dir, and so a node cache, of its own)."""
    # The default root, moved from this process's temp dir to the node's.
    root = os.path.relpath(default_node_cache_root(), tempfile.gettempdir())
    caches = {}
    for node_id, temp_dir in sim_cluster.node_temp_dirs.items():
        folder = os.path.join(temp_dir, root, node_cache_folder(store.folder))
        names = os.listdir(folder) if os.path.isdir(folder) else []
        caches[node_id] = sorted(name for name in names if not name.endswith((LOCK_SUFFIX, PARTIAL_SUFFIX)))
    return caches


def test_each_node_reads_its_half_of_the_store_from_object_storage(two_node_run):
    """The store's GETs, counted by the S3 server, are each one worker node's (its node cache holds what it fetched):
    a node fetches only blocks of its rank's lanes, about half the store's blocks, each once. The run's losses step
    by step are the one-node run's (test_two_workers_on_two_nodes_repeat_the_single_node_run)."""
    store, caches, args = two_node_run["store"], two_node_run["node_caches"], two_node_run["model"].args
    block_names = [f"{store.files[file_index]}.group-{group}" for file_index, group, _ in store.blocks()]
    # Every GET of the store's files is a block or a footer that one node's cache holds: none is unaccounted for.
    for name, gets in two_node_run["store_gets"].items():
        fetched = sum(cached.startswith(f"{name}.") for names in caches.values() for cached in names)
        assert gets == fetched > 0, (name, gets, caches)
    placed = {rank: (starts[0]["node_id"], starts[0]["world_size"]) for rank, starts in two_node_run["starts"].items()}
    assert len({node for node, _ in placed.values()}) == len(placed) == 2, placed
    order = EpochOrder(store.block_rows(), args.seed, epoch=0, lanes=args.global_batch_size)
    fetched_blocks = {}
    for rank, (node, world_size) in placed.items():
        # The blocks of this rank's lanes over the whole epoch: all it would ever need.
        lanes_blocks = set()
        for position in range(0, order.num_examples, args.global_batch_size):
            start, stop = rank_range(position, order.num_examples, args.global_batch_size, rank, world_size)
            lanes_blocks.update(order.locate(start, stop)[0].tolist())
        fetched_blocks[rank] = {block for block, name in enumerate(block_names) if name in caches[node]}
        assert fetched_blocks[rank] <= lanes_blocks, (rank, fetched_blocks[rank], lanes_blocks)
        assert len(fetched_blocks[rank]) <= 1.25 * len(block_names) / 2, (rank, fetched_blocks[rank])
    print(
        f"\nstore reads: {sum(two_node_run['store_gets'].values())} GETs of the store ({len(block_names)} blocks); "
        + ", ".join(f"rank {rank}'s node fetched {len(blocks)} blocks" for rank, blocks in fetched_blocks.items())
    )


def test_two_workers_on_two_nodes_repeat_the_single_node_run(two_node_run, bucket, tmp_path, sim_cluster):
    head_node = next(node["NodeID"] for node in ray.nodes() if node["Alive"] and HEAD_TRAINER in node["Resources"])
    worker_nodes = {node.node_id for node in sim_cluster.workers}
    placed = {rank: starts[0]["node_id"] for rank, starts in two_node_run["starts"].items()}
    assert len(set(placed.values())) == 2 and set(placed.values()) <= worker_nodes, placed

    # The same job with both workers on one node (the head), and a local storage_path: a folder every
    # node of this simulated cluster sees, as a shared mount would be (the storage probe lets it pass).
    _, (global_step, _), (steps, starts) = _train(
        bucket,
        tmp_path / "out",
        tmp_path / "trace",
        storage_path=str(tmp_path / "runs"),
        resources_per_worker={"CPU": 1, HEAD_TRAINER: 1},
    )
    assert {records[0]["node_id"] for records in starts.values()} == {head_node}
    assert global_step == two_node_run["global_step"] == MAX_STEPS
    for rank in (0, 1):
        one_node, two_nodes = steps[rank], two_node_run["steps"][rank]
        assert sorted(one_node) == sorted(two_nodes) == list(range(1, MAX_STEPS + 1))
        for step in one_node:
            assert one_node[step]["example_ids"] == two_nodes[step]["example_ids"], (rank, step)
            # Two ranks' gradients summed by gloo in the same order: bit-identical wherever the ranks ran.
            assert one_node[step]["loss"] == two_nodes[step]["loss"], (rank, step)
    # Each rank's trace holds its share of the global mean loss; the two add up to it.
    losses = {
        step: two_node_run["steps"][0][step]["loss"] + two_node_run["steps"][1][step]["loss"]
        for step in range(1, MAX_STEPS + 1)
    }
    print(
        "\nglobal mean loss per step, 1 node = 2 nodes:",
        ", ".join(f"{step}: {loss:.4f}" for step, loss in losses.items()),
    )
    assert losses[MAX_STEPS] < 0.9 * losses[1], losses

    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(two_node_run["out"])
    for name, tensor in two_node_run["model"].model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    # ...and those are the weights the workers trained, not merely the final checkpoint's (which the in-memory
    # model was loaded from too): they score what the workers' own evaluation after the last step found.
    reloaded_model = LanguageModelingModel("gpt2", two_node_run["out"], args={"output_dir": str(tmp_path / "reload")})
    assert reloaded_model.eval_model(bucket["eval"])["eval_loss"] == pytest.approx(
        two_node_run["in_training"]["eval_loss"][-1], rel=1e-6
    )


def test_a_lost_node_resumes_from_object_storage_on_the_spare_node(two_node_run, bucket, tmp_path, sim_cluster):
    """A worker node removed mid-run (max_failures=1): the group restarts on the spare node from the
    latest checkpoint in S3, the steps after it repeat the uninterrupted run's, output_dir keeps what it had."""
    out, trace, release = tmp_path / "out", tmp_path / "trace", tmp_path / "release"
    hold_step = SAVE_STEPS + 2
    removed: dict = {}

    def remove_the_node_of_rank_1() -> None:
        # Once both ranks wait after hold_step and the step-4 checkpoint is mirrored (Ray registered it).
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            steps, starts = read_trace(str(trace)) if trace.exists() else ({}, {})
            if all(hold_step in steps.get(rank, {}) for rank in (0, 1)) and is_training_checkpoint(
                str(out / f"checkpoint-{SAVE_STEPS}")
            ):
                node = sim_cluster.node_by_id(starts[1][0]["node_id"])
                removed["time"] = time.time()
                sim_cluster.remove(node)
                break
            time.sleep(0.5)
        release.touch()

    watcher = threading.Thread(target=remove_the_node_of_rank_1, daemon=True)
    watcher.start()
    try:
        _, (global_step, _), (steps, starts) = _train(
            bucket,
            out,
            trace,
            storage_path=f"{bucket['uri']}/runs",
            experiment_name="node-loss",
            max_failures=1,
            diagnostics={"holds": [[hold_step, str(release)]]},
        )
    finally:
        watcher.join()
        sim_cluster.add_worker_node()  # back to 3 worker nodes for the tests after this one
    assert "time" in removed, "the node was never removed"
    assert global_step == MAX_STEPS
    # One restart, from the step-4 checkpoint read back from S3, on a node that is not the lost one.
    assert [record["resumed_from"] for record in starts[1]] == [None, SAVE_STEPS], starts
    assert starts[1][1]["node_id"] != starts[1][0]["node_id"]
    reference = two_node_run["steps"]
    for rank in (0, 1):
        for step in range(SAVE_STEPS + 1, MAX_STEPS + 1):
            assert steps[rank][step]["loss"] == reference[rank][step]["loss"], (rank, step)
            assert steps[rank][step]["example_ids"] == reference[rank][step]["example_ids"], (rank, step)
    first_step_after = min(
        record["time"]
        for record in _all_records(str(trace))
        if record.get("step") == SAVE_STEPS + 1 and record["time"] > removed["time"]
    )
    print(
        f"\nnode loss: {hold_step - SAVE_STEPS} steps repeated, "
        f"{first_step_after - removed['time']:.1f} s from the removal to the next step"
    )
    # Nothing already in output_dir was lost: every checkpoint copy is whole, the final model is there.
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            assert is_training_checkpoint(str(out / name)), name
    assert read_trainer_state(str(out / f"checkpoint-{MAX_STEPS}")).global_step == MAX_STEPS
    assert (out / "model.safetensors").exists()


def _all_records(trace_dir):
    for name in os.listdir(trace_dir):
        if name.endswith(".jsonl"):
            yield from (json.loads(line) for line in open(os.path.join(trace_dir, name), encoding="utf-8"))


def test_resuming_a_driver_local_checkpoint_on_other_nodes_keeps_other_copies(two_node_run, bucket, tmp_path):
    """The checkpoint folder is on the driver's disk only: it is staged to storage for the workers.
    The run keeps the reference's name: an explicit checkpoint wins over Ray's latest of that name."""
    out = tmp_path / "out"
    shutil.copytree(two_node_run["out"], out)
    foreign = out / "checkpoint-99"  # another run's copy in the same output_dir
    shutil.copytree(out / f"checkpoint-{MAX_STEPS}", foreign)
    resume_from = str(out / f"checkpoint-{SAVE_STEPS}")
    _, (global_step, _), (steps, starts) = _train(
        bucket,
        out,
        tmp_path / "trace",
        model_name=resume_from,
        storage_path=f"{bucket['uri']}/runs",
        experiment_name="two-node",
        checkpoints_to_keep=1,
    )
    assert global_step == MAX_STEPS
    assert [record["resumed_from"] for record in starts[0]] == [SAVE_STEPS]
    for rank in (0, 1):
        assert sorted(steps[rank]) == list(range(SAVE_STEPS + 1, MAX_STEPS + 1))
        for step, record in steps[rank].items():
            assert record["loss"] == two_node_run["steps"][rank][step]["loss"], (rank, step)
    # The mirror prunes only its own copies: the one resumed from and the foreign one stay.
    copies = sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))
    assert copies == sorted([f"checkpoint-{SAVE_STEPS}", f"checkpoint-{MAX_STEPS}", "checkpoint-99"]), copies
    assert all(is_training_checkpoint(str(out / name)) for name in copies)


def test_a_reused_experiment_name_is_refused_unless_resuming_and_a_finished_run_is_not_resumed(
    two_node_run, bucket, tmp_path
):
    args = dict(storage_path=f"{bucket['uri']}/runs", experiment_name="two-node")
    model = LanguageModelingModel("gpt2", None, args=_args(tmp_path / "a", tokenizer_name=bucket["tokenizer"], **args))
    with pytest.raises(
        ConfigError, match="experiment_name 'two-node' names a run that already exists.*Set resume=True"
    ):
        model.train_model(bucket["train"])
    # Asked to resume, the run is found, and it already reached this job's end.
    model = LanguageModelingModel(
        "gpt2", None, args=_args(tmp_path / "b", tokenizer_name=bucket["tokenizer"], resume=True, **args)
    )
    with pytest.raises(ConfigError, match=f"at step {MAX_STEPS} .*max_steps {MAX_STEPS}.*Raise max_steps"):
        model.train_model(bucket["train"])
    finished = LanguageModelingModel(
        "gpt2",
        os.path.join(two_node_run["out"], f"checkpoint-{MAX_STEPS}"),
        args={
            "max_steps": MAX_STEPS,
            "output_dir": str(tmp_path / "c"),
            "overwrite_output_dir": True,
            "evaluate_during_training": False,  # the checkpoint's own args evaluate, and no eval_file is given here
        },
    )
    with pytest.raises(ConfigError, match="resuming would train nothing"):
        finished.train_model(bucket["train"])
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


UNSHARED_DRIVER = """
import sys
from raylm import ConfigError, LanguageModelingModel
args = {args!r}
try:
    LanguageModelingModel("gpt2", None, args=args).train_model({train!r})
except ConfigError as err:
    print("REFUSED", err)
    sys.exit(3)
"""


def _unshared_driver(tmp_path, args: dict, train: str, private, then: str = "") -> subprocess.CompletedProcess:
    """The driver in a mount namespace of its own with a tmpfs at `private` (`then` runs there first)."""
    script = tmp_path / "driver.py"
    script.write_text(UNSHARED_DRIVER.format(args=args, train=train))
    command = f"mount -t tmpfs tmpfs {private} && {then or 'true'} && exec {sys.executable} {script}"
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def test_a_local_storage_path_the_other_nodes_cannot_see_is_refused(bucket, tmp_path):
    """The driver runs in a mount namespace of its own with a tmpfs at storage_path: a disk only its node has."""
    private = tmp_path / "driver-only"
    private.mkdir()
    args = _args(
        str(tmp_path / "out"), tokenizer_name=bucket["tokenizer"], storage_path=str(private / "runs")
    ).to_dict()
    done = _unshared_driver(tmp_path, args, bucket["train"], private)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert "storage_path" in done.stdout and "cannot see it" in done.stdout and "s3://" in done.stdout, done.stdout
    assert not (private / "runs").exists()  # outside the namespace: nothing was written here


def test_a_local_train_file_the_other_nodes_cannot_read_is_refused(bucket, corpus, tmp_path):
    """The same driver, with storage_path in S3 and train_file on its private disk, where Ray Data's tokenizing
    tasks on the other nodes could not read it (small shards: several tasks, not the driver's lone shard)."""
    private = tmp_path / "driver-only"
    private.mkdir()
    args = _args(
        str(tmp_path / "out"),
        tokenizer_name=bucket["tokenizer"],
        storage_path=f"{bucket['uri']}/refused-runs",
        shard_size_mb=0.02,
    ).to_dict()
    train = private / "train.txt"
    done = _unshared_driver(tmp_path, args, str(train), private, then=f"cp {corpus[1]} {train}")
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"train_file '{train}' is a local file, and " in done.stdout, done.stdout
    assert "cannot read it" in done.stdout and "s3://" in done.stdout, done.stdout


def test_use_gpu_unset_follows_what_the_autoscaler_can_add(on_sim_cluster, tmp_path, monkeypatch):
    """No GPU is up; an autoscaler config with GPU node types (as `ray up` leaves on the head) means GPUs."""
    import yaml

    from raylm import LanguageModelingArgs
    from raylm.cluster import capacity

    args = LanguageModelingArgs()
    monkeypatch.setenv(capacity.AUTOSCALER_CONFIG_ENV, str(tmp_path / "none.yaml"))
    assert capacity.resolve_use_gpu(args, use_cuda=True) is False
    config = yaml.safe_load(open(os.path.join(REPO, "cluster.yaml"), encoding="utf-8"))
    # As `ray up` writes it on the head: each node type's resources filled in from its instance type.
    detected = {
        "head": {"CPU": 8},
        "gpu_1x": {"CPU": 4, "GPU": 1},
        "gpu_1x_spot": {"CPU": 4, "GPU": 1},
        "gpu_8x": {"CPU": 192, "GPU": 8},
    }
    for name, spec in config["available_node_types"].items():
        spec["resources"] = detected[name]
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(capacity.AUTOSCALER_CONFIG_ENV, str(path))
    assert capacity.autoscaler_gpu_node_types() == ["gpu_1x", "gpu_1x_spot", "gpu_8x"]
    assert capacity.resolve_use_gpu(args, use_cuda=True) is True
    assert capacity.resolve_use_gpu(args, use_cuda=False) is False
    args.use_gpu = False
    assert capacity.resolve_use_gpu(args, use_cuda=True) is False
    # Without GPU node types the autoscaler cannot help: CPU.
    for spec in config["available_node_types"].values():
        spec["resources"].pop("GPU", None)
    path.write_text(yaml.safe_dump(config))
    assert capacity.resolve_use_gpu(LanguageModelingArgs(), use_cuda=True) is False


def _sessions(trace_dir) -> dict:
    """{step: [its records in the last session that ran it]}: a session is a worker group (resumed_from, world_size)."""
    by_step: dict = {}
    for record in _all_records(trace_dir):
        if "step" in record:
            session = (-1 if record["resumed_from"] is None else record["resumed_from"], record["world_size"])
            by_step.setdefault(record["step"], {}).setdefault(session, []).append(record)
    return {step: sessions[max(sessions)] for step, sessions in by_step.items()}


# How long Ray Train waits for a worker group's resources in the elastic tests (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S,
# 60 s by default). Its elastic policy sizes a restart from its autoscaling coordinator's view of the nodes, refreshed
# every 20 s: just after a loss it still counts the lost node, and each try at 2 workers waits this long for resources
# that are gone (seen: two tries) before it restarts with 1.
ELASTIC_START_TIMEOUT_S = "10"


def test_an_elastic_run_shrinks_when_a_node_is_lost_and_grows_when_one_joins(
    two_node_run, bucket, tmp_path, sim_cluster, monkeypatch
):
    """num_workers [1, 2] on 2 worker nodes: a node removed at step 6 (the run goes on with 1 worker from
    checkpoint 4), a node added at step 10 (back to 2 from checkpoint 8). Every step trains on the fixed
    2-worker run's global batch at its learning rate, and no example is used twice."""
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", ELASTIC_START_TIMEOUT_S)
    out, trace = tmp_path / "out", tmp_path / "trace"
    shrink_at, grow_at = SAVE_STEPS + 2, 2 * SAVE_STEPS + 2
    released = {name: tmp_path / name for name in ("after-shrink", "after-grow")}
    events: dict = {}  # when the test removed and added nodes, and saw the group grow
    spare = sim_cluster.workers[-1]
    sim_cluster.remove(spare)  # two worker nodes: a lost one cannot be replaced until one is added

    def watch(training: threading.Thread) -> None:
        """Here, on the main thread: Ray's Cluster.add_node installs signal handlers, which only it may."""
        deadline = time.monotonic() + 2 * WATCH_SECONDS
        while training.is_alive() and time.monotonic() < deadline and "grown" not in events:
            steps, starts = read_trace(str(trace)) if trace.exists() else ({}, {})
            if "shrink" not in events:
                if all(shrink_at in steps.get(rank, {}) for rank in (0, 1)) and is_training_checkpoint(
                    str(out / f"checkpoint-{SAVE_STEPS}")
                ):
                    events["shrink"] = time.time()
                    sim_cluster.remove(sim_cluster.node_by_id(starts[1][0]["node_id"]))
                    released["after-shrink"].touch()
            elif "grow" not in events:
                alone = [r for r in _all_records(str(trace)) if r.get("step") == grow_at and r["world_size"] == 1]
                if alone and is_training_checkpoint(str(out / f"checkpoint-{2 * SAVE_STEPS}")):
                    events["grow"] = time.time()
                    sim_cluster.add_worker_node()
                    events["joined"] = time.time()
            elif any(start["world_size"] == 2 and start["time"] > events["grow"] for start in starts.get(0, [])):
                events["grown"] = time.time()
            time.sleep(0.5)

    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = _train(
                bucket,
                out,
                trace,
                storage_path=f"{bucket['uri']}/runs",
                experiment_name="elastic",
                num_workers=[1, 2],
                max_failures=2,
                elastic_resize_check_s=1,
                # The workers evaluate after the last step, as the fixed run's did (no evaluation actors to start).
                eval_file=bucket["eval"],
                evaluate_during_training=True,
                evaluate_during_training_steps=MAX_STEPS,
                evaluate_each_epoch=False,
                diagnostics={
                    "holds": [[shrink_at, str(released["after-shrink"])], [grow_at, str(released["after-grow"])]]
                },
            )
        except BaseException as err:  # raised below, on the test's thread
            outcome["error"] = err

    training = threading.Thread(target=train, daemon=True)
    training.start()
    try:
        watch(training)
    finally:
        for release in released.values():
            release.touch()
        training.join(timeout=WATCH_SECONDS)
        sim_cluster.top_up()
    if "error" in outcome:
        raise outcome["error"]
    _, (global_step, scores), _ = outcome["result"]
    assert {"shrink", "grow", "grown"} <= set(events), events
    assert global_step == MAX_STEPS
    _, starts = read_trace(str(trace))
    assert [(s["resumed_from"], s["world_size"]) for s in starts[0]] == [
        (None, 2),
        (SAVE_STEPS, 1),
        (2 * SAVE_STEPS, 2),
    ], starts[0]

    final, fixed = _sessions(str(trace)), two_node_run["steps"]
    used = []
    for step in range(1, MAX_STEPS + 1):
        records = final[step]
        assert len(records) == records[0]["world_size"]
        batch = [i for record in records for i in record["example_ids"]]
        # The fixed run's global batch and learning rate at every step, with 1 worker or 2.
        assert sorted(batch) == sorted(fixed[0][step]["example_ids"] + fixed[1][step]["example_ids"]), step
        assert records[0]["lr"] == fixed[0][step]["lr"], step
        used.extend(batch)
    assert len(used) == len(set(used)) == MAX_STEPS * 16
    workers_logged = [
        (e["global_step"], e["num_workers"])
        for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines())
        if e["kind"] == "train"
    ]
    # Reports of every session (the first one's steps 7-8, run before Ray saw the node gone, included).
    changes = [
        count for index, (_, count) in enumerate(workers_logged) if index == 0 or workers_logged[index - 1][1] != count
    ]
    assert changes == [2, 1, 2] and (2 * SAVE_STEPS, 1) in workers_logged and workers_logged[-1] == (MAX_STEPS, 2), (
        workers_logged
    )
    records = list(_all_records(str(trace)))
    after_shrink = min(r["time"] for r in records if "step" in r and r["world_size"] == 1)
    after_grow = min(r["time"] for r in records if "step" in r and r["time"] > events["grow"] and r["world_size"] == 2)
    print(
        f"\nelastic: {after_shrink - events['shrink']:.1f} s from the node loss to the next step (1 worker), "
        f"{after_grow - events['joined']:.1f} s from the node joining to the next step (2 workers)"
    )
    assert scores["global_step"][-1] == MAX_STEPS
    elastic_loss, fixed_loss = scores["eval_loss"][-1], two_node_run["in_training"]["eval_loss"][-1]
    print(f"eval_loss elastic {elastic_loss:.4f}, fixed 2-worker run {fixed_loss:.4f}")
    # The same examples, batches and learning rates; only steps 5-8 drew other dropout masks (one rank's
    # stream instead of two). Measured: 5.3149 vs 5.3148 (2e-5); 1e-3 leaves room for the float order.
    assert elastic_loss == pytest.approx(fixed_loss, rel=1e-3)


RECLAIM_STEP = 7
# Long enough for the checkpoint at the notice (1.5 s here, seen 2 s in) several times over on a loaded machine.
RECLAIM_DEADLINE_S = 12


def _drain_for_preemption(node_id: str, deadline_s: float) -> float:
    """What a raylet does on the provider's SIGTERM: ask the GCS to drain its node for preemption, with a deadline."""
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int((time.time() + deadline_s) * 1000)
    client = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, refusal = client.drain_node(node_id, reason, "spot reclaim (test)", deadline_ms)
    assert accepted, refusal
    return deadline_ms / 1000


def test_a_reclaim_notice_checkpoints_at_once_and_repeats_no_step(
    two_node_run, bucket, tmp_path, sim_cluster, monkeypatch
):
    """Rank 1's node drained for preemption after step 7 with a 12 s deadline and removed at the deadline; save_steps
    50, max_failures 0: the run checkpoints at the notice, resumes on the spare node and repeats no step."""
    # Ray Train passes this to its controller, whose watcher then polls the drains every 0.5 s instead of 5.
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    out, trace, release = tmp_path / "out", tmp_path / "trace", tmp_path / "release"
    drained: dict = {}
    # Released 2 s after the drain, past the watcher's poll: the ranks see the notice at step 7's boundary.
    watcher = threading.Thread(
        target=_reclaim_during, args=(sim_cluster, trace, release, RECLAIM_DEADLINE_S, 2, drained), daemon=True
    )
    watcher.start()
    try:
        _, (global_step, _), (steps, starts) = _train(
            bucket,
            out,
            trace,
            storage_path=f"{bucket['uri']}/runs",
            experiment_name="reclaim",
            save_steps=50,
            diagnostics={"holds": [[RECLAIM_STEP, str(release)]]},
        )
    finally:
        watcher.join()
        sim_cluster.top_up()
    assert "removed" in drained, drained
    assert global_step == MAX_STEPS
    reclaims = [
        e for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if e["kind"] == "preemption"
    ]
    assert len(reclaims) == 1, reclaims
    reclaim = reclaims[0]
    assert reclaim["global_step"] in (RECLAIM_STEP, RECLAIM_STEP + 1) and reclaim["ranks"] == [1], reclaim
    assert reclaim["checkpoint_step"] == reclaim["resumes_from_step"] == reclaim["global_step"], reclaim
    assert reclaim["steps_repeated"] == 0
    # One restart, from the just-in-time checkpoint, on a node that is not the reclaimed one.
    assert [record["resumed_from"] for record in starts[1]] == [None, reclaim["checkpoint_step"]], starts
    assert starts[1][1]["node_id"] != starts[1][0]["node_id"]
    reference = two_node_run["steps"]
    for rank in (0, 1):
        assert sorted(steps[rank]) == list(range(1, MAX_STEPS + 1))
        for step in range(1, MAX_STEPS + 1):
            assert steps[rank][step]["loss"] == reference[rank][step]["loss"], (rank, step)
            assert steps[rank][step]["example_ids"] == reference[rank][step]["example_ids"], (rank, step)
    # No step ran twice: the first group stopped where the restart began (one record per rank and step).
    step_records = [record for record in _all_records(str(trace)) if "step" in record]
    assert len(step_records) == 2 * MAX_STEPS, "a step ran twice"
    first_step_after = min(r["time"] for r in step_records if r["step"] == reclaim["checkpoint_step"] + 1)
    print(
        f"\nspot reclaim: notice at step {reclaim['global_step']}, {reclaim['deadline_seconds']:.1f} s before the "
        f"deadline; checkpoint committed {reclaim['checkpoint_seconds']:.1f} s after the ranks agreed; 0 steps "
        f"repeated (a save_steps 50 run without it would repeat {reclaim['global_step']}); "
        f"{first_step_after - drained['time']:.1f} s from the drain to the next step"
    )


def _reclaim_during(sim_cluster, trace, release, deadline_s: float, notice_s: float, drained: dict) -> None:
    """Once both ranks hold after RECLAIM_STEP: drain rank 1's node for preemption, let the ranks go on `notice_s`
    later, remove the node at the deadline."""
    watch_until = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < watch_until and "time" not in drained:
        steps, starts = read_trace(str(trace)) if trace.exists() else ({}, {})
        if all(RECLAIM_STEP in steps.get(rank, {}) for rank in (0, 1)):
            node = sim_cluster.node_by_id(starts[1][0]["node_id"])
            drained["time"] = time.time()
            reclaimed_at = _drain_for_preemption(node.node_id, deadline_s)
            time.sleep(notice_s)
            release.touch()
            # Not sooner (once the run has checkpointed, say): Ray takes a drained node gone before its deadline for
            # a node failure, which max_failures 0 makes fatal.
            time.sleep(max(0.0, reclaimed_at - time.time()))
            sim_cluster.remove(node)
            drained["removed"] = time.time()
        time.sleep(0.2)
    release.touch()


def test_an_elastic_run_shrinks_on_a_reclaim_and_repeats_no_step(
    two_node_run, bucket, tmp_path, sim_cluster, monkeypatch
):
    """num_workers [1, 2], no spare node, max_failures 0, async checkpoint uploads: rank 1's node reclaimed after
    step 7 with a 12 s notice; the run checkpoints at the notice, the ranks wait until its upload is registered, and
    the run goes on alone from it, every step on the fixed run's global batch."""
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", ELASTIC_START_TIMEOUT_S)
    out, trace, release = tmp_path / "out", tmp_path / "trace", tmp_path / "release"
    drained: dict = {}
    sim_cluster.remove(sim_cluster.workers[-1])  # no spare: the run can only shrink
    watcher = threading.Thread(
        target=_reclaim_during, args=(sim_cluster, trace, release, RECLAIM_DEADLINE_S, 2, drained), daemon=True
    )
    watcher.start()
    try:
        _, (global_step, _), _ = _train(
            bucket,
            out,
            trace,
            storage_path=f"{bucket['uri']}/runs",
            experiment_name="elastic-reclaim",
            num_workers=[1, 2],
            save_steps=50,
            checkpoint_upload_mode="async",
            elastic_resize_check_s=3600,
            diagnostics={"holds": [[RECLAIM_STEP, str(release)]]},
        )
    finally:
        watcher.join()
        sim_cluster.top_up()
    assert "removed" in drained, drained
    assert global_step == MAX_STEPS
    (reclaim,) = [
        e for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if e["kind"] == "preemption"
    ]
    assert reclaim["checkpoint_step"] == reclaim["resumes_from_step"] == reclaim["global_step"], reclaim
    assert reclaim["steps_repeated"] == 0
    _, starts = read_trace(str(trace))
    assert [(s["resumed_from"], s["world_size"]) for s in starts[0]] == [(None, 2), (reclaim["checkpoint_step"], 1)]
    final, fixed = _sessions(str(trace)), two_node_run["steps"]
    for step in range(1, MAX_STEPS + 1):
        batch = sorted(i for record in final[step] for i in record["example_ids"])
        assert batch == sorted(fixed[0][step]["example_ids"] + fixed[1][step]["example_ids"]), step
    step_records = [record for record in _all_records(str(trace)) if "step" in record]
    # 2 ranks up to the reclaim, then 1: no step ran twice.
    assert len(step_records) == 2 * reclaim["checkpoint_step"] + (MAX_STEPS - reclaim["checkpoint_step"])
    print(
        f"\nelastic reclaim: shrank to 1 worker at step {reclaim['checkpoint_step']}, "
        f"checkpoint committed in {reclaim['checkpoint_seconds']:.1f} s, 0 steps repeated"
    )


def test_a_reclaim_too_close_for_a_checkpoint_resumes_from_the_one_before(
    two_node_run, bucket, tmp_path, sim_cluster, monkeypatch
):
    """A 3 s notice, seen 2.5 s in: less than the run's checkpoints take. Nothing is written at the notice; the run
    resumes from step 4's checkpoint and repeats steps 5-7 exactly, with max_failures 0."""
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    out, trace, release = tmp_path / "out", tmp_path / "trace", tmp_path / "release"
    drained: dict = {}
    watcher = threading.Thread(target=_reclaim_during, args=(sim_cluster, trace, release, 3, 2.5, drained), daemon=True)
    watcher.start()
    try:
        _, (global_step, _), (steps, starts) = _train(
            bucket,
            out,
            trace,
            storage_path=f"{bucket['uri']}/runs",
            experiment_name="reclaim-too-close",
            diagnostics={"holds": [[RECLAIM_STEP, str(release)]]},
        )
    finally:
        watcher.join()
        sim_cluster.top_up()
    assert "removed" in drained, drained
    assert global_step == MAX_STEPS
    assert [record["resumed_from"] for record in starts[1]] == [None, SAVE_STEPS], starts
    for rank in (0, 1):
        for step in range(SAVE_STEPS + 1, MAX_STEPS + 1):
            assert steps[rank][step]["loss"] == two_node_run["steps"][rank][step]["loss"], (rank, step)
    reclaims = [
        e for e in map(json.loads, (out / "training_log.jsonl").read_text().splitlines()) if e["kind"] == "preemption"
    ]
    assert len(reclaims) == 1, reclaims
    assert reclaims[0]["checkpoint_step"] is None and reclaims[0]["resumes_from_step"] == SAVE_STEPS, reclaims
    assert reclaims[0]["steps_repeated"] == RECLAIM_STEP - SAVE_STEPS
    print(f"\nreclaim too close: {len(reclaims)} record(s), resumed from step {SAVE_STEPS}: {reclaims}")
