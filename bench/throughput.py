"""raylm end to end (Ray Data ingest + the worker loop, 1 worker) against a bare PyTorch loop, same model and settings.

The bare loop trains the same freshly initialised model with the same optimizer (raylm's
build_optimizer), loss (forward_loss_sums), gradient clipping, batch and precision, over
pre-tokenized, pre-collated tensors held in memory, on as many threads as a 1-CPU Ray worker gets
(one). It runs before and after raylm; its mean is the baseline. raylm's figures come from the
run's own logging windows (training_log.jsonl), the first window (start-up) left out.

    python bench/throughput.py                      # tiny and small GPT-2 and BERT on this machine
    python bench/throughput.py --sizes small --steps 400
"""

from __future__ import annotations

import statistics
import tempfile
import time

import common


def bare_loop_tokens_per_second(
    model, batches: list[dict], objective: str, args, device, steps: int, warmup_steps: int = 3
) -> float:
    """Training tokens/s of a plain loop over ready tensors (every token is real: packed full blocks)."""
    import torch

    from raylm.models.modeling import combine_loss, forward_loss_sums
    from raylm.training.optim import build_optimizer

    model = model.to(device).train()
    optimizer = build_optimizer(model, args, device)
    use_amp = device.type == "cuda"
    tokens = 0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, tokens = time.perf_counter(), 0
        batch = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batches[step % len(batches)].items()
        }
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = combine_loss(
                forward_loss_sums(model, batch, objective),
                batch["n_targets"],
                batch["n_input_tokens"],
                args.discriminator_loss_weight,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["n_input_tokens"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def pre_collated_batches(model_wrapper, train_file: str, batch_size: int) -> list[dict]:
    """The training text tokenized, packed into full blocks and collated (masks drawn once), as in-memory tensors."""
    import numpy as np

    from raylm.data.collators import collate
    from raylm.data.datasets import ExampleSpec, packed_examples
    from raylm.data.tokenization import document_layout
    from raylm.models.modeling import CLM

    tokenizer = model_wrapper.tokenizer
    prefix, suffix = document_layout(
        tokenizer, model_wrapper.objective == CLM, True, model_wrapper.args.document_separator
    )
    with open(train_file, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    blocks = [
        b
        for b in packed_examples(ids, ExampleSpec("text", common.BLOCK_SIZE, tuple(prefix), tuple(suffix)))
        if len(b) == common.BLOCK_SIZE
    ]
    spec = model_wrapper._collator_spec(model_wrapper.args)
    batches = []
    for start in range(0, len(blocks) - batch_size + 1, batch_size):
        rows = {
            "input_ids": np.array(blocks[start : start + batch_size]),
            "example_id": np.arange(start, start + batch_size),
        }
        batches.append(collate(rows, spec, stream=0))
    return batches


def run_raylm(model_type: str, size: str, train_file: str, steps: int, log_every: int, use_gpu: bool) -> dict:
    from raylm import LanguageModelingModel

    with tempfile.TemporaryDirectory() as out:
        args = common.raylm_args(
            out,
            config=common.MODEL_CONFIGS[(model_type, size)],
            mlm=model_type == "bert",
            max_steps=steps,
            logging_steps=log_every,
            bf16=use_gpu,
            fp16=False,
        )
        model = LanguageModelingModel(model_type, None, args=args, train_files=train_file)
        model.train_model(train_file)
        events = common.train_events(out)
    # Padded tokens/s from the step rate (every example is at most block_size long).
    rates = [
        (b["global_step"] - a["global_step"]) / (b["elapsed_seconds"] - a["elapsed_seconds"])
        for a, b in zip(events, events[1:])
    ]
    return {
        "useful_tokens_per_second": common.steady(events, "tokens_per_second"),
        "tokens_per_second": statistics.median(rates[1:] or rates) * args.train_batch_size * common.BLOCK_SIZE,
        "data_wait_fraction": common.steady(events, "data_wait_fraction"),
        "model_flops_per_second": common.steady(events, "model_flops_per_second"),
        "mfu": common.steady(events, "mfu") if "mfu" in events[-1] else None,
    }


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: 300 tiny, 80 small)")
    parser.add_argument(
        "--copies",
        type=int,
        default=12,
        help="the sample corpus repeated this many times (one epoch must outlast the run)",
    )
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)

    import torch

    from raylm import LanguageModelingModel
    from raylm.models.flops import model_training_flops_per_token, peak_flops_per_second

    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    threads = 1  # a Ray worker with 1 CPU runs torch on one thread (OMP_NUM_THREADS=1)
    torch.set_num_threads(threads)
    # --smoke: one small GEMM for the CPU's peak; tiny models, two steps each (a window after the first).
    gemm = {"size": 128, "repeats": 1, "trials": 1} if options.smoke else {}
    sizes, copies = (["tiny"], 1) if options.smoke else (options.sizes.split(","), options.copies)
    peak = (
        peak_flops_per_second(device, torch.bfloat16)
        if use_gpu
        else common.cpu_matmul_peak_flops_per_second(threads, **gemm)
    )
    peak_label = "dense bf16 datasheet peak" if use_gpu else f"measured fp32 {threads}-thread GEMM peak"
    print(
        f"# device {torch.cuda.get_device_name() if use_gpu else 'cpu'}; MFU against the {peak_label}: "
        f"{common.fmt(peak / 1e9)} GFLOP/s"
    )

    rows = []
    with tempfile.TemporaryDirectory() as corpus_dir:
        train_file, _ = common.write_corpus(corpus_dir, copies=copies, smoke=options.smoke)
        for model_type in options.models.split(","):
            for size in sizes:
                steps = 2 if options.smoke else options.steps or (300 if size == "tiny" else 80)
                with tempfile.TemporaryDirectory() as out:
                    args = common.raylm_args(
                        out, config=common.MODEL_CONFIGS[(model_type, size)], mlm=model_type == "bert"
                    )
                    wrapper = LanguageModelingModel(model_type, None, args=args, train_files=train_file)
                batches = pre_collated_batches(wrapper, train_file, args.train_batch_size)
                flops_per_token = model_training_flops_per_token(
                    wrapper.model, common.BLOCK_SIZE, mlm_probability=args.mlm_probability
                )
                initial = {k: v.clone() for k, v in wrapper.model.state_dict().items()}

                def bare() -> float:
                    wrapper.model.load_state_dict(initial)
                    return bare_loop_tokens_per_second(wrapper.model, batches, wrapper.objective, args, device, steps)

                before = bare()
                # Logging windows of several seconds: a report costs up to Ray's 2 s controller poll (see
                # training/reports.py).
                raylm = run_raylm(model_type, size, train_file, steps, max(steps // 5, 1), use_gpu)
                bare_tps = statistics.mean([before, bare()])
                n_params = sum(p.numel() for p in wrapper.model.parameters())
                rows.append(
                    [
                        f"{model_type}-{size}",
                        f"{n_params / 1e6:.2f}M",
                        bare_tps,
                        raylm["tokens_per_second"],
                        raylm["useful_tokens_per_second"],
                        f"{raylm['useful_tokens_per_second'] / bare_tps:.3f}",
                        f"{raylm['data_wait_fraction']:.2%}",
                        f"{bare_tps * flops_per_token / peak:.1%}",
                        f"{raylm['useful_tokens_per_second'] * flops_per_token / peak:.1%}",
                    ]
                )
                print(f"# {rows[-1][0]} done", flush=True)
    common.print_table(
        "raylm end to end vs a bare PyTorch loop (1 worker, 1 thread, batch 16, block 128; tokens/s)",
        [
            "model",
            "params",
            "bare",
            "raylm",
            "raylm useful",
            "ratio (useful/bare)",
            "data wait",
            "MFU bare",
            "MFU raylm",
        ],
        rows,
    )
    print("targets: ratio >= 0.95, data wait < 2% of step time")
    common.print_load("end")


if __name__ == "__main__":
    main()
