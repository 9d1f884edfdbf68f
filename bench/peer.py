"""raylm against Simple Transformers 0.70.8 on the seed configuration as written: `dataset_type: simple` in both tools.

GPT-2 and BERT from scratch (2 layers x 128 wide, an 8,000-token tokenizer), block 128, batch 16,
learning rate 1e-3, 1 epoch, on CPU, on the same corpus files, with raylm's default
resources_per_worker. Each train_model runs in a fresh process, so raylm's time includes starting its
local Ray. Simple Transformers runs in its own venv (bench/.peer-venv, created on first use: it needs
transformers<5) with use_cuda=False.

Three corpus shapes, each made from the sample corpus (Python's docstrings, one paragraph a line) and
repeated --copies times: `short` (each paragraph cut into sentences, one a line, those of 10-60 words and
punctuation marks: ~10,000 lines of ~40 tokens at 5 copies), `paragraphs` (the corpus as it is), and `mix`
(every other paragraph whole, the others cut into sentences: short lines next to lines longer than
block_size). The test file of each shape is made the same way from the held-out paragraphs.

What each tool's `simple` trains on: Simple Transformers' joins every line's tokens and cuts 126-token
chunks (by decoding and re-encoding them, which can overflow 128 positions, so its models keep GPT-2's and
BERT's default position tables; lines are glued with nothing between them, the tail is dropped).
raylm's keeps each line a sample of its own (truncated to block_size) and packs several whole lines into
each row, kept apart by a document mask (datasets.packed_lines). Its eval_model crashes on this path, so
both saved models are scored here by one protocol (see test_perplexity). tok/s: the useful tokens of the
epoch each tool trained on (its input tokens, none of them padding) over its train_model wall time.

--raylm-dataset-type text runs raylm's `text` instead (lines joined with eos and cut into full blocks),
the comparison this script made before: the peer keeps its `simple`.

--same-tokenizer compares the models' quality on equal footing: raylm loads the tokenizer Simple
Transformers trained (its output_dir, through tokenizer_name) and trains exactly as many optimizer
steps as the peer did (max_steps), so both see the same token ids, the same model size, batch,
learning rate and schedule length; the table adds raylm's perplexity over the peer's. `--raylm-steps
peer,epoch` also trains raylm for its own one epoch on that tokenizer (equal text rather than equal steps).
For GPT-2 with raylm's `text` it adds raylm's perplexity with each test line after the eos that `text` puts
between documents (test_perplexity's after_separator: the same predicted tokens; the peer glues its lines
with nothing between them, and raylm's `simple` starts each line afresh, so neither has such context to be
given); otherwise that column repeats raylm's.

`--raylm-init own,peer` (with --same-tokenizer) also starts raylm from the peer's own initial weights: the
peer saves its model as initialised before it trains, and raylm loads that folder as model_name (GPT-2's
and BERT's default position tables, as the peer's models have), so that only the two training loops
and data orders differ, not the initialisation.

`--raylm-separator on,off` also trains raylm with document_separator=False: GPT-2's lines without the
eos after each, BERT's `text` blocks without the [SEP] after each document (a masked model's `simple` line
keeps [CLS] line [SEP] either way).

--seeds runs both tools once per seed (each tool's manual_seed: its model's initialisation and its
data order) and adds, per shape and model, the mean and the spread (min-max) of each tool's perplexity and
of the ratio, so that a gap can be read against the seed-to-seed spread. Seeds must be non-zero:
Simple Transformers seeds nothing for manual_seed 0.

    python bench/peer.py                                   # the three shapes, GPT-2 and BERT, `simple` in both
    python bench/peer.py --shapes short --copies 2         # a quick look
    python bench/peer.py --raylm-dataset-type text --shapes paragraphs --copies 12 --width 64 --vocab-size 10000
    python bench/peer.py --same-tokenizer --raylm-steps epoch --shapes short --seeds 1,2,3
    python bench/peer.py --same-tokenizer --models gpt2 --shapes paragraphs --seeds 1,2,3 --raylm-init own,peer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_VENV = os.path.join(HERE, ".peer-venv")
PEER_PYTHON = os.path.join(PEER_VENV, "bin", "python")
SHAPES = ("short", "paragraphs", "mix")
# A stand-in for token counts that needs no tokenizer: words and punctuation marks.
_WORDS = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def tiny_config(model_type: str, width: int) -> dict:
    """2 layers of `width`, 2 heads, a 4x wide MLP (GPT-2's own ratio) in both models."""
    if model_type == "gpt2":
        return {"n_layer": 2, "n_embd": width, "n_head": 2}
    return {"num_hidden_layers": 2, "hidden_size": width, "num_attention_heads": 2, "intermediate_size": 4 * width}


RAYLM_POSITIONS = {"gpt2": {"n_positions": common.BLOCK_SIZE}, "bert": {"max_position_embeddings": common.BLOCK_SIZE}}


def shape_lines(paragraphs: list[str], shape: str) -> list[str]:
    """The lines of one corpus shape, made from the sample corpus's paragraphs (see the module's docstring)."""
    if shape == "paragraphs":
        return list(paragraphs)
    lines = []
    for index, paragraph in enumerate(paragraphs):
        if shape == "mix" and index % 2 == 0:
            lines.append(paragraph)
            continue
        sentences = [s for s in _SENTENCE_END.split(paragraph) if s.strip()]
        lines.extend(s for s in sentences if shape == "mix" or 10 <= len(_WORDS.findall(s)) <= 60)
    return lines


def write_shapes(folder: str, shapes: list[str], copies: int, smoke: bool) -> dict[str, tuple[str, str]]:
    """{shape: (train file, test file)}: the training lines repeated `copies` times, the test lines once."""
    train, test = common.write_corpus(os.path.join(folder, "sample"), smoke=smoke)
    paragraphs = {}
    for role, path in (("train", train), ("test", test)):
        with open(path, encoding="utf-8") as f:
            paragraphs[role] = [line for line in f.read().splitlines() if line.strip()]
    files = {}
    for shape in shapes:
        os.makedirs(os.path.join(folder, shape), exist_ok=True)
        paths = []
        for role, repeat in (("train", copies), ("test", 1)):
            path = os.path.join(folder, shape, f"{role}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(shape_lines(paragraphs[role], shape) * repeat) + "\n")
            paths.append(path)
        files[shape] = tuple(paths)
    return files


def corpus_summary(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        counts = [len(_WORDS.findall(line)) for line in f.read().splitlines() if line.strip()]
    over = sum(count > common.BLOCK_SIZE for count in counts)
    mean = statistics.mean(counts)
    return f"{len(counts):,} lines, {mean:.0f} words+marks a line on average, {over:,} over {common.BLOCK_SIZE}"


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
        "config": tiny_config(model_type, options.width),
        "mlm": model_type == "bert",
        "dataset_type": "simple",
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
        dataset_type=spec["raylm_dataset_type"],
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


def seed_summary(rows: list[dict]) -> list[list]:
    """Per shape, model and raylm variant: the seeds, then mean and min-max of ST ppl, raylm ppl, their ratio, both
    after eos."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in VARIANT), []).append(row)
    summary = []
    for variant, group in groups.items():
        cells = [*variant, len(group)]
        for values in (
            [r["st_ppl"] for r in group],
            [r["raylm_ppl"] for r in group],
            [r["raylm_ppl"] / r["st_ppl"] for r in group],
            [r["raylm_ppl_after_eos"] for r in group],
            [r["raylm_ppl_after_eos"] / r["st_ppl"] for r in group],
        ):
            digits = ".3f" if values[0] < 10 else ",.0f"
            cells += [f"{statistics.mean(values):{digits}}", f"{min(values):{digits}}-{max(values):{digits}}"]
        summary.append(cells)
    return summary


SKIPPED = "skipped (--smoke)"


def peer_cell(value, spec: str = ""):
    """A Simple Transformers figure for the table: SKIPPED where --smoke did not run it."""
    if value is None:
        return SKIPPED
    return format(value, spec) if spec else value


def ratio_cell(raylm_value: float, peer_value, spec: str) -> str:
    return SKIPPED if peer_value is None else format(raylm_value / peer_value, spec)


# What tells one raylm run of a shape and model from another (besides the seed).
VARIANT = ("shape", "model", "dataset_type", "steps", "init", "separator")
VARIANT_HEADER = ["shape", "model", "raylm dataset_type", "raylm steps as", "raylm init", "raylm separator"]


def comma_list(parser, option: str, value: str, allowed) -> list[str]:
    values = value.split(",")
    if not set(values) <= set(allowed):
        parser.error(f"{option}: a comma list of {', '.join(allowed)}")
    return values


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument(
        "--copies",
        type=int,
        default=5,
        help="each shape's training lines repeated this many times (~10,000 short lines at 5)",
    )
    parser.add_argument("--width", type=int, default=128, help="both models' hidden size (2 layers, 2 heads)")
    parser.add_argument("--vocab-size", type=int, default=8_000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--raylm-dataset-type",
        default="simple",
        help="raylm's dataset_type: 'simple' (the seed's, as the peer's) or 'text' (lines joined with eos, full "
        "blocks)",
    )
    parser.add_argument(
        "--worker-cpus",
        default="default",
        help="comma list: raylm runs with these CPUs for its one worker ('default': no resources_per_worker, so the "
        "machine's cores; Simple Transformers' torch uses every core)",
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
        help="with --same-tokenizer, comma list: 'own' (raylm initialises its model from its manual_seed) and/or "
        "'peer' (raylm loads the peer's initial weights)",
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
    shapes = comma_list(parser, "--shapes", options.shapes, SHAPES)
    if options.raylm_dataset_type not in ("simple", "text"):
        parser.error("--raylm-dataset-type: 'simple' or 'text'")
    step_modes = (
        comma_list(parser, "--raylm-steps", options.raylm_steps, ("peer", "epoch"))
        if options.same_tokenizer
        else ["epoch"]
    )
    init_modes = (
        comma_list(parser, "--raylm-init", options.raylm_init, ("own", "peer")) if options.same_tokenizer else ["own"]
    )
    separator_modes = comma_list(parser, "--raylm-separator", options.raylm_separator, ("on", "off"))
    if options.smoke:
        if options.same_tokenizer:
            parser.error("--same-tokenizer: raylm then trains with the peer's tokenizer, and --smoke runs no peer")
        # raylm's side only (the peer's venv takes minutes to create): one shape, one small model, the smoke corpus
        # once.
        shapes, options.copies, options.width, options.vocab_size = ["short"], 1, 32, 1000
        options.models = options.models.split(",")[0]
    else:
        ensure_peer_venv()
    common.begin_measuring(options)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        corpora = write_shapes(os.path.join(work, "data"), shapes, options.copies, options.smoke)
        for shape, (train_file, test_file) in corpora.items():
            print(f"# {shape}: train {corpus_summary(train_file)}; test {corpus_summary(test_file)}", flush=True)
            for model_type in options.models.split(","):
                masked = model_type == "bert"
                for seed in seeds:
                    rows += compare(
                        shape,
                        model_type,
                        seed,
                        train_file,
                        test_file,
                        masked,
                        options,
                        step_modes,
                        init_modes,
                        separator_modes,
                        os.path.join(work, "runs"),
                    )
                    print(f"# {shape} {model_type} seed {seed} done", flush=True)
    tokenizers = (
        f"one tokenizer (ST's), raylm steps as {options.raylm_steps}, raylm init {options.raylm_init}"
        if options.same_tokenizer
        else "each tool's own tokenizer"
    ) + (f"; Simple Transformers {SKIPPED}" if options.smoke else "")
    common.print_table(
        "train_model wall time (s), useful tokens/s and test perplexity: Simple Transformers 0.70.8 (ST, `simple`) vs "
        f"raylm, 2 x {options.width}, vocab {options.vocab_size:,}, block {common.BLOCK_SIZE}, batch 16, "
        f"corpus shapes x{options.copies}, 1 epoch, CPU, {tokenizers}",
        [
            *VARIANT_HEADER,
            "raylm worker CPUs",
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
        [
            [
                *(row[key] for key in VARIANT),
                row["cpus"],
                row["seed"],
                peer_cell(row["st_steps"]),
                row["raylm_steps"],
                peer_cell(row["st_seconds"]),
                row["raylm_seconds"],
                ratio_cell(row["raylm_seconds"], row["st_seconds"], ".2f"),
                peer_cell(row["st_rate"], ",.0f"),
                f"{row['raylm_rate']:,.0f}",
                ratio_cell(row["raylm_rate"], row["st_rate"], ".2f"),
                peer_cell(row["st_ppl"]),
                row["raylm_ppl"],
                ratio_cell(row["raylm_ppl"], row["st_ppl"], ".3f"),
                row["raylm_ppl_after_eos"],
                ratio_cell(row["raylm_ppl_after_eos"], row["st_ppl"], ".3f"),
            ]
            for row in rows
        ],
    )
    if len(seeds) > 1:
        common.print_table(
            "test perplexity over the seeds: mean and spread (min-max)",
            [
                *VARIANT_HEADER,
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


def compare(
    shape, model_type, seed, train_file, test_file, masked, options, step_modes, init_modes, separator_modes, work
) -> list[dict]:
    """The peer's run, then raylm's runs (one per variant), on one shape, model and seed: a row each."""
    peer_dir, initial_dir = (
        os.path.join(work, f"st-{shape}-{model_type}-{seed}"),
        os.path.join(work, f"st-initial-{shape}-{model_type}-{seed}"),
    )
    peer = None  # --smoke: the peer is not run
    if not options.smoke:
        peer_job = job(model_type, train_file, peer_dir, options, seed, initial_dir if "peer" in init_modes else None)
        peer = last_json_line([PEER_PYTHON, os.path.join(HERE, "_peer_simpletransformers.py"), json.dumps(peer_job)])
        peer.update(
            perplexity=test_perplexity(peer_dir, test_file, masked), rate=peer["input_tokens"] / peer["train_seconds"]
        )
    rows = []
    for cpus, steps, init, separator in [
        (c, s, i, e)
        for c in options.worker_cpus.split(",")
        for s in step_modes
        for i in init_modes
        for e in separator_modes
    ]:
        raylm_dir = os.path.join(work, f"raylm-{shape}-{model_type}-{cpus}-{steps}-{init}-{separator}-{seed}")
        spec = {
            **job(model_type, train_file, raylm_dir, options, seed),
            "worker_cpus": cpus,
            "document_separator": separator == "on",
            "raylm_dataset_type": options.raylm_dataset_type,
        }
        if options.same_tokenizer:
            spec.update(tokenizer_name=peer_dir, max_steps=peer["global_step"] if steps == "peer" else -1)
        if init == "peer":
            spec.update(model_name=initial_dir)
        # A fresh process, as the peer's: its wall time includes Python's, torch's and Ray's start-up. --smoke trains
        # in this one, on whatever Ray it holds (one Ray start for the suite's smoke group, not one per script).
        ours = (
            raylm_train(spec)
            if options.smoke
            else last_json_line([sys.executable, __file__, "--raylm-run", json.dumps(spec)])
        )
        ours_perplexity = test_perplexity(raylm_dir, test_file, masked)
        # raylm's `text` ends each document with eos, so its causal LMs see one before every document they start.
        ours_after_separator = (
            test_perplexity(raylm_dir, test_file, masked, after_separator=True)
            if separator == "on" and not masked and options.raylm_dataset_type == "text"
            else ours_perplexity
        )
        rows.append(
            {
                "shape": shape,
                "model": model_type,
                "dataset_type": options.raylm_dataset_type,
                "steps": steps,
                "init": init,
                "separator": separator,
                "cpus": cpus,
                "seed": seed,
                "st_steps": peer and peer["global_step"],
                "raylm_steps": ours["global_step"],
                "st_seconds": peer and peer["train_seconds"],
                "raylm_seconds": ours["train_seconds"],
                "st_rate": peer and peer["rate"],
                "raylm_rate": ours["input_tokens"] / ours["train_seconds"],
                "st_ppl": peer and peer["perplexity"],
                "raylm_ppl": ours_perplexity,
                "raylm_ppl_after_eos": ours_after_separator,
            }
        )
    return rows


if __name__ == "__main__":
    main()
