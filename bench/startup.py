"""Time from `train_model(...)` to the first optimizer step, starting a local Ray included.

A tiny GPT-2 from scratch on the sample corpus (1 worker, 1 epoch, the default path: the corpus is
tokenized into the example store, and the one worker trains in the driver's process). The first optimizer step is when
the worker's per-step trace (the test suite's diagnostics hook, written by the worker right after each
step) shows step 1, watched from a thread. A second train_model in the same process, with Ray
already running, shows what the Ray start costs.

    python bench/startup.py
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import common


def time_to_first_step(train_file: str, output_dir: str) -> tuple[float, float]:
    """(seconds from train_model's call to step 1's log line, seconds for the whole train_model)."""
    from raylm import LanguageModelingModel

    args = common.raylm_args(output_dir, mlm=False, config=common.MODEL_CONFIGS[("gpt2", "tiny")], num_train_epochs=1)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_file)
    trace_dir = tempfile.mkdtemp()
    seen: dict = {}
    trace = os.path.join(trace_dir, "rank0.jsonl")
    watcher = threading.Thread(
        target=lambda: seen.update(at=common.first_line_time(trace, lambda e: e.get("step") == 1, timeout_s=600)),
        daemon=True,
    )
    watcher.start()
    started = time.perf_counter()
    model.train_model(train_file, _diagnostics={"trace_dir": trace_dir})
    finished = time.perf_counter()
    watcher.join()
    return seen["at"] - started, finished - started


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        train_file, _ = common.write_corpus(os.path.join(work, "data"), smoke=options.smoke)
        for label in ("local Ray started by train_model", "Ray already running"):
            first_step, total = time_to_first_step(train_file, os.path.join(work, label.split()[0]))
            rows.append([label, first_step, total])
    common.print_table(
        "train_model -> first optimizer step (s), tiny GPT-2, 1 worker",
        ["case", "first step", "train_model total"],
        rows,
    )
    print("target: first step <= 10 s including the local Ray start (issue 16)")
    common.print_load("end")


if __name__ == "__main__":
    main()
