"""How long a checkpoint holds training up, `checkpoint_upload_mode` sync against async, to S3.

The same run twice (GPT-2 small, 1 worker, storage_path on moto's S3 server on loopback, a checkpoint
every SAVE_STEPS steps): once uploading synchronously, once asynchronously. The worker reports the
seconds its checkpoints held the loop up in each logging window (`checkpoint_stall_seconds`); with
logging_steps = save_steps each window holds one checkpoint. Also the whole run's wall time.

    python bench/async_checkpoint.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import common
from checkpoint_storage import s3_on_loopback

SAVE_STEPS, SMOKE_SAVE_STEPS = 5, 1
CHECKPOINTS, SMOKE_CHECKPOINTS = 4, 2


def run(
    mode: str, endpoint: str, train_file: str, work: str, size: str, save_steps: int, checkpoints: int, smoke: bool
) -> tuple[list[float], float]:
    """(stall seconds per checkpoint, train_model seconds)."""
    from raylm import LanguageModelingModel

    output_dir = os.path.join(work, mode)
    # max_failures 1: both modes on a Ray Train worker (a sync one-worker run would train in the driver), so only the
    # upload differs; --smoke lets sync train in the driver, saving a worker group's start-up.
    args = common.raylm_args(
        output_dir,
        mlm=False,
        config=common.MODEL_CONFIGS[("gpt2", size)],
        max_steps=save_steps * checkpoints,
        save_steps=save_steps,
        logging_steps=save_steps,
        # The endpoint in the URI, not only in AWS_ENDPOINT_URL: a Ray started before this script (the suite's smoke
        # runs share one) gave its workers the environment of that time.
        storage_path=f"s3://raylm-bench/{mode}?endpoint_override={endpoint.split('://', 1)[1]}&scheme=http",
        checkpoint_upload_mode=mode,
        max_failures=0 if smoke and mode == "sync" else 1,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_file)
    started = time.perf_counter()
    model.train_model(train_file)
    seconds = time.perf_counter() - started
    events = common.train_events(output_dir)
    # A window's report comes before its step's checkpoint, so window k holds checkpoint k-1's stall.
    stalls = [event["checkpoint_stall_seconds"] for event in events[1:]]
    return stalls, seconds


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)
    size, save_steps, checkpoints = (
        ("tiny", SMOKE_SAVE_STEPS, SMOKE_CHECKPOINTS) if options.smoke else ("small", SAVE_STEPS, CHECKPOINTS)
    )
    with (
        s3_on_loopback("raylm-bench") as endpoint,
        tempfile.TemporaryDirectory(prefix="raylm-bench-async-", ignore_cleanup_errors=True) as work,
    ):
        train_file, _ = common.write_corpus(os.path.join(work, "data"), smoke=options.smoke)
        results = {
            mode: run(mode, endpoint, train_file, work, size, save_steps, checkpoints, options.smoke)
            for mode in ("sync", "async")
        }
        rows = [
            [mode, common.fmt(statistics.mean(stalls)), common.fmt(max(stalls)), common.fmt(seconds)]
            for mode, (stalls, seconds) in results.items()
        ]
        common.print_table(
            f"checkpoint stall to S3 (moto), GPT-2 {size}, a checkpoint every {save_steps} steps",
            ["mode", "mean stall (s)", "max stall (s)", "train_model (s)"],
            rows,
        )
        sync, asynchronous = statistics.mean(results["sync"][0]), statistics.mean(results["async"][0])
        print(f"async / sync stall per checkpoint: {asynchronous / max(sync, 1e-9):.2f}")
        common.print_load("end")


if __name__ == "__main__":
    main()
