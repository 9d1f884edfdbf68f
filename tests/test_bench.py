"""The benchmarks still run: each with --smoke, its smallest size, printing its table (figures not checked).

Benchmarks that no test runs break silently when the code they call changes. A smoke run is seconds and
checks only that the script went through and printed what it reports; the figures come from full runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A figure as common.fmt and the scripts print it: 0.0886, 1.62, 21,030, 99.10%, +0.6%, 1e-05.
NUM = r"[+-]?[\d.,]+(?:e[+-]\d+)?%?"
SKIPPED = r"skipped \(--smoke\)"


def table(header: list[str], *rows: str) -> list[str]:
    """The lines of a common.print_table: its header, its rule, then one pattern per row (matched from its start)."""
    return [r"^\s*" + r"\s+".join(map(re.escape, header)) + "$", r"^[- ]+$", *(rf"^\s*{row}\s*$" for row in rows)]


def figures(count: int) -> str:
    return r"\s+".join([NUM] * count)


# script -> the lines its --smoke run must print, one per row of its table.
SMOKE_ROWS = {
    "mlm_logits.py": [
        r"^BERT vocab 8000, hidden 128, 2 layers, batch 8x128: every position \d+ ms, masked only \d+ ms"
    ],
    "data_scale.py": [
        r"^1 workers on 1 node\(s\): rank read/share [\d.]+x \(was [\d.]+x\), node read/share [\d.]+x",
        r"^8 workers on 1 node\(s\): rank read/share",
        r"^64 workers on 8 node\(s\): rank read/share",
        r"^512 workers on 64 node\(s\): rank read/share .* imbalance \d+ example\(s\) per step",
        r"^shuffle: batch spread [\d.]+ of a full shuffle's",
        r"^data-scale: worst node read [\d.]+x its share \(\d+ workers\)$",
    ],
    "read_ahead.py": [
        rf"^{mode}: \d+ blocks in [\d.]+ s, [\d.]+ blocks/s; \d+ GETs, \d+ HEADs; at most \d+ in flight$"
        for mode in (
            "sequential",
            r"read-ahead \d+ blocks",
            r"read-ahead \d+ blocks, no added delay \(what loopback S3 serves\)",
            r"read-ahead \d+ blocks, a node's first rank",
            r"read-ahead \d+ blocks, a node's second rank",
        )
    ]
    + [r"^read-ahead: [\d.]+x the sequential read rate \(30 ms per request\)$"],
    "data_wait.py": [
        rf"^{label}: \d+ steps of \d+ ms; waiting for data [\d.]+% of the step time after the first window "
        r"\(worst window [\d.]+%, first window [\d.]+%\); \d+ GETs through its proxy, \d+ of them ranged, "
        r"from a store of \d+ blocks$"
        for label in ("baseline", "30 ms per request")
    ]
    + [r"^data-wait: [\d.]+% of the step time waiting for data at 30 ms per request \(baseline [\d.]+%\)$"],
    "packing.py": [
        r"^gpt2 tiny, batch 8x128, [\d.]+ documents per block: without the mask [\d.]+ ms, with it [\d.]+ ms",
        r"^bert tiny, batch 8x128, [\d.]+ documents per block: without the mask [\d.]+ ms, with it [\d.]+ ms",
    ],
    "async_checkpoint.py": [
        *table(
            ["mode", "mean stall (s)", "max stall (s)", "train_model (s)"],
            rf"sync\s+{figures(3)}",
            rf"async\s+{figures(3)}",
        ),
        rf"^async / sync stall per checkpoint: {NUM}$",
    ],
    "checkpoint_storage.py": [
        r"^model\s+MB\s+upload local\s+upload s3\s+ratio\s+mirror local\s+mirror s3\s+ratio$",
        rf"^tiny\s+{NUM}(?:\s+{NUM}s\s+{NUM}s\s+{NUM}){{2}}$",
    ],
    "compile.py": table(
        ["model", "eager s/step", "compiled s/step", "speed-up", "compile s", "graphs", "recompilations"],
        rf"gpt2-smoke \(CLM\)\s+{figures(4)}\s+\d+\s+\d+",
    ),
    "data.py": [
        *table(
            ["path", "text tokens/s", "ratio to raw", "non-pad in blocks"],
            rf"raw tokenizers encode_batch\s+{NUM}\s+1\.00",
            *(rf"raylm pipeline \({run}\)\s+{figures(3)}" for run in ("cold", "warm", r"stored, reused")),
            rf"a training rank reads an epoch \(shuffled\)\s+{figures(2)}",
        ),
        r"^targets: ratio >= 0.8",
        *table(
            ["corpus", "tokens", "driver peak", "worker peak", "start: tokenize", "start: stored"],
            rf"1x\s+{figures(5)}",
        ),
        r"^targets: memory < 10% growth",
    ],
    "electra_peer.py": table(
        ["tool", "epochs", "steps", "train s", "generator loss", "disc loss", "prior loss", "precision", "recall"]
        + ["F1", "AUC"],
        rf"Simple Transformers\s+1(?:\s+{SKIPPED}){{9}}",
        rf"raylm\s+1\s+{figures(9)}",
    ),
    "electra_seed.py": table(
        ["variant", "epoch", "steps", "generator loss", "unigram CE", "disc loss", "prior loss", "precision", "recall"]
        + ["F1", "AUC"],
        *(rf"{variant}\s+1\s+\d+\s+{NUM} -> {figures(8)}" for variant in ("seed", "uniform")),
    ),
    "fsdp.py": table(
        ["strategy", "param MB per rank", "peak RSS MB per rank", "s per step", "last loss"],
        rf"ddp\s+{figures(4)}",
        rf"fsdp\s+{figures(4)}",
        rf"fsdp / ddp\s+{figures(3)}",
    ),
    "fsdp_memory.py": table(
        ["phase", "old rank 0", "old rank 1", "new rank 0", "new rank 1", "new/old rank 0", "new/old rank 1"],
        *(rf"{phase}(?:\s+{NUM}){{4}}(?:\s+(?:{NUM}|n/a)){{2}}" for phase in ("start-up", "resume")),
    ),
    "peer.py": [
        *table(
            ["shape", "model", "raylm dataset_type", "raylm steps as", "raylm init", "raylm separator"]
            + ["raylm worker CPUs", "seed", "ST steps", "raylm steps", "ST s", "raylm s", "ratio", "ST tok/s"]
            + ["raylm tok/s", "tok/s ratio", "ST ppl", "raylm ppl", "ppl ratio", "raylm ppl after eos"]
            + ["ratio after eos"],
            *(
                rf"short\s+{model}\s+simple\s+epoch\s+own\s+on\s+default\s+42\s+{SKIPPED}\s+\d+\s+{SKIPPED}\s+{NUM}"
                rf"(?:\s+{SKIPPED}){{2}}\s+{NUM}\s+{SKIPPED}\s+{SKIPPED}\s+{NUM}\s+{SKIPPED}\s+{NUM}\s+{SKIPPED}"
                for model in ("gpt2",)
            ),
        ),
        r"^targets: ratio <= 0.8",
    ],
    "report_overhead.py": [
        *table(["run", "tokens/s"], rf"logging off\s+{NUM}", rf"logging_steps 1\s+{NUM}"),
        rf"^ratio logging_steps 1 / logging off: {NUM} \(target >= 0.95\)$",
    ],
    "scaling.py": [
        *table(
            ["workers", "global tokens/s", "per worker", "data wait (rank 0)"],
            rf"1\s+{figures(3)}",
            rf"2\s+{figures(3)}",
            rf"efficiency\s+{NUM}",
        ),
        r"^target: efficiency >= 0.85$",
    ],
    "startup.py": [
        *table(
            ["case", "first step", "train_model total"],
            rf"local Ray started by train_model\s+{figures(2)}",
            rf"Ray already running\s+{figures(2)}",
        ),
        r"^target: first step <= 10 s including the local Ray start",
    ],
    "throughput.py": [
        *table(
            ["model", "params", "bare", "raylm", "raylm useful", "ratio (useful/bare)", "data wait", "MFU bare"]
            + ["MFU raylm"],
            *(rf"{model}-tiny\s+{NUM}M\s+{figures(7)}" for model in ("gpt2", "bert")),
        ),
        r"^targets: ratio >= 0.95",
    ],
}


# The scripts run in one interpreter, one after another (tests/bench_smoke_group.py), which imports torch and starts a
# local Ray once for them all instead of ~10 s for each. startup.py comes first, so that its first run is the one that
# starts Ray; the scripts that point the driver at an S3 server of their own come last (their workers, started with the
# suite's S3 credentials in their environment, are given the endpoint in the storage URI).
SMOKE_ORDER = [
    "startup.py",
    "compile.py",
    "data.py",
    "fsdp.py",
    "fsdp_memory.py",
    "report_overhead.py",
    "scaling.py",
    "throughput.py",
    "electra_seed.py",
    "electra_peer.py",
    "peer.py",
    "mlm_logits.py",
    "packing.py",
    "data_scale.py",
    "read_ahead.py",
    "data_wait.py",
    "checkpoint_storage.py",
    "async_checkpoint.py",
]
GROUP_SECONDS = 900


@pytest.fixture(scope="module")
def smoke_outputs(s3_server, tmp_path_factory) -> dict:
    """{script: {"stdout", "error"}} of every script's smoke run. s3_server: its credentials are in this process's
    environment, which the group's Ray workers inherit."""
    out = tmp_path_factory.mktemp("bench-smokes") / "outputs.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bench_smoke_group.py"), str(out), *SMOKE_ORDER],
        capture_output=True,
        text=True,
        timeout=GROUP_SECONDS,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", sorted(SMOKE_ROWS))
def test_a_benchmark_runs_its_smoke_size_and_prints_its_table(script, smoke_outputs):
    output = smoke_outputs[script]
    assert output["error"] is None, output["error"]
    stdout = output["stdout"]
    lines = stdout.splitlines()
    # The end's load closes the output, or comes just before a summary line that scripts print last.
    assert lines[0].startswith("# start: load average"), stdout
    assert any(line.startswith("# end: load average") for line in lines[-2:]), stdout
    # A table's rows: its header and rule, and each line of figures (a blank line sets a table apart).
    rows = [line for line in lines if line.strip() and not line.startswith("#")]
    assert len(rows) == len(SMOKE_ROWS[script]), stdout
    for row, pattern in zip(rows, SMOKE_ROWS[script]):
        assert re.search(pattern, row), (row, pattern)


def test_every_benchmark_has_a_smoke_run():
    scripts = {path.name for path in (REPO / "bench").glob("*.py") if not path.name.startswith("_")}
    assert scripts - {"common.py"} == set(SMOKE_ROWS)
    assert sorted(SMOKE_ORDER) == sorted(SMOKE_ROWS)


def test_the_gpu_check_script_parses():
    """bench/gpu_check.sh runs on a GPU machine only: here, bash reads it through without running it."""
    done = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
