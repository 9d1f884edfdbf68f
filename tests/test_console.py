"""What reaches the console: raylm's own lines (progress, the run summary) and nothing of Ray's; what a run leaves
to look at."""

import contextlib
import io
import logging
import os
import re

import pytest
import ray
from conftest import TINY_GPT2, png_size, read_tensorboard_scalars, read_trace, tiny_args

from raylm import LanguageModelingModel
from raylm.cluster import launcher
from raylm.console import ProgressLine, configure_logging, format_bytes, format_seconds, log_table, logger
from raylm.training import curves, tracking

STEPS, LOGGING_STEPS, EVAL_STEPS = 6, 2, 3
SUMMARY_LABELS = ["steps", "tokens", "wall time", "workers", "eval", "model", "checkpoints", "disk"]
# Lines that only Ray, its workers or Python's warning machinery would print.
FOREIGN_MARKERS = [
    "(RayTrainWorker pid=",
    "(pid=",
    "(autoscaler",
    "(raylet",
    "(SplitCoordinator",
    "(TrainController",
    "Traceback",
    "warning",
    "deprecat",
    "Running Dataset",
    "progress UI",
    "ray.data",
    "INFO ",
]


@pytest.fixture(scope="module")
def small_files(corpus, tmp_path_factory):
    """200 training and 40 held-out paragraphs: enough for STEPS steps, and quick to tokenize and evaluate."""
    folder = tmp_path_factory.mktemp("console_corpus")
    paths = []
    for source, name, count in ((corpus[0], "train.txt", 200), (corpus[1], "test.txt", 40)):
        with open(source, encoding="utf-8") as f:
            (folder / name).write_text("\n".join(f.read().splitlines()[:count]) + "\n", encoding="utf-8")
        paths.append(str(folder / name))
    return paths


@pytest.mark.parametrize("max_failures", [0, 1], ids=["in-the-driver", "worker-group"])
def test_a_short_run_shows_progress_and_a_summary_and_leaves_curves_and_scalars(
    ray_session, small_files, tmp_path, capfd, recwarn, max_failures
):
    """One worker that may not restart trains in the driver; with max_failures=1 it trains on Ray Train's
    worker group, as every cluster run does, whose processes (controller, worker) must stay off the console."""
    train_file, eval_file = small_files
    out, trace = tmp_path / "out", tmp_path / "trace"
    trace.mkdir()
    args = tiny_args(
        out,
        mlm=False,
        vocab_size=500,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        learning_rate=3e-3,
        train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        logging_steps=LOGGING_STEPS,
        evaluate_during_training=True,
        evaluate_during_training_steps=EVAL_STEPS,
        silent=False,
        num_workers=1,
        max_failures=max_failures,
        storage_path=str(tmp_path / "runs"),
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_file)
    capfd.readouterr()  # the console of train_model alone
    global_step, scores = model.train_model(train_file, eval_file=eval_file, _diagnostics={"trace_dir": str(trace)})
    console = capfd.readouterr()
    # Each variant ran where its name says (runs_in_driver decides by max_failures).
    [start] = read_trace(str(trace))[1][0]
    assert (start["pid"] == os.getpid()) == (max_failures == 0), start

    # --- the console -----------------------------------------------------------------------------
    assert global_step == STEPS and scores["global_step"] == [EVAL_STEPS, 2 * EVAL_STEPS]
    assert console.out == "", "raylm writes to stderr only; anything on stdout is someone else's"
    # pytest keeps warnings off the console; outside it they would print there (Ray's deprecations, say).
    assert not recwarn.list, [f"{w.category.__name__} from {w.filename}: {w.message}" for w in recwarn.list]
    lines = console.err.splitlines()
    for marker in FOREIGN_MARKERS:
        assert not [line for line in lines if marker.lower() in line.lower()], (marker, console.err)
    assert all(line.strip() for line in lines), (
        console.err
    )  # no stray blank lines (progress bars off a TTY print those)
    # Not a TTY here, so one line per report: steps 2, 4, 6.
    progress = [line for line in lines if line.startswith("epoch ")]
    assert [re.search(r"\| step (\d+)/6 \|", line).group(1) for line in progress] == ["2", "4", "6"], console.err
    title = lines.index("raylm: Training finished.")
    rows = lines[title + 1 :]
    assert [row[len("raylm:   ") :].split("  ")[0] for row in rows] == SUMMARY_LABELS, console.err
    [value_column] = {re.match(r"raylm:   \S+( \S+)*\s{2,}", row).end() for row in rows}  # values aligned
    summary = {label: row[value_column:] for label, row in zip(SUMMARY_LABELS, rows)}
    assert summary["steps"].startswith(f"{STEPS} (")
    assert (
        summary["eval"]
        == f"eval_loss {scores['eval_loss'][-1]:.4f}, perplexity {scores['perplexity'][-1]:.2f} (step {STEPS})"
    )
    assert summary["model"].startswith(f"{out}; best (step ")
    assert (
        summary["checkpoints"].startswith(f"{out / f'checkpoint-{STEPS}'} and 1 more; ")
        and str(tmp_path / "runs") in summary["checkpoints"]
    )
    # Packed text fills every 64-token block; a causal LM predicts all but the first token of each.
    # max_steps counts optimizer steps: each took 2 accumulated micro-batches of 4 examples.
    assert re.fullmatch(
        rf"{STEPS * 2 * 4 * 64:,} in \([\d,]+/s\), {STEPS * 2 * 4 * 63:,} predicted", summary["tokens"]
    ), summary["tokens"]
    # One worker on raylm's local Ray: every CPU but the data stage's.
    assert summary["workers"] == f"1 x {ray.cluster_resources()['CPU'] - launcher.DATA_STAGE_CPUS:g} CPUs", summary[
        "workers"
    ]
    # Checkpoints hold optimizer state twice over (output_dir and Ray's run folder): the summary says how much.
    mirrored = sum(path.stat().st_size for path in out.glob("checkpoint-*/**/*") if path.is_file())
    assert mirrored > 0 and summary["disk"].startswith(f"{format_bytes(mirrored)} of checkpoints in output_dir, "), (
        summary["disk"]
    )
    assert re.search(
        r", [\d.,]+ [KMG]?B in Ray's run folder; all checkpoints kept \(checkpoints_to_keep=None\)$", summary["disk"]
    ), summary["disk"]
    # The bound: one line per logging_steps report, the summary (a title and at most 8 rows), and at
    # most 2 notices (no GPU, resuming). Anything beyond that is chatter a user did not ask for.
    assert len(lines) <= STEPS // LOGGING_STEPS + 9 + 2, console.err

    # --- what it leaves to look at -----------------------------------------------------------------
    assert png_size(str(out / tracking.TRAINING_CURVES_FILE)) == curves.FIGURE_SIZE_PIXELS == (1000, 700)
    [run_dir] = (out / "runs").iterdir()
    scalars = read_tensorboard_scalars(str(run_dir))
    assert [step for step, _ in scalars["loss"]] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    assert [step for step, _ in scalars["eval_loss"]] == scores["global_step"]
    for (_, logged), returned in zip(scalars["eval_loss"], scores["eval_loss"]):
        assert logged == pytest.approx(returned, rel=1e-6)  # TensorBoard stores float32


def test_raylm_lines_follow_stderr_when_it_is_replaced():
    # Both are set up before stderr is swapped, as a notebook or a caller's redirect would do it.
    configure_logging()
    progress = ProgressLine(total_steps=4)
    replaced = io.StringIO()
    with contextlib.redirect_stderr(replaced):
        logger.info("first")
        progress.update({"global_step": 2, "epoch": 1, "loss": 1.5, "learning_rate": 1e-3, "tokens_per_second": 1234.0})
        progress.close()
    lines = replaced.getvalue().splitlines()
    assert lines[0] == "raylm: first"
    assert (
        lines[1].startswith("epoch 1 | step 2/4 | loss 1.5000 | lr 1.00e-03 | 1,234 tok/s | ETA ") and len(lines) == 2
    )


def test_verbose_false_keeps_raylms_info_lines_off(capsys):
    configure_logging(verbose=False)
    try:
        logger.info("hidden")
        logger.warning("shown")
    finally:
        configure_logging()
    assert capsys.readouterr().err == "raylm: shown\n"
    assert logger.level == logging.INFO


def test_log_table_aligns_the_values(capsys):
    configure_logging()
    log_table("Done.", [("steps", "6"), ("wall time", "3 min 07 s")])
    assert capsys.readouterr().err.splitlines() == [
        "raylm: Done.",
        "raylm:   steps      6",
        "raylm:   wall time  3 min 07 s",
    ]


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59.4, "59 s"), (187, "3 min 07 s"), (7500, "2 h 05 min")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_bad_bytes_past_the_drivers_check_are_one_paragraph_not_a_ray_traceback(
    ray_session, tmp_path, monkeypatch, capfd
):
    """Past the check budget (256 MB; 0 here, so a 1.5 MB file stands for a big one) the driver checks a
    file's first MB only: a bad byte after it is found by a tokenizing task, while the example store is
    built (for train_model and eval_model alike). Shards of 0.5 MB make several, so Ray Data's tasks
    tokenize them (a corpus of one shard is tokenized in the driver, where no task error could arise)."""
    from raylm import DataError
    from raylm.data import sources
    from raylm.data.sources import plan_shards

    monkeypatch.setattr(sources, "_FULL_CHECK_BUDGET_BYTES", 0)
    good_lines = [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(30_000)]
    bad = tmp_path / "big.txt"
    bad.write_bytes(("\n".join(good_lines) + "\n").encode() + b"caf\xe9 au lait\n" + b"more text\n" * 10)
    assert bad.stat().st_size > 1.5 * 2**20
    small = tmp_path / "small.txt"
    small.write_text("\n".join(good_lines[:300]) + "\n")
    args = tiny_args(
        tmp_path / "out",
        mlm=False,
        vocab_size=300,
        config=TINY_GPT2,
        block_size=64,
        num_workers=1,
        shard_size_mb=0.5,
        storage_path=str(tmp_path / "runs"),
    )
    assert len(plan_shards([str(bad)], args.shard_size_mb)) >= 3
    model = LanguageModelingModel("gpt2", None, args=args, train_files=str(small))
    capfd.readouterr()
    offset = len(("\n".join(good_lines) + "\n").encode()) + 3
    for run in (
        lambda: model.train_model(str(bad)),
        lambda: model.eval_model(str(bad)),
        lambda: model.train_model(str(bad), args={"max_steps": 2}),
    ):
        with pytest.raises(DataError) as caught:
            run()
        assert type(caught.value) is DataError
        assert str(caught.value) == (
            f"The text file {str(bad)!r} is not valid UTF-8 (first bad byte at offset {offset}). "
            "Convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`."
        )
    err = capfd.readouterr().err
    for marker in ("ERROR", "Traceback", "RayTaskError", "UserCodeException", "Exception occurred"):
        assert marker not in err, err


def test_nothing_is_written_to_a_terminal_at_exit():
    """Ray's CLI logger (imported with Ray Train) sets colorama to write ESC[0m to a terminal's stdout at exit."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    code = (
        "from raylm import LanguageModelingModel; from raylm.console import configure_logging; "
        "configure_logging(); print('last line')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], stdout=follower, stderr=follower, timeout=120, env={**os.environ, "TERM": "xterm"}
    )
    os.close(follower)
    written = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal's other side is closed: everything was read
            break
        if not chunk:
            break
        written += chunk
    os.close(leader)
    assert done.returncode == 0, written
    assert written.endswith(b"last line\r\n"), written
