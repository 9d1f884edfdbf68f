"""Time one checkpoint to object storage (moto's S3 server on loopback) against local disk, same model.

A checkpoint folder as a worker writes it (model, tokenizer, AdamW state after one step, trainer state)
for GPT-2 tiny and small, then the two copies a run makes of it:
- upload: the worker's folder into `storage_path` (what Ray Train's checkpoint persistence does, pyarrow's
  copy_files), to a local folder and to s3://;
- mirror: the driver's copy from `storage_path` into `output_dir` (checkpoints.mirror_checkpoint, which
  downloads and publishes), local -> local and s3 -> s3.
moto keeps objects in memory and runs in Python on this machine, so its figures bound a real S3-compatible
server on loopback from above in CPU and below in latency.

    python bench/checkpoint_storage.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import common

REPEATS = 3
MOTO_START_SECONDS = 60


@contextlib.contextmanager
def s3_on_loopback(bucket: str):
    """moto's S3 server on a free loopback port, in a session of its own, with `bucket` made; the AWS_* variables
    point at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MOTO_START_SECONDS
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not answer on {endpoint} within {MOTO_START_SECONDS} s")
                time.sleep(0.2)
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def write_checkpoint(size: str, folder: str) -> int:
    """A worker's checkpoint folder for GPT-2 `size`; returns its bytes."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from raylm.config import LanguageModelingArgs
    from raylm.models.modeling import save_trained
    from raylm.training.checkpoints import TrainerState, write_training_state
    from raylm.training.optim import build_optimizer, build_scheduler

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=common.VOCAB_SIZE, bos_token_id=0, eos_token_id=0, **common.MODEL_CONFIGS[("gpt2", size)])
    )
    tokenizer = GPT2TokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    args = LanguageModelingArgs()
    optimizer = build_optimizer(model, args, torch.device("cpu"))
    model(input_ids=torch.zeros((1, 8), dtype=torch.long), labels=torch.zeros((1, 8), dtype=torch.long)).loss.backward()
    optimizer.step()
    save_trained(model, tokenizer, folder)
    write_training_state(
        folder,
        TrainerState(global_step=1),
        optimizer,
        build_scheduler(optimizer, args, 10),
        None,
        [{"cpu": torch.get_rng_state()}],
    )
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def timed(action, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    options = parser.parse_args()
    import ray.train

    from raylm.data import storage
    from raylm.training.checkpoints import mirror_checkpoint

    common.begin_measuring(options)
    sizes, repeats = (("tiny",), 1) if options.smoke else (("tiny", "small"), REPEATS)
    with (
        s3_on_loopback("raylm-bench"),
        tempfile.TemporaryDirectory(prefix="raylm-bench-ckpt-", ignore_cleanup_errors=True) as work,
    ):
        rows = []
        for size in sizes:
            folder = os.path.join(work, f"{size}-worker")
            total = write_checkpoint(size, folder)
            local_runs, s3_runs = os.path.join(work, f"{size}-runs"), f"s3://raylm-bench/{size}/runs"
            local_out, s3_out = os.path.join(work, f"{size}-out"), f"s3://raylm-bench/{size}/out"
            upload_local = timed(lambda: storage.upload(folder, storage.join(local_runs, "checkpoint_0")), repeats)
            upload_s3 = timed(lambda: storage.upload(folder, storage.join(s3_runs, "checkpoint_0")), repeats)
            mirror_local = timed(
                lambda: mirror_checkpoint(
                    ray.train.Checkpoint(storage.join(local_runs, "checkpoint_0")),
                    storage.join(local_out, "checkpoint-1"),
                ),
                repeats,
            )
            mirror_s3 = timed(
                lambda: mirror_checkpoint(
                    ray.train.Checkpoint(storage.join(s3_runs, "checkpoint_0")), storage.join(s3_out, "checkpoint-1")
                ),
                repeats,
            )
            rows.append((size, total, upload_local, upload_s3, mirror_local, mirror_s3))
        print(f"# median of {repeats}")
        print(
            f"{'model':6} {'MB':>6} {'upload local':>13} {'upload s3':>10} {'ratio':>6} {'mirror local':>13} "
            f"{'mirror s3':>10} {'ratio':>6}"
        )
        for size, total, upload_local, upload_s3, mirror_local, mirror_s3 in rows:
            print(
                f"{size:6} {total / 2**20:6.1f} "
                f"{upload_local:12.3f}s {upload_s3:9.3f}s {upload_s3 / upload_local:6.1f} "
                f"{mirror_local:12.3f}s {mirror_s3:9.3f}s {mirror_s3 / mirror_local:6.1f}"
            )
    common.print_load("end")


if __name__ == "__main__":
    main()
