"""Shared pieces of the benchmarks: corpora, model sizes, raylm runs, reading their logs, and printing.

Every benchmark measures its baseline in the same run and prints ratios; the absolute numbers
depend on the machine and on whatever else runs on it, so each script also prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BLOCK_SIZE = 128
VOCAB_SIZE = 1000
# tiny: the test suite's models (~0.16M matmul parameters); small: 4 layers x 256 wide (~3.5M); smoke: one layer
# x 32, for a --smoke run where the model's size is what it costs (compiling it).
MODEL_CONFIGS = {
    ("gpt2", "smoke"): {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": BLOCK_SIZE},
    ("gpt2", "tiny"): {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": BLOCK_SIZE},
    ("gpt2", "small"): {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": BLOCK_SIZE},
    ("bert", "tiny"): {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": BLOCK_SIZE,
    },
    ("bert", "small"): {
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "max_position_embeddings": BLOCK_SIZE,
    },
}


def load_average() -> float:
    """The 1-minute load average (what the results are to be read against)."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, timeout_s: float) -> float:
    """Sleep until the 1-minute load average is below max_load (or timeout_s passes); returns the load."""
    deadline = time.monotonic() + timeout_s
    while load_average() >= max_load and time.monotonic() < deadline:
        print(f"# load {load_average():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
    return load_average()


# A --smoke run's corpus: the first paragraphs of each file, enough for a few steps of 16 blocks of 128 tokens.
SMOKE_TRAIN_PARAGRAPHS, SMOKE_TEST_PARAGRAPHS = 200, 20


def write_corpus(folder: str, copies: int = 1, smoke: bool = False) -> tuple[str, str]:
    """(train.txt, test.txt) from the standard library's docstrings; the training text repeated `copies` times.

    smoke: each file cut to its first SMOKE_TRAIN_PARAGRAPHS / SMOKE_TEST_PARAGRAPHS paragraphs first.
    """
    from raylm.data.sample_corpus import write_sample_corpus

    train, test = write_sample_corpus(folder)
    if smoke:
        for path, paragraphs in ((train, SMOKE_TRAIN_PARAGRAPHS), (test, SMOKE_TEST_PARAGRAPHS)):
            with open(path, encoding="utf-8") as f:
                first = f.read().splitlines()[:paragraphs]
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(first) + "\n")
    if copies > 1:
        with open(train, encoding="utf-8") as f:
            text = f.read()
        with open(train, "w", encoding="utf-8") as f:
            f.write(text * copies)
    return train, test


def raylm_args(output_dir: str, **overrides):
    from raylm import LanguageModelingArgs

    args = LanguageModelingArgs()
    args.update_from_dict(
        {
            "output_dir": output_dir,
            "overwrite_output_dir": True,
            "silent": True,
            "vocab_size": VOCAB_SIZE,
            "dataset_type": "text",
            "block_size": BLOCK_SIZE,
            "train_batch_size": 16,
            "learning_rate": 1e-3,
            "save_model_every_epoch": False,
            "save_steps": -1,
            **overrides,
        }
    )
    return args


def train_events(output_dir: str) -> list[dict]:
    """The logged training steps of a run (training_log.jsonl, kind 'train')."""
    with open(os.path.join(output_dir, "training_log.jsonl"), encoding="utf-8") as f:
        return [e for e in map(json.loads, f) if e.get("kind") == "train"]


def steady(events: list[dict], key: str, skip: int = 1) -> float:
    """Median of `key` over the logging windows after the first `skip` (start-up and warm-up)."""
    values = [e[key] for e in events[skip:] if e.get(key) is not None] or [
        e[key] for e in events if e.get(key) is not None
    ]
    return statistics.median(values)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_matmul_peak_flops_per_second(threads: int, size: int = 1024, repeats: int = 10, trials: int = 5) -> float:
    """A measured stand-in for a CPU's peak: the best float32 GEMM FLOP/s of a few trials on `threads` threads.

    CPUs publish no usable peak; the best trial is the one least disturbed by other work on the machine.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best_seconds = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best_seconds = min(best_seconds, time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * size**3 * repeats / best_seconds


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for index, row in enumerate(cells):
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def print_load(label: str) -> None:
    print(
        f"# {label}: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {os.cpu_count()} cores", flush=True
    )


def quiet_logs() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("ray", "ray.data", "ray.train", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def first_line_time(path: str, predicate, timeout_s: float, poll_s: float = 0.01) -> Optional[float]:
    """time.perf_counter() when a JSON line matching predicate first appears in `path` (None on timeout)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if predicate(json.loads(line)):
                            return time.perf_counter()
                    except json.JSONDecodeError:
                        break
        time.sleep(poll_s)
    return None


def argument_parser(description: str) -> argparse.ArgumentParser:
    """Each script's parser, with the --wait-quiet flag they all take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--wait-quiet", type=float, default=0, help="first wait until the 1-minute load is below this")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest run that goes through every part of the script (seconds; the test suite's check that it "
        "still works): its figures mean nothing",
    )
    return parser


def begin_measuring(options: argparse.Namespace) -> None:
    """Wait for a quiet machine when asked, then print the load the figures are measured under."""
    if options.wait_quiet:
        wait_for_quiet(options.wait_quiet, 1200)
    print_load("start")
