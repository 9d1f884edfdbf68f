"""torch_compile vs eager, 1 worker: steady seconds per step, compile seconds and recompilations, for CLM (GPT-2) and
MLM (BERT).

Each model trains the same steps eagerly and compiled (inductor, dynamic shapes). Step time is the
median over the logging windows after the first (the first holds the compile); compile_seconds and
recompilations are the compiled run's own report (torch_compile.CompileStats) at its last window.

    python bench/compile.py
    python bench/compile.py --size tiny --steps 100
"""

from __future__ import annotations

import os
import statistics
import tempfile

import common


def run(model_type: str, size: str, train_file: str, output_dir: str, steps: int, compiled: bool) -> dict:
    from raylm import LanguageModelingModel

    args = common.raylm_args(
        output_dir,
        mlm=model_type == "bert",
        config=common.MODEL_CONFIGS[(model_type, size)],
        max_steps=steps,
        logging_steps=max(steps // 5, 1),
        torch_compile=compiled,
        fp16=False,
    )
    model = LanguageModelingModel(model_type, None, args=args, train_files=train_file)
    model.train_model(train_file)
    events = common.train_events(output_dir)
    step_seconds = [
        (b["elapsed_seconds"] - a["elapsed_seconds"]) / (b["global_step"] - a["global_step"])
        for a, b in zip(events, events[1:])
    ]
    return {
        "step_seconds": statistics.median(step_seconds[1:] or step_seconds),
        "compile_seconds": events[-1].get("compile_seconds"),
        "recompilations": events[-1].get("recompilations"),
        "graphs": events[-1].get("compiled_graphs"),
    }


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=50)
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)
    import torch

    # --smoke: one model of one layer (inductor's compile is most of the time), two steps: a window after the compiling
    # one.
    models, size, steps = (
        (["gpt2"], "smoke", 2) if options.smoke else (options.models.split(","), options.size, options.steps)
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        train_file, _ = common.write_corpus(os.path.join(work, "data"), copies=2, smoke=options.smoke)
        for model_type in models:
            eager = run(model_type, size, train_file, os.path.join(work, f"{model_type}-eager"), steps, compiled=False)
            compiled = run(
                model_type, size, train_file, os.path.join(work, f"{model_type}-compiled"), steps, compiled=True
            )
            rows.append(
                [
                    f"{model_type}-{size} ({'CLM' if model_type == 'gpt2' else 'MLM'})",
                    eager["step_seconds"],
                    compiled["step_seconds"],
                    f"{eager['step_seconds'] / compiled['step_seconds']:.2f}",
                    compiled["compile_seconds"],
                    compiled["graphs"],
                    compiled["recompilations"],
                ]
            )
            print(f"# {model_type} done", flush=True)
    common.print_table(
        f"torch_compile vs eager, 1 worker on {device}, batch 16, block {common.BLOCK_SIZE}, {steps} steps",
        ["model", "eager s/step", "compiled s/step", "speed-up", "compile s", "graphs", "recompilations"],
        rows,
    )
    common.print_load("end")


if __name__ == "__main__":
    main()
