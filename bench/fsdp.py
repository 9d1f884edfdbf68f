"""parallel_strategy fsdp vs ddp, 2 workers of 1 CPU: per-rank parameter memory, peak memory and step time.

The same GPT-2 job runs under each strategy; the figures are rank 0's from the run's training_log.jsonl
(the ranks are alike): param_memory_mb (this rank's parameters: its shards under FSDP), peak_memory_mb
(on CPU the worker process's peak resident set, torch and the interpreter included, so the share that
sharding saves is the parameters, gradients and AdamW state: ~4 x the parameters' bytes / 2), and the
median seconds per optimizer step over the logging windows after the first (start-up, and the ranks'
first all-gathers).

    python bench/fsdp.py
    python bench/fsdp.py --size tiny --steps 60
"""

from __future__ import annotations

import os
import statistics
import tempfile

import common


def run(train_file: str, output_dir: str, size: str, strategy: str, steps: int, workers: int = 2) -> dict:
    from raylm import LanguageModelingModel

    args = common.raylm_args(
        output_dir,
        mlm=False,
        config=common.MODEL_CONFIGS[("gpt2", size)],
        max_steps=steps,
        num_workers=workers,
        logging_steps=max(steps // 5, 1),
        parallel_strategy=strategy,
        fp16=False,
        resources_per_worker={"CPU": 1},
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=train_file)
    model.train_model(train_file)
    events = common.train_events(output_dir)
    step_seconds = [
        (b["elapsed_seconds"] - a["elapsed_seconds"]) / (b["global_step"] - a["global_step"])
        for a, b in zip(events, events[1:])
    ]
    return {
        "param_mb": events[-1]["param_memory_mb"],
        "peak_mb": events[-1]["peak_memory_mb"],
        "step_seconds": statistics.median(step_seconds[1:] or step_seconds),
        "loss": events[-1]["loss"],
    }


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=30)
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)
    from raylm.cluster import launcher

    launcher.ensure_ray(common.raylm_args("unused", num_workers=2))
    # --smoke: two steps, one window after the first.
    size, steps = ("tiny", 2) if options.smoke else (options.size, options.steps)
    found = {}
    with tempfile.TemporaryDirectory() as work:
        train_file, _ = common.write_corpus(os.path.join(work, "data"), copies=2, smoke=options.smoke)
        for strategy in ("ddp", "fsdp"):
            # --smoke: DDP on one worker, in the driver (the suite's FSDP tests run DDP's two workers), saving a worker
            # group's start-up.
            workers = 1 if options.smoke and strategy == "ddp" else 2
            found[strategy] = run(train_file, os.path.join(work, strategy), size, strategy, steps, workers)
            print(f"# {strategy} done", flush=True)
    ddp, fsdp = found["ddp"], found["fsdp"]
    rows = [
        [s, found[s]["param_mb"], found[s]["peak_mb"], found[s]["step_seconds"], found[s]["loss"]]
        for s in ("ddp", "fsdp")
    ]
    rows.append(
        [
            "fsdp / ddp",
            f"{fsdp['param_mb'] / ddp['param_mb']:.3f}",
            f"{fsdp['peak_mb'] / ddp['peak_mb']:.3f}",
            f"{fsdp['step_seconds'] / ddp['step_seconds']:.2f}",
            "",
        ]
    )
    common.print_table(
        f"FSDP2 vs DDP, GPT-2 {size}, {'DDP 1 worker, FSDP 2' if options.smoke else '2 workers'} x 1 CPU (gloo), "
        "batch 16 per worker, "
        f"block {common.BLOCK_SIZE}, {steps} steps; rank 0",
        ["strategy", "param MB per rank", "peak RSS MB per rank", "s per step", "last loss"],
        rows,
    )
    common.print_load("end")


if __name__ == "__main__":
    main()
