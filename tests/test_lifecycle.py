"""Training lifecycle: checkpoints, exact resume after a worker death or from output_dir, early stopping, divergence."""

import collections
import glob
import math
import os
import random
import re
import tempfile
import threading
import time

import boto3
import numpy as np
import pytest
import torch
from conftest import TINY_GPT2, read_trace, tiny_args
from transformers import AutoModelForCausalLM, GPT2Config

from raylm import DivergenceError, LanguageModelingModel, TrainingFailed
from raylm.cluster import launcher, run_folders
from raylm.training import in_process
from raylm.training.checkpoints import read_trainer_state


@pytest.fixture(scope="module")
def small_corpus(corpus, tmp_path_factory):
    """The first 300 training paragraphs (about 19 optimizer steps per epoch at 2 workers x 8) and the test set."""
    path = tmp_path_factory.mktemp("small") / "train.txt"
    with open(corpus[0], encoding="utf-8") as f:
        path.write_text("\n".join(f.read().splitlines()[:300]), encoding="utf-8")
    return str(path), corpus[1]


# What the loopback S3 proxy adds to every request in the kill-mid-upload test: Ray uploads a checkpoint's dozen
# files one after another, three requests each (a multipart upload), so one checkpoint takes ~3 s, while a tiny
# model's step takes tens of milliseconds.
UPLOAD_DELAY_S = 0.1


def _args(out, **overrides):
    values = dict(
        mlm=False,
        vocab_size=500,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        learning_rate=3e-3,
        train_batch_size=8,
        num_train_epochs=2,
        save_steps=5,
        logging_steps=5,
    )
    values.update(overrides)
    return tiny_args(out, **values)


def _train(tmp_path, name, corpus, diagnostics=None, eval_file=None, **overrides):
    out, trace = tmp_path / name, tmp_path / f"{name}-trace"
    trace.mkdir()
    model = LanguageModelingModel("gpt2", None, args=_args(out, **overrides), train_files=corpus)
    result = model.train_model(
        corpus, eval_file=eval_file, _diagnostics={"trace_dir": str(trace), **(diagnostics or {})}
    )
    return model, result, str(out), read_trace(str(trace))


@pytest.fixture(scope="module")
def uninterrupted(ray_session, small_corpus, tmp_path_factory):
    """A 2-worker, 2-epoch run without failures: the reference for the resumed ones."""
    return _train(tmp_path_factory.mktemp("ref"), "run", small_corpus[0], num_workers=2)


def test_killed_worker_resumes_to_the_same_run(uninterrupted, small_corpus, tmp_path):
    _, (ref_steps_total, _), _, (ref_steps, _) = uninterrupted
    per_epoch = max(r["step"] for r in ref_steps[0].values() if r["epoch"] == 0)
    kill_step = per_epoch + 3  # mid second epoch, 3 steps after a save_steps checkpoint at most
    _, (global_step, _), out, (steps, starts) = _train(
        tmp_path,
        "killed",
        small_corpus[0],
        num_workers=2,
        max_failures=1,
        diagnostics={"kill_rank": 1, "kill_at_step": kill_step},
    )
    # The group restarted once, from a checkpoint taken before the kill.
    resumed_from = [start["resumed_from"] for start in starts[1]]
    assert len(resumed_from) == 2 and resumed_from[0] is None and 0 < resumed_from[1] < kill_step, starts
    assert global_step == ref_steps_total
    for rank in (0, 1):
        assert sorted(steps[rank]) == sorted(ref_steps[rank]) == list(range(1, global_step + 1))
        for step, record in steps[rank].items():
            reference = ref_steps[rank][step]
            assert record["example_ids"] == reference["example_ids"], (rank, step)
            # Bit-identical: same weights, optimizer, RNG and batches after the restore.
            assert record["loss"] == reference["loss"], (rank, step, record["loss"], reference["loss"])
    consumed = collections.Counter(i for rank in steps for r in steps[rank].values() for i in r["example_ids"])
    reference = collections.Counter(i for rank in ref_steps for r in ref_steps[rank].values() for i in r["example_ids"])
    assert consumed == reference and max(consumed.values()) == 2  # every example once per epoch, none lost
    assert read_trainer_state(os.path.join(out, f"checkpoint-{global_step}-epoch-2")).global_step == global_step


def test_a_killed_worker_still_uses_max_failures_where_reclaims_do_not(ray_session, small_corpus, tmp_path):
    """Reclaims have a budget of their own (max_preemption_failures, test_multinode's reclaim runs use max_failures
    0); a worker that dies without notice is a failure: with max_failures 0 the group is not restarted and the run
    fails, its checkpoints kept."""
    with pytest.raises(TrainingFailed) as failure:
        _train(
            tmp_path,
            "killed-no-retry",
            small_corpus[0],
            num_workers=2,
            max_failures=0,
            diagnostics={"kill_rank": 1, "kill_at_step": 7},
        )
    assert "worker" in str(failure.value).lower(), failure.value
    steps, starts = read_trace(str(tmp_path / "killed-no-retry-trace"))
    assert [len(starts[rank]) for rank in (0, 1)] == [1, 1], starts  # no restart
    assert max(steps[1]) == 7 and max(steps[0]) <= 8, (sorted(steps[0]), sorted(steps[1]))
    assert read_trainer_state(os.path.join(tmp_path / "killed-no-retry", "checkpoint-5")).global_step == 5


def test_a_one_worker_run_trains_in_the_driver_and_ray_train_workers_resume_it_exactly(
    ray_session, small_corpus, tmp_path
):
    """One worker that may not restart trains in this process (no Ray Train worker to start), and its
    checkpoints are Ray Train's: registered in the run's snapshot and pruned to checkpoints_to_keep, and
    a run on Ray Train's workers (max_failures=1) resumes one to the losses the driver's run had. The
    process is left as it was: torch's threads and the random generators the loop seeds."""
    out, trace = tmp_path / "in-driver", tmp_path / "in-driver-trace"
    trace.mkdir()
    model = LanguageModelingModel(
        "gpt2",
        None,
        args=_args(out, num_workers=1, max_steps=12, save_steps=4, checkpoints_to_keep=2),
        train_files=small_corpus[0],
    )
    random.seed(7), np.random.seed(7), torch.manual_seed(7), torch.set_num_threads(2)
    before = random.random(), float(np.random.random()), float(torch.rand(()))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    total, _ = model.train_model(small_corpus[0], _diagnostics={"trace_dir": str(trace)})
    assert (
        random.random(),
        float(np.random.random()),
        float(torch.rand(())),
    ) == before and torch.get_num_threads() == 2
    steps, _ = read_trace(str(trace))
    [start] = read_trace(str(trace))[1][0]
    assert start["pid"] == os.getpid() and total == 12
    run_folder = os.path.dirname(model.checkpoint_path)
    kept = sorted(
        name
        for name in os.listdir(run_folder)
        if name.startswith("checkpoint_") and os.path.isdir(os.path.join(run_folder, name))
    )
    assert len(kept) == 2 and os.path.isfile(os.path.join(run_folder, run_folders.RAY_CHECKPOINT_SNAPSHOT)), os.listdir(
        run_folder
    )
    assert sorted(read_trainer_state(os.path.join(run_folder, name)).global_step for name in kept) == [8, 12]

    resumed = LanguageModelingModel(
        "gpt2", os.path.join(out, "checkpoint-8"), args={"output_dir": str(tmp_path / "resumed"), "max_failures": 1}
    )
    trace = tmp_path / "resumed-trace"
    trace.mkdir()
    global_step, _ = resumed.train_model(small_corpus[0], _diagnostics={"trace_dir": str(trace)})
    [start] = read_trace(str(trace))[1][0]
    assert start["pid"] != os.getpid() and start["resumed_from"] == 8 and global_step == 12
    _assert_same_steps(read_trace(str(trace))[0][0], steps[0], [9, 10, 11, 12])


# The runs that twelve_steps_in_the_driver is the reference of: one worker, 12 steps, a checkpoint every 4.
TWELVE_STEPS = dict(num_workers=1, max_steps=12, save_steps=4)


@pytest.fixture(scope="module")
def twelve_steps_in_the_driver(ray_session, small_corpus, tmp_path_factory) -> dict:
    """Rank 0's trace of a TWELVE_STEPS run that nothing interrupts (it trains in the driver)."""
    _, _, _, (steps, _) = _train(tmp_path_factory.mktemp("twelve"), "reference", small_corpus[0], **TWELVE_STEPS)
    return steps[0]


def test_a_failed_run_in_the_driver_resumes_by_name_in_the_driver_exactly(
    twelve_steps_in_the_driver, small_corpus, tmp_path
):
    """A driver run whose loop fails after step 10, submitted again with resume: true, continues from
    the snapshot the driver wrote (latest checkpoint: 8), in the driver, to the losses of a run that did not fail."""
    job = dict(**TWELVE_STEPS, storage_path=str(tmp_path / "runs"))
    with pytest.raises(TrainingFailed, match="injected failure after step 10"):
        _train(tmp_path, "failed", small_corpus[0], diagnostics={"raise_at_step": 10}, experiment_name="failed", **job)
    _, (global_step, _), _, (steps, starts) = _train(
        tmp_path, "failed-again", small_corpus[0], experiment_name="failed", resume=True, **job
    )
    [start] = read_trace(str(tmp_path / "failed-again-trace"))[1][0]
    assert start["pid"] == os.getpid() and [s["resumed_from"] for s in starts[0]] == [8] and global_step == 12
    _assert_same_steps(steps[0], twelve_steps_in_the_driver, [9, 10, 11, 12])


def test_a_second_run_while_one_trains_in_the_driver_goes_to_ray_train_workers(ray_session, tmp_path):
    """Ray Train's utilities are one per process: while one run holds the driver, another (from another thread)
    gets a Ray queue and workers."""
    args = _args(tmp_path, num_workers=1)
    first = launcher.event_queue(args, False, print)
    second = launcher.event_queue(args, False, print)
    try:
        assert isinstance(first, in_process.DriverEvents) and not isinstance(second, in_process.DriverEvents)
    finally:
        launcher.close_event_queue(second)
        launcher.close_event_queue(first)
    third = launcher.event_queue(args, False, print)
    launcher.close_event_queue(third)
    assert isinstance(third, in_process.DriverEvents)


def test_a_run_in_the_driver_refuses_tensor_metrics_as_ray_train_workers_do(tmp_path):
    from ray.train import CheckpointConfig

    utils = in_process.DriverTrainFnUtils(str(tmp_path / "runs"), "tensor-metrics", CheckpointConfig())
    utils.report({"loss": 1.0})
    with pytest.raises(ValueError, match="torch tensors as metrics"):
        utils.report({"loss": torch.tensor(1.0)})
    assert utils._get_last_metrics() == {"loss": 1.0}


def _assert_same_steps(steps: dict, reference: dict, expected: list, loss_rel: float = 0.0) -> None:
    assert sorted(steps) == expected
    for step, record in steps.items():
        assert record["example_ids"] == reference[step]["example_ids"], step
        loss = pytest.approx(reference[step]["loss"], rel=loss_rel, abs=0.0)
        assert record["loss"] == loss, (step, record["loss"], reference[step]["loss"])


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(ray_session, small_corpus, tmp_path):
    _, (global_step, _), out, (steps, starts) = _train(
        tmp_path,
        "killed-saving",
        small_corpus[0],
        num_workers=1,
        num_train_epochs=1,
        max_failures=1,
        diagnostics={"kill_rank": 0, "kill_at_step": 10, "kill_while_saving": True},
    )
    assert [s["resumed_from"] for s in starts[0]] == [
        None,
        5,
    ]  # checkpoint-10 was never registered; checkpoint-5 was resumed
    assert sorted(steps[0]) == list(range(1, global_step + 1))
    # The restarted rank read from its position on: by its first step it had prepared that step and
    # what it prefetches (2 steps, the default, plus one in hand), not the 5 steps before it as well.
    assert steps[0][6]["steps_prepared"] <= 1 + 2 + 1
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-5"))
    assert read_trainer_state(os.path.join(out, "checkpoint-5")).global_step == 5
    assert reloaded.config.n_layer == TINY_GPT2["n_layer"]
    assert not [name for name in os.listdir(out) if "partial" in name or name.startswith(".")]


def test_a_kill_mid_upload_resumes_from_the_previous_checkpoint(
    twelve_steps_in_the_driver, s3_server, s3_proxy, small_corpus, tmp_path
):
    """checkpoint_upload_mode async, storage_path in S3 behind a proxy that holds every request UPLOAD_DELAY_S, so
    one checkpoint's upload takes seconds. Rank 0 waits after step 9 until the upload of checkpoint 8 has begun
    writing its files, and is killed after step 10, in the middle of it. Ray had registered checkpoint 4 only
    (raylm announced it before reporting 8): the restart resumes from it, never from the half-uploaded 8, and
    trains on to the examples and losses of a run that was not killed."""
    proxy, bucket = s3_proxy(delay_s=UPLOAD_DELAY_S), s3_server.bucket()
    release = tmp_path / "checkpoint-8-upload-began"
    watcher = threading.Thread(
        target=_release_once_the_second_checkpoint_is_written, args=(proxy, release), daemon=True
    )
    watcher.start()
    _, (global_step, _), out, (steps, starts) = _train(
        tmp_path,
        "killed",
        small_corpus[0],
        max_failures=1,
        checkpoint_upload_mode="async",
        storage_path=f"s3://{bucket}/runs?{proxy.endpoint_query}",
        diagnostics={"kill_rank": 0, "kill_at_step": 10, "holds": [[9, str(release)]]},
        **TWELVE_STEPS,
    )
    watcher.join()
    assert [s["resumed_from"] for s in starts[0]] == [None, 4] and global_step == 12, starts
    # The reference trains in the driver, the killed run on a Ray Train worker beside Ray's upload thread: their
    # losses have differed in the last float bit (once in CI, 5.6985602 vs 5.6985598 at step 10). The wrong
    # checkpoint would show in the example ids, and in the losses at 1e-2.
    _assert_same_steps(steps[0], twelve_steps_in_the_driver, list(range(1, 13)), loss_rel=1e-6)
    assert read_trainer_state(os.path.join(out, "checkpoint-12")).global_step == 12
    # What the kill left in storage: checkpoint 8's folder, begun (the release came from one of its writes) but
    # short of files that checkpoint 4's folder, which the restart read, has whole.
    first, killed = _checkpoint_folders(proxy)[:2]
    keys = boto3.client("s3", endpoint_url=s3_server.endpoint).list_objects_v2(Bucket=bucket, Prefix="runs/")
    files = {
        folder: {key.rsplit("/", 1)[1] for key in (item["Key"] for item in keys["Contents"]) if f"/{folder}/" in key}
        for folder in (first, killed)
    }
    assert release.exists() and files[killed] < files[first], files
    # The killed worker's local copy of checkpoint 8, which Ray's upload would have deleted, was deleted by the worker
    # that took over on this node.
    killed_pid = starts[0][0]["pid"]
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"raylm-checkpoint-{killed_pid}-*"))


def _checkpoint_folders(proxy) -> list[str]:
    """The names of the checkpoint folders (checkpoint_<time>) that requests through `proxy` named, first seen first."""
    names = (re.search(r"/(checkpoint_[^/?]+)/", request["path"]) for request in proxy.requests())
    return list(dict.fromkeys(name.group(1) for name in names if name))


def _release_once_the_second_checkpoint_is_written(proxy, release, timeout_s: float = 300) -> None:
    """Create `release` once a write (PUT, POST) into the run's second checkpoint folder has been answered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        folders = _checkpoint_folders(proxy)
        if len(folders) > 1 and any(
            request["method"] in ("PUT", "POST") and f"/{folders[1]}/" in request["path"]
            for request in proxy.requests()
        ):
            release.touch()
            return
        time.sleep(0.05)


def test_resume_from_output_dir_checkpoint_continues_steps_and_schedule(uninterrupted, small_corpus, tmp_path):
    _, (total, _), ref_out, (ref_steps, _) = uninterrupted
    resumed = LanguageModelingModel(
        "gpt2", os.path.join(ref_out, "checkpoint-10"), args={"output_dir": str(tmp_path / "resumed"), "num_workers": 2}
    )
    trace = tmp_path / "trace"
    trace.mkdir()
    global_step, _ = resumed.train_model(small_corpus[0], _diagnostics={"trace_dir": str(trace)})
    steps, starts = read_trace(str(trace))
    assert [s["resumed_from"] for s in starts[0]] == [10] and global_step == total
    for rank in (0, 1):
        assert sorted(steps[rank]) == list(range(11, total + 1))
        for step, record in steps[rank].items():
            reference = ref_steps[rank][step]
            assert record["lr"] == pytest.approx(reference["lr"], rel=1e-12), (rank, step)
            assert record["example_ids"] == reference["example_ids"], (rank, step)
            # Exact, as after a worker death: the optimizer, scheduler and RNG state came back with the weights.
            assert record["loss"] == reference["loss"], (rank, step, record["loss"], reference["loss"])


@pytest.mark.parametrize("workers", [1, 2], ids=["in-the-driver", "worker-group"])
def test_early_stopping_on_a_plateau_keeps_the_best_model_and_checkpoint(ray_session, small_corpus, tmp_path, workers):
    """One worker trains in the driver; two on Ray Train's worker group, where every rank must decide to stop
    at the same step (each from the same all-reduced metric), or the other would wait in a collective."""
    # A learning rate of 1e-9 leaves the eval loss flat: no evaluation improves on the first by more than delta.
    model, (global_step, scores), out, (steps, _) = _train(
        tmp_path,
        "plateau",
        small_corpus[0],
        eval_file=small_corpus[1],
        num_workers=workers,
        num_train_epochs=5,
        learning_rate=1e-9,
        scheduler="constant_schedule",
        evaluate_during_training=True,
        evaluate_during_training_steps=3,
        use_early_stopping=True,
        early_stopping_patience=2,
        early_stopping_delta=1e-3,
        save_steps=2,
        save_model_every_epoch=False,
        checkpoints_to_keep=1,
        keep_best_checkpoints=True,
        experiment_name="plateau",
        storage_path=str(tmp_path / "runs"),
    )
    assert global_step == 9  # evaluations at steps 3 (best), 6 and 9 (no improvement): patience 2 reached
    assert scores["global_step"] == [3, 6, 9]
    assert {rank: max(rank_steps) for rank, rank_steps in steps.items()} == {rank: 9 for rank in range(workers)}
    # Checkpoints at steps 2, 3 (the best), 4, 6, 8 and 9 (the end): one kept by score, plus the latest to resume from.
    mirrored = sorted(
        read_trainer_state(os.path.join(out, name)).global_step
        for name in os.listdir(out)
        if name.startswith("checkpoint-")
    )
    in_storage = sorted(
        read_trainer_state(str(path)).global_step
        for path in (tmp_path / "runs" / "plateau").glob("checkpoint_*")
        if path.is_dir()
    )
    assert mirrored == in_storage == [3, 9]
    best = os.path.join(out, "best_model")
    with open(os.path.join(best, "eval_results.txt")) as f:
        saved = dict(line.strip().split(" = ") for line in f)
    assert float(saved["global_step"]) == 3 and float(saved["eval_loss"]) == pytest.approx(
        scores["eval_loss"][0], rel=1e-9
    )
    reloaded = LanguageModelingModel("gpt2", best, args={"output_dir": str(tmp_path / "best-eval")})
    assert isinstance(AutoModelForCausalLM.from_pretrained(best), torch.nn.Module)
    assert reloaded.eval_model(small_corpus[1])["eval_loss"] == pytest.approx(scores["eval_loss"][0], rel=1e-6)


def _loss_on_text(folder: str) -> float:
    from transformers import AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Return the number of items in a container.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("max_failures", [0, 1], ids=["in-the-driver", "worker-group"])
def test_divergence_names_a_checkpoint_whose_weights_give_a_finite_loss(
    ray_session, small_corpus, tmp_path, max_failures
):
    # Warm-up from 0 makes step 1 a no-op; step 2 moves every weight by about 5e29 (Adam steps by about the
    # learning rate), finite weights that overflow float32 in step 3's forward pass. So checkpoint-2 holds
    # finite but ruined weights, and checkpoint-1 is the last good one.
    with pytest.raises(DivergenceError, match=r"at step \d+") as caught:
        _train(
            tmp_path,
            "diverged",
            small_corpus[0],
            num_workers=1,
            max_failures=max_failures,  # a divergence is not retried: the run stops at once either way
            learning_rate=1e30,
            max_grad_norm=0.0,
            scheduler="constant_schedule_with_warmup",
            warmup_steps=2,
            max_steps=8,
            save_steps=1,
            logging_steps=1,
        )
    # Each variant ran where its name says (runs_in_driver decides by max_failures).
    [start] = read_trace(str(tmp_path / "diverged-trace"))[1][0]
    assert (start["pid"] == os.getpid()) == (max_failures == 0), start
    problem = caught.value.problem
    bad_step = int(problem.split("at step ")[1].split(",")[0])
    named = problem.split("the last good checkpoint is ")[1]
    out = tmp_path / "diverged"
    assert bad_step == 3 and named == str(out / "checkpoint-1"), problem
    assert read_trainer_state(named).global_step <= bad_step - 2
    assert math.isfinite(_loss_on_text(named))
    # The checkpoint just before the bad step has finite weights, yet they are what produced the NaN.
    ruined = str(out / f"checkpoint-{bad_step - 1}")
    assert all(torch.isfinite(p).all() for p in AutoModelForCausalLM.from_pretrained(ruined).parameters())
    assert not math.isfinite(_loss_on_text(ruined))


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_divergence_at_that_step(ray_session, small_corpus, tmp_path):
    # The final LayerNorm scaled by 1e37 and the (tied) token embeddings by 1e-36: the logits and the loss stay
    # finite, but the gradients' norm overflows float32 at the first step (and clipping then scales them by 0).
    model = LanguageModelingModel(
        "gpt2",
        None,
        args=_args(tmp_path / "out", num_workers=1, max_steps=3, save_steps=1, logging_steps=1),
        train_files=small_corpus[0],
    )
    with torch.no_grad():
        model.model.transformer.ln_f.weight.fill_(1e37)
        model.model.transformer.ln_f.bias.zero_()
        model.model.transformer.wte.weight.mul_(1e-36)
    with pytest.raises(DivergenceError, match=r"at step 1,") as caught:
        model.train_model(small_corpus[0])
    problem = caught.value.problem
    # Only the starting weights precede step 1: there is no earlier step to name.
    assert "none is known to be good" in problem and "step -1" not in problem and "step 0" not in problem, problem


def test_a_worker_error_reaches_the_user_as_one_paragraph(ray_session, small_corpus, tmp_path):
    with pytest.raises(TrainingFailed) as caught:
        _train(tmp_path, "raises", small_corpus[0], num_workers=1, max_steps=3, diagnostics={"raise_at_step": 2})
    message = str(caught.value)
    # One paragraph that keeps all of the cause, not only its first line.
    assert (
        "\n" not in message and "RuntimeError: injected failure after step 2 because the test asked for it" in message
    ), message
    log_path = message.split("The full traceback is in ")[1].rstrip(".")
    with open(log_path, encoding="utf-8") as f:
        assert "Traceback" in f.read()


def test_a_run_whose_controller_dies_fails_and_frees_its_workers(state_api, small_corpus, tmp_path):
    """The Train controller killed mid-run (as the kernel's OOM killer would): train_model fails in one
    paragraph, and no reservation of its workers is left behind, where the next run would wait for it."""
    import signal
    import threading

    import ray
    from ray.util.state import list_actors

    release, trace = tmp_path / "release", tmp_path / "orphaned-trace" / "rank0.jsonl"
    outcome: dict = {}

    def train() -> None:
        try:
            # max_failures=1: on Ray Train's workers (a one-worker run that cannot restart trains in the
            # driver, with no controller); a dead controller ends the run whatever max_failures allows.
            _train(
                tmp_path,
                "orphaned",
                small_corpus[0],
                num_workers=1,
                max_steps=6,
                max_failures=1,
                diagnostics={"holds": [[2, str(release)]]},
            )
        except BaseException as err:  # asserted below, on the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while (
            '"step": 2' not in (trace.read_text() if trace.exists() else "")
            and thread.is_alive()
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
        [controller] = list_actors(
            address=state_api,
            filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")],
        )
        os.kill(controller.pid, signal.SIGKILL)
        thread.join(timeout=180)
    finally:
        release.touch()
    assert isinstance(outcome.get("error"), TrainingFailed), outcome
    assert "\n" not in str(outcome["error"])
    assert [group["state"] for group in ray.util.placement_group_table().values() if group["state"] != "REMOVED"] == []


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "tolerated, losses, grad_norms, diverged_at",
    [
        (0, [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], -1),
        (0, [1.0, NAN, 2.0, INF], [1.0] * 4, 2),  # fp32/bf16: the first non-finite loss
        (0, [1.0, 2.0, 3.0], [1.0, 5.0, NAN], 3),  # a NaN gradient with a finite loss would make every weight NaN
        (2, [1.0, NAN, INF, 3.0, NAN, NAN, NAN, 4.0], [1.0] * 8, 5),  # fp16: runs of more than 2
        (2, [1.0, 2.0, NAN, 3.0, 4.0], [1.0, INF, 1.0, INF, INF], 2),  # overflowing gradients count towards the run
        (2, [NAN, NAN, 1.0, NAN, NAN], [1.0] * 5, -1),
    ],
)
def test_nonfinite_steps_diverge_at_the_start_of_a_run_longer_than_tolerated(
    tolerated, losses, grad_norms, diverged_at
):
    from raylm.training.divergence import NonfiniteLosses

    tracker = NonfiniteLosses(torch.device("cpu"), tolerated_in_a_row=tolerated)
    for step, (loss, grad_norm) in enumerate(zip(losses, grad_norms), start=1):
        tracker.record(step, torch.tensor(loss), torch.tensor(grad_norm))
    assert int(tracker.first_diverged_step) == diverged_at


def test_an_error_while_the_driver_mirrors_a_checkpoint_stops_the_training(state_api, small_corpus, tmp_path):
    """A file where the step-2 checkpoint's copy must go: the driver's mirror fails while the workers
    wait at step 3. The run is aborted (no Ray Train worker left) and the driver's error is raised."""
    from ray.util.state import list_actors

    out = tmp_path / "blocked"
    out.mkdir()
    (out / "checkpoint-2").write_text("in the way")
    with pytest.raises(NotADirectoryError):
        _train(
            tmp_path,
            "blocked",
            small_corpus[0],
            num_workers=1,
            max_steps=8,
            save_steps=2,
            diagnostics={"holds": [[3, str(tmp_path / "never")]]},
        )
    deadline = time.monotonic() + 60
    while (
        alive := list_actors(
            address=state_api, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        )
    ) and time.monotonic() < deadline:
        time.sleep(1)
    assert not alive, alive
    steps, _ = read_trace(str(tmp_path / "blocked-trace"))
    assert max(steps[0]) <= 3, sorted(steps[0])


@pytest.mark.parametrize("save_best_model", [True, False])
def test_save_best_model_decides_whether_best_model_is_written(tmp_path, save_best_model):
    import pyarrow.fs

    from raylm.console import ProgressLine
    from raylm.data.storage import OutputFolder
    from raylm.training.run_events import TrainingEvents
    from raylm.training.tracking import RunLog

    registered = tmp_path / "ray" / "checkpoint_0"
    registered.mkdir(parents=True)
    AutoModelForCausalLM.from_config(GPT2Config(**TINY_GPT2, vocab_size=100)).save_pretrained(registered)
    args = tiny_args(tmp_path / "out", save_best_model=save_best_model)
    events = TrainingEvents(
        ProgressLine(4, silent=True), OutputFolder(args.output_dir), args, RunLog(args.output_dir, args, "run")
    )
    events.handle(
        {
            "kind": "checkpoint",
            "label": "checkpoint-2",
            "global_step": 2,
            "is_best": True,
            "path": str(registered),
            "filesystem": pyarrow.fs.LocalFileSystem(),
            "metrics": {"eval_loss": 1.5, "global_step": 2},
            "kept_labels": ["checkpoint-2"],
        }
    )
    events.close(True)
    assert (tmp_path / "out" / "checkpoint-2" / "config.json").is_file()
    assert (tmp_path / "out" / "best_model" / "config.json").is_file() == save_best_model


@pytest.mark.parametrize(
    "checkpoint_steps, kept_steps, resumed_from, diverged_at, named",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], None, 5, "ray/3"),  # checkpoint 4's weights gave step 5's NaN
        ([2, 4, 6], [2, 4, 6], None, 5, "ray/2"),
        ([1, 2], [1, 2], None, 3, "ray/1"),
        ([1], [1], None, 2, None),  # checkpoint 1 produced step 2: none is good
        ([1, 2, 3], [3], None, 4, None),  # the good ones were pruned (checkpoints_to_keep)
        ([11, 12], [11, 12], (10, "resumed/checkpoint-10"), 13, "ray/11"),
        ([11], [11], (10, "resumed/checkpoint-10"), 12, "resumed/checkpoint-10"),
    ],
)
def test_the_last_good_checkpoint_is_the_latest_kept_two_steps_before_divergence(
    tmp_path, checkpoint_steps, kept_steps, resumed_from, diverged_at, named
):
    from raylm.console import ProgressLine
    from raylm.data.storage import OutputFolder
    from raylm.training.run_events import TrainingEvents
    from raylm.training.tracking import RunLog

    args = tiny_args(tmp_path / "out", no_save=True)
    events = TrainingEvents(
        ProgressLine(20, silent=True),
        OutputFolder(args.output_dir),
        args,
        RunLog(args.output_dir, args, "run"),
        resumed_from=resumed_from,
    )
    for step in checkpoint_steps:
        events.handle(
            {
                "kind": "checkpoint",
                "label": f"checkpoint-{step}",
                "global_step": step,
                "is_best": False,
                "path": f"ray/{step}",
                "filesystem": None,
                "metrics": {},
                "kept_labels": [f"checkpoint-{s}" for s in kept_steps if s <= step],
            }
        )
    events.handle({"kind": "diverged", "global_step": diverged_at})
    assert events.last_good_checkpoint() == named


@pytest.mark.parametrize("in_a_row, diverged_at", [(24, -1), (25, 3)])
def test_fp16_diverges_after_25_non_finite_steps_in_a_row_from_the_first_of_them(in_a_row, diverged_at):
    """Under fp16 the gradient scaler skips an overflowing step and lowers its scale: 24 in a row are its
    business, the 25th makes it divergence, named at the run's first step (README, Troubleshooting)."""
    from raylm.training.divergence import FP16_NONFINITE_STEPS_TOLERATED, NonfiniteLosses

    tracker = NonfiniteLosses(torch.device("cpu"), tolerated_in_a_row=FP16_NONFINITE_STEPS_TOLERATED)
    tracker.record(1, torch.tensor(2.0), torch.tensor(1.0))
    tracker.record(2, torch.tensor(2.0), torch.tensor(1.0))
    for step in range(3, 3 + in_a_row):
        tracker.record(step, torch.tensor(2.0), torch.tensor(float("inf")))
    assert int(tracker.first_diverged_step) == diverged_at


@pytest.mark.parametrize("scale, diverged", [(2.0**-8, False), (2.0**-9, True)])
def test_fp16_diverges_once_the_loss_scale_is_halved_below_2_to_the_minus_8(scale, diverged):
    """A scaler that keeps halving its scale applies gradients scaled to nothing: below 2^-8 the run has
    diverged, at the current step (the check each logging step makes through _Run._check_finite, on one rank)."""
    from raylm.training.divergence import FP16_NONFINITE_STEPS_TOLERATED, NonfiniteLosses

    nonfinite = NonfiniteLosses(torch.device("cpu"), tolerated_in_a_row=FP16_NONFINITE_STEPS_TOLERATED)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    assert nonfinite.agreed_first_step(scaler, 7, world_size=1) == (7 if diverged else -1)


def test_the_loop_takes_fp16s_divergence_rules_from_its_gradient_scaler(
    ray_session, small_corpus, tmp_path, monkeypatch
):
    """The two rules above, as the loop applies them: with its gradient scaler on (a CPU one, standing in for fp16's
    on a GPU; the patch reaches the loop because one worker that may not restart trains in the driver), weights
    ruined at step 2 make every step from 3 on non-finite and the scaler halves its scale at each. From 2^-4, the
    5th of them (step 7) leaves it below 2^-8: divergence at step 7. A loop that dropped the fp16 tolerance would
    stop at step 3, one that dropped the scale floor at step 27 (the 25th in a row), named from step 3."""
    from raylm.training import parallelism

    monkeypatch.setattr(
        parallelism, "gradient_scaler", lambda fsdp, enabled: torch.amp.GradScaler("cpu", init_scale=2.0**-4)
    )
    with pytest.raises(DivergenceError, match=r"at step 7,"):
        _train(
            tmp_path,
            "scaled",
            small_corpus[0],
            num_workers=1,
            learning_rate=1e30,  # as in test_divergence_names_a_checkpoint_whose_weights_give_a_finite_loss
            max_grad_norm=0.0,
            scheduler="constant_schedule_with_warmup",
            warmup_steps=2,
            max_steps=40,
            save_steps=0,
            logging_steps=1,
        )
    steps, _ = read_trace(str(tmp_path / "scaled-trace"))
    assert max(steps[0]) == 7, sorted(steps[0])


def test_a_maximized_metric_stops_a_learning_run_and_the_checkpoint_switches_are_obeyed(
    ray_session, small_corpus, tmp_path
):
    """early_stopping_metric_minimize=False on an eval_loss that falls: every evaluation after the first is worse,
    so patience 2 stops the run at the third (step 9) with the first as the best. save_eval_checkpoints=False:
    no checkpoint at the evaluation of step 6 (neither a best nor a save step); save_optimizer_and_scheduler=False:
    the checkpoints hold the weights and run state without the optimizer's and scheduler's."""
    model, (global_step, scores), out, _ = _train(
        tmp_path,
        "maximized",
        small_corpus[0],
        eval_file=small_corpus[1],
        num_workers=1,
        max_steps=30,
        evaluate_during_training=True,
        evaluate_during_training_steps=3,
        use_early_stopping=True,
        early_stopping_patience=2,
        early_stopping_metric_minimize=False,
        save_steps=0,
        save_model_every_epoch=False,
        save_eval_checkpoints=False,
        save_optimizer_and_scheduler=False,
    )
    assert scores["eval_loss"][0] > scores["eval_loss"][1] > scores["eval_loss"][2], scores  # it learns
    assert global_step == 9 and scores["global_step"] == [3, 6, 9]
    checkpoints = sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-3", "checkpoint-9"], checkpoints
    for name in checkpoints:
        held = set(os.listdir(os.path.join(out, name)))
        assert {"trainer_state.json", "rng_states.pt", "model.safetensors"} <= held, held
        assert not held & {"optimizer.pt", "scheduler.pt"}, held
    with open(os.path.join(out, "best_model", "eval_results.txt")) as f:
        assert dict(line.strip().split(" = ") for line in f)["global_step"] == "3"


@pytest.mark.parametrize("consider_epochs", [True, False])
def test_end_of_epoch_evaluations_count_for_early_stopping_only_when_asked(
    ray_session, small_corpus, tmp_path, consider_epochs
):
    """Only end-of-epoch evaluations, on a flat eval loss (learning rate 1e-9), patience 1: with
    early_stopping_consider_epochs the second epoch's evaluation stops the run, without it all 4 epochs train."""
    _, (global_step, scores), out, (steps, _) = _train(
        tmp_path,
        "epochs",
        small_corpus[0],
        eval_file=small_corpus[1],
        num_train_epochs=4,
        learning_rate=1e-9,
        scheduler="constant_schedule",
        evaluate_during_training=True,
        evaluate_during_training_steps=10_000,
        evaluate_each_epoch=True,
        use_early_stopping=True,
        early_stopping_patience=1,
        early_stopping_delta=1e-3,
        early_stopping_consider_epochs=consider_epochs,
    )
    per_epoch = max(record["step"] for record in steps[0].values() if record["epoch"] == 0)
    assert scores["epoch"] == ([1, 2] if consider_epochs else [1, 2, 3, 4])
    assert global_step == per_epoch * (2 if consider_epochs else 4)
