"""Why the seed's ELECTRA from scratch ends with a discriminator that flags nothing: the pair trained in a plain torch
loop.

The seed's "Training an ELECTRA model from scratch" at the suite's tiny sizes (2 layers x 64, a
WordPiece tokenizer of the sample corpus, `simple` lines, batch 8, 1 epoch) with raylm's own
ElectraPair, collator, optimizer and schedule, without Ray, so each variant takes about a minute.
Printed per variant and epoch: the generator's MLM loss before -> after (next to the unigram cross-entropy of
the test text, the level a context-free generator reaches), the discriminator's loss (next to the
loss of always answering the prior), precision / recall / F1 on replaced tokens, and the AUC of its
logits (0.5: it cannot rank replaced tokens above original ones at all).

The `seed-sizes` variants are the snippet as it is written: both halves at ElectraConfig's defaults
(ELECTRA-small's 12 layers x 256), no `config`.

The `uniform` variant is a control: replacements drawn uniformly from the vocabulary instead of from
the generator, which a discriminator can spot token by token.

    python bench/electra_seed.py
    python bench/electra_seed.py --variants seed,lr1e-3 --epochs 3
    python bench/electra_seed.py --variants seed-sizes --epochs 3
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import tempfile

import common

TINY_BERT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
VARIANTS = {
    "seed": {},  # the snippet's own settings: Simple Transformers' learning rate 4e-5
    "lr1e-3": {"learning_rate": 1e-3},
    "lr1e-3-untied": {"learning_rate": 1e-3, "tie_generator_and_discriminator_embeddings": False},
    "lr1e-3-weight1": {"learning_rate": 1e-3, "discriminator_loss_weight": 1.0},
    "lr1e-3-quarter-generator": {
        "learning_rate": 1e-3,
        "generator_config": {"hidden_size": 16, "num_attention_heads": 1, "intermediate_size": 64},
    },
    "uniform": {"learning_rate": 1e-3},
    # The snippet's real sizes: ElectraConfig's defaults (ELECTRA-small: 12 layers x 256) for both halves.
    "seed-sizes": {"config": {}},
    "seed-sizes-lr5e-4": {"config": {}, "learning_rate": 5e-4},
}


@contextlib.contextmanager
def uniform_replacements(enabled: bool):
    import raylm.models.electra

    original = raylm.models.electra.sample_replacements
    if enabled:
        # The first 5 ids are WordPiece's specials.
        raylm.models.electra.sample_replacements = lambda logits, uniforms: (
            5 + (uniforms * (logits.size(-1) - 5)).long()
        ).clamp(max=logits.size(-1) - 1)
    try:
        yield
    finally:
        raylm.models.electra.sample_replacements = original


def auc(logits, labels) -> float:
    """Mann-Whitney AUC of the replaced (label 1) tokens' logits against the original ones'."""
    ranks = logits.argsort().argsort().double() + 1
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def line_rows(tokenizer, path: str) -> list[list[int]]:
    """Each non-blank line of `path` as one example (`simple`), with the tokenizer's specials, at most 128 tokens."""
    with open(path, encoding="utf-8") as f:
        return tokenizer([line for line in f.read().splitlines() if line.strip()], truncation=True, max_length=128)[
            "input_ids"
        ]


def collated(rows: list[list[int]], example_ids, spec, stream: int) -> dict:
    import numpy as np

    from raylm.data.collators import collate

    examples = np.empty(len(rows), dtype=object)
    examples[:] = [np.asarray(r, dtype=np.int64) for r in rows]
    return collate({"input_ids": examples, "example_id": np.asarray(example_ids)}, spec, stream)


def pair_metrics(pair, spec, test: list[list[int]]) -> dict:
    """The pair on the test lines, masked as raylm's evaluation masks them: generator loss, discriminator loss,
    P/R/F1 at p > 0.5, AUC."""
    import torch
    import torch.nn.functional as F

    import raylm.models.electra
    from raylm.data.collators import EVAL_STREAM
    from raylm.models.modeling import ELECTRA, forward_loss_sums

    captured, captured_real = [], []
    bce = F.binary_cross_entropy_with_logits

    def capturing(logits, labels, **kwargs):
        captured.append((logits.detach(), labels.detach().bool()))
        return bce(logits, labels, **kwargs)

    was_training = pair.training
    pair.eval()
    totals = collections.Counter()
    raylm.models.electra.F.binary_cross_entropy_with_logits = capturing
    try:
        with torch.no_grad():
            for start in range(0, len(test), 32):
                b = collated(test[start : start + 32], range(start, min(start + 32, len(test))), spec, EVAL_STREAM)
                totals.update({k: float(v) for k, v in forward_loss_sums(pair, b, ELECTRA).items() if v.dim() == 0})
                # The batch's real tokens only (batches pad to different lengths; padding is no token).
                batch_logits, batch_labels = captured.pop()
                real = b["attention_mask"].bool()
                captured_real.append((batch_logits[real], batch_labels[real]))
                totals.update(targets=b["n_targets"], inputs=b["n_input_tokens"])
    finally:
        raylm.models.electra.F.binary_cross_entropy_with_logits = bce
    pair.train(was_training)
    logits, labels = torch.cat([c[0] for c in captured_real]), torch.cat([c[1] for c in captured_real])
    tp, fp, fn = totals["true_positives"], totals["false_positives"], totals["false_negatives"]
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    replaced = (tp + fn) / totals["inputs"]
    return {
        "generator": totals["target_loss"] / totals["targets"],
        "discriminator": totals["token_loss"] / totals["inputs"],
        "prior_loss": -(replaced * math.log(replaced) + (1 - replaced) * math.log(1 - replaced)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "auc": auc(logits, labels),
    }


def discriminator_cells(metrics: dict) -> list[str]:
    """The table cells of pair_metrics' discriminator figures: loss, the prior's loss, precision, recall, F1, AUC."""
    return [
        f"{metrics['discriminator']:.3f}",
        f"{metrics['prior_loss']:.3f}",
        *(f"{metrics[key]:.2f}" for key in ("precision", "recall", "f1", "auc")),
    ]


def run_variant(name: str, overrides: dict, train_file: str, test_file: str, epochs: int, work: str) -> dict:
    import numpy as np
    import torch

    from raylm import LanguageModelingArgs, LanguageModelingModel
    from raylm.models.modeling import ELECTRA, combine_loss, forward_loss_sums
    from raylm.training.optim import build_optimizer, build_scheduler

    torch.set_num_threads(1)
    args = LanguageModelingArgs()
    args.update_from_dict(
        {
            "vocab_size": 30000,
            "config": TINY_BERT,
            "num_train_epochs": epochs,
            "output_dir": os.path.join(work, name),
            "overwrite_output_dir": True,
            **overrides,
        }
    )
    torch.manual_seed(args.seed)
    model = LanguageModelingModel("electra", None, args=args, train_files=train_file)
    tokenizer, pair, spec = model.tokenizer, model.model, model._collator_spec(args)
    train, test = line_rows(tokenizer, train_file), line_rows(tokenizer, test_file)

    def evaluate() -> dict:
        return pair_metrics(pair, spec, test)

    total_steps = math.ceil(len(train) / args.train_batch_size) * epochs
    optimizer = build_optimizer(pair, args, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, args, total_steps)
    before, after_epochs = evaluate(), []
    with uniform_replacements(name == "uniform"):
        for epoch in range(epochs):
            order = np.random.default_rng(epoch).permutation(len(train))
            for start in range(0, len(train), args.train_batch_size):
                picked = order[start : start + args.train_batch_size]
                b = collated([train[i] for i in picked], picked, spec, epoch)
                combine_loss(
                    forward_loss_sums(pair, b, ELECTRA),
                    b["n_targets"],
                    b["n_input_tokens"],
                    args.discriminator_loss_weight,
                ).backward()
                torch.nn.utils.clip_grad_norm_(pair.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            after_epochs.append(evaluate())
    counts = collections.Counter(t for ids in train for t in ids[1:-1])
    test_tokens = [t for ids in test for t in ids[1:-1]]
    n, vocab = sum(counts.values()), len(tokenizer)
    unigram = sum(-math.log((counts[t] + 0.5) / (n + 0.5 * vocab)) for t in test_tokens) / len(test_tokens)
    return {
        "variant": name,
        "steps": total_steps,
        "train_tokens": n,
        "unigram": unigram,
        "before": before,
        "after_epochs": after_epochs,
    }


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, default=1)
    options = parser.parse_args()
    common.quiet_logs()
    common.begin_measuring(options)
    # --smoke: the snippet's settings and the uniform control (the one variant that swaps the sampler).
    variants = ["seed", "uniform"] if options.smoke else options.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        train_file, test_file = common.write_corpus(os.path.join(work, "data"), smoke=options.smoke)
        for name in variants:
            r = run_variant(name, VARIANTS[name], train_file, test_file, options.epochs, work)
            b, steps_per_epoch = r["before"], r["steps"] // options.epochs
            for epoch, a in enumerate(r["after_epochs"], 1):
                rows.append(
                    [
                        name,
                        epoch,
                        epoch * steps_per_epoch,
                        f"{b['generator']:.2f} -> {a['generator']:.2f}",
                        f"{r['unigram']:.2f}",
                        *discriminator_cells(a),
                    ]
                )
            print(f"# {name} done ({r['train_tokens']:,} training tokens per epoch)", flush=True)
    common.print_table(
        f"seed-sized ELECTRA from scratch, {options.epochs} epoch(s), plain torch loop",
        [
            "variant",
            "epoch",
            "steps",
            "generator loss",
            "unigram CE",
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
