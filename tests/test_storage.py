"""Object storage end to end on moto's S3 server: text in, checkpoints and outputs out, models loaded back.

AWS_ENDPOINT_URL and the credentials are set the standard way by the `s3_server` fixture (before the
session's Ray starts, so its workers see them too); the explicit `?endpoint_override=...` URI form is
checked where it must survive: shard planning and publishing.
"""

from __future__ import annotations

import json
import os
import shutil

import boto3
import pytest

from raylm import storage
from raylm.errors import ModelError
from raylm.sources import plan_shards, read_shard_lines, resolve_text_files


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
    parts = {"texts/a.txt": lines[:third], "texts/b.txt": lines[third:2 * third], "texts/more/c.txt": lines[2 * third:]}
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
    wanted = {"file": lines[:third], "folder": lines, "glob": lines, "list": lines[:third] + lines[2 * third:]}[form]
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
    assert storage.join("s3://b/models/run?endpoint_override=h:1&scheme=http", "checkpoint-4", "config.json") == \
        "s3://b/models/run/checkpoint-4/config.json?endpoint_override=h:1&scheme=http"
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
def test_a_publish_that_fails_midway_leaves_a_folder_readers_refuse(s3_server, tmp_path, monkeypatch, explicit_endpoint):
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
