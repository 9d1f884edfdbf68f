"""The benchmarks still run: each with --smoke, its smallest size, printing its table (figures not checked).

Benchmarks that no test runs break silently when the code they call changes. A smoke run is seconds and
checks only that the script went through and printed what it reports; the figures come from full runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_SECONDS = 300
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
}


@pytest.mark.parametrize("script", sorted(SMOKE_ROWS))
def test_a_benchmark_runs_its_smoke_size_and_prints_its_table(script):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # The end's load closes the output, or comes just before a summary line that scripts print last.
    assert lines[0].startswith("# start: load average"), done.stdout
    assert any(line.startswith("# end: load average") for line in lines[-2:]), done.stdout
    rows = [line for line in lines if not line.startswith("#")]
    assert len(rows) == len(SMOKE_ROWS[script]), done.stdout
    for row, pattern in zip(rows, SMOKE_ROWS[script]):
        assert re.search(pattern, row), (row, pattern)
