"""Object storage end to end on moto's S3 server: text in, checkpoints and outputs out, models loaded back.

AWS_ENDPOINT_URL and the credentials are set the standard way by the `s3_server` fixture (before the
session's Ray starts, so its workers see them too); the explicit `?endpoint_override=...` URI form is
checked where it must survive: shard planning and publishing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest
import torch
from conftest import TINY_GPT2, read_trace, tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from raylm import LanguageModelingModel
from raylm.data import storage
from raylm.data.documents import read_shard_lines
from raylm.data.sources import plan_shards, resolve_text_files
from raylm.errors import ModelError, OutputDirError

REPO = Path(__file__).resolve().parents[1]


def _s3(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint)


def _keys(s3_server, bucket: str, prefix: str = "") -> list[str]:
    pages = _s3(s3_server).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def text_bucket(s3_server, corpus):
    """A bucket with the corpus cut into three files in texts/ (one in a subfolder) plus a hidden file."""
    bucket = s3_server.bucket()
    with open(corpus[0], encoding="utf-8") as f:
        lines = f.read().splitlines()
    third = len(lines) // 3
    parts = {
        "texts/a.txt": lines[:third],
        "texts/b.txt": lines[third : 2 * third],
        "texts/more/c.txt": lines[2 * third :],
    }
    client = _s3(s3_server)
    for key, part in parts.items():
        client.put_object(Bucket=bucket, Key=key, Body="\n".join(part).encode("utf-8"))
    client.put_object(Bucket=bucket, Key="texts/.hidden", Body=b"not text \x00")
    return bucket, lines


def _read_all(files: list[str]) -> list[str]:
    return [line for shard in plan_shards(files, shard_size_mb=0.05) for line in read_shard_lines(shard)]


@pytest.mark.parametrize("form", ["file", "folder", "glob", "list"])
def test_s3_text_as_file_folder_glob_and_list(s3_server, text_bucket, form):
    bucket, lines = text_bucket
    base = f"s3://{bucket}/texts"
    spec = {
        "file": f"{base}/a.txt",
        "folder": base,
        "glob": f"{base}/**/*.txt",
        "list": [f"{base}/a.txt", f"{base}/more"],
    }[form]
    files = resolve_text_files(spec)
    expected = {
        "file": [f"{base}/a.txt"],
        "folder": [f"{base}/a.txt", f"{base}/b.txt", f"{base}/more/c.txt"],
        "glob": [f"{base}/a.txt", f"{base}/b.txt", f"{base}/more/c.txt"],
        "list": [f"{base}/a.txt", f"{base}/more/c.txt"],
    }[form]
    assert files == expected
    read = _read_all(files)
    third = len(lines) // 3
    wanted = {"file": lines[:third], "folder": lines, "glob": lines, "list": lines[:third] + lines[2 * third :]}[form]
    assert read == [line for line in wanted if line.strip()] and len(read) > 100


@pytest.mark.parametrize("form", ["folder", "glob"])
def test_expanded_uris_keep_the_explicit_endpoint(s3_server, text_bucket, monkeypatch, form):
    bucket, lines = text_bucket
    # Only the URI says where the server is: without its query the reads would go to AWS itself.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    query = s3_server.endpoint_query
    spec = f"s3://{bucket}/texts?{query}" if form == "folder" else f"s3://{bucket}/texts/*.txt?{query}"
    files = resolve_text_files(spec)
    names = ["a.txt", "b.txt", "more/c.txt"] if form == "folder" else ["a.txt", "b.txt"]
    assert files == [f"s3://{bucket}/texts/{name}?{query}" for name in names]
    assert len(_read_all(files)) > 100


def test_join_keeps_the_query_at_the_end():
    assert (
        storage.join("s3://b/models/run?endpoint_override=h:1&scheme=http", "checkpoint-4", "config.json")
        == "s3://b/models/run/checkpoint-4/config.json?endpoint_override=h:1&scheme=http"
    )
    assert storage.join("s3://b/models/", "x") == "s3://b/models/x"
    assert storage.join("out", "x") == os.path.join("out", "x")
    assert storage.is_remote("gs://b/x") and not storage.is_remote("file:///tmp/x") and not storage.is_remote("out/x")


def _model_folder(path, marker_text: str, broken: bool = False) -> str:
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json", "sub/x.json"):
        with open(os.path.join(path, name), "w") as f:
            f.write(marker_text)
    with open(os.path.join(path, storage.COMPLETION_MARKER), "w") as f:
        json.dump({"version": marker_text}, f)
    if broken:
        # Uploaded after model.safetensors and before config.json: the publish fails in the middle.
        os.symlink(os.path.join(path, "missing"), os.path.join(path, "rng_states.pt"))
    return str(path)


@pytest.mark.parametrize("explicit_endpoint", [False, True])
def test_a_publish_that_fails_midway_leaves_a_folder_readers_refuse(
    s3_server, tmp_path, monkeypatch, explicit_endpoint
):
    bucket = s3_server.bucket()
    destination = f"s3://{bucket}/models/name"
    if explicit_endpoint:
        destination += f"?{s3_server.endpoint_query}"
        monkeypatch.delenv("AWS_ENDPOINT_URL")

    def publish(source: str) -> None:
        with storage.publishing(destination) as staging:
            shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)

    publish(_model_folder(tmp_path / "v1", "v1"))
    storage.download_model(destination, str(tmp_path / "read-v1"), "model_name")
    assert json.load(open(tmp_path / "read-v1" / "config.json")) == {"version": "v1"}

    with pytest.raises(FileNotFoundError):
        publish(_model_folder(tmp_path / "v2", "v2", broken=True))
    # Some of v2 is there, the marker is not: a reader must not mix v1's config with v2's weights.
    keys = _keys(s3_server, bucket, "models/name/")
    assert "models/name/model.safetensors" in keys and "models/name/config.json" not in keys
    with pytest.raises(ModelError, match="no config.json, so it is not a complete model folder"):
        storage.download_model(destination, str(tmp_path / "read-v2"), "model_name")

    os.remove(tmp_path / "v2" / "rng_states.pt")
    publish(str(tmp_path / "v2"))
    storage.download_model(destination, str(tmp_path / "read-v2"), "model_name")
    assert json.load(open(tmp_path / "read-v2" / "config.json")) == {"version": "v2"}
    assert open(tmp_path / "read-v2" / "sub" / "x.json").read() == "v2"


# --- training with object storage: one shared run, then loads from what it left ----------------------------
RUN_STEPS = 8


def _run_args(output_dir, **overrides):
    values = dict(
        mlm=False,
        vocab_size=400,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        learning_rate=6e-3,
        train_batch_size=8,
        max_steps=RUN_STEPS,
        save_steps=4,
        logging_steps=2,
        num_workers=1,
    )
    values.update(overrides)
    return tiny_args(output_dir, **values)


def _trace(trace_dir) -> tuple[dict, list]:
    """({step: record} of rank 0, keeping each step's last record; [resumed_from of each start])."""
    steps, starts = read_trace(trace_dir)
    return steps.get(0, {}), [start["resumed_from"] for start in starts.get(0, [])]


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_server, text_bucket, corpus, tmp_path_factory):
    """A run that reads its text from S3 and writes its checkpoints and outputs there; then eval_model into output_dir.

    Its checkpoints upload asynchronously, so it trains on a Ray Train worker, whose uploader thread
    does that (one worker that uploads synchronously trains in the driver): the mirror into output_dir
    and the exact resume from them (test_checkpoint_uri_resumes_exactly) are checked on that path; the
    synchronous one is every other run's.
    """
    bucket, _ = text_bucket
    _s3(s3_server).upload_file(corpus[1], bucket, "eval/test.txt")
    train_uri, eval_uri = f"s3://{bucket}/texts", f"s3://{bucket}/eval/test.txt"
    output_dir = f"s3://{bucket}/models/name"
    trace = tmp_path_factory.mktemp("s3-trace")
    args = _run_args(
        output_dir,
        storage_path=f"s3://{bucket}/runs",
        experiment_name="s3run",
        evaluate_during_training=True,
        evaluate_during_training_steps=4,
        checkpoint_upload_mode="async",
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_uri)
    cwd_before = set(os.listdir(os.getcwd()))
    global_step, scores = model.train_model(train_uri, eval_file=eval_uri, _diagnostics={"trace_dir": str(trace)})
    # The worker's local copies of this run's checkpoints (a temp folder each, named in model_args.json by
    # this run's output_dir) that are still on disk after the run.
    local_copies = [
        folder
        for folder in glob.glob(os.path.join(tempfile.gettempdir(), "raylm-checkpoint-*"))
        if _saved_output_dir(folder) == output_dir
    ]
    evaluated = model.eval_model(eval_uri)
    return {
        "model": model,
        "bucket": bucket,
        "output_dir": output_dir,
        "train_uri": train_uri,
        "eval_uri": eval_uri,
        "global_step": global_step,
        "scores": scores,
        "eval": evaluated,
        "trace": _trace(str(trace)),
        "pids": [start["pid"] for start in read_trace(str(trace))[1].get(0, [])],
        "new_in_cwd": set(os.listdir(os.getcwd())) - cwd_before,
        "local_copies": local_copies,
    }


def _saved_output_dir(folder: str):
    try:
        with open(os.path.join(folder, "model_args.json"), encoding="utf-8") as f:
            return json.load(f).get("output_dir")
    except (OSError, ValueError):  # another run's folder, being written or deleted
        return None


def _causal_loss(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :64]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_output_dir_in_s3_holds_the_model_logs_best_model_and_checkpoints(s3_run, s3_server, tmp_path, corpus):
    bucket = s3_run["bucket"]
    keys = _keys(s3_server, bucket, "models/name/")
    names = {key[len("models/name/") :] for key in keys}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "model_args.json",
        "eval_results.txt",
        "training_log.jsonl",
        "training_progress_scores.csv",
        "training_curves.png",
        "best_model/config.json",
        "best_model/eval_results.txt",
        "checkpoint-4/trainer_state.json",
        "checkpoint-4/config.json",
        f"checkpoint-{RUN_STEPS}/optimizer.pt",
    ):
        assert name in names, (name, sorted(names))
    assert any(name.startswith("runs/s3run/events.out.tfevents.") for name in names), sorted(names)
    assert not names & {
        "trainer_state.json",
        "optimizer.pt",
        "best_model/trainer_state.json",
    }  # the models are not resume points
    assert not [name for name in names if name.startswith(".") or "partial" in name]
    assert s3_run["pids"] and os.getpid() not in s3_run["pids"]  # on a Ray Train worker, whose uploader is tested here
    # checkpoint_upload_mode async: the worker's local copy of each checkpoint is deleted once uploaded.
    assert s3_run["local_copies"] == []
    # Nothing was written to a local folder named after the URI ("s3:").
    assert not s3_run["new_in_cwd"], s3_run["new_in_cwd"]
    # The run's checkpoints are in storage_path: Ray's own copies, uploaded by the worker.
    ray_states = [key for key in _keys(s3_server, bucket, "runs/s3run/") if key.endswith("/trainer_state.json")]
    assert len(ray_states) == 2, ray_states
    # The logs made it whole: every train event of the run and both evaluations.
    body = _s3(s3_server).get_object(Bucket=bucket, Key="models/name/training_log.jsonl")["Body"].read().decode()
    events = [json.loads(line) for line in body.splitlines()]
    assert [e["global_step"] for e in events if e["kind"] == "eval"] == s3_run["scores"]["global_step"] == [4, 8]
    # A logging window's stall is the time its checkpoints held training up: some for a window in which
    # a checkpoint was written (a checkpoint follows its step's log line), none for one without.
    checkpoint_steps = {int(name.split("/")[0].split("-")[1]) for name in names if name.startswith("checkpoint-")}
    train_steps = [e["global_step"] for e in events if e["kind"] == "train"]
    stalls = {e["global_step"]: e["checkpoint_stall_seconds"] for e in events if e["kind"] == "train"}
    for previous, step in zip([0, *train_steps], train_steps):
        saved_in_window = any(previous <= saved < step for saved in checkpoint_steps)
        assert (stalls[step] > 0) == saved_in_window, (step, stalls, sorted(checkpoint_steps))
    assert any(stall > 0 for stall in stalls.values()), stalls
    saved = dict(
        line.split(" = ")
        for line in _s3(s3_server)
        .get_object(Bucket=bucket, Key="models/name/eval_results.txt")["Body"]
        .read()
        .decode()
        .splitlines()
    )
    assert float(saved["eval_loss"]) == pytest.approx(s3_run["eval"]["eval_loss"], rel=1e-12)

    # A plain Hugging Face user: download with boto3, load with the Auto classes, same loss as the in-memory model.
    local = tmp_path / "downloaded"
    for key in keys:
        relative = key[len("models/name/") :]
        if relative and "/" not in relative:
            local.mkdir(exist_ok=True)
            _s3(s3_server).download_file(bucket, key, str(local / relative))
    reloaded = AutoModelForCausalLM.from_pretrained(str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    text = open(corpus[1], encoding="utf-8").read()[:2000]
    in_memory = s3_run["model"]
    assert _causal_loss(reloaded, tokenizer, text) == _causal_loss(in_memory.model, in_memory.tokenizer, text)


def test_model_from_s3_evaluates_the_same_and_fine_tunes(s3_run, tmp_path):
    loaded = LanguageModelingModel(
        "gpt2",
        s3_run["output_dir"],
        args={
            "output_dir": f"s3://{s3_run['bucket']}/models/finetuned",
            "overwrite_output_dir": True,
            "max_steps": 2,
            "save_steps": 2,
            "evaluate_during_training": False,
            # s3_run's saved args ask for async uploads, which only a worker process has: sync trains in the driver
            # (the worker's path is s3_run's and the checkpoint URI resume's).
            "checkpoint_upload_mode": "sync",
            "experiment_name": "s3finetune",
            "storage_path": f"s3://{s3_run['bucket']}/runs",
        },
    )
    assert loaded.eval_model(s3_run["eval_uri"])["eval_loss"] == pytest.approx(s3_run["eval"]["eval_loss"], rel=1e-6)
    trace = tmp_path / "trace"
    trace.mkdir()
    global_step, _ = loaded.train_model(s3_run["train_uri"], _diagnostics={"trace_dir": str(trace)})
    steps, starts = _trace(str(trace))
    assert global_step == 2 and starts == [None] and sorted(steps) == [1, 2]  # a new run from the weights, not a resume
    # It starts where the trained model is, far below where training from scratch started.
    scratch_steps, _ = s3_run["trace"]
    assert steps[1]["loss"] < scratch_steps[1]["loss"] - 0.5, (steps[1]["loss"], scratch_steps[1]["loss"])
    assert (
        LanguageModelingModel("gpt2", f"s3://{s3_run['bucket']}/models/finetuned").model.config.n_layer
        == TINY_GPT2["n_layer"]
    )


def test_checkpoint_uri_resumes_exactly(s3_run, s3_server, tmp_path, monkeypatch):
    # The explicit-endpoint form end to end: the driver downloads with it, the worker resumes from the URI itself.
    query = s3_server.endpoint_query
    checkpoint = f"s3://{s3_run['bucket']}/models/name/checkpoint-4?{query}"
    resumed = LanguageModelingModel(
        "gpt2",
        checkpoint,
        args={
            "output_dir": str(tmp_path / "resumed"),
            "experiment_name": "s3resume",
            "storage_path": str(tmp_path / "runs"),
            "evaluate_during_training": False,
        },
    )
    trace = tmp_path / "trace"
    trace.mkdir()
    global_step, _ = resumed.train_model(f"{s3_run['train_uri']}?{query}", _diagnostics={"trace_dir": str(trace)})
    steps, starts = _trace(str(trace))
    reference, _ = s3_run["trace"]
    assert starts == [4] and global_step == RUN_STEPS and sorted(steps) == list(range(5, RUN_STEPS + 1))
    for step, record in steps.items():
        assert record["example_ids"] == reference[step]["example_ids"], step
        assert record["loss"] == reference[step]["loss"], (step, record["loss"], reference[step]["loss"])


def test_an_incomplete_model_folder_in_s3_is_refused(s3_run, s3_server):
    bucket, client = s3_run["bucket"], _s3(s3_server)
    for key in _keys(s3_server, bucket, "models/name/checkpoint-4/"):
        if not key.endswith("/config.json"):
            client.copy_object(
                Bucket=bucket,
                Key=key.replace("checkpoint-4", "half-written"),
                CopySource={"Bucket": bucket, "Key": key},
            )
    with pytest.raises(ModelError, match="has no config.json, so it is not a complete model folder"):
        LanguageModelingModel("gpt2", f"s3://{bucket}/models/name/half-written")
    with pytest.raises(ModelError, match="does not exist"):
        LanguageModelingModel("gpt2", f"s3://{bucket}/models/nothing-here")


def test_output_dir_in_s3_is_checked_before_training(s3_server, corpus, tmp_path):
    bucket = s3_server.bucket()
    _s3(s3_server).put_object(Bucket=bucket, Key="models/taken/config.json", Body=b"{}")
    model = LanguageModelingModel("gpt2", None, args=_run_args(tmp_path), train_files=corpus[1])
    with pytest.raises(OutputDirError, match="already exists and is not empty"):
        model.train_model(corpus[1], args={"output_dir": f"s3://{bucket}/models/taken", "overwrite_output_dir": False})
    with pytest.raises(OutputDirError, match="cannot be (read|written)"):
        model.train_model(corpus[1], args={"output_dir": "s3://no-such-bucket-raylm/models/x"})
    assert _keys(s3_server, bucket) == ["models/taken/config.json"]  # the probe object was removed


def _put_checkpoint(s3_server, bucket: str, name: str, weights: bytes) -> str:
    """A checkpoint folder in S3 (its weights and a trainer state); its URI."""
    client = _s3(s3_server)
    client.put_object(Bucket=bucket, Key=f"runs/{name}/model.safetensors", Body=weights)
    client.put_object(Bucket=bucket, Key=f"runs/{name}/trainer_state.json", Body=b'{"global_step": 4}')
    return f"s3://{bucket}/runs/{name}"


def test_readers_of_a_checkpoint_in_s3_share_one_copy_that_never_changes_under_them(s3_server, tmp_path, monkeypatch):
    """Ray's as_directory shares one download folder per machine, and a reader that starts later downloads
    again over the files an earlier one still reads; a restarted worker read a truncated file that way. A
    node's readers share one copy that is published whole and never written again; it stays for the node's
    later ranks until a reader of another checkpoint finds it unused; a checkpoint republished under the same
    name is downloaded again, never served stale."""
    import ray.train

    from raylm.training.checkpoints import local_copy

    # The node's copies in a temp dir of this test's: other runs on this machine delete the unused ones they find.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bucket = s3_server.bucket()
    weights = os.urandom(64 * 1024)
    checkpoint = ray.train.Checkpoint(_put_checkpoint(s3_server, bucket, "checkpoint_000001", weights))
    with local_copy(checkpoint) as first:
        with open(os.path.join(first, "model.safetensors"), "rb") as reading:
            head = reading.read(1024)
            written_at = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
            with local_copy(checkpoint) as second:
                assert second == first
                assert open(os.path.join(second, "model.safetensors"), "rb").read() == weights
            assert head + reading.read() == weights
            assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == written_at
    assert open(os.path.join(first, "model.safetensors"), "rb").read() == weights  # kept for later ranks

    # Another size: S3 lists modification times to the second, which a real republish (a run's) is apart by.
    republished = os.urandom(65 * 1024)
    _put_checkpoint(s3_server, bucket, "checkpoint_000001", republished)
    with local_copy(checkpoint) as again:
        assert again != first and open(os.path.join(again, "model.safetensors"), "rb").read() == republished
    assert not os.path.exists(first), "an unused copy of an earlier checkpoint was left on the node"


READER = """
import hashlib, os, sys, time
import ray.train
from raylm.training.checkpoints import local_copy

uri, ready, go = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
with local_copy(ray.train.Checkpoint(uri)) as folder:
    print(folder, hashlib.sha256(open(os.path.join(folder, "model.safetensors"), "rb").read()).hexdigest())
"""


def test_two_ranks_on_one_node_download_a_resumed_checkpoint_once(s3_server, tmp_path):
    """Two processes of one machine (a node's ranks) start reading the same checkpoint at once: the S3 server
    sends its weights once, and both read them whole from the one copy."""
    import hashlib

    import ray.train

    bucket = s3_server.bucket()
    weights = os.urandom(4 * 2**20)
    uri = _put_checkpoint(s3_server, bucket, "checkpoint_000002", weights)
    go = tmp_path / "go"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", READER, uri, str(tmp_path / f"ready-{rank}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + READER_START_SECONDS
    while not all((tmp_path / f"ready-{rank}").exists() for rank in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [rank.communicate(timeout=READER_START_SECONDS) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    folders, digests = zip(*(stdout.split() for stdout, _ in outputs))
    assert digests == (hashlib.sha256(weights).hexdigest(),) * 2
    # One download's requests (pyarrow reads a file in ranged GETs): those of a private download of the same size.
    baseline = ray.train.Checkpoint(_put_checkpoint(s3_server, bucket, "baseline", os.urandom(len(weights))))
    baseline.to_directory(str(tmp_path / "baseline"))
    one_download = s3_server.requests("GET", f"{bucket}/runs/baseline/model.safetensors")
    assert one_download >= 1
    assert s3_server.requests("GET", f"{bucket}/runs/checkpoint_000002/model.safetensors") == one_download
    assert folders[0] == folders[1]


READER_START_SECONDS = 120
KILLED_FILLER = """
import sys
import ray.train
from raylm.training.checkpoints import local_copy

with local_copy(ray.train.Checkpoint(sys.argv[1])):
    pass
"""


def test_a_rank_killed_mid_download_leaves_no_copy_and_the_next_rank_downloads_it_whole(
    s3_server, tmp_path, monkeypatch
):
    """A worker group restarting mid-download: the killed rank's partial folder is never taken for the copy."""
    import ray.train

    from raylm.training import node_copies
    from raylm.training.checkpoints import local_copy

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the filler's TMPDIR too
    bucket = s3_server.bucket()
    weights = os.urandom(64 * 2**20)
    uri = _put_checkpoint(s3_server, bucket, "checkpoint_000003", weights)
    checkpoint = ray.train.Checkpoint(uri)
    root, key = node_copies.copies_root(), node_copies.copy_key(checkpoint)
    copy = os.path.join(root, key)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    filler = subprocess.Popen([sys.executable, "-c", KILLED_FILLER, uri], env=environment)
    partial_weights = os.path.join(root, f"{key}{node_copies.PARTIAL_INFIX}{filler.pid}", "model.safetensors")
    deadline = time.monotonic() + READER_START_SECONDS
    while not (os.path.isfile(partial_weights) and os.path.getsize(partial_weights) > 0):
        assert filler.poll() is None and time.monotonic() < deadline, "the filler ended before it was seen downloading"
        time.sleep(0.002)
    filler.kill()
    filler.wait()
    assert os.path.getsize(partial_weights) < len(weights), "the download finished before the kill: nothing shown"
    assert not os.path.exists(copy), "an incomplete download was given the copy's name"
    with local_copy(checkpoint) as folder:
        assert folder == copy and open(os.path.join(folder, "model.safetensors"), "rb").read() == weights
    assert not os.path.exists(os.path.dirname(partial_weights))
