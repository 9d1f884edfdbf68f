"""Sweeps with Ray Tune (raylm.sweep, python -m raylm.tune): search spaces, W&B sweep configs, real sweeps.

One real sweep serves most assertions (the module fixture `sweep`): a W&B-style grid of four
learning rates, one absurd, on a tiny GPT-2 (8 steps, an evaluation every 2, one checkpoint kept),
ASHA judging each evaluation. It is interrupted with Ctrl-C (SIGINT) as the third trial reports for
the first time, then run again, which resumes it; Tune saves its experiment state as often as it can
meanwhile. The shipped sweep job runs once more, shrunk, through the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml
from conftest import TINY_GPT2, tiny_args
from ray import tune

from raylm import LanguageModelingModel
from raylm import tune as tune_cli
from raylm.config import field_help
from raylm.errors import DivergenceError
from raylm.sweep import SweepConfig, run_sweep
from raylm.sweep.space import Parameter, check_sweep
from raylm.sweep.trials import STOPPED_EARLY, trial_outcome
from raylm.train import read_job_file

REPO = Path(__file__).resolve().parents[1]
SWEEP_JOB_FILES = [path for path in sorted((REPO / "jobs").glob("*.yaml")) if "sweep" in read_job_file(str(path))]

SWEEP_STEPS = 8
EVAL_EVERY_STEPS = 2
# In grid order: a good rate, one too small to move the loss (ASHA's first cut), a larger one
# (the trial interrupted mid-way), and an absurd one that stops early or diverges.
LEARNING_RATES = [5e-3, 1e-5, 1e-2, 1e3]
GOOD, TOO_SMALL, INTERRUPTED, ABSURD = range(4)
# A trial takes ~30 s here (most of it Ray Train's start-up), several times that on a loaded machine.
SWEEP_TIME_LIMIT_S = 600
WANDB_SWEEP = {
    "method": "grid",
    "metric": {"name": "eval_loss", "goal": "minimize"},
    "parameters": {"learning_rate": {"values": LEARNING_RATES}},
    # W&B's hyperband counts evaluations: a trial may be stopped from its first one on.
    "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
}


# --- search spaces ----------------------------------------------------------------------------------------


def test_a_wandb_sweep_config_is_the_same_search_space_as_raylms():
    wandb = {
        "method": "random",
        "name": "lr-sweep",  # W&B bookkeeping, ignored
        "metric": {"name": "eval_loss", "goal": "minimize"},
        "run_cap": 6,
        "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
        "parameters": {
            "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
            "warmup_ratio": {"min": 0.0, "max": 0.1},  # float bounds: uniform
            "num_train_epochs": {"min": 1, "max": 3},  # integer bounds: int_uniform
            "weight_decay": {"distribution": "log_uniform", "min": math.log(1e-4), "max": math.log(1e-1)},
            "train_batch_size": {"values": [8, 16]},
            "max_grad_norm": {"value": 1.0},
        },
    }
    raylm = {
        "search_alg": "random",
        "metric": "eval_loss",
        "mode": "min",
        "num_samples": 6,
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 3},
        "parameters": {
            "learning_rate": {"distribution": "loguniform", "min": 1e-5, "max": 1e-3},
            "warmup_ratio": {"distribution": "uniform", "min": 0.0, "max": 0.1},
            "num_train_epochs": {"distribution": "randint", "min": 1, "max": 3},
            "weight_decay": {"distribution": "loguniform", "min": 1e-4, "max": 1e-1},
            "train_batch_size": {"values": [8, 16]},
            "max_grad_norm": {"value": 1.0},
        },
    }
    translated, native = SweepConfig.from_dict(wandb), SweepConfig.from_dict(raylm)
    assert [p.kind for p in native.parameters] == [
        "loguniform",
        "uniform",
        "randint",
        "loguniform",
        "choice",
        "constant",
    ]
    for ours, theirs in zip(native.parameters, translated.parameters):
        # log_uniform's bounds are natural logs: exp(log(x)) comes back within rounding.
        assert (theirs.name, theirs.kind, theirs.values) == (ours.name, ours.kind, ours.values)
        if ours.low is not None:
            assert (theirs.low, theirs.high) == pytest.approx((ours.low, ours.high), rel=1e-12)
    assert dataclasses.replace(translated, parameters=native.parameters) == native


def test_wandb_grid_values_become_a_grid_and_bounds_are_inclusive():
    grid = SweepConfig.from_dict(WANDB_SWEEP)
    assert grid.search_alg == "grid" and grid.num_samples == 1
    assert grid.parameters == (Parameter("learning_rate", "grid", tuple(LEARNING_RATES)),)
    assert (grid.scheduler, grid.grace_period, grid.reduction_factor) == ("asha", 1, 2)
    # Without early_terminate a W&B sweep runs every trial to the end.
    assert SweepConfig.from_dict({k: v for k, v in WANDB_SWEEP.items() if k != "early_terminate"}).scheduler == "none"
    # W&B's int_uniform includes max; so does raylm's randint (Tune's own excludes it).
    domain = Parameter("num_train_epochs", "randint", low=1, high=2).to_tune()
    assert {domain.sample() for _ in range(200)} == {1, 2}


def test_each_trial_is_reported_as_it_ended_and_judged_by_its_best_finite_evaluation():
    import pandas
    from ray.tune import Result

    def result(trial_id: str, last: dict, evaluations: list[tuple], error=None) -> Result:
        history = pandas.DataFrame(
            [
                {
                    "global_step": step,
                    "eval_loss": loss,
                    "perplexity": math.exp(min(loss, 700)),
                    "checkpoint_path": path,
                }
                for step, loss, path in evaluations
            ]
        )
        return Result(
            metrics={"config": {"learning_rate": 1e-3}, **last},
            checkpoint=None,
            error=error,
            path=f"/runs/sweep/{trial_id}",
            metrics_dataframe=history,
        )

    completed = trial_outcome(
        result(
            "a_00000",
            {"done": True, "global_step": 8},
            [(2, 6.0, "/c2"), (4, 5.0, "/c4"), (6, 5.5, None), (8, 5.2, "/c8")],
        ),
        "eval_loss",
        "min",
    )
    assert (completed.trial_id, completed.status, completed.last_step, completed.sampled) == (
        "a_00000",
        "completed",
        8,
        {"learning_rate": 1e-3},
    )
    assert completed.best["global_step"] == 4 and completed.best["checkpoint_path"] == "/c4"
    stopped = trial_outcome(
        result("a_00001", {"done": True, "global_step": 2, STOPPED_EARLY: True}, [(2, 6.5, "/c2")]), "eval_loss", "min"
    )
    assert stopped.status == "stopped early"
    diverged = trial_outcome(
        result(
            "a_00002",
            {"global_step": 4},
            [(2, 6.1, "/c2"), (4, float("nan"), None)],
            error=DivergenceError("Training diverged: the loss became NaN at step 3", "Lower learning_rate"),
        ),
        "eval_loss",
        "min",
    )
    assert diverged.status == "diverged" and diverged.best["global_step"] == 2 and "loss became NaN" in diverged.error
    interrupted = trial_outcome(result("a_00003", {"global_step": 2}, [(2, 6.2, "/c2")]), "eval_loss", "min")
    assert interrupted.status == "not finished"
    # mode max picks the highest value of the metric.
    assert (
        trial_outcome(result("a_00004", {"done": True}, [(2, 6.0, "/c2"), (4, 5.0, "/c4")]), "eval_loss", "max").best[
            "global_step"
        ]
        == 2
    )


# --- errors before anything starts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("sweep.parameters={lerning_rate: {values: [1e-4]}}", "'lerning_rate' (did you mean 'learning_rate'?)"),
        ("sweep.parameters={num_workers: {values: [1, 2]}}", "'num_workers', which the sweep sets for every trial"),
        ("sweep.parameters.learning_rate.min=-1", "sweep.parameters.learning_rate is loguniform with min -1"),
        (
            "sweep.parameters.train_batch_size={values: [8, 0]}",
            "sweep.parameters.train_batch_size = 0: train_batch_size must be a positive integer",
        ),
        ("sweep.scheduler.grace_priod=3", "'grace_priod' (did you mean 'grace_period'?)"),
        ("sweep.metric=accuracy", "sweep.metric 'accuracy' is not reported at evaluations"),
        ("eval_file=null", "the job has no eval_file"),
    ],
)
def test_a_bad_sweep_is_one_paragraph_and_exit_code_2(override, message, capsys, no_ray):
    assert tune_cli.main([str(REPO / "jobs" / "sweep_gpt2.yaml"), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylm: error: ") and message in lines[0], lines


@pytest.mark.parametrize("path", SWEEP_JOB_FILES, ids=lambda path: path.stem)
def test_every_shipped_sweep_job_parses_and_checks(path, no_ray):
    job, sweep = tune_cli.load_sweep_job(str(path), [])
    config = SweepConfig.from_dict(sweep)
    check_sweep(job, config)
    assert {p.name for p in config.parameters} <= set(field_help())
    assert config.metric == "eval_loss" and job.args.evaluate_during_training


# --- a real sweep, interrupted and resumed -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2_dir(corpus, tmp_path_factory) -> str:
    """An untrained tiny GPT-2 with a 1,000-token tokenizer: the model every sweep fine-tunes."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    args = tiny_args(folder, mlm=False, vocab_size=1000, dataset_type="text", config=TINY_GPT2)
    LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0]).save_model(str(folder))
    return str(folder)


class InterruptOnce(tune.Callback):
    """Ctrl-C on the sweep's driver when the trial at `trial_index` first reports (once: Tune keeps callbacks across
    a resume)."""

    def __init__(self, trial_index: int, marker: str):
        self.trial_index = trial_index
        self.marker = marker

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trials.index(trial) == self.trial_index and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def ctrl_c_after(seconds: float):
    """Ctrl-C on a sweep that hangs (as one did when a stopped trial's workers were never freed): it
    then ends unfinished and the assertions say so, instead of the test suite hanging."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def sweep(ray_session, corpus, tiny_gpt2_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sweep")
    args = tiny_args(
        out / "best",
        mlm=False,
        dataset_type="text",
        block_size=64,
        train_batch_size=16,
        eval_batch_size=64,
        max_steps=SWEEP_STEPS,
        warmup_ratio=0.0,
        evaluate_during_training_steps=EVAL_EVERY_STEPS,
        storage_path=str(out / "runs"),
        experiment_name="lr-sweep",
        checkpoints_to_keep=1,
    )

    def run(callbacks=None):
        table = io.StringIO()
        with contextlib.redirect_stdout(table), ctrl_c_after(SWEEP_TIME_LIMIT_S):
            result = run_sweep(WANDB_SWEEP, "gpt2", tiny_gpt2_dir, corpus[0], corpus[1], args=args, callbacks=callbacks)
        return result, table.getvalue()

    with pytest.MonkeyPatch.context() as env:
        # Tune saves its experiment state at every step of its loop, so also between a trial's last
        # report and its end: the saved state must still say that the trial completed.
        env.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
        interrupted, _ = run([InterruptOnce(INTERRUPTED, str(out / "interrupted"))])
        runs = out / "runs" / "lr-sweep" / "trials"
        checkpoints_before = {
            trial.trial_id: sorted(os.listdir(runs / trial.trial_id))
            for trial in interrupted.trials
            if trial.status in ("completed", "stopped early")
        }
        final, table = run()
    return {
        "interrupted": interrupted,
        "final": final,
        "table": table,
        "checkpoints_before": checkpoints_before,
        "runs": runs,
        "args": args,
        "experiment": out / "runs" / "lr-sweep",
    }


def test_an_interrupted_sweep_resumes_without_running_ended_trials_again(sweep):
    interrupted, final = sweep["interrupted"], sweep["final"]
    assert not interrupted.finished
    # One trial at a time: the fourth trial was not even created yet.
    assert [trial.status for trial in interrupted.trials] == ["completed", "stopped early", "not finished"]
    assert final.finished and len(final.trials) == len(LEARNING_RATES)
    assert [t.trial_id for t in final.trials[: INTERRUPTED + 1]] == [t.trial_id for t in interrupted.trials]
    assert all(trial.status != "not finished" for trial in final.trials)
    # Trials that had ended were not started again: their runs have the same checkpoints, and Tune the same evaluations.
    assert set(sweep["checkpoints_before"]) == {
        interrupted.trials[GOOD].trial_id,
        interrupted.trials[TOO_SMALL].trial_id,
    }
    for trial_id, checkpoints in sweep["checkpoints_before"].items():
        assert sorted(os.listdir(sweep["runs"] / trial_id)) == checkpoints
    for before, after in zip(interrupted.trials[:INTERRUPTED], final.trials[:INTERRUPTED]):
        assert (after.status, after.last_step, after.best) == (before.status, before.last_step, before.best)
    # The trial stopped mid-way went on from its last checkpoint: started afresh, it would evaluate step 2 again.
    resumed = final.trials[INTERRUPTED]
    steps = [
        json.loads(line)["global_step"]
        for line in (sweep["experiment"] / resumed.trial_id / "result.json").read_text().splitlines()
    ]
    assert steps[0] == EVAL_EVERY_STEPS and len(steps) >= 2 and len(set(steps)) == len(steps), steps


def test_asha_stops_a_poor_trial_before_the_end(sweep):
    trials = sweep["final"].trials
    assert trials[GOOD].status == "completed" and trials[GOOD].last_step == SWEEP_STEPS
    # 1e-5 barely moves the loss from its untrained value; the good rate's first evaluation is below it.
    assert trials[TOO_SMALL].status == "stopped early" and trials[TOO_SMALL].last_step == EVAL_EVERY_STEPS
    # The absurd rate ends at its first evaluation either way: stopped by ASHA, or diverged (an error, not a crash).
    assert trials[ABSURD].status in ("stopped early", "diverged") and trials[ABSURD].last_step in (
        None,
        EVAL_EVERY_STEPS,
    )


def test_the_best_trial_has_the_lowest_eval_loss_of_all_evaluations(sweep):
    final, experiment = sweep["final"], sweep["experiment"]
    evaluations = []  # (eval_loss, trial_id, step) from Tune's own result files
    for trial in final.trials:
        for line in (experiment / trial.trial_id / "result.json").read_text().splitlines():
            result = json.loads(line)
            if math.isfinite(result["eval_loss"]):
                evaluations.append(
                    (result["eval_loss"], trial.trial_id, result["global_step"], result.get("checkpoint_path"))
                )
    assert len(evaluations) >= SWEEP_STEPS // EVAL_EVERY_STEPS + 2, "too few evaluations to compare"
    lowest_loss, best_trial, best_step, best_checkpoint = min(evaluations)
    assert final.best.trial_id == best_trial and final.best.best["global_step"] == best_step
    assert final.best.best["eval_loss"] == pytest.approx(lowest_loss, rel=1e-9)
    assert json.loads((experiment / "best_config.json").read_text()) == {
        "learning_rate": final.best.sampled["learning_rate"]
    }
    recorded = json.loads((experiment / "best_checkpoint.json").read_text())
    assert recorded["trial_id"] == best_trial and recorded["checkpoint"] == best_checkpoint
    assert (Path(best_checkpoint) / "model.safetensors").is_file()
    # checkpoints_to_keep=1: a trial keeps its best checkpoint and its latest, so the best outlives later ones.
    for trial in final.trials:
        assert len([path for path in (sweep["runs"] / trial.trial_id).glob("checkpoint_*") if path.is_dir()]) <= 2


def test_the_exported_model_reloads_with_the_auto_classes_and_gives_that_eval_loss(sweep, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = sweep["final"]
    exported = final.exported_to
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert model.config.vocab_size == len(tokenizer)
    saved_args = json.loads((Path(exported) / "model_args.json").read_text())
    assert saved_args["learning_rate"] == final.best.sampled["learning_rate"] and saved_args["no_save"] is False
    assert not (Path(exported) / "optimizer.pt").exists()
    # Evaluate the Auto-loaded weights with raylm's evaluation, on the same blocks the trials used.
    evaluator = LanguageModelingModel("gpt2", exported, args=sweep["args"].copy())
    evaluator.model = model
    result = evaluator.eval_model(corpus[1], output_dir=str(Path(exported).parent / "eval"))
    # Same weights, same blocks, float32 sums in another order: equal well within 1e-4.
    assert result["eval_loss"] == pytest.approx(final.best.best["eval_loss"], abs=1e-4)


def test_the_table_lists_every_trial_with_its_values_and_outcome(sweep):
    final = sweep["final"]
    lines = sweep["table"].strip().splitlines()
    assert lines[0].split() == ["trial", "learning_rate", "eval_loss", "perplexity", "steps", "status"]
    for trial, line in zip(final.trials, lines[1:5]):
        assert line.startswith(trial.trial_id) and line.rstrip().endswith(trial.status)
        assert f"{trial.sampled['learning_rate']:.4g}" in line
    assert lines[5].startswith(f"best: {final.best.trial_id}, eval_loss {final.best.best['eval_loss']:.4f}")


def test_each_trial_keeps_raylms_training_log_in_its_trial_folder(sweep):
    good = sweep["final"].trials[GOOD]
    log = sweep["experiment"] / good.trial_id / "raylm_run" / "training_log.jsonl"
    evaluations = [event for event in map(json.loads, log.read_text().splitlines()) if event["kind"] == "eval"]
    assert [event["global_step"] for event in evaluations] == list(
        range(EVAL_EVERY_STEPS, SWEEP_STEPS + 1, EVAL_EVERY_STEPS)
    )


# --- the shipped sweep job, shrunk, through the CLI ----------------------------------------------------------


@pytest.mark.parametrize("path", SWEEP_JOB_FILES, ids=lambda path: path.stem)
def test_the_shipped_sweep_job_runs_shrunk(path, ray_session, corpus, tiny_gpt2_dir, tmp_path, capfd):
    shrink = {
        "model_name": tiny_gpt2_dir,
        "train_file": corpus[0],
        "eval_file": corpus[1],
        "output_dir": str(tmp_path / "best"),
        "storage_path": str(tmp_path / "runs"),
        "max_steps": 4,
        "evaluate_during_training_steps": 2,
        "block_size": 64,
        "eval_batch_size": 64,
        "logging_steps": 1000,
        "num_workers": 1,
        "use_gpu": False,
        "sweep.num_samples": 1,
        "sweep.max_concurrent_trials": 1,
    }
    with ctrl_c_after(SWEEP_TIME_LIMIT_S):
        assert tune_cli.main([str(path), *(f"{key}={json.dumps(value)}" for key, value in shrink.items())]) == 0
    job, sweep_values = tune_cli.load_sweep_job(str(path), [])
    best_config = json.loads((tmp_path / "runs" / job.args.experiment_name / "best_config.json").read_text())
    assert set(best_config) == set(sweep_values["parameters"])
    assert (tmp_path / "best" / "config.json").is_file() and (tmp_path / "best" / "model.safetensors").is_file()
    output = capfd.readouterr()
    # Our table, and none of Tune's banners or progress tables.
    assert output.out.splitlines()[0].split() == [
        "trial",
        *sweep_values["parameters"],
        "eval_loss",
        "perplexity",
        "steps",
        "status",
    ]
    assert (
        "Configuration for experiment" not in output.out + output.err and "Trial status" not in output.out + output.err
    )


def test_the_sweep_resolves_its_job_mapping_once(monkeypatch, capsys, no_ray):
    """The job is checked once into a typed Job; the sweep's checks of each sampled value work on that, not on the
    mapping again."""
    from raylm import train
    from raylm.sweep import tuner as sweep_module

    calls = []
    resolve_job = train.resolve_job

    def counting_resolve_job(job, overrides):
        calls.append(overrides)
        return resolve_job(job, overrides)

    for module in (train, sweep_module, tune_cli):
        monkeypatch.setattr(module, "resolve_job", counting_resolve_job)
    assert tune_cli.main([str(REPO / "jobs" / "sweep_gpt2.yaml"), "max_steps=10", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_steps"] == 10
    assert calls == [["max_steps=10"]]


def test_a_wandb_bayes_sweep_searches_with_optuna_from_the_jobs_seed():
    """W&B's method bayes runs Optuna (search_alg optuna): the search algorithm Tune gets is Optuna's, it samples
    the sweep's own space within its bounds, and the same seed samples the same values."""
    from ray.tune.search.optuna import OptunaSearch

    from raylm.sweep import SweepConfig
    from raylm.sweep.tuner import _search_alg

    sweep = SweepConfig.from_dict(
        {
            "method": "bayes",
            "metric": {"name": "eval_loss", "goal": "minimize"},
            "parameters": {
                "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
                "train_batch_size": {"values": [8, 16]},
            },
        }
    )
    assert sweep.search_alg == "optuna"
    suggestions = []
    for _ in range(2):
        search = _search_alg(sweep, 42, 2)
        assert isinstance(search, OptunaSearch)
        search.set_search_properties(sweep.metric, sweep.mode, {p.name: p.to_tune() for p in sweep.parameters})
        suggestions.append([search.suggest(f"trial-{i}") for i in range(3)])
    assert suggestions[0] == suggestions[1]
    for suggested in suggestions[0]:
        assert 1e-5 <= suggested["learning_rate"] <= 1e-3 and suggested["train_batch_size"] in (8, 16), suggested
    assert len({s["learning_rate"] for s in suggestions[0]}) == 3, "it samples, not repeats one point"


class _StopBeforeTuning(Exception):
    """Raised by the stand-in Tuner: the test needs what a sweep hands Tune, not the trials."""


def test_a_bayes_sweep_hands_tune_an_optuna_search_seeded_with_the_jobs_manual_seed(
    ray_session, corpus, tmp_path, monkeypatch
):
    """run_sweep's own path to Tune: its search algorithm samples what Optuna seeded with the job's manual_seed
    samples (one dropped or replaced on the way would sample other values)."""
    from raylm.cluster import launcher
    from raylm.sweep.tuner import _search_alg

    handed = {}

    class RecordingTuner:
        can_restore = staticmethod(lambda path: False)

        def __init__(self, trainable, param_space, tune_config, run_config):
            handed["search_alg"] = tune_config.search_alg
            raise _StopBeforeTuning

    # The session's Ray serves the sweep's storage check; a sweep would restart it with the dashboard.
    monkeypatch.setattr(launcher, "ensure_ray", lambda *_, **__: None)
    monkeypatch.setattr(tune, "Tuner", RecordingTuner)
    sweep = {
        "method": "bayes",
        "metric": {"name": "eval_loss", "goal": "minimize"},
        "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}},
    }
    args = tiny_args(tmp_path / "best", mlm=False, config=TINY_GPT2, manual_seed=7, storage_path=str(tmp_path))
    with pytest.raises(_StopBeforeTuning):
        run_sweep(sweep, "gpt2", None, corpus[0], corpus[1], args=args)
    space = SweepConfig.from_dict(sweep)
    suggested = {}
    for name, search in (("handed", handed["search_alg"]), ("seed 7", _search_alg(space, 7, 1))):
        search.set_search_properties(space.metric, space.mode, {p.name: p.to_tune() for p in space.parameters})
        suggested[name] = [search.suggest(f"trial-{i}") for i in range(3)]
    assert suggested["handed"] == suggested["seed 7"]
