"""python -m raylm.plot RUN_DIR [RUN_DIR ...] [-o OUT.png]: redraw one run's training curves or compare several.

matplotlib is an optional extra (pip install raylm[plot]); it is only imported when drawing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from raylm.console import report_error, write_result
from raylm.errors import RaylmUserError
from raylm.training.curves import COMPARISON_FILE, TRAINING_CURVES_FILE, plot_run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raylm.plot",
        description="Draw train loss, eval loss and learning rate of raylm runs against steps (PNG).",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="output_dir of a training run (holds training_log.jsonl); several to compare",
    )
    parser.add_argument(
        "-o",
        "--output",
        help=f"PNG to write. Default: RUN_DIR/{TRAINING_CURVES_FILE} for one run, ./{COMPARISON_FILE} for several",
    )
    options = parser.parse_args(argv)
    out_path = options.output or (
        os.path.join(options.run_dirs[0], TRAINING_CURVES_FILE) if len(options.run_dirs) == 1 else COMPARISON_FILE
    )
    try:
        plot_run(options.run_dirs, out_path)
    except RaylmUserError as err:
        report_error(err)
        return 2
    write_result(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
