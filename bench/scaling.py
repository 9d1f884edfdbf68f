"""Weak scaling 1 -> 2 workers: the same per-worker batch, 1 CPU per worker (on CPU) or 1 GPU per worker.

Each run trains a GPT-2 for one epoch of a corpus large enough for a few hundred steps; the
figure is the median global tokens/s of the logging windows after the first (start-up), from the
run's training_log.jsonl. Efficiency = tokens/s with 2 workers / (2 x tokens/s with 1).
The data is tokenized into Ray's object store before the workers start (the epoch path), so the
workers do not share their cores with tokenization while they are timed.

    python bench/scaling.py
    python bench/scaling.py --size small --copies 24
"""

from __future__ import annotations

import os
import tempfile

import common


def global_tokens_per_second(
    train_file: str, output_dir: str, size: str, workers: int, use_gpu: bool, logging_steps: int
) -> tuple[float, float]:
    from raylm import LanguageModelingModel

    args = common.raylm_args(
        output_dir,
        mlm=False,
        config=common.MODEL_CONFIGS[("gpt2", size)],
        num_train_epochs=1,
        num_workers=workers,
        logging_steps=logging_steps,
        use_gpu=use_gpu,
        bf16=use_gpu,
        fp16=False,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_file)
    model.train_model(train_file)
    events = common.train_events(output_dir)
    return common.steady(events, "tokens_per_second"), common.steady(events, "data_wait_fraction")


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument(
        "--copies", type=int, default=12, help="the sample corpus repeated this many times (~600 steps of 16 at 12)"
    )
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)
    import torch

    use_gpu = torch.cuda.is_available()
    counts = [1, 2] if not use_gpu or torch.cuda.device_count() >= 2 else [1]
    from raylm.cluster import launcher

    # One local Ray for both runs, sized (as train_model would size it) for the larger one.
    launcher.ensure_ray(common.raylm_args("unused", num_workers=max(counts)))
    # --smoke: the smoke corpus once (a few steps an epoch), a window every step.
    copies, logging_steps = (1, 1) if options.smoke else (options.copies, 50 if options.size == "tiny" else 10)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        train_file, _ = common.write_corpus(os.path.join(work, "data"), copies=copies, smoke=options.smoke)
        for workers in counts:
            tokens_per_second, wait = global_tokens_per_second(
                train_file, os.path.join(work, f"w{workers}"), options.size, workers, use_gpu, logging_steps
            )
            rows.append([workers, tokens_per_second, tokens_per_second / workers, f"{wait:.2%}"])
    if len(rows) == 2:
        rows.append(["efficiency", "", f"{rows[1][1] / (2 * rows[0][1]):.2f}", ""])
    common.print_table(
        f"weak scaling, GPT-2 {options.size}, batch 16 per worker, {'1 GPU' if use_gpu else '1 CPU'} per worker",
        ["workers", "global tokens/s", "per worker", "data wait (rank 0)"],
        rows,
    )
    print("target: efficiency >= 0.85" + ("" if len(counts) == 2 else " (needs 2 GPUs: not measured)"))
    common.print_load("end")


if __name__ == "__main__":
    main()
