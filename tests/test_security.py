"""Security: what a model folder, a checkpoint or the local Ray can make raylm do, tried as an attacker would."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
from conftest import read_trace_records
from transformers import GPT2Config, GPT2LMHeadModel

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.config import NEVER_FROM_MODEL_FOLDER
from raylm.data.tokenization import train_tokenizer

# Loaded through config.json's auto_map only when trust_remote_code is honoured; importing it leaves a marker.
CUSTOM_CODE = """
import pathlib

pathlib.Path({marker!r}).write_text("the folder's code ran")

from transformers import GPT2Config, GPT2LMHeadModel


class CustomConfig(GPT2Config):
    model_type = "gpt2"


class CustomModel(GPT2LMHeadModel):
    config_class = CustomConfig
"""


def write_remote_code_folder(folder, model_args: dict) -> str:
    """A tiny GPT-2 folder (save_pretrained, no hub) whose auto_map points at a module in the folder; returns the
    marker path."""
    text = folder / "text.txt"
    text.write_text(
        "\n".join(f"line {i} of some tiny text to train a tokenizer on" for i in range(50)), encoding="utf-8"
    )
    tokenizer = train_tokenizer(
        "gpt2", [str(text)], LanguageModelingArgs.from_dict({"vocab_size": 300, "min_frequency": 1}), is_causal=True
    )
    model_dir = folder / "downloaded"
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    marker = str(folder / "MARKER")
    (model_dir / "custom_gpt2.py").write_text(CUSTOM_CODE.format(marker=marker), encoding="utf-8")
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoConfig": "custom_gpt2.CustomConfig", "AutoModelForCausalLM": "custom_gpt2.CustomModel"}
    config_path.write_text(json.dumps(config))
    (model_dir / "model_args.json").write_text(json.dumps({"mlm": False, **model_args}))
    return marker


ATTACKER_ARGS = {
    "trust_remote_code": True,
    "output_dir": "/tmp/attacker-output",
    "overwrite_output_dir": True,
    "best_model_dir": "/tmp/attacker-output/best",
    "storage_path": "/tmp/attacker-storage",
    "experiment_name": "attacker-run",
    "tensorboard_dir": "/tmp/attacker-tensorboard",
    "wandb_project": "attacker-project",
    "wandb_kwargs": {"entity": "attacker"},
    "cache_dir": "/tmp/attacker-cache",
    "max_seq_length": 32,  # an ordinary setting, which is taken from the folder
}


@pytest.mark.parametrize("model_type", ["gpt2", "causal"])
def test_a_model_folder_cannot_switch_on_its_own_code_or_choose_where_outputs_go(tmp_path, model_type):
    marker = write_remote_code_folder(tmp_path, ATTACKER_ARGS)
    model = LanguageModelingModel(model_type, str(tmp_path / "downloaded"), args={"mlm": False})
    assert not os.path.exists(marker)
    assert type(model.model) is GPT2LMHeadModel
    defaults = LanguageModelingArgs()
    for name in NEVER_FROM_MODEL_FOLDER:
        assert getattr(model.args, name) == getattr(defaults, name), name
    assert model.args.max_seq_length == 32  # the folder's other settings still apply


def test_the_same_folder_runs_its_code_when_the_user_opts_in(tmp_path):
    # The attack above is real: with the user's own trust_remote_code the folder's module is imported.
    marker = write_remote_code_folder(tmp_path, ATTACKER_ARGS)
    model = LanguageModelingModel("gpt2", str(tmp_path / "downloaded"), args={"mlm": False, "trust_remote_code": True})
    assert os.path.exists(marker)
    assert type(model.model).__name__ == "CustomModel"


CUSTOM_TOKENIZER_CODE = """
from transformers import GPT2Tokenizer


class FolderTokenizer(GPT2Tokenizer):
    pass
"""


def test_a_tokenizer_with_its_own_code_loads_when_the_user_trusts_it(tmp_path):
    # transformers finds a tokenizer's own class only through tokenizer_config.json's auto_map and the
    # user's trust_remote_code; without it the folder loads as a generic tokenizer (after a stdin prompt).
    write_remote_code_folder(tmp_path, {})
    model_dir = tmp_path / "downloaded"
    (model_dir / "folder_tokenizer.py").write_text(CUSTOM_TOKENIZER_CODE, encoding="utf-8")
    tokenizer_config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config.update(
        {
            "tokenizer_class": "FolderTokenizer",
            "auto_map": {"AutoTokenizer": [None, "folder_tokenizer.FolderTokenizer"]},
        }
    )
    tokenizer_config_path.write_text(json.dumps(tokenizer_config))
    model = LanguageModelingModel("causal", str(model_dir), args={"mlm": False, "trust_remote_code": True})
    assert type(model.tokenizer).__name__ == "FolderTokenizer"


def test_every_path_and_tracker_field_is_kept_from_model_folders():
    path_like = {
        name
        for name in LanguageModelingArgs().to_dict()
        if name.endswith(("_dir", "_path")) or name.startswith("wandb")
    }
    assert path_like <= NEVER_FROM_MODEL_FOLDER
    assert {"trust_remote_code", "experiment_name", "overwrite_output_dir"} <= NEVER_FROM_MODEL_FOLDER


# A model type transformers does not know: only the folder's own code can build it, so every load needs the opt-in.
CUSTOM_TYPE_CODE = """
from transformers import GPT2Config, GPT2LMHeadModel


class TinyCustomConfig(GPT2Config):
    model_type = "raylm_tiny_custom"


class TinyCustomModel(GPT2LMHeadModel):
    config_class = TinyCustomConfig
"""


@pytest.fixture
def driver_modules_cache(tmp_path, monkeypatch):
    """A transformers modules cache of the driver's own, as on a cluster, where workers on other nodes have only
    what raylm sends them: here Ray's workers would otherwise read the module the driver's load wrote. The
    worker cache's copies of what the test compiled are removed after it."""
    from transformers import dynamic_module_utils

    worker_cache = dynamic_module_utils.HF_MODULES_CACHE
    driver_cache = tmp_path / "driver-modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(driver_cache))
    yield
    for compiled in driver_cache.glob("transformers_modules/*/*/"):
        shutil.rmtree(os.path.join(worker_cache, compiled.relative_to(driver_cache)), ignore_errors=True)


def test_a_custom_code_model_the_user_trusts_trains_resumes_and_reloads(
    ray_session, corpus, tmp_path, monkeypatch, driver_modules_cache
):
    from raylm import api
    from raylm.training import evaluation

    marker = write_remote_code_folder(tmp_path, {})
    os.remove(tmp_path / "downloaded" / "custom_gpt2.py")
    model_dir = tmp_path / "downloaded"
    # A source no earlier run compiled (the cache's folder is its hash), so no worker's cache holds it already.
    (model_dir / "custom_tiny.py").write_text(CUSTOM_TYPE_CODE + f"# {uuid.uuid4()}\n", encoding="utf-8")
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "raylm_tiny_custom"
    config["auto_map"] = {
        "AutoConfig": "custom_tiny.TinyCustomConfig",
        "AutoModelForCausalLM": "custom_tiny.TinyCustomModel",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    trusted = {
        "mlm": False,
        "trust_remote_code": True,
        "block_size": 32,
        "max_steps": 2,
        "save_steps": 1,
        "logging_steps": 1,
        "silent": True,
        "overwrite_output_dir": True,
        "storage_path": str(tmp_path / "runs"),
    }

    # The first run trains on Ray Train's worker group (max_failures=1), whose worker unpickles the driver's model
    # once raylm has written the module's files there; the resume trains in the driver, from the checkpoint.
    model = LanguageModelingModel(
        "causal", str(model_dir), args={**trusted, "output_dir": str(tmp_path / "out"), "max_failures": 1}
    )
    assert type(model.model).__name__ == "TinyCustomModel" and not os.path.exists(marker)
    trace = tmp_path / "trace"
    trace.mkdir()
    global_step, _ = model.train_model(corpus[1], _diagnostics={"trace_dir": str(trace)})
    assert global_step == 2 and type(model.model).__name__ == "TinyCustomModel"  # the final load
    [start] = [r for r in read_trace_records(trace) if r.get("event") == "start"]
    assert start["pid"] != os.getpid()

    resumed = LanguageModelingModel(
        "causal",
        str(tmp_path / "out" / "checkpoint-1"),
        args={**trusted, "output_dir": str(tmp_path / "resumed"), "max_steps": 3},
    )
    resumed_trace = tmp_path / "resumed-trace"
    resumed_trace.mkdir()
    global_step, _ = resumed.train_model(corpus[1], _diagnostics={"trace_dir": str(resumed_trace)})
    assert global_step == 3 and type(resumed.model).__name__ == "TinyCustomModel"
    [start] = [r for r in read_trace_records(resumed_trace) if r.get("event") == "start"]
    assert start["resumed_from"] == 1
    # Ray Data's evaluation actors, as on a cluster (eval_model passes in_process only on raylm's local Ray),
    # build it from the files too, and score the trained weights as the driver does: a finite loss alone would
    # also come from a stock or freshly initialised model.
    in_driver = resumed.eval_model(corpus[1])["eval_loss"]
    monkeypatch.setattr(
        api, "evaluate", lambda *args, **kwargs: evaluation.evaluate(*args, **{**kwargs, "in_process": False})
    )
    assert resumed.eval_model(corpus[1])["eval_loss"] == pytest.approx(in_driver, rel=1e-6)


# Run in a process of its own: a local Ray that raylm starts, with the user's environment opting out of auth.
LOCAL_RAY_SCRIPT = """
import json, sys
import ray
from raylm import LanguageModelingArgs
from raylm.cluster import launcher

launcher.ensure_ray(LanguageModelingArgs())
for_training = ray._private.worker.global_worker.node.webui_url
launcher.ensure_ray(LanguageModelingArgs(), for_sweep=True)
from ray.util.state import list_actors

# The state API a sweep's trials ask (at its address: the test's own Ray runs on this machine too).
list_actors(address="http://" + ray._private.worker.get_dashboard_url())
print(
    json.dumps({"for_training": for_training, "dashboard": ray._private.worker.global_worker.node.webui_url}),
    flush=True,
)
sys.stdin.read()
ray.shutdown()
"""


def test_the_local_ray_raylm_starts_serves_no_jobs_api_for_training_and_refuses_a_sweeps_without_its_token(tmp_path):
    import shutil
    import signal
    import stat
    import subprocess
    import sys
    import tempfile
    import urllib.error
    import urllib.request

    home = tmp_path / "home"
    home.mkdir()
    # Ray's socket paths must stay short: a private temp dir of its own, not pytest's long one.
    ray_tmp = tempfile.mkdtemp(prefix="rlsec", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": ray_tmp,
            "HOME": str(home),
            "PYTHONPATH": os.pathsep.join(
                [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")]
            ),
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-c", LOCAL_RAY_SCRIPT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = process.stdout.readline()
        assert line, "the local Ray did not start"
        started = json.loads(line)
        # A training run's local Ray serves no dashboard, so no jobs API; a sweep restarts it with both.
        assert not started["for_training"], started
        url = "http://" + started["dashboard"].removeprefix("http://") + "/api/jobs/"

        def status(headers: dict) -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        assert status({}) in (401, 403)
        assert status({"Authorization": "Bearer not-the-token"}) in (401, 403)
        token_file = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        # The refusal is the token's doing: the same request with it is served.
        assert status({"Authorization": f"Bearer {token_file.read_text().strip()}"}) == 200
    finally:
        try:
            process.communicate(input="", timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


class WritesAMarkerWhenUnpickled:
    """What a poisoned optimizer.pt holds: unpickling it calls open(marker, "w")."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_tensor_file_that_would_run_code_is_refused(tmp_path):
    import torch

    from raylm.errors import ModelError
    from raylm.training.checkpoints import OPTIMIZER_FILE, read_tensors

    marker = tmp_path / "MARKER"
    torch.save(
        {"state": {}, "param_groups": [], "payload": WritesAMarkerWhenUnpickled(str(marker))}, tmp_path / OPTIMIZER_FILE
    )
    with pytest.raises(ModelError, match=OPTIMIZER_FILE):
        read_tensors(str(tmp_path), OPTIMIZER_FILE)
    assert not marker.exists()
    # The file is a real attack: a loader that unpickles anything runs it.
    torch.load(tmp_path / OPTIMIZER_FILE, weights_only=False)
    assert marker.exists()


def test_a_model_folder_whose_weights_would_run_code_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file

    from raylm.errors import ModelError

    write_remote_code_folder(tmp_path, {})
    model_dir = tmp_path / "downloaded"
    # An old-style pytorch_model.bin instead of safetensors, with a payload beside the weights.
    weights = load_file(model_dir / "model.safetensors")
    os.remove(model_dir / "model.safetensors")
    marker = tmp_path / "WEIGHTS_MARKER"
    torch.save({**weights, "payload": WritesAMarkerWhenUnpickled(str(marker))}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError, match="refuses to unpickle"):
        LanguageModelingModel("gpt2", str(model_dir), args={"mlm": False})
    assert not marker.exists()


PYTHON_TAGGED_JOB = """model_type: gpt2
model_name: null
train_file: data/train.txt
learning_rate: {tagged_value}
"""


# The call to a command, and a reference to a function: PyYAML's full loader refuses the first but builds the
# second, so only the safe loader refuses both.
@pytest.mark.parametrize(
    "tagged_value", ['!!python/object/apply:os.system ["touch {marker}"]', "!!python/name:os.system"]
)
def test_a_job_file_that_would_run_code_is_refused_without_running_it(tmp_path, tagged_value):
    """Job files (raylm.train, raylm.tune) and key=value overrides are read with YAML's safe loader: a
    `!!python/...` tag is a ConfigError, and the command it names never runs."""
    import yaml

    from raylm import ConfigError
    from raylm.train import read_job_file, resolve_job

    marker = tmp_path / "ran"
    tagged_value = tagged_value.format(marker=marker)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(PYTHON_TAGGED_JOB.format(tagged_value=tagged_value), encoding="utf-8")
    with pytest.raises(ConfigError, match="python/"):
        read_job_file(str(job_file))
    with pytest.raises(ConfigError, match="python/"):
        resolve_job({"model_type": "gpt2"}, [f"learning_rate={tagged_value}"])
    # LanguageModelingArgs.from_yaml reads the same way (its error is PyYAML's own, not a ConfigError).
    with pytest.raises(yaml.YAMLError, match="python/"):
        LanguageModelingArgs.from_yaml(str(job_file))
    assert not marker.exists()


def test_an_existing_token_file_is_tightened_to_0600_and_kept(tmp_path, monkeypatch):
    import stat

    from raylm.cluster import launcher

    token_file = tmp_path / "auth_token"
    token_file.write_text("a-token-the-user-made")
    token_file.chmod(0o644)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    launcher._require_token_auth()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text() == "a-token-the-user-made"
    assert os.environ["RAY_AUTH_MODE"] == "token"
