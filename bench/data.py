"""Ray Data tokenize + pack throughput against raw `tokenizers` batch encoding, and memory at 1x and 4x corpus.

Throughput: the same text and tokenizer (a 1,000-token byte-level BPE), the same cores (a local
Ray with one CPU per core). The baseline is `Tokenizer.encode_batch` on all lines in this process
(Rust threads on every core); raylm's is its training pipeline (shards -> tokenize -> pack ->
the example store) run to completion, then read back with `materialize()`. The pipeline runs
three times: the first run also starts the Ray worker processes (and their imports), the second
tokenizes again, the third reuses the store (reprocess_input_data=False) and only reads it. Last,
one training rank's read of a whole epoch from the store, in the epoch's shuffled order (what a
worker does on its data thread, collating excepted).

Memory and start-up: each corpus size runs in a fresh process with its own local Ray. It tokenizes
into the example store (a first run's start), then reuses it and counts the epoch from its manifest
(a later run's, or a sweep trial's, start; epoch-based and max_steps runs alike), then a consumer
task reads one epoch of it and collates batches of 16 as a training worker does (epoch_data.py).
Peak RSS of the driver and of that consumer; the corpus grows 4x.

    python bench/data.py
    python bench/data.py --copies 64      # a bigger 1x corpus
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common


def build_tokenizer(text_file: str):
    from raylm.data.tokenization import train_tokenizer

    return train_tokenizer("gpt2", [text_file], common.raylm_args("unused", mlm=False), is_causal=True)


def pipeline(files: list[str], tokenizer, shard_size_mb: float, cache_root: str, rebuild: bool = True):
    """The example store of the files (tokenized into `cache_root`, or reused there unless `rebuild`)."""
    from raylm.data.datasets import ExampleSpec
    from raylm.data.example_store import stored_examples

    spec = ExampleSpec("text", common.BLOCK_SIZE, (), (tokenizer.eos_token_id,))
    return stored_examples(files, tokenizer, spec, shard_size_mb, cache_root, rebuild)


def epoch_steps(store, micro_batch: int = 16):
    """One rank's micro-batches (numpy) of epoch 0 of the store, as a single training worker reads them."""
    from raylm.data.epoch_data import EpochOrder, RankExamples, rank_steps
    from raylm.data.example_store import BlockReader

    examples = RankExamples([BlockReader(store)], EpochOrder(store.block_rows(), seed=42, epoch=0, lanes=micro_batch))
    return rank_steps(examples, 0, micro_batch, micro_batch, rank=0, world_size=1)


def token_counts(dataset) -> tuple[int, int]:
    """(tokens, rows) of a materialized dataset."""
    import pyarrow.compute as pc

    tokens = rows = 0
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=4096):
        tokens += pc.sum(pc.list_value_length(batch["input_ids"])).as_py() or 0
        rows += batch.num_rows
    return tokens, rows


def throughput(train_file: str, shard_size_mb: float) -> None:
    from raylm.cluster import launcher

    with open(train_file, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    tokenizer = build_tokenizer(train_file)
    backend = tokenizer.backend_tokenizer
    started = time.perf_counter()
    raw_tokens = sum(len(e.ids) for e in backend.encode_batch(lines, add_special_tokens=False))
    raw_seconds = time.perf_counter() - started

    launcher.ensure_ray(common.raylm_args("unused", num_workers=1))
    rows = []
    cache_root = os.path.join(os.path.dirname(train_file), "example-store")
    for attempt, rebuild in (("cold", True), ("warm", True), ("stored, reused", False)):
        started = time.perf_counter()
        dataset = pipeline([train_file], tokenizer, shard_size_mb, cache_root, rebuild).dataset().materialize()
        seconds = time.perf_counter() - started
        tokens, n_rows = token_counts(dataset)
        text_tokens = tokens - len(lines)  # less the eos after each line
        rows.append(
            [
                f"raylm pipeline ({attempt})",
                text_tokens / seconds,
                f"{raw_seconds / seconds:.2f}",
                f"{tokens / (n_rows * common.BLOCK_SIZE):.2%}",
            ]
        )
    store = pipeline([train_file], tokenizer, shard_size_mb, cache_root, rebuild=False)
    started = time.perf_counter()
    tokens = sum(len(ids) for step in epoch_steps(store) for batch in step for ids in batch["input_ids"])
    seconds = time.perf_counter() - started
    rows.append(
        [
            "a training rank reads an epoch (shuffled)",
            (tokens - len(lines)) / seconds,
            f"{raw_seconds / seconds:.2f}",
            "",
        ]
    )
    rows.insert(0, ["raw tokenizers encode_batch", raw_tokens / raw_seconds, "1.00", ""])
    size_mb = os.path.getsize(train_file) / 2**20
    common.print_table(
        f"tokenize + pack, {size_mb:.1f} MB, {raw_tokens:,} tokens, shards of {shard_size_mb} MB, "
        f"{os.cpu_count()} cores",
        ["path", "text tokens/s", "ratio to raw", "non-pad in blocks"],
        rows,
    )
    print("targets: ratio >= 0.8; packed text >= 98% non-pad")


def memory_probe(train_file: str, shard_size_mb: float) -> dict:
    """Run in a fresh process (in this one under --smoke): the example store, then one epoch of it read by a collating
    consumer task; peak RSS of both."""
    import ray

    from raylm.cluster import launcher
    from raylm.data.collators import CollatorSpec, collate
    from raylm.data.epoch_data import steps_per_epoch

    tokenizer = build_tokenizer(train_file)
    launcher.ensure_ray(common.raylm_args("unused", num_workers=1))
    spec = CollatorSpec("clm", tokenizer.pad_token_id, None, len(tokenizer), tuple(tokenizer.all_special_ids), 0.15, 42)

    @ray.remote(num_cpus=1)
    def consume(store) -> dict:
        import resource

        tokens = 0
        for step in epoch_steps(store):
            tokens += sum(collate(batch, spec, stream=0)["n_input_tokens"] for batch in step)
        # This module is not importable in a Ray worker: peak RSS (KiB on Linux) read here.
        return {"tokens": tokens, "worker_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    with tempfile.TemporaryDirectory() as cache_root:
        started = time.perf_counter()
        pipeline([train_file], tokenizer, shard_size_mb, cache_root)
        tokenize_seconds = time.perf_counter() - started
        started = time.perf_counter()
        store = pipeline([train_file], tokenizer, shard_size_mb, cache_root, rebuild=False)
        # What an epoch-based run does before step 1 besides: count the schedule from the manifest.
        steps_per_epoch(store.num_examples, 16)
        cached_seconds = time.perf_counter() - started
        result = ray.get(consume.remote(store))
    return {
        **result,
        "driver_peak_mb": common.peak_rss_mb(),
        "tokenize_s": tokenize_seconds,
        "cached_s": cached_seconds,
    }


def memory(copies: int, shard_size_mb: float, smoke: bool) -> None:
    rows = []
    # Each probe is a process of its own, so that its peaks are the probe's alone. --smoke: one probe, in this process
    # (a smoke run's figures are not read), no growth to show.
    for factor in (1,) if smoke else (1, 4):
        if smoke:
            with tempfile.TemporaryDirectory() as corpus_dir:
                probe = memory_probe(common.write_corpus(corpus_dir, copies=copies, smoke=True)[0], shard_size_mb)
        else:
            command = [
                sys.executable,
                __file__,
                "--memory-probe",
                "--copies",
                str(copies * factor),
                "--shard-size-mb",
                str(shard_size_mb),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            probe = json.loads(output.strip().splitlines()[-1])
        rows.append(
            [
                f"{factor}x",
                probe["tokens"],
                probe["driver_peak_mb"],
                probe["worker_peak_mb"],
                probe["tokenize_s"],
                probe["cached_s"],
            ]
        )
    if not smoke:
        rows.append(["growth 1x -> 4x", "", *(f"{rows[1][i] / rows[0][i] - 1:+.1%}" for i in (2, 3, 4, 5))])
    common.print_table(
        "the example store, then an epoch streamed into a collating consumer (memory MB, start-up s)",
        ["corpus", "tokens", "driver peak", "worker peak", "start: tokenize", "start: stored"],
        rows,
    )
    print("targets: memory < 10% growth; start-up with a stored corpus far below tokenizing")


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--copies",
        type=int,
        help="the 1x corpus: the sample corpus repeated this many times (~0.26 MB each; default 32, 1 with --smoke)",
    )
    parser.add_argument("--shard-size-mb", type=float, default=4.0, help="raylm's shard_size_mb (its default)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    common.quiet_logs()
    copies = options.copies or (1 if options.smoke else 32)
    with tempfile.TemporaryDirectory() as corpus_dir:
        train_file, _ = common.write_corpus(corpus_dir, copies=copies, smoke=options.smoke)
        if options.memory_probe:
            print(json.dumps(memory_probe(train_file, options.shard_size_mb)))
            return
        common.begin_measuring(options)
        throughput(train_file, options.shard_size_mb)
    memory(copies, options.shard_size_mb, options.smoke)
    common.print_load("end")


if __name__ == "__main__":
    main()
