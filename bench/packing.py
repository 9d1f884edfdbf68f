"""Step time of packed blocks with packing_document_mask (block-diagonal mask, per-document positions) against without.

The same blocks (documents of 20-120 tokens packed into 128-token blocks, batch 8) are collated both
ways through raylm's collator and trained through forward_loss_sums: forward plus backward, the two
alternating, median of the repeats, one thread, SDPA attention. Without the mask SDPA runs its
mask-free causal path (GPT-2) or is told only about padding (BERT); with it, it reads a [8, 1, 128, 128] mask.

    python bench/packing.py
"""

from __future__ import annotations

import statistics
import time

import common

BATCH = 8
DOCUMENT_TOKENS = (20, 120)


def packed_batch(vocab: int, objective: str) -> tuple[dict, dict]:
    """(with document starts, without) collated batches of the same full blocks."""
    import numpy as np

    from raylm.data.collators import CollatorSpec, collate
    from raylm.data.datasets import ExampleSpec, document_starts, packed_blocks

    rng = np.random.default_rng(0)
    documents = [rng.integers(5, vocab, size=int(n)).tolist() for n in rng.integers(*DOCUMENT_TOKENS, size=BATCH * 4)]
    spec = ExampleSpec("text", common.BLOCK_SIZE, () if objective == "clm" else (1,), (2,), document_mask=True)
    values, offsets = packed_blocks(documents, spec)
    start_values, start_offsets = document_starts(documents, spec)
    blocks = {
        "input_ids": [values[a:b] for a, b in zip(offsets[:BATCH], offsets[1 : BATCH + 1])],
        "document_starts": [start_values[a:b] for a, b in zip(start_offsets[:BATCH], start_offsets[1 : BATCH + 1])],
        "example_id": np.arange(BATCH),
    }
    collator = CollatorSpec(
        objective=objective,
        pad_id=0,
        mask_id=3,
        vocab_size=vocab,
        special_ids=(0, 1, 2, 3),
        mlm_probability=0.15,
        seed=0,
    )
    plain = {k: v for k, v in blocks.items() if k != "document_starts"}
    return collate(blocks, collator, stream=0), collate(plain, collator, stream=0)


def step_seconds(model_type: str, size: str, repeats: int) -> tuple[float, float, float]:
    """(seconds without the mask, with it, documents per block)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from raylm.models.modeling import forward_loss_sums

    objective = "clm" if model_type == "gpt2" else "mlm"
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](vocab_size=common.VOCAB_SIZE, **common.MODEL_CONFIGS[(model_type, size)])
    model = (AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM).from_config(config)
    masked, plain = packed_batch(common.VOCAB_SIZE, objective)

    def run(batch):
        forward_loss_sums(model, batch, objective)["target_loss"].backward()

    times: dict = {"plain": [], "masked": []}
    for step in range(repeats + 2):
        for name, batch in (("plain", plain), ("masked", masked)):
            started = time.perf_counter()
            run(batch)
            if step >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    documents = float((masked["document_ids"].amax(dim=1) + 1).float().mean())
    return statistics.median(times["plain"]), statistics.median(times["masked"]), documents


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    options = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    common.begin_measuring(options)
    sizes = ("tiny",) if options.smoke else ("tiny", "small")
    for model_type, size in [(model_type, size) for model_type in ("gpt2", "bert") for size in sizes]:
        plain, masked, documents = step_seconds(model_type, size, 1 if options.smoke else options.repeats)
        print(
            f"{model_type} {size}, batch {BATCH}x{common.BLOCK_SIZE}, {documents:.1f} documents per block: "
            f"without the mask {plain * 1000:.1f} ms, with it {masked * 1000:.1f} ms per step ({masked / plain:.2f}x)"
        )
    common.print_load("end")


if __name__ == "__main__":
    main()
