"""raylm against Simple Transformers 0.70.8 on the seed configuration: train_model wall time and test perplexity.

Tiny GPT-2 and BERT from scratch (2 layers x 64 wide, a 10,000-token tokenizer), 1 epoch, block
128, batch 16, learning rate 1e-3, on CPU, on the same corpus files. Each train_model runs in a
fresh process, so raylm's time includes starting its local Ray. Simple Transformers runs in its own
venv (bench/.peer-venv, created on first use: it needs transformers<5) with use_cuda=False.

Simple Transformers' default `simple` dataset packs the text into blocks (by decoding and
re-encoding them, which can overflow 128 positions, so its models keep GPT-2's and BERT's default
position tables); raylm's equivalent is dataset_type='text'. Its eval_model crashes on this path,
so both saved models are scored here by one protocol (see test_perplexity). tok/s: the input tokens
of the epoch each tool trained on (none of them padding: both pack) over its train_model wall time.

--same-tokenizer compares the models' quality on equal footing: raylm loads the tokenizer Simple
Transformers trained (its output_dir, through tokenizer_name) and trains exactly as many optimizer
steps as the peer did (max_steps), so both see the same token ids, the same model size, batch,
learning rate and schedule length, on packed blocks (the peer's `simple`, raylm's `text`); the table
adds raylm's perplexity over the peer's. `--raylm-steps peer,epoch` also trains raylm for its own one epoch
on that tokenizer (equal text rather than equal steps: the two epochs differ in length, since raylm's
`text` puts each document's separator into the blocks and the peer decodes and re-encodes its
chunks, which lengthens them). For GPT-2 it adds raylm's perplexity with each test line after
the eos that raylm's `text` puts between documents (test_perplexity's after_separator: the same
predicted tokens; the peer glues its lines with nothing between them, so it has no such context to be
given); for BERT, and for raylm without its separators, that column repeats raylm's.

`--raylm-init own,peer` (with --same-tokenizer) also starts raylm from the peer's own initial weights: the
peer saves its model as initialised before it trains, and raylm loads that folder as model_name (GPT-2's
and BERT's default position tables, as the peer's models have), so that only the two training loops
and data orders differ, not the initialisation.

`--raylm-separator on,off` also trains raylm with document_separator=False: GPT-2's documents without the
eos after each, BERT's packed blocks without the [SEP] after each document, so that raylm's blocks hold
the text alone, as the peer's do (it glues its lines with nothing between them; its BERT blocks end with one
[SEP], raylm's then with none).

--seeds runs both tools once per seed (each tool's manual_seed: its model's initialisation and its
data order) and adds, per model, the mean and the spread (min-max) of each tool's perplexity and of
the ratio, so that a gap can be read against the seed-to-seed spread. Seeds must be non-zero:
Simple Transformers seeds nothing for manual_seed 0.

    python bench/peer.py
    python bench/peer.py --copies 4      # a smaller corpus, for a quick look
    python bench/peer.py --same-tokenizer --worker-cpus default
    python bench/peer.py --same-tokenizer --worker-cpus default --models gpt2 --copies 4 --seeds 1,2,3
    python bench/peer.py --same-tokenizer --worker-cpus default --copies 4 --seeds 1,2,3 --raylm-steps peer,epoch
    python bench/peer.py --same-tokenizer --worker-cpus default --copies 4 --seeds 1,2,3 --raylm-init own,peer
    python bench/peer.py --same-tokenizer --worker-cpus default --models gpt2 --copies 4 --seeds 1,2,3 \\
        --raylm-init peer --raylm-separator on,off
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_VENV = os.path.join(HERE, ".peer-venv")
PEER_PYTHON = os.path.join(PEER_VENV, "bin", "python")
TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "bert": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128},
}
RAYLM_POSITIONS = {"gpt2": {"n_positions": common.BLOCK_SIZE}, "bert": {"max_position_embeddings": common.BLOCK_SIZE}}


def ensure_peer_venv() -> None:
    if os.path.exists(PEER_PYTHON):
        return
    print(f"# creating {PEER_VENV} (Simple Transformers 0.70.8, transformers<5; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
    local = ["--find-links", "/opt/wheels"] if os.path.isdir("/opt/wheels") else []
    pip = [PEER_PYTHON, "-m", "pip", "install", "-q", *local]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "transformers<5", "simpletransformers==0.70.8"], check=True)


def last_json_line(command: list[str]) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{command[:2]} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def job(model_type: str, train_file: str, output_dir: str, options, seed: int, initial_dir: str | None = None) -> dict:
    return {
        "initial_dir": initial_dir,
        "model_type": model_type,
        "train_file": train_file,
        "output_dir": output_dir,
        "block_size": common.BLOCK_SIZE,
        "seed": seed,
        "batch_size": 16,
        "learning_rate": options.learning_rate,
        "vocab_size": options.vocab_size,
        "config": TINY[model_type],
        "mlm": model_type == "bert",
    }


def raylm_train(spec: dict) -> dict:
    """Run in a fresh process: construct (trains the tokenizer, unless given one), then time train_model, local Ray
    start included."""
    from raylm import LanguageModelingModel

    same = (
        {"tokenizer_name": spec["tokenizer_name"], "max_steps": spec["max_steps"]} if spec.get("tokenizer_name") else {}
    )
    # A model loaded from the peer's initial weights keeps their configuration (their position table included).
    config = {} if spec.get("model_name") else {**spec["config"], **RAYLM_POSITIONS[spec["model_type"]]}
    args = common.raylm_args(
        spec["output_dir"],
        vocab_size=spec["vocab_size"],
        config=config,
        document_separator=spec["document_separator"],
        mlm=spec["mlm"],
        num_train_epochs=1,
        learning_rate=spec["learning_rate"],
        use_gpu=False,
        manual_seed=spec["seed"],
        resources_per_worker=None if spec["worker_cpus"] == "default" else {"CPU": int(spec["worker_cpus"])},
        **same,
    )
    model = LanguageModelingModel(
        spec["model_type"], spec.get("model_name"), args=args, train_files=spec["train_file"], use_cuda=False
    )
    started = time.perf_counter()
    global_step, _ = model.train_model(spec["train_file"])
    train_seconds = time.perf_counter() - started
    from raylm.training.checkpoints import read_trainer_state

    return {
        "train_seconds": train_seconds,
        "global_step": global_step,
        "input_tokens": read_trainer_state(model.checkpoint_path).train_input_tokens,
    }


def test_perplexity(
    model_dir: str, test_file: str, masked: bool, batch_size: int = 32, after_separator: bool = False
) -> float:
    """One protocol for both tools' saved models: each test line on its own, at most block_size tokens.

    Causal: every token of the line after its first is predicted (at most block_size - 1 tokens a
    line, so that a separator fits). The line comes alone, or, with after_separator, after the
    end-of-document token the model's tool trained it to see before every document (raylm's `text`
    puts one after each document; the peer's `simple` glues lines with nothing between them, so its
    lines come alone either way). The predicted tokens are the same in both forms. Masked: the
    tokenizer's own specials around the line, 15% of the other tokens (at least one, chosen by a
    seeded generator per line) replaced by the mask token and predicted.
    """
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(model_dir).eval()
    with open(test_file, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    specials = set(tokenizer.all_special_ids)
    nll, count = 0.0, 0
    for start in range(0, len(lines), batch_size):
        rows, labels = [], []
        for index, line in enumerate(lines[start : start + batch_size], start):
            ids = tokenizer(
                line, add_special_tokens=masked, truncation=True, max_length=common.BLOCK_SIZE - (not masked)
            )["input_ids"]
            target = list(ids)
            if masked:
                candidates = [i for i, t in enumerate(ids) if t not in specials]
                rng = np.random.default_rng(index)
                chosen = (
                    set(rng.choice(candidates, size=max(1, round(0.15 * len(candidates))), replace=False).tolist())
                    if candidates
                    else set()
                )
                target = [t if i in chosen else -100 for i, t in enumerate(ids)]
                ids = [tokenizer.mask_token_id if i in chosen else t for i, t in enumerate(ids)]
            elif after_separator:
                # The separator and the line's first token are context, as the line alone's first token is.
                ids, target = [tokenizer.eos_token_id] + ids, [-100, -100] + target[1:]
            rows.append(ids)
            labels.append(target)
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        if not masked:
            logits, label_ids = logits[:, :-1], label_ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), label_ids.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((label_ids != -100).sum())
    return math.exp(nll / count)


# Where a row of main's table keeps the perplexities.
STEPS, INIT, SEPARATOR, ST_PPL, RAYLM_PPL, RAYLM_PPL_AFTER_EOS = 2, 3, 4, 14, 15, 17


def seed_summary(rows: list[list]) -> list[list]:
    """Per model, raylm CPUs, raylm steps, raylm init and raylm separator: [model, cpus, steps, init, separator,
    seeds, then mean and min-max of ST ppl, raylm ppl, their ratio, and both after eos] over the rows' seeds."""
    groups: dict[tuple, list[list]] = {}
    for row in rows:
        groups.setdefault((row[0], row[1], row[STEPS], row[INIT], row[SEPARATOR]), []).append(row)
    summary = []
    for (model_type, cpus, steps, init, separator), group in groups.items():
        cells = [model_type, cpus, steps, init, separator, len(group)]
        peer = [r[ST_PPL] for r in group]
        for values in (
            peer,
            [r[RAYLM_PPL] for r in group],
            [r[RAYLM_PPL] / r[ST_PPL] for r in group],
            [r[RAYLM_PPL_AFTER_EOS] for r in group],
            [r[RAYLM_PPL_AFTER_EOS] / r[ST_PPL] for r in group],
        ):
            digits = ".3f" if values[0] < 10 else ",.0f"
            cells += [f"{statistics.mean(values):{digits}}", f"{min(values):{digits}}-{max(values):{digits}}"]
        summary.append(cells)
    return summary


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument(
        "--copies", type=int, default=12, help="the sample corpus repeated this many times (~1.2M GPT-2 tokens at 12)"
    )
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--worker-cpus",
        default="default,1",
        help="raylm runs with these CPUs for its one worker ('default': no resources_per_worker, so the machine's "
        "cores; Simple Transformers' torch uses every core)",
    )
    parser.add_argument(
        "--same-tokenizer",
        action="store_true",
        help="raylm trains with the peer's tokenizer for the peer's number of steps (quality on equal footing)",
    )
    parser.add_argument(
        "--raylm-steps",
        default="peer",
        help="with --same-tokenizer, comma list: 'peer' (the peer's step count, equal steps) and/or 'epoch' (raylm's "
        "own one epoch, equal text)",
    )
    parser.add_argument(
        "--raylm-init",
        default="own",
        help="with --same-tokenizer, comma list: 'own' (raylm initialises its model from its manual_seed) "
        "and/or 'peer' (raylm loads the peer's initial weights)",
    )
    parser.add_argument(
        "--raylm-separator",
        default="on",
        help="comma list: 'on' (raylm ends each document with eos or [SEP], the default) and/or 'off' "
        "(document_separator=False: the text alone, as the peer trains)",
    )
    parser.add_argument(
        "--seeds", default="42", help="comma list of non-zero seeds; both tools run once per seed (manual_seed)"
    )
    parser.add_argument("--raylm-run", help=argparse.SUPPRESS)
    options = parser.parse_args()
    common.quiet_logs()
    if options.raylm_run:
        print(json.dumps(raylm_train(json.loads(options.raylm_run))))
        return
    seeds = [int(seed) for seed in options.seeds.split(",")]
    if 0 in seeds:
        parser.error("--seeds: use non-zero seeds (Simple Transformers seeds nothing for manual_seed 0)")
    step_modes = options.raylm_steps.split(",") if options.same_tokenizer else ["epoch"]
    if not set(step_modes) <= {"peer", "epoch"}:
        parser.error("--raylm-steps: a comma list of 'peer' and 'epoch'")
    init_modes = options.raylm_init.split(",") if options.same_tokenizer else ["own"]
    if not set(init_modes) <= {"own", "peer"}:
        parser.error("--raylm-init: a comma list of 'own' and 'peer'")
    separator_modes = options.raylm_separator.split(",")
    if not set(separator_modes) <= {"on", "off"}:
        parser.error("--raylm-separator: a comma list of 'on' and 'off'")
    ensure_peer_venv()
    common.begin_measuring(options)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        train_file, test_file = common.write_corpus(os.path.join(work, "data"), copies=options.copies)
        for model_type in options.models.split(","):
            masked = model_type == "bert"
            for seed in seeds:
                peer_dir, initial_dir = (
                    os.path.join(work, f"st-{model_type}-{seed}"),
                    os.path.join(work, f"st-initial-{model_type}-{seed}"),
                )
                peer_job = job(
                    model_type, train_file, peer_dir, options, seed, initial_dir if "peer" in init_modes else None
                )
                peer = last_json_line(
                    [PEER_PYTHON, os.path.join(HERE, "_peer_simpletransformers.py"), json.dumps(peer_job)]
                )
                peer_perplexity = test_perplexity(peer_dir, test_file, masked)
                for cpus, steps, init, separator in [
                    (c, s, i, e)
                    for c in options.worker_cpus.split(",")
                    for s in step_modes
                    for i in init_modes
                    for e in separator_modes
                ]:
                    raylm_dir = os.path.join(work, f"raylm-{model_type}-{cpus}-{steps}-{init}-{separator}-{seed}")
                    spec = {
                        **job(model_type, train_file, raylm_dir, options, seed),
                        "worker_cpus": cpus,
                        "document_separator": separator == "on",
                    }
                    if options.same_tokenizer:
                        spec.update(tokenizer_name=peer_dir, max_steps=peer["global_step"] if steps == "peer" else -1)
                    if init == "peer":
                        spec.update(model_name=initial_dir)
                    ours = last_json_line([sys.executable, __file__, "--raylm-run", json.dumps(spec)])
                    ours_perplexity = test_perplexity(raylm_dir, test_file, masked)
                    # raylm's `text` ends each document with eos, so its causal LMs see one before every document they
                    # start.
                    ours_after_separator = (
                        test_perplexity(raylm_dir, test_file, masked, after_separator=True)
                        if separator == "on" and not masked
                        else ours_perplexity
                    )
                    peer_rate, ours_rate = (
                        peer["input_tokens"] / peer["train_seconds"],
                        ours["input_tokens"] / ours["train_seconds"],
                    )
                    rows.append(
                        [
                            model_type,
                            cpus,
                            steps,
                            init,
                            separator,
                            seed,
                            peer["global_step"],
                            ours["global_step"],
                            peer["train_seconds"],
                            ours["train_seconds"],
                            f"{ours['train_seconds'] / peer['train_seconds']:.2f}",
                            f"{peer_rate:,.0f}",
                            f"{ours_rate:,.0f}",
                            f"{ours_rate / peer_rate:.2f}",
                            peer_perplexity,
                            ours_perplexity,
                            f"{ours_perplexity / peer_perplexity:.3f}",
                            ours_after_separator,
                            f"{ours_after_separator / peer_perplexity:.3f}",
                        ]
                    )
                print(f"# {model_type} seed {seed} done", flush=True)
    tokenizers = (
        f"one tokenizer (ST's), raylm steps as {options.raylm_steps}, raylm init {options.raylm_init}, raylm separator "
        f"{options.raylm_separator}"
        if options.same_tokenizer
        else "each tool's own tokenizer"
    )
    common.print_table(
        "train_model wall time (s) and test perplexity: Simple Transformers 0.70.8 (ST) vs raylm, corpus "
        f"x{options.copies}, 1 epoch, CPU, {tokenizers}",
        [
            "model",
            "raylm worker CPUs",
            "raylm steps as",
            "raylm init",
            "raylm separator",
            "seed",
            "ST steps",
            "raylm steps",
            "ST s",
            "raylm s",
            "ratio",
            "ST tok/s",
            "raylm tok/s",
            "tok/s ratio",
            "ST ppl",
            "raylm ppl",
            "ppl ratio",
            "raylm ppl after eos",
            "ratio after eos",
        ],
        rows,
    )
    if len(seeds) > 1:
        common.print_table(
            "test perplexity over the seeds: mean and spread (min-max)",
            [
                "model",
                "raylm worker CPUs",
                "raylm steps as",
                "raylm init",
                "raylm separator",
                "seeds",
                "ST ppl mean",
                "ST ppl spread",
                "raylm ppl mean",
                "raylm ppl spread",
                "ppl ratio mean",
                "ppl ratio spread",
                "raylm ppl after eos mean",
                "spread",
                "ratio after eos mean",
                "spread",
            ],
            seed_summary(rows),
        )
    print("targets: ratio <= 0.8 (raylm's local Ray start included); tok/s ratio >= 1.25; raylm ppl <= ST ppl")
    common.print_load("end")


if __name__ == "__main__":
    main()
