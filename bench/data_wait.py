"""The share of a training step spent waiting for data when the store is in object storage 30 ms away.

A 1-worker raylm run (trained in the driver's process) whose example store lives in moto's S3 server,
read through a proxy that adds --delay-ms to every request (tests/local_s3.py); the baseline reads the
same way through a proxy that adds nothing. AWS_ENDPOINT_URL names the run's proxy before train_model,
so the driver's reads go through it; each run counts the GETs its proxy answered. The model is sized
for a step of about 50 ms on a small CPU, the store holds a few hundred blocks (64 examples each), and
the run's 16 lanes (the global batch) each move into a new block every 64 steps, so new blocks are read
throughout. Each run builds a store of its own (its own cache_dir in a new bucket): no node cache holds
its blocks, and the bench removes what it cached at its end.

`data_wait_fraction` is what the workers report in training_log.jsonl (docs/performance.md): rank 0's
time blocked on its data over each logging window's wall time. The figure is over the windows after
the first, which waits for the first step's blocks (nothing can be read ahead of the start).

    python bench/data_wait.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid

import common

sys.path.insert(0, os.path.join(common.REPO, "tests"))

BLOCK_SIZE = 64
TRAIN_BATCH_SIZE = 16
# GPT-2 of 2 layers x 96 wide: about 50 ms a step of 16 x 64 tokens on one thread of this machine's CPU (one
# thread: on a shared 2-core machine, a step on two waits for whichever of them was descheduled, 5x slower at times).
MODEL = {"n_layer": 2, "n_embd": 96, "n_head": 4, "n_positions": BLOCK_SIZE}
SMOKE_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": BLOCK_SIZE}
# The sample corpus repeated: about 300 blocks of 64 examples of 64 tokens.
CORPUS_COPIES, SMOKE_CORPUS_COPIES = 16, 1
STEPS, SMOKE_STEPS = 300, 6
LOGGING_STEPS, SMOKE_LOGGING_STEPS = 20, 2


def train_tokenizer(folder: str, train_file: str) -> str:
    """A GPT-2 tokenizer trained on `train_file`, saved in `folder`: every run uses it, so the stores differ only in
    where they live."""
    from raylm import LanguageModelingModel

    args = common.raylm_args(os.path.join(folder, "run"), mlm=False, tokenizer_name=None, block_size=BLOCK_SIZE)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_file)
    model.tokenizer.save_pretrained(folder)
    return folder


def window_waits(events: list[dict]) -> list[tuple[float, float]]:
    """(seconds waiting for data, wall seconds) of each logging window, from its data_wait_fraction and the run's
    elapsed_seconds."""
    windows, elapsed = [], 0.0
    for event in events:
        seconds = event["elapsed_seconds"] - elapsed
        elapsed = event["elapsed_seconds"]
        windows.append((event["data_wait_fraction"] * seconds, seconds))
    return windows


def store_folders(bucket: str, prefix: str) -> list[str]:
    """The stores (folders with a manifest) under s3://bucket/prefix."""
    import boto3

    from raylm.data.example_store import MANIFEST

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [entry["Key"] for page in pages for entry in page.get("Contents", [])]
    return [f"s3://{bucket}/{key[: -len(MANIFEST) - 1]}" for key in keys if key.endswith(f"/{MANIFEST}")]


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=30.0, help="added to every request to the store")
    options = parser.parse_args()
    import boto3
    from local_s3 import MotoServer, S3Proxy

    from raylm import LanguageModelingModel
    from raylm.data.example_store import node_cache_folder, read_store
    from raylm.data.node_cache import default_node_cache_root

    common.quiet_logs()
    model_config = SMOKE_MODEL if options.smoke else MODEL
    steps = SMOKE_STEPS if options.smoke else STEPS
    logging_steps = SMOKE_LOGGING_STEPS if options.smoke else LOGGING_STEPS
    work = tempfile.mkdtemp(prefix="raylm-data-wait-")
    server = MotoServer(os.path.join(work, "moto.log"))
    proxies, stores = [], []
    try:
        os.environ.update(server.client_environment)
        bucket = f"data-wait-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        one_copy, _ = common.write_corpus(os.path.join(work, "tokenizer-corpus"))
        tokenizer = train_tokenizer(os.path.join(work, "tokenizer"), one_copy)
        train_file, _ = common.write_corpus(
            os.path.join(work, "corpus"), SMOKE_CORPUS_COPIES if options.smoke else CORPUS_COPIES
        )
        common.begin_measuring(options)
        waits = {}
        for delay_ms in (0.0, options.delay_ms):
            label = "baseline" if delay_ms == 0 else f"{delay_ms:.0f} ms per request"
            proxy = S3Proxy(server.endpoint, os.path.join(work, f"proxy-{delay_ms}.jsonl"), delay_ms / 1000)
            proxies.append(proxy)
            # A run in the driver's process reads the store with the driver's environment, at the time it reads.
            os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
            out = os.path.join(work, f"run-{delay_ms}")
            prefix = f"delay-{delay_ms:.0f}ms"
            args = common.raylm_args(
                out,
                mlm=False,
                tokenizer_name=tokenizer,
                config=model_config,
                block_size=BLOCK_SIZE,
                train_batch_size=TRAIN_BATCH_SIZE,
                max_steps=steps,
                logging_steps=logging_steps,
                num_workers=1,
                resources_per_worker={"CPU": 1},
                storage_path=os.path.join(work, "ray-runs"),
                cache_dir=f"s3://{bucket}/{prefix}",
                # One shard: the store is built in the driver, whose environment names this run's proxy.
                shard_size_mb=1024,
            )
            LanguageModelingModel("gpt2", None, args=args).train_model(train_file)
            os.environ["AWS_ENDPOINT_URL"] = server.endpoint
            (store,) = store_folders(bucket, prefix)
            stores.append(store)
            store_blocks = len(read_store(store).block_rows())
            events = common.train_events(out)
            windows = window_waits(events)
            after_first = windows[1:] or windows
            waits[label] = sum(w for w, _ in after_first) / sum(s for _, s in after_first)
            requests = proxy.requests()
            gets = sum(request["method"] == "GET" for request in requests)
            ranged = sum(request["method"] == "GET" and request["range"] is not None for request in requests)
            step_ms = 1000 * sum(s for _, s in after_first) / (len(after_first) * logging_steps)
            first_window = windows[0][0] / windows[0][1]
            worst = max(w / s for w, s in after_first)
            print(
                f"{label}: {events[-1]['global_step']} steps of {step_ms:.0f} ms; waiting for data "
                f"{100 * waits[label]:.2f}% of the step time after the first window (worst window "
                f"{100 * worst:.2f}%, first window {100 * first_window:.2f}%); {gets} GETs through its proxy, "
                f"{ranged} of them ranged, from a store of {store_blocks} blocks",
                flush=True,
            )
        common.print_load("end")
        print(
            f"data-wait: {100 * waits[label]:.2f}% of the step time waiting for data at {options.delay_ms:.0f} ms "
            f"per request (baseline {100 * waits['baseline']:.2f}%)"
        )
    finally:
        for proxy in proxies:
            proxy.stop()
        server.stop()
        for folder in stores:
            shutil.rmtree(os.path.join(default_node_cache_root(), node_cache_folder(folder)), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
