"""Runs bench/ scripts with --smoke one after another in this one interpreter: `python tests/bench_smoke_group.py
OUT.json SCRIPT...`.

Each script runs as `python bench/SCRIPT --smoke` would run it (its own `__main__`), its stdout captured;
between them they import torch and start a local Ray once, where each alone would pay ~10 s for that.
OUT.json: {script: {"stdout": what it printed, "error": its traceback, or null, "seconds": how long it ran}}; a
script that fails does not stop the ones after it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import time
import traceback

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def main() -> None:
    out_path, scripts = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, BENCH)  # what `python bench/SCRIPT` puts first: the scripts import `common` and each other
    outputs = {}
    for script in scripts:
        path = os.path.join(BENCH, script)
        sys.argv = [path, "--smoke"]
        printed, error, started = io.StringIO(), None, time.perf_counter()
        try:
            with contextlib.redirect_stdout(printed):
                runpy.run_path(path, run_name="__main__")
        except BaseException:  # argparse's SystemExit too: the test shows the traceback
            error = traceback.format_exc()
        outputs[script] = {"stdout": printed.getvalue(), "error": error, "seconds": time.perf_counter() - started}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(outputs, f)


if __name__ == "__main__":
    main()
