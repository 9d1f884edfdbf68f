"""What a user sees: run logs (jsonl, csv, TensorBoard, W&B, MLflow), training-curve PNGs, generate and fill_mask."""

import csv
import importlib.machinery
import json
import math
import os
import random
import subprocess
import sys
import types

import pytest
from conftest import TINY_BERT, TINY_ELECTRA, TINY_GPT2, png_size, read_tensorboard_scalars, tiny_args

from raylm import ConfigError, DataError, LanguageModelingArgs, LanguageModelingModel, ModelError, plot
from raylm.training import curves, tracking
from raylm.training.tracking import RunLog

TRAIN_STEPS = 60
EVAL_EVERY = 20


# --- helpers ------------------------------------------------------------------------------------------
def train_event(step: int) -> dict:
    # A loss that falls and a linear warm-up/decay schedule, so values differ at every step.
    return {
        "kind": "train",
        "global_step": step,
        "epoch": step // 30,
        "loss": 6.0 * math.exp(-step / 20) + 0.5,
        "learning_rate": 1e-3 * min(1.0, step / 6) * (1 - step / (TRAIN_STEPS + 1)),
        "tokens_per_second": 1000.0 + step,
        "data_wait_fraction": 0.01,
        "model_flops_per_second": 6e6 * (1000.0 + step),
        "elapsed_seconds": 0.1 * step,
    }


def eval_event(step: int, **extra) -> dict:
    eval_loss = 6.0 * math.exp(-step / 20) + 0.8
    return {
        "kind": "eval",
        "global_step": step,
        "epoch": step // 30,
        "train_loss": train_event(step)["loss"],
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss),
        **extra,
    }


def feed_synthetic_run(run_log: RunLog, eval_extra_from_step: int = EVAL_EVERY * 2) -> None:
    """TRAIN_STEPS train events, an eval every EVAL_EVERY steps (a new metric from the second), and checkpoints to
    ignore."""
    for step in range(1, TRAIN_STEPS + 1):
        run_log.on_event(train_event(step))
        if step % EVAL_EVERY == 0:
            extra = {"eval_tokens": 1000 + step} if step >= eval_extra_from_step else {"is_best": True}
            run_log.on_event(eval_event(step, **extra))
            run_log.on_event({"kind": "checkpoint", "global_step": step, "path": "/nowhere"})


def assert_valid_png(path: str) -> None:
    assert png_size(path) == curves.FIGURE_SIZE_PIXELS == (1000, 700)
    from PIL import Image  # installed with matplotlib

    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        assert image.size == (1000, 700)
        # Not a blank canvas: curves, text and axes give many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


@pytest.fixture
def matplotlib_missing(monkeypatch):
    # A None entry makes both `import matplotlib` and importlib.util.find_spec behave as if it were not installed.
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


# --- RunLog ---------------------------------------------------------------------------------------------
def test_run_log_writes_jsonl_and_progress_scores(tmp_path):
    out = tmp_path / "out"
    run_log = RunLog(str(out), LanguageModelingArgs(), "run-a")
    assert not out.exists()  # nothing is created before the first event
    feed_synthetic_run(run_log)
    # Readable while training runs: every event is on disk as a complete line already.
    lines = (out / tracking.TRAINING_LOG_FILE).read_text().splitlines()
    assert len(lines) == TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY
    run_log.close()

    events = [json.loads(line) for line in (out / tracking.TRAINING_LOG_FILE).read_text().splitlines()]
    assert [e["kind"] for e in events].count("train") == TRAIN_STEPS
    assert {e["kind"] for e in events} == {"train", "eval"}
    assert events[0] == train_event(1)
    assert events[20] == eval_event(20, is_best=True)

    with open(out / tracking.PROGRESS_SCORES_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["global_step", "train_loss", "eval_loss", "perplexity"]
    assert "eval_tokens" in rows[0]  # a metric first seen in the second evaluation still gets its column
    assert [int(r["global_step"]) for r in rows] == [20, 40, 60]
    assert [r["eval_tokens"] for r in rows] == ["", "1040", "1060"]
    assert "is_best" not in rows[0] and "kind" not in rows[0]
    assert float(rows[1]["eval_loss"]) == pytest.approx(eval_event(40)["eval_loss"])
    assert float(rows[2]["perplexity"]) == pytest.approx(eval_event(60)["perplexity"])
    assert not list(out.glob("*.tmp"))


def test_run_log_writes_tensorboard_scalars_as_simple_transformers_names_them(tmp_path):
    out = tmp_path / "out"
    with RunLog(str(out), LanguageModelingArgs(), "run-a") as run_log:
        feed_synthetic_run(run_log)
    scalars = read_tensorboard_scalars(str(out / "runs" / "run-a"))
    assert {
        "loss",
        "lr",
        "tokens_per_second",
        "data_wait_fraction",
        "model_flops_per_second",
        "eval_loss",
        "eval_perplexity",
        "eval_tokens",
    } <= set(scalars)
    # mfu only on a GPU whose peak raylm knows; elapsed time is not a curve.
    assert not {"mfu", "elapsed_seconds", "eval_elapsed_seconds"} & set(scalars)
    assert not {"eval_train_loss", "eval_global_step", "eval_epoch", "eval_is_best"} & set(scalars)
    assert [step for step, _ in scalars["loss"]] == list(range(1, TRAIN_STEPS + 1))
    for step, value in scalars["loss"]:
        assert value == pytest.approx(train_event(step)["loss"], rel=1e-6)  # stored as float32
    for step, value in scalars["lr"]:
        assert value == pytest.approx(train_event(step)["learning_rate"], rel=1e-6, abs=1e-12)
    assert [step for step, _ in scalars["eval_loss"]] == [20, 40, 60]
    assert scalars["eval_perplexity"][-1][1] == pytest.approx(eval_event(60)["perplexity"], rel=1e-6)


def test_tensorboard_dir_is_used_as_given(tmp_path):
    args = LanguageModelingArgs()
    args.tensorboard_dir = str(tmp_path / "tb")
    with RunLog(str(tmp_path / "out"), args, "run-a") as run_log:
        run_log.on_event(train_event(1))
    assert read_tensorboard_scalars(str(tmp_path / "tb"))["loss"][0][0] == 1
    assert not (tmp_path / "out" / "runs").exists()


def test_close_draws_the_training_curves_png(tmp_path):
    out = tmp_path / "out"
    run_log = RunLog(str(out), LanguageModelingArgs(), "run-a")
    feed_synthetic_run(run_log)
    run_log.close()
    assert_valid_png(str(out / tracking.TRAINING_CURVES_FILE))
    assert not list(out.glob("*.partial"))


def test_close_without_matplotlib_skips_the_png_quietly(tmp_path, matplotlib_missing):
    out = tmp_path / "out"
    with RunLog(str(out), LanguageModelingArgs(), "run-a") as run_log:
        feed_synthetic_run(run_log)
    assert (out / tracking.TRAINING_LOG_FILE).is_file()
    assert not (out / tracking.TRAINING_CURVES_FILE).exists()


def test_a_run_without_events_leaves_output_dir_alone(tmp_path):
    RunLog(str(tmp_path / "out"), LanguageModelingArgs(), "run-a").close()
    assert not (tmp_path / "out").exists()


def test_wandb_project_without_wandb_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = LanguageModelingArgs()
    args.wandb_project = "my-project"
    with pytest.raises(ConfigError, match="pip install wandb"):
        tracking.check_trackers(args)
    with pytest.raises(ConfigError, match="wandb_project"):
        RunLog(str(tmp_path / "out"), args, "run-a")


def test_wandb_gets_the_args_and_every_scalar(monkeypatch, tmp_path):
    calls = {"init": [], "log": [], "finish": []}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self, exit_code):
            calls["finish"].append(exit_code)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    args = LanguageModelingArgs()
    args.wandb_project, args.wandb_kwargs, args.learning_rate = "my-project", {"entity": "team"}, 3e-4
    with RunLog(str(tmp_path / "out"), args, "run-a") as run_log:
        feed_synthetic_run(run_log)
    [init_kwargs] = calls["init"]
    assert init_kwargs["project"] == "my-project" and init_kwargs["entity"] == "team" and init_kwargs["name"] == "run-a"
    assert init_kwargs["config"]["learning_rate"] == 3e-4
    assert len(calls["log"]) == TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY
    assert calls["log"][0] == (
        1,
        {
            "loss": train_event(1)["loss"],
            "lr": train_event(1)["learning_rate"],
            "tokens_per_second": 1001.0,
            "data_wait_fraction": 0.01,
            "model_flops_per_second": 6.006e9,
            "global_step": 1,
        },
    )
    assert calls["log"][20][1]["eval_loss"] == eval_event(20)["eval_loss"]
    assert calls["finish"] == [0]


def test_a_failing_tracker_is_switched_off_and_the_files_go_on(monkeypatch, tmp_path, caplog):
    calls = {"log": 0, "finish": 0}

    class BrokenRun:
        def log(self, values, step):
            calls["log"] += 1
            raise ConnectionError("wandb.ai unreachable")

        def finish(self, exit_code):
            calls["finish"] += 1

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=lambda **kwargs: BrokenRun()))
    args = LanguageModelingArgs()
    args.wandb_project = "my-project"
    out = tmp_path / "out"
    with RunLog(str(out), args, "run-a") as run_log:
        feed_synthetic_run(run_log)
    # Switched off at its first failure: never called again, and said so once.
    assert calls == {"log": 1, "finish": 0}
    warnings = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert warnings == ["wandb logging failed and is switched off for this run: wandb.ai unreachable"]
    # Every file sink got every event.
    assert len((out / tracking.TRAINING_LOG_FILE).read_text().splitlines()) == TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY
    with open(out / tracking.PROGRESS_SCORES_FILE, encoding="utf-8") as f:
        assert [int(row["global_step"]) for row in csv.DictReader(f)] == list(range(EVAL_EVERY, TRAIN_STEPS + 1, 20))
    [run_dir] = (out / "runs").iterdir()
    scalars = read_tensorboard_scalars(str(run_dir))
    assert [step for step, _ in scalars["loss"]] == list(range(1, TRAIN_STEPS + 1))
    assert [step for step, _ in scalars["eval_loss"]] == list(range(EVAL_EVERY, TRAIN_STEPS + 1, EVAL_EVERY))
    assert_valid_png(str(out / tracking.TRAINING_CURVES_FILE))


def test_mlflow_run_is_started_logged_and_ended_when_a_tracking_uri_is_set(monkeypatch, tmp_path):
    calls = {"start_run": [], "log_params": [], "log_metrics": [], "end_run": []}
    mlflow = fake_module(
        "mlflow",
        active_run=lambda: None,
        start_run=lambda run_name: calls["start_run"].append(run_name),
        log_params=lambda params: calls["log_params"].append(params),
        log_metrics=lambda metrics, step: calls["log_metrics"].append((step, metrics)),
        end_run=lambda status: calls["end_run"].append(status),
    )
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with RunLog(str(tmp_path / "quiet"), LanguageModelingArgs(), "run-a") as run_log:
        run_log.on_event(train_event(1))
    assert calls["log_metrics"] == []  # installed but neither active nor configured: not used

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    with pytest.raises(RuntimeError):
        with RunLog(str(tmp_path / "out"), LanguageModelingArgs(), "run-b") as run_log:
            feed_synthetic_run(run_log)
            raise RuntimeError("worker died")
    assert calls["start_run"] == ["run-b"]
    assert calls["log_params"][0]["learning_rate"] == str(4e-5)
    assert len(calls["log_metrics"]) == TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY
    assert calls["log_metrics"][-1] == (
        60,
        {
            "eval_loss": eval_event(60)["eval_loss"],
            "eval_perplexity": eval_event(60)["perplexity"],
            "eval_tokens": 1060,
        },
    )
    assert calls["end_run"] == ["FAILED"]


# --- plot ---------------------------------------------------------------------------------------------
def write_log(run_dir, steps: int, loss_scale: float, with_eval: bool = True) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with RunLog(str(run_dir), LanguageModelingArgs(), "run") as run_log:
        for step in range(1, steps + 1):
            event = train_event(step)
            run_log.on_event({**event, "loss": event["loss"] * loss_scale})
            if with_eval and step % EVAL_EVERY == 0:
                run_log.on_event(eval_event(step))


def test_read_run_skips_a_line_cut_short_by_a_crash_but_not_a_broken_middle_line(tmp_path, matplotlib_missing):
    write_log(tmp_path / "run", steps=30, loss_scale=1.0)
    log_path = tmp_path / "run" / tracking.TRAINING_LOG_FILE
    with open(log_path, "a") as f:
        f.write('{"kind": "train", "global_st')
    history = curves.read_run(str(tmp_path / "run"))
    assert history.train_steps == list(range(1, 31)) and history.eval_steps == [20]
    assert history.learning_rate[5] == train_event(6)["learning_rate"]

    lines = log_path.read_text().splitlines()
    log_path.write_text("\n".join(lines[:3] + ["{broken"] + lines[3:]) + "\n")
    with pytest.raises(DataError, match="Line 4"):
        curves.read_run(str(tmp_path / "run"))


def test_steps_logged_again_after_a_restart_replace_the_first_attempt(tmp_path, matplotlib_missing):
    out = tmp_path / "out"
    with RunLog(str(out), LanguageModelingArgs(), "run-a") as run_log:
        for step in range(1, 31):
            run_log.on_event(train_event(step))
            if step % EVAL_EVERY == 0:
                run_log.on_event(eval_event(step))
        # The worker group restarts from the checkpoint at step 10 and trains on to step 40.
        for step in range(11, 41):
            run_log.on_event({**train_event(step), "loss": 1.0})
            if step % EVAL_EVERY == 0:
                run_log.on_event(eval_event(step, eval_tokens=step))
    history = curves.read_run(str(out))
    assert history.train_steps == list(range(1, 41))
    assert history.train_loss[9] == train_event(10)["loss"] and set(history.train_loss[10:]) == {1.0}
    assert history.eval_steps == [20, 40]
    with open(out / tracking.PROGRESS_SCORES_FILE, newline="") as f:
        assert [(row["global_step"], row["eval_tokens"]) for row in csv.DictReader(f)] == [("20", "20"), ("40", "40")]


def test_a_resumed_run_continues_the_logs_of_the_first(tmp_path, matplotlib_missing):
    out = tmp_path / "out"
    with RunLog(str(out), LanguageModelingArgs(), "run-a") as run_log:
        for step in range(1, 31):
            run_log.on_event(train_event(step))
            if step % EVAL_EVERY == 0:
                run_log.on_event(eval_event(step, eval_tokens=step))
    with open(out / tracking.TRAINING_LOG_FILE, "a") as f:
        f.write('{"kind": "train", "glo')  # the crash that made the resume necessary
    with RunLog(str(out), LanguageModelingArgs(), "run-b", resume=True) as run_log:
        for step in range(21, 41):
            run_log.on_event(train_event(step))
            if step % EVAL_EVERY == 0:
                run_log.on_event(eval_event(step))
    history = curves.read_run(str(out))
    assert history.train_steps == list(range(1, 41)) and history.eval_steps == [20, 40]
    with open(out / tracking.PROGRESS_SCORES_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["global_step"], row["eval_tokens"]) for row in rows] == [("20", "20"), ("40", "")]
    assert float(rows[0]["eval_loss"]) == eval_event(20)["eval_loss"]


def test_plot_cli_compares_two_runs(tmp_path):
    write_log(tmp_path / "fast", steps=60, loss_scale=0.5)
    write_log(tmp_path / "slow", steps=40, loss_scale=1.0, with_eval=False)
    out = tmp_path / "compare.png"
    completed = subprocess.run(
        [sys.executable, "-m", "raylm.plot", str(tmp_path / "fast"), str(tmp_path / "slow"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(out)
    assert_valid_png(str(out))


def test_plot_cli_redraws_one_run_in_place(tmp_path, capsys):
    write_log(tmp_path / "run", steps=30, loss_scale=1.0)
    png = tmp_path / "run" / tracking.TRAINING_CURVES_FILE
    png.unlink()
    assert plot.main([str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    assert_valid_png(str(png))


def test_plot_cli_without_matplotlib_says_how_to_install_it(tmp_path, capsys, matplotlib_missing):
    write_log(tmp_path / "run", steps=5, loss_scale=1.0)
    assert plot.main([str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "pip install raylm[plot]" in error and "\n" not in error.strip()


def test_plot_cli_on_a_folder_without_a_log(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "has no training_log.jsonl" in capsys.readouterr().err


# --- generate and fill_mask on models trained on a repetitive corpus ------------------------------------
# Each animal has its own verb, preposition and place, so every word is predictable from any other.
PATTERNS = {
    "cat": "the cat sat on the mat .",
    "dog": "the dog slept under the rug .",
    "bird": "the bird sang in the tree .",
    "fish": "the fish swam through the pond .",
}


@pytest.fixture(scope="module")
def pattern_corpus(tmp_path_factory):
    lines = list(PATTERNS.values()) * 100
    random.Random(0).shuffle(lines)
    path = tmp_path_factory.mktemp("patterns") / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pattern_gpt2(ray_session, pattern_corpus, tmp_path_factory):
    args = tiny_args(
        tmp_path_factory.mktemp("pattern_gpt2"),
        mlm=False,
        vocab_size=400,
        config=TINY_GPT2,
        learning_rate=3e-3,
        train_batch_size=2,  # a row packs about 16 lines (dataset_type simple): 2 rows a step, 75 steps
        num_train_epochs=6,
        warmup_ratio=0.05,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=pattern_corpus)
    model.train_model(pattern_corpus)
    return model


@pytest.fixture(scope="module")
def pattern_bert(ray_session, pattern_corpus, tmp_path_factory):
    # 400 small steps: one line holds about one masked token, so MLM needs more steps than CLM. With 300
    # steps of 8 lines the top token's score ranged 0.4-0.93 over seeds 42-44; 400 steps of one packed row
    # (about 16 lines) passed on each of them.
    args = tiny_args(
        tmp_path_factory.mktemp("pattern_bert"),
        vocab_size=400,
        config=TINY_BERT,
        learning_rate=3e-3,
        train_batch_size=1,  # a row packs about 16 lines (dataset_type simple): 25 steps an epoch
        num_train_epochs=16,
        warmup_ratio=0.05,
    )
    model = LanguageModelingModel("bert", None, args=args, train_files=pattern_corpus)
    model.train_model(pattern_corpus)
    return model


@pytest.mark.parametrize("animal", list(PATTERNS))
def test_generate_continues_the_pattern(pattern_gpt2, animal):
    sentence = PATTERNS[animal]
    prompt = " ".join(sentence.split()[:2])  # "the cat": the rest of the sentence follows from the animal
    assert pattern_gpt2.generate(prompt, max_new_tokens=12) == sentence


def test_generate_stops_at_the_end_of_a_document(pattern_gpt2):
    # 12 new tokens would run into a second sentence if the model had not learned the eos between lines.
    assert pattern_gpt2.generate("the", max_new_tokens=12) in PATTERNS.values()


def test_without_document_separators_a_packed_gpt2_runs_on_into_the_next_document(
    ray_session, pattern_corpus, tmp_path
):
    # The same lines packed without the eos after each: the model learns that a sentence goes on into the next one.
    args = tiny_args(
        tmp_path,
        mlm=False,
        vocab_size=400,
        config=TINY_GPT2,
        document_separator=False,
        dataset_type="text",
        block_size=32,
        learning_rate=3e-3,
        train_batch_size=16,
        num_train_epochs=16,
        warmup_ratio=0.05,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=pattern_corpus)
    model.train_model(pattern_corpus)
    generated = model.generate("the", max_new_tokens=12)
    first = next((sentence for sentence in PATTERNS.values() if generated.startswith(sentence)), None)
    assert first is not None, generated
    rest = generated[len(first) :].lstrip()  # byte-level BPE glues the lines: "mat .the dog"
    assert any(sentence.startswith(rest) for sentence in PATTERNS.values()) and len(rest.split()) >= 4, generated


@pytest.mark.parametrize("animal", list(PATTERNS))
def test_fill_mask_ranks_the_obvious_token_first(pattern_bert, animal):
    words = PATTERNS[animal].split()
    for position in (1, 2, 5):  # the animal, the verb, the place
        candidates = pattern_bert.fill_mask(" ".join(words[:position] + ["[MASK]"] + words[position + 1 :]))
        best, runner_up = candidates[0], candidates[1]
        assert best["token"] == words[position], candidates
        assert best["score"] > 0.6 and best["score"] > 5 * runner_up["score"], candidates
        assert len(candidates) == 5 and [c["score"] for c in candidates] == sorted(
            (c["score"] for c in candidates), reverse=True
        )
    tokenizer = pattern_bert.tokenizer
    assert best["sequence"] == tokenizer.decode(tokenizer(PATTERNS[animal])["input_ids"], skip_special_tokens=True)


def test_fill_mask_accepts_either_mask_spelling_and_needs_exactly_one(pattern_bert):
    first = pattern_bert.fill_mask("the <mask> sat on the mat .", top_k=3)
    assert first[0]["token"] == "cat" and len(first) == 3
    with pytest.raises(ConfigError, match="exactly one mask"):
        pattern_bert.fill_mask("the cat sat on the mat .")
    with pytest.raises(ConfigError, match="found 2"):
        pattern_bert.fill_mask("the [MASK] sat on the [MASK] .")


@pytest.fixture(scope="module")
def pattern_electra(ray_session, pattern_corpus, tmp_path_factory):
    """An ELECTRA pair trained on the pattern corpus as pattern_bert is (its generator is a masked LM of that size)."""
    args = tiny_args(
        tmp_path_factory.mktemp("pattern_electra"),
        vocab_size=400,
        config=TINY_ELECTRA,
        mlm_probability=0.3,  # twice the masked tokens per step of pattern_bert, in 2/3 of its steps
        learning_rate=3e-3,
        train_batch_size=1,  # a row packs about 16 lines (dataset_type simple): 25 steps an epoch
        num_train_epochs=11,
        warmup_ratio=0.05,
        save_model_every_epoch=False,
    )
    model = LanguageModelingModel("electra", None, args=args, train_files=pattern_corpus)
    model.train_model(pattern_corpus)
    return model


def test_fill_mask_uses_the_electra_generator(pattern_electra):
    # An ELECTRA model keeps its masked LM in .generator; its discriminator predicts no tokens at all.
    candidates = pattern_electra.fill_mask("the fish swam through the [MASK] .")
    assert candidates[0]["token"] == "pond", candidates


def test_each_check_refuses_the_other_objective(pattern_gpt2, pattern_bert):
    with pytest.raises(ModelError, match="generate needs a causal language model.*BertForMaskedLM"):
        pattern_bert.generate("the cat")
    with pytest.raises(ModelError, match="fill_mask needs a masked language model.*GPT2LMHeadModel"):
        pattern_gpt2.fill_mask("the [MASK] sat")


def test_no_save_leaves_an_existing_output_dir_exactly_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / tracking.TRAINING_LOG_FILE).write_text('{"kind": "train", "global_step": 1, "loss": 9.0}\n')
    (out / tracking.PROGRESS_SCORES_FILE).write_text("global_step,train_loss,eval_loss,perplexity\n1,9.0,9.0,8103.0\n")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    args = LanguageModelingArgs.from_dict({"no_save": True})
    with RunLog(str(out), args, "run-a") as run_log:
        feed_synthetic_run(run_log)
    assert sorted(path.name for path in out.iterdir()) == sorted(before)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_no_save_with_overwrite_output_dir_still_logs_there(tmp_path):
    # A sweep's trials run so: no model in their folders, but each keeps its log.
    out = tmp_path / "out"
    with RunLog(
        str(out), LanguageModelingArgs.from_dict({"no_save": True, "overwrite_output_dir": True}), "run-a"
    ) as run_log:
        feed_synthetic_run(run_log)
    assert len((out / tracking.TRAINING_LOG_FILE).read_text().splitlines()) == TRAIN_STEPS + TRAIN_STEPS // EVAL_EVERY
