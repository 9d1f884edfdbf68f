"""The seed's ELECTRA from scratch as Simple Transformers 0.70.8 and raylm each run it, both saved pairs scored by one
protocol.

The snippet "Training an ELECTRA model from scratch" as written (both halves at ElectraConfig's
defaults, ELECTRA-small's 12 layers x 256; vocab_size 30,000; `simple`; 1 epoch; Simple Transformers'
defaults otherwise: batch 8, learning rate 4e-5, block 128), on the sample corpus. Simple Transformers
runs in bench/.peer-venv (see peer.py) and raylm through its own train_model (a local Ray). Each tool
trains its own WordPiece tokenizer; each saved pair (output_dir/generator_model and
discriminator_model, the same layout in both tools) is scored on the test lines with its own tokenizer,
masked as raylm's evaluation masks them (electra_seed.pair_metrics): the generator's MLM loss, the
discriminator's loss next to the prior's, precision / recall / F1 on replaced tokens at p > 0.5, and the
AUC of its logits. Simple Transformers' `simple` packs the lines into 126-token blocks; raylm's packs
whole lines into rows of up to 128 tokens, each line kept apart (about as many steps over the same text).

    python bench/electra_peer.py
    python bench/electra_peer.py --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import common
import electra_seed
import peer

SEED_ARGS = {
    "vocab_size": 30000,
    "train_batch_size": 8,
    "learning_rate": 4e-5,
    "block_size": 128,
    "dataset_type": "simple",
    "manual_seed": 42,
}


def peer_job(train_file: str, output_dir: str, epochs: int) -> dict:
    return {
        "model_type": "electra",
        "train_file": train_file,
        "output_dir": output_dir,
        "block_size": SEED_ARGS["block_size"],
        "seed": SEED_ARGS["manual_seed"],
        "batch_size": SEED_ARGS["train_batch_size"],
        "learning_rate": SEED_ARGS["learning_rate"],
        "vocab_size": SEED_ARGS["vocab_size"],
        "config": {},
        "mlm": True,
        "num_train_epochs": epochs,
    }


def raylm_train(train_file: str, output_dir: str, epochs: int, smoke: bool = False) -> dict:
    from raylm import LanguageModelingModel

    # --smoke: both halves at the suite's tiny sizes instead of ElectraConfig's defaults.
    sizes = {"config": electra_seed.TINY_BERT} if smoke else {}
    args = common.raylm_args(output_dir, **SEED_ARGS, num_train_epochs=epochs, use_gpu=False, **sizes)
    model = LanguageModelingModel("electra", None, args=args, train_files=train_file, use_cuda=False)
    started = time.perf_counter()
    global_step, _ = model.train_model(train_file)
    return {"train_seconds": time.perf_counter() - started, "global_step": global_step}


def saved_pair_metrics(output_dir: str, test_file: str) -> dict:
    import torch
    import transformers
    from transformers import AutoTokenizer, ElectraForMaskedLM, ElectraForPreTraining

    from raylm.data.collators import ELECTRA_MASKING, CollatorSpec
    from raylm.models.electra import DISCRIMINATOR_SUBDIR, GENERATOR_SUBDIR, ElectraPair
    from raylm.models.modeling import ELECTRA

    torch.set_num_threads(1)
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(output_dir, DISCRIMINATOR_SUBDIR))
    generator = ElectraForMaskedLM.from_pretrained(os.path.join(output_dir, GENERATOR_SUBDIR))
    discriminator = ElectraForPreTraining.from_pretrained(os.path.join(output_dir, DISCRIMINATOR_SUBDIR))
    # Both tools tie the token embeddings; pairing the saved halves keeps the generator's table, which is the shared
    # one.
    pair = ElectraPair(generator, discriminator, tie_embeddings=True)
    spec = CollatorSpec(
        objective=ELECTRA,
        pad_id=tokenizer.pad_token_id,
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tuple(tokenizer.all_special_ids),
        mlm_probability=0.15,
        seed=SEED_ARGS["manual_seed"],
        **ELECTRA_MASKING,
    )
    return electra_seed.pair_metrics(pair, spec, electra_seed.line_rows(tokenizer, test_file))


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--raylm-run", help=argparse.SUPPRESS)
    options = parser.parse_args()
    common.quiet_logs()
    if options.raylm_run:
        print(json.dumps(raylm_train(**json.loads(options.raylm_run))))
        return
    if not options.smoke:  # --smoke runs raylm's side only: the peer's venv takes minutes to create
        peer.ensure_peer_venv()
    common.begin_measuring(options)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        train_file, test_file = common.write_corpus(os.path.join(work, "data"), smoke=options.smoke)
        runs = {
            "Simple Transformers": (
                os.path.join(work, "st"),
                lambda out: peer.last_json_line(
                    [
                        peer.PEER_PYTHON,
                        os.path.join(peer.HERE, "_peer_simpletransformers.py"),
                        json.dumps(peer_job(train_file, out, options.epochs)),
                    ]
                ),
            ),
            "raylm": (
                os.path.join(work, "raylm"),
                # --smoke trains in this process, on whatever Ray it holds (see peer.compare).
                lambda out: (
                    raylm_train(train_file, out, options.epochs, smoke=True)
                    if options.smoke
                    else peer.last_json_line(
                        [
                            sys.executable,
                            __file__,
                            "--raylm-run",
                            json.dumps(dict(train_file=train_file, output_dir=out, epochs=options.epochs)),
                        ]
                    )
                ),
            ),
        }
        for tool, (output_dir, train) in runs.items():
            if options.smoke and tool != "raylm":
                rows.append([tool, options.epochs, *[peer.SKIPPED] * 9])
                continue
            trained = train(output_dir)
            metrics = saved_pair_metrics(output_dir, test_file)
            rows.append(
                [
                    tool,
                    options.epochs,
                    trained["global_step"],
                    f"{trained['train_seconds']:.0f}",
                    f"{metrics['generator']:.2f}",
                    *electra_seed.discriminator_cells(metrics),
                ]
            )
            print(f"# {tool} done", flush=True)
    common.print_table(
        f"the seed's ELECTRA from scratch ({'tiny halves' if options.smoke else 'ElectraConfig defaults'}, 30,000 "
        f"vocab, batch 8, lr 4e-5), {options.epochs} epoch(s), each tool's saved pair scored alike"
        + (f"; Simple Transformers {peer.SKIPPED}" if options.smoke else ""),
        [
            "tool",
            "epochs",
            "steps",
            "train s",
            "generator loss",
            "disc loss",
            "prior loss",
            "precision",
            "recall",
            "F1",
            "AUC",
        ],
        rows,
    )
    common.print_load("end")


if __name__ == "__main__":
    main()
