"""A real Ray cluster: `ray job submit` round trips with token authentication on, and cluster.yaml.

The fixture starts `ray start --head --block` in its own process session, on loopback ports of its
own, with its own temp dir (so `ray.init()` elsewhere on this machine never finds it) and its own
token, and stops exactly that cluster with SIGTERM to its process group.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import RAY_CLI, TINY_GPT2, RayHeadPorts, free_loopback_ports
from process_groups import stop_process_group

REPO = Path(__file__).resolve().parents[1]
CLUSTER_START_SECONDS = 120
JOB_SECONDS = 420
# A throwaway head's raylet, GCS and autoscaler monitor take 10-30 s to exit on SIGTERM, which nothing here needs
# (its storage is a temporary folder): they are killed after this.
STOP_GRACE_SECONDS = 2
ADDRESS_FILE_SECONDS = 60


@dataclass
class LocalCluster:
    dashboard_url: str
    token: str
    temp_dir: str
    env: dict  # for `ray job ...` and everything the cluster starts: token auth on, our token


def _http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0  # not listening yet


def head_start_settings(cluster_config: dict) -> tuple[dict, dict]:
    """(environment, {flag: value}) of cluster.yaml's `ray start --head` command."""
    [command] = [c for c in cluster_config["head_start_ray_commands"] if "ray start --head" in c]
    words = command.split(";")[-1].split()
    ray_at = words.index("ray")
    environment = dict(word.split("=", 1) for word in words[:ray_at])
    flags = dict(word[2:].split("=", 1) for word in words[ray_at + 2 :] if word.startswith("--") and "=" in word)
    return environment, flags


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    with open(REPO / "cluster.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def local_cluster(ray_session, cluster_config):
    """A 2-CPU Ray head on 127.0.0.1, started after the session Ray with the environment and dashboard host of
    cluster.yaml's head start command (its token authentication comes from there), on ports of its own."""
    temp_dir = tempfile.mkdtemp(prefix="raylm-cluster-")  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(token)
    cluster_yaml_env, cluster_yaml_flags = head_start_settings(cluster_config)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")
    }
    # The job's `python` is this interpreter, with raylm's dependencies.
    env.update(RAY_AUTH_TOKEN_PATH=str(token_path), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    # Ray turns token authentication on by itself when RAY_AUTH_MODE is unset and it finds a token: the head starts
    # from an environment that opts out (as a node's image may), so that only cluster.yaml's own setting turns it on.
    head_env = {**env, "RAY_AUTH_MODE": "disabled", **cluster_yaml_env}
    ports = RayHeadPorts()
    command = [
        word if not word.startswith("--dashboard-host=") else f"--dashboard-host={cluster_yaml_flags['dashboard-host']}"
        for word in ports.start_command("127.0.0.1", temp_dir, 2, 0)
    ]
    # `ray job ...` as the README has a user run it: `export RAY_AUTH_MODE=token` sends the token.
    env["RAY_AUTH_MODE"] = "token"
    # Ray's state API (used by Train's placement-group cleaner) otherwise scans this machine for a
    # dashboard and gives up when it finds several Ray instances, as it will here.
    env["RAY_API_SERVER_ADDRESS"] = head_env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{ports.dashboard}"
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = LocalCluster(f"http://127.0.0.1:{ports.dashboard}", token, temp_dir, env)
    try:
        deadline = time.monotonic() + CLUSTER_START_SECONDS
        while _http_status(f"{cluster.dashboard_url}/api/jobs/", token) != 200:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "ray start --head did not come up:\n" + (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
                )
            time.sleep(1)
        yield cluster
    finally:
        stop_process_group(head, STOP_GRACE_SECONDS)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_details(cluster: LocalCluster, submission_id: str) -> dict:
    """The job's record from the jobs REST API (what `ray job status` prints in words)."""
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _ray_job(cluster: LocalCluster, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY_CLI, "job", *arguments], env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def _submit(cluster: LocalCluster, submission_id: str, train_arguments: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit` as a user types it; it waits for the job and exits 1 when the job failed.

    The jobs API answers before the head's job agent has registered (on a loaded machine, seconds
    later): Ray then refuses the submission, creating no job, and asks to try again, as a user would.
    """
    for attempt in range(AGENT_WAIT_ATTEMPTS):
        submitted = _ray_job(
            cluster,
            "submit",
            "--address",
            cluster.dashboard_url,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "raylm.train",
            *train_arguments,
            timeout=JOB_SECONDS,
        )
        if NO_AGENT_YET not in submitted.stderr + submitted.stdout:
            break
        time.sleep(AGENT_WAIT_SECONDS)
    return submitted


NO_AGENT_YET = "No available agent to submit job, please try again later"
AGENT_WAIT_ATTEMPTS, AGENT_WAIT_SECONDS = 12, 5


def test_a_head_started_as_cluster_yaml_starts_it_refuses_requests_without_its_token(local_cluster):
    jobs_url = f"{local_cluster.dashboard_url}/api/jobs/"
    assert _http_status(jobs_url) == 401
    assert _http_status(jobs_url, token="0" * 64) == 403
    assert _http_status(jobs_url, local_cluster.token) == 200


def test_a_submitted_job_succeeds_and_saves_the_model(local_cluster, corpus, tmp_path):
    """jobs/gpt2_from_scratch.yaml shrunk as test_jobs.py shrinks the other jobs (which skips this one)."""
    submission_id = f"raylm-ok-{uuid.uuid4().hex[:8]}"
    output_dir = tmp_path / "model"
    submitted = _submit(
        local_cluster,
        submission_id,
        [
            "jobs/gpt2_from_scratch.yaml",
            # file://: the cluster's one node shares this machine's disk, a shared mount as raylm asks a joined
            # cluster for (nodes may join it later).
            f"train_file=file://{corpus[0]}",
            "eval_file=null",
            f"output_dir={output_dir}",
            f"storage_path=file://{tmp_path / 'runs'}",
            "max_steps=3",
            "vocab_size=400",
            f"config={json.dumps(TINY_GPT2)}",
            "block_size=64",
            "train_batch_size=8",
            "eval_batch_size=32",
        ],
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]

    assert _job_details(local_cluster, submission_id)["status"] == "SUCCEEDED"
    logs = _ray_job(local_cluster, "logs", "--address", local_cluster.dashboard_url, submission_id).stdout
    assert re.search(
        rf"raylm: Done: global_step 3, train_loss [0-9.]+, output_dir {re.escape(str(output_dir))}$", logs, re.M
    ), logs[-4000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.config.n_layer == TINY_GPT2["n_layer"]
    assert len(AutoTokenizer.from_pretrained(output_dir)) == model.config.vocab_size


def test_a_failing_job_is_failed_with_our_one_paragraph_error(local_cluster, tmp_path):
    submission_id = f"raylm-bad-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "not-on-this-cluster" / "train.txt"
    submitted = _submit(local_cluster, submission_id, ["jobs/gpt2_from_scratch.yaml", f"train_file={missing}"])
    assert submitted.returncode == 1, submitted.stdout[-4000:] + submitted.stderr[-4000:]

    details = _job_details(local_cluster, submission_id)
    assert details["status"] == "FAILED" and "exit code 2" in details["message"], details
    logs = _ray_job(local_cluster, "logs", "--address", local_cluster.dashboard_url, submission_id).stdout
    errors = [line for line in logs.splitlines() if line.startswith("raylm: error: ")]
    assert len(errors) == 1, logs
    assert f"'{missing}' does not exist. Check the path" in errors[0]
    assert "Traceback" not in logs


ENSURE_RAY = (
    "import ray; from raylm import LanguageModelingArgs; from raylm.cluster import launcher; "
    "launcher.ensure_ray(LanguageModelingArgs.from_dict({'num_workers': 2})); "
    "print('CPUS', ray.cluster_resources()['CPU'], 'LOCAL', launcher.on_local_ray()); ray.shutdown()"
)


def _ensure_ray_in(temp_dir: str, env: dict) -> subprocess.CompletedProcess:
    """ensure_ray in a fresh process whose system temp dir is temp_dir (Ray reads temp_dir/ray/ray_current_cluster)."""
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-c", ENSURE_RAY],
        env={**env, "RAY_TMPDIR": temp_dir, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_ensure_ray_starts_a_local_ray_beside_a_stale_address_file(tmp_path):
    """A `ray start` that was killed leaves its address file; plain ray.init(num_cpus=...) then fails."""
    temp_dir = tempfile.mkdtemp(prefix="rlm-stale-", dir="/tmp")
    try:
        (Path(temp_dir) / "ray").mkdir()
        (Path(temp_dir) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_loopback_ports(1)[0]}")
        done = _ensure_ray_in(temp_dir, dict(os.environ))
        assert done.returncode == 0, done.stderr[-3000:]
        assert re.search(r"CPUS \d+\.0 LOCAL True", done.stdout), done.stdout
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ensure_ray_joins_a_live_ray_start_cluster(local_cluster):
    """Without RAY_ADDRESS, the cluster that `ray start` left running is joined, found by its address file
    where a `ray start` without --temp-dir writes it (the fixture's cluster wrote it in its own temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="rlm-live-", dir="/tmp")
    try:
        written = Path(local_cluster.temp_dir) / "ray_current_cluster"
        deadline = time.monotonic() + ADDRESS_FILE_SECONDS  # `ray start` writes it after the dashboard is up
        while not written.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        (Path(temp_dir) / "ray").mkdir()
        shutil.copy(written, Path(temp_dir) / "ray" / "ray_current_cluster")
        done = _ensure_ray_in(temp_dir, local_cluster.env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "CPUS 2.0 LOCAL False" in done.stdout, done.stdout
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- cluster.yaml ----------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_autoscaler_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster_config)))
    # The same check rejects a misspelt key, so passing means something.
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_1x"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_yaml_autoscales_gpu_workers_and_installs_raylm(cluster_config):
    node_types = cluster_config["available_node_types"]
    head = node_types[cluster_config["head_node_type"]]["node_config"]["InstanceType"]
    assert head.startswith("m"), "the head is a CPU node"
    gpu_types = {
        name: spec for name, spec in node_types.items() if spec["node_config"]["InstanceType"].startswith(("g", "p"))
    }
    assert {spec["node_config"]["InstanceType"] for spec in gpu_types.values()} == {"g5.xlarge", "g5.48xlarge"}
    assert all(spec["min_workers"] == 0 < spec["max_workers"] for spec in gpu_types.values())
    assert cluster_config["idle_timeout_minutes"] > 0 and cluster_config["max_workers"] >= max(
        s["max_workers"] for s in gpu_types.values()
    )
    assert cluster_config["docker"]["worker_image"].endswith("-gpu")
    assert any("pip install" in command and "raylm" in command for command in cluster_config["setup_commands"])
    assert all(spec["node_config"]["IamInstanceProfile"] for spec in gpu_types.values()), (
        "workers need S3 for checkpoints"
    )


def test_cluster_yaml_keeps_the_job_api_private_and_token_protected(cluster_config):
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    worker_start = " ".join(cluster_config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]
    assert not cluster_config["provider"]["security_group"].get("IpPermissions"), "only Ray's SSH rule faces outside"
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|BEGIN .*PRIVATE KEY", text, re.I)


def test_readme_shows_the_cluster_life_cycle():
    readme = (REPO / "README.md").read_text()
    for command in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit", "ray down cluster.yaml"):
        assert command in readme, command
    # Kubernetes is one link away: the RayJob lives on the clusters page.
    assert "docs/clusters.md#kubernetes" in readme
    assert "kind: RayJob" in (REPO / "docs" / "clusters.md").read_text()
