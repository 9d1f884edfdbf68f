"""The CLI and the shipped jobs: every jobs/*.yaml parses and trains shrunk; overrides, --help, errors.

Jobs run in-process through `raylm.train.main` against the session Ray, shrunk by overrides that a
user could type: tiny models from configs (or the session's trained ones for fine-tuning), the
sample corpus, 3 steps, 1 CPU worker (an elastic job: 1 to 2), S3 on the session's moto server.
Everything else in the job is kept as shipped (bf16 among it, which a CPU worker leaves off).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import TINY_BERT, TINY_ELECTRA, TINY_GENERATOR, TINY_GPT2

from raylm import train
from raylm.config import field_help
from raylm.data.sample_corpus import MODULES, docstring_paragraphs, read_paragraphs, write_sample_corpus
from raylm.train import JOB_KEYS, read_job_file, resolve_job

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))
SWEEP_FILES = [path for path in JOB_FILES if "sweep" in read_job_file(str(path))]
TRAIN_JOB_FILES = [path for path in JOB_FILES if path not in SWEEP_FILES]
# gpt2_from_scratch trains shrunk through `ray job submit` in test_cluster.py; a second run here
# would cost ~30 s of the suite and check nothing more.
SUBMITTED_JOB = "gpt2_from_scratch"
SHRUNK_STEPS = 3


def test_the_shipped_jobs_are_all_there():
    names = {path.stem for path in JOB_FILES}
    assert names == {
        "bert_mlm_finetune",
        "gpt2_clm_finetune",
        "electra_finetune",
        "bert_from_scratch",
        "gpt2_from_scratch",
        "electra_from_scratch",
        "sweep_gpt2",
        "gpt2_pretrain_at_scale",
        "llama_from_scratch",
    }
    assert [path.stem for path in SWEEP_FILES] == ["sweep_gpt2"]


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda path: path.stem)
def test_every_job_parses_and_validates(path):
    job = read_job_file(str(path))
    job.pop("sweep", None)
    resolved = resolve_job(job, [])
    assert resolved["model_type"] and resolved["train_file"]
    # Floats written 5e-5 in YAML arrive as floats, not as the strings PyYAML would give.
    assert all(not isinstance(value, str) or not _looks_like_number(value) for value in resolved.values())


def test_the_sweep_follows_the_tune_schema():
    sweep = read_job_file(str(REPO / "jobs" / "sweep_gpt2.yaml"))["sweep"]
    assert set(sweep) == {
        "num_samples",
        "metric",
        "mode",
        "scheduler",
        "max_concurrent_trials",
        "search_alg",
        "parameters",
    }
    assert sweep["metric"] == "eval_loss" and sweep["mode"] == "min"
    assert sweep["scheduler"] == {"type": "asha", "grace_period": 2}
    learning_rate = sweep["parameters"]["learning_rate"]
    assert learning_rate["distribution"] == "loguniform" and 0 < learning_rate["min"] < learning_rate["max"]
    assert set(sweep["parameters"]) <= set(field_help()), "a swept name is not a LanguageModelingArgs field"


def test_pretrain_job_is_the_at_scale_setup():
    job = read_job_file(str(REPO / "jobs" / "gpt2_pretrain_at_scale.yaml"))
    assert job["train_file"].startswith("s3://") and job["storage_path"].startswith("s3://")
    assert job["num_workers"] == [4, 8] and job["use_gpu"] is True and job["bf16"] is True
    assert job["save_steps"] > 0 and job["max_failures"] > 0


# --- every job, shrunk, trains ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def electra_pair(bert_trained, tmp_path_factory) -> dict:
    """Tiny untrained ELECTRA generator and discriminator folders sharing the session BERT's tokenizer."""
    from transformers import AutoTokenizer, ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    tokenizer = AutoTokenizer.from_pretrained(bert_trained["dir"])
    folder = tmp_path_factory.mktemp("electra_pair")
    paths = {}
    for role, model_class, sizes in (
        ("generator", ElectraForMaskedLM, {**TINY_ELECTRA, **TINY_GENERATOR}),
        ("discriminator", ElectraForPreTraining, TINY_ELECTRA),
    ):
        config = ElectraConfig(vocab_size=len(tokenizer), **sizes)
        paths[role] = str(folder / role)
        model_class(config).save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


def _flow(value) -> str:
    """A value as one command-line word: JSON is YAML flow syntax."""
    return json.dumps(value)


def shrink_overrides(job: dict, corpus: tuple[str, str], out: Path, request) -> list[str]:
    """key=value overrides that keep the job's shape and make it train 3 steps of a tiny model on CPU."""
    # eval_file=None: evaluation costs ~10 s of Ray Data start-up per run here; the embedded default
    # job and the `ray job submit` test evaluate through the CLI.
    overrides = {
        "train_file": corpus[0],
        "eval_file": None,
        "output_dir": str(out / "model"),
        "storage_path": str(out / "runs"),
        "max_steps": SHRUNK_STEPS,
        "num_workers": 1,
        "use_gpu": False,
        "block_size": 64,
        "train_batch_size": 8,
        "eval_batch_size": 32,
        "silent": True,
        "logging_steps": 1000,
    }
    model_type = job["model_type"]
    if job.get("model_name") is None and model_type != "electra":
        overrides["config"] = TINY_GPT2 if model_type == "gpt2" else TINY_BERT
    if job.get("model_name") is None:
        overrides["vocab_size"] = 400
    if model_type == "electra":
        if "generator_name" in job:
            pair = request.getfixturevalue("electra_pair")
            overrides["generator_name"], overrides["discriminator_name"] = pair["generator"], pair["discriminator"]
        else:
            overrides["generator_config"] = {**TINY_ELECTRA, **TINY_GENERATOR}
            overrides["discriminator_config"] = TINY_ELECTRA
    elif job.get("model_name") is not None:
        overrides["model_name"] = request.getfixturevalue(f"{model_type}_trained")["dir"]
    if job.get("tokenizer_name"):
        overrides["tokenizer_name"] = None
    if job.get("resources_per_worker"):
        overrides["resources_per_worker"] = {"CPU": 1}
    if isinstance(job.get("num_workers"), list):
        # Elastic as shipped, at this machine's size: up to 2 one-CPU workers, on Ray Train's worker group.
        overrides["num_workers"] = [1, 2]
    if str(job.get("storage_path", "")).startswith("s3://"):
        # S3 as shipped, on the session's moto server: the text as a glob of a bucket's folder, checkpoints there.
        import boto3

        s3_server = request.getfixturevalue("s3_server")
        bucket = s3_server.bucket()
        boto3.client("s3", endpoint_url=s3_server.endpoint).upload_file(corpus[0], bucket, "corpus/train/part-0.txt")
        overrides["train_file"] = f"s3://{bucket}/corpus/train/*.txt"
        overrides["storage_path"] = f"s3://{bucket}/raylm-runs"
    return [f"{key}={_flow(value)}" for key, value in overrides.items()]


@pytest.fixture
def outcomes(monkeypatch) -> list[dict]:
    """What each run_job called by main() returned (steps, losses), as main() itself only logs them."""
    recorded: list[dict] = []
    run_job = train.run_job

    def recording_run_job(job: dict) -> dict:
        recorded.append(run_job(job))
        return recorded[-1]

    monkeypatch.setattr(train, "run_job", recording_run_job)
    return recorded


@pytest.mark.parametrize("path", [p for p in TRAIN_JOB_FILES if p.stem != SUBMITTED_JOB], ids=lambda path: path.stem)
def test_every_job_trains_shrunk(path, ray_session, corpus, tmp_path, outcomes, request):
    job = read_job_file(str(path))
    overrides = shrink_overrides(job, corpus, tmp_path, request)
    assert train.main([str(path), *overrides]) == 0
    [outcome] = outcomes
    assert outcome["global_step"] == SHRUNK_STEPS
    assert math.isfinite(outcome["train_loss"])
    model_dir = tmp_path / "model"
    assert (model_dir / "config.json").is_file()
    assert any(model_dir.glob("*.safetensors"))
    if job["model_type"] != "electra":
        assert json.loads((model_dir / "config.json").read_text())["model_type"] == job["model_type"]
    if str(job.get("storage_path", "")).startswith("s3://"):
        import boto3

        s3_server = request.getfixturevalue("s3_server")
        storage_path = next(o for o in overrides if o.startswith("storage_path="))
        bucket = json.loads(storage_path.split("=", 1)[1]).split("/")[2]
        listed = boto3.client("s3", endpoint_url=s3_server.endpoint).list_objects_v2(
            Bucket=bucket, Prefix=f"raylm-runs/{job['experiment_name']}/"
        )
        keys = [item["Key"] for item in listed.get("Contents", [])]
        assert any("/checkpoint" in key and key.endswith("/trainer_state.json") for key in keys), keys
    if isinstance(job.get("num_workers"), list):
        [last] = [
            e
            for e in map(json.loads, (model_dir / "training_log.jsonl").read_text().splitlines())
            if e["kind"] == "train"
        ]
        assert last["num_workers"] == 2, "an elastic job starts with as many workers as the cluster gives"


def test_the_embedded_default_job_trains(ray_session, tmp_path, monkeypatch, outcomes, capfd):
    """README's first command, `python -m raylm.train`, shrunk to 3 steps: it writes outputs/gpt2-sample/."""
    from raylm import console

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(console, "_said_once", set())  # as in a fresh process
    capfd.readouterr()
    assert (
        train.main(
            [f"max_steps={SHRUNK_STEPS}", "config.n_layer=1", "silent=true", f"storage_path={tmp_path / 'runs'}"]
        )
        == 0
    )
    err = capfd.readouterr().err
    assert outcomes[0]["global_step"] == SHRUNK_STEPS
    model_dir = tmp_path / "outputs" / "gpt2-sample"
    assert outcomes[0]["perplexity"] > 1 and (model_dir / "eval_results.txt").is_file()
    assert (model_dir / "config.json").is_file()
    assert (tmp_path / "outputs" / "sample_corpus" / "train.txt").stat().st_size > 100_000
    # --- what the run says and records -----------------------------------------------------------
    # The CPU notice once per command, although training and evaluation both ask where to run.
    assert err.count("No GPU in the Ray cluster: training on CPU.") == 1, err
    assert re.search(r"perplexity \S+ over \d{1,3}(,\d{3})+ tokens\.", err), err
    # logging_steps is 20: the last step (3) is logged all the same, its epoch counted from 1 as on the console.
    train_events = [
        event
        for event in map(json.loads, (model_dir / "training_log.jsonl").read_text().splitlines())
        if event["kind"] == "train"
    ]
    assert [(event["global_step"], event["epoch"]) for event in train_events] == [(SHRUNK_STEPS, 1)]
    # best_model_dir follows output_dir, and model_args.json says where it went.
    assert json.loads((model_dir / "model_args.json").read_text())["best_model_dir"] == os.path.join(
        "outputs", "gpt2-sample", "best_model"
    )


def test_evaluating_during_training_hands_eval_file_to_train_model(monkeypatch, tmp_path):
    """The sweep's setting through the CLI: train_model gets eval_file and returns scores, not a loss."""
    import raylm.api

    calls: list[tuple] = []

    class RecordingModel:
        def __init__(self, model_type, model_name, args, **kwargs):
            self.args = args

        def train_model(self, train_file, eval_file=None):
            calls.append(("train", train_file, eval_file))
            return 4, {"global_step": [2, 4], "eval_loss": [3.0, 2.5]}

        def eval_model(self, eval_file):
            calls.append(("eval", eval_file))
            return {"eval_loss": 2.5, "perplexity": 12.2}

    monkeypatch.setattr(raylm.api, "LanguageModelingModel", RecordingModel)
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("Some text to train on.\n")
    job = resolve_job(
        {
            "model_type": "gpt2",
            "model_name": "gpt2",
            "train_file": "a.txt",
            "eval_file": "b.txt",
            "mlm": False,
            "evaluate_during_training": True,
            "evaluate_during_training_steps": 2,
        },
        [],
    )
    outcome = train.run_job(job)
    assert calls == [("train", "a.txt", "b.txt"), ("eval", "b.txt")]
    assert outcome["global_step"] == 4 and "train_loss" not in outcome and outcome["eval_loss"] == 2.5


# --- overrides, --print-config, --help ---------------------------------------------------------------


def test_overrides_win_over_the_file_and_print_config_shows_the_result(tmp_path, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "model_type: gpt2\ntrain_file: t.txt\nmlm: false\nlearning_rate: 5e-5\nweight_decay: 1e-2\n"
        "config: {n_layer: 4, n_embd: 64}\n"
    )
    assert train.main([str(job_file), "learning_rate=1e-4", "config.n_layer=2", "num_workers=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["learning_rate"] == 1e-4 and printed["weight_decay"] == 0.01
    assert printed["config"] == {"n_layer": 2, "n_embd": 64}
    assert printed["num_workers"] == 2 and printed["mlm"] is False


def test_without_a_job_file_print_config_shows_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--print-config", "learning_rate=1e-3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model_type"] == "gpt2" and printed["model_name"] is None and printed["learning_rate"] == 1e-3
    assert printed["output_dir"] == os.path.join("outputs", "gpt2-sample")


def test_help_lists_every_key_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    keys = {**JOB_KEYS, **field_help()}
    assert len(keys) > 90
    for name, text in keys.items():
        assert f"  {name}: {text}" in out, name


def test_the_console_script_is_raylm_train():
    [entry] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "raylm"]
    assert entry.value == "raylm.train:main"


# --- user errors: one paragraph, exit code 2, nothing started ------------------------------------------


def _one_paragraph_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylm: error: "), stderr
    return lines[0]


def test_unknown_keys_in_the_file_are_listed(tmp_path, capsys, no_ray):
    job_file = tmp_path / "job.yaml"
    job_file.write_text("model_type: gpt2\ntrain_file: t.txt\nlerning_rate: 1e-4\nepochs: 3\n")
    assert train.main([str(job_file)]) == 2
    error = _one_paragraph_error(capsys.readouterr().err)
    assert "'lerning_rate' (did you mean 'learning_rate'?)" in error and "'epochs'" in error


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learning_rate=abc"], "learning_rate must be a number, got 'abc'"),
        (["num_workers=1.5"], "num_workers must be an integer or a list, got 1.5"),
        (["mlm=maybe"], "mlm must be true or false, got 'maybe'"),
        (["num_train_epochs=0"], "num_train_epochs is 0 and max_steps is -1"),
        (["learning_rate=-1"], "learning_rate must be a positive number"),
        (["config={n_layer: "], "Could not read the override"),
        (["mlm.x=1"], "'mlm' is not a dict field"),
        (["train_file="], "The job has no train_file"),
        (
            ["evaluate_during_training=true", "eval_file=null"],
            "evaluate_during_training is true but the job has no eval_file",
        ),
    ],
)
def test_a_bad_value_is_one_paragraph_and_exit_code_2(overrides, message, capsys, no_ray):
    assert train.main([str(REPO / "jobs" / "gpt2_from_scratch.yaml"), *overrides]) == 2
    assert message in _one_paragraph_error(capsys.readouterr().err)


def test_the_process_exits_with_code_2_and_one_paragraph(tmp_path):
    """The exit code a shell (and `ray job submit`) sees, from a real process."""
    done = subprocess.run(
        [sys.executable, "-m", "raylm.train", "jobs/gpt2_from_scratch.yaml", "lerning_rate=1e-4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "did you mean 'learning_rate'?" in _one_paragraph_error(done.stderr)


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_every_problem_of_a_job_is_reported_at_once(tmp_path, capsys, no_ray):
    """An unknown key, a wrong type, two values out of range and a bad override: one run, one paragraph, all five."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "model_type: gpt2\ntrain_file: t.txt\nmlm: false\nlerning_rate: 1e-4\nnum_workers: two\n"
        "train_batch_size: 0\nwarmup_ratio: 1.5\n"
    )
    assert train.main([str(job_file), "config.n_layer"]) == 2
    error = _one_paragraph_error(capsys.readouterr().err)
    assert "5 problems" in error
    for part in (
        "'lerning_rate' (did you mean 'learning_rate'?)",
        "num_workers must be an integer or a list, got 'two'",
        "train_batch_size must be a positive integer, got 0",
        "warmup_ratio must be in [0, 1), got 1.5",
        "Override 'config.n_layer' is not of the form key=value",
    ):
        assert part in error, part
    # Each problem keeps its own fix.
    assert "Set train_batch_size to 1 or more" in error and "Set warmup_ratio to a value such as 0.06" in error


def test_a_missing_train_file_is_named_by_the_key_the_job_has(tmp_path, capsys, no_ray):
    """From scratch the tokenizer trains on train_file; the job has no train_files key, so the error must not name
    one."""
    missing = tmp_path / "data" / "train.txt"
    assert train.main([str(REPO / "jobs" / "gpt2_from_scratch.yaml"), f"train_file={missing}"]) == 2
    error = _one_paragraph_error(capsys.readouterr().err)
    assert f"The train_file '{missing}' does not exist" in error and "train_files" not in error


def test_the_readme_command_makes_the_files_the_jobs_read(tmp_path):
    """A fresh clone has no data/: the command the README gives writes every local file a shipped job names."""
    command = "python -m raylm.data.sample_corpus data"
    assert command in (REPO / "README.md").read_text()
    done = subprocess.run(
        [sys.executable, *command.split()[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [os.path.join("data", "train.txt"), os.path.join("data", "test.txt")]
    jobs = {path.name: read_job_file(str(path)) for path in JOB_FILES}
    local_files = [job[key] for job in jobs.values() for key in ("train_file", "eval_file") if "://" not in job[key]]
    remote = [name for name, job in jobs.items() if "://" in job["train_file"]]
    assert remote == ["gpt2_pretrain_at_scale.yaml"]
    assert len(local_files) == 2 * (len(jobs) - 1)  # every job but the s3:// pre-training one
    for name in local_files:
        assert (tmp_path / name).stat().st_size > 10_000, name
    # The same corpus as a process that has imported torch, transformers and Ray writes (this one), whatever
    # those libraries replaced in the standard library's modules.
    here = write_sample_corpus(str(tmp_path / "here"))
    assert [open(path, encoding="utf-8").read() for path in here] == [
        (tmp_path / "data" / name).read_text(encoding="utf-8") for name in ("train.txt", "test.txt")
    ]


def test_the_sample_corpus_ignores_what_other_libraries_put_into_the_standard_library(monkeypatch):
    """typing_extensions, for one, replaces typing's private helpers when imported; the corpus must not depend on
    that."""

    def dedent(text):
        """A replacement another library installed, with a docstring of its own."""

    original = " ".join(inspect.getdoc(textwrap.dedent).split("\n\n")[0].split())
    monkeypatch.setattr(textwrap, "dedent", dedent)
    read_here = read_paragraphs(MODULES)
    assert (
        "A replacement another library installed, with a docstring of its own." in read_here
        and original not in read_here
    ), "read here, the patch shows"
    paragraphs = docstring_paragraphs()
    assert (
        original in paragraphs
        and "A replacement another library installed, with a docstring of its own." not in paragraphs
    )
