"""MLM step time with the vocabulary projection on the masked positions only, against every position.

raylm's forward_loss_sums feeds a masked LM's output layer only the labelled (~15%) positions; the
baseline is the same model, batch and loss from the full [batch, seq, vocab] logits. Forward plus
backward of one batch, alternating the two, median of the repeats, one thread.

    python bench/mlm_logits.py
"""

from __future__ import annotations

import statistics
import time

import common

# (vocab, hidden, layers): bert-base's vocabulary on a small encoder, and a small vocabulary.
SHAPES = [(30522, 256, 4), (8000, 128, 2)]
BATCH, SEQUENCE, MASKED = 8, 128, 0.15


def step_seconds(shape: tuple[int, int, int], repeats: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertForMaskedLM

    from raylm.models.modeling import MLM, forward_loss_sums

    vocab, hidden, layers = shape
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=4 * hidden,
        )
    )
    input_ids = torch.randint(5, vocab, (BATCH, SEQUENCE))
    labels = torch.full_like(input_ids, -100)
    masked = torch.rand(input_ids.shape) < MASKED
    labels[masked] = input_ids[masked]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "target_positions": masked.reshape(-1).nonzero().squeeze(1),
        "n_input_tokens": input_ids.numel(),  # no padding, as the collator counts it
    }

    def every_position():
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(
            logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).backward()

    def masked_only():
        forward_loss_sums(model, batch, MLM)["target_loss"].backward()

    times: dict = {every_position: [], masked_only: []}
    for step in range(repeats + 2):
        for run in times:
            started = time.perf_counter()
            run()
            if step >= 2:  # the first two are warm-up
                times[run].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    return statistics.median(times[every_position]), statistics.median(times[masked_only])


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    options = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    common.begin_measuring(options)
    # --smoke: the small vocabulary's shape, one timed step each way.
    shapes, repeats = (SHAPES[-1:], 1) if options.smoke else (SHAPES, options.repeats)
    for shape in shapes:
        full, fast = step_seconds(shape, repeats)
        vocab, hidden, layers = shape
        print(
            f"BERT vocab {vocab}, hidden {hidden}, {layers} layers, batch {BATCH}x{SEQUENCE}: "
            f"every position {full * 1000:.0f} ms, masked only {fast * 1000:.0f} ms per step: {full / fast:.2f}x faster"
        )
    common.print_load("end")


if __name__ == "__main__":
    main()
