"""What logging every step costs a Ray Train worker group: steady tokens/s with logging_steps 1 against logging off.

ray.train.report is a barrier over the ranks that waits for Ray Train's controller to take the previous
report, which it does once per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2 s; raylm's local Ray
lowers it to 0.5 s). This script sets Ray's default, so the figure is a cluster's. Both runs train the same
tiny GPT-2 on 2 workers for the same steps; each rate is over the second half of the run (start-up and
warm-up left out), read from the run's training_log.jsonl. Logging off is one window per half.

    python bench/report_overhead.py --steps 200
"""

from __future__ import annotations

import os
import tempfile

import common


def second_half_steps_per_second(output_dir: str, steps: int) -> float:
    events = {e["global_step"]: e for e in common.train_events(output_dir)}
    middle, last = events[steps // 2], events[steps]
    return (steps - steps // 2) / (last["elapsed_seconds"] - middle["elapsed_seconds"])


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (even)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    options = parser.parse_args()
    # Read by raylm's local Ray when it starts (launcher.ensure_ray): Ray's own default, as on a cluster. --smoke keeps
    # raylm's local 0.5 s: each report of its two steps would wait up to 2 s for a poll.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5" if options.smoke else "2")
    common.quiet_logs()
    common.begin_measuring(options)

    from raylm import LanguageModelingModel

    # --smoke: two steps, a window of one step each half, on one worker, which trains in the driver: the script's
    # path in seconds, not Ray Train's barrier (two worker groups would cost ~20 s of the suite).
    steps, workers = (2, 1) if options.smoke else (options.steps, options.workers)
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        train_file, _ = common.write_corpus(folder, copies=1 if options.smoke else 12, smoke=options.smoke)
        for label, logging_steps in (("logging off", steps // 2), ("logging_steps 1", 1)):
            out = os.path.join(folder, label.replace(" ", "_"))
            args = common.raylm_args(
                out,
                mlm=False,
                config=common.MODEL_CONFIGS[("gpt2", options.size)],
                num_workers=workers,
                max_steps=steps,
                logging_steps=logging_steps,
                use_gpu=False,  # the barrier's cost, not the device's: 2 workers on any machine
            )
            LanguageModelingModel("gpt2", None, args=args, train_files=train_file).train_model(train_file)
            tokens_per_step = args.train_batch_size * workers * common.BLOCK_SIZE
            rates[label] = second_half_steps_per_second(out, steps) * tokens_per_step
    poll = os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    rows = [[label, rate] for label, rate in rates.items()]
    common.print_table(f"{workers} workers, GPT-2 {options.size}, controller poll {poll} s", ["run", "tokens/s"], rows)
    print(
        f"ratio logging_steps 1 / logging off: {rates['logging_steps 1'] / rates['logging off']:.3f} (target >= 0.95)"
    )
    common.print_load("end")


if __name__ == "__main__":
    main()
