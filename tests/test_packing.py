"""Document-aware packing (packing_document_mask): stored document starts, positions, labels and masks, so that a
document inside a packed block is computed as if it were alone."""

import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_ELECTRA, TINY_GENERATOR, TINY_GPT2, small_config, tiny_args
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.data.collators import ELECTRA_MASKING, IGNORE_INDEX, CollatorSpec, collate
from raylm.data.datasets import ExampleSpec, document_starts, packed_blocks
from raylm.data.example_store import BlockReader, read_store, store_key
from raylm.data.packing import check_document_mask_support
from raylm.errors import ConfigError
from raylm.models.electra import ORIGINAL_HISTOGRAM, REPLACED_HISTOGRAM, ElectraPair
from raylm.models.modeling import CLM, ELECTRA, MLM, forward_loss_sums, model_inputs

VOCAB = 60
PAD, CLS, SEP, MASK = 0, 1, 2, 3


def _documents(seed=0, lengths=(7, 13, 4, 18, 9)):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, VOCAB, size=n).tolist() for n in lengths]


def _blocks(spec: ExampleSpec, token_lists) -> dict:
    """The packed blocks of `token_lists` as a training rank reads them: ids and document starts per block."""
    values, offsets = packed_blocks(token_lists, spec)
    start_values, start_offsets = document_starts(token_lists, spec)
    return {
        "input_ids": [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        "document_starts": [start_values[a:b] for a, b in zip(start_offsets[:-1], start_offsets[1:])],
        "example_id": np.arange(len(offsets) - 1),
    }


def _segments(blocks: dict):
    """(block, start, end) of every segment of every block."""
    for row, (ids, starts) in enumerate(zip(blocks["input_ids"], blocks["document_starts"])):
        bounds = [*starts.tolist(), len(ids)]
        yield from ((row, a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def _spec(objective: str) -> CollatorSpec:
    return CollatorSpec(
        objective=objective,
        pad_id=PAD,
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=(PAD, CLS, SEP, MASK),
        mlm_probability=0.3,
        seed=1,
        **(ELECTRA_MASKING if objective == ELECTRA else {}),
    )


def _model(model_type: str, attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    config = small_config(model_type, VOCAB, 64, pad_id=PAD)
    config._attn_implementation = attn_implementation
    auto = AutoModelForCausalLM if model_type == "gpt2" else AutoModelForMaskedLM
    return auto.from_config(config).eval()


# --- the stored boundaries ------------------------------------------------------------------------------
def test_document_starts_mark_each_document_in_its_block():
    # Blocks of 8: [CLS] + 7 text tokens; every document is followed by [SEP].
    spec = ExampleSpec("text", 8, (CLS,), (SEP,), document_mask=True)
    blocks = _blocks(spec, [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30], [40, 41, 42, 43, 44, 45]])
    assert [ids.tolist() for ids in blocks["input_ids"]] == [
        [CLS, 10, 11, 12, SEP, 20, 21, 22],
        [CLS, 23, 24, 25, 26, 27, 28, SEP],
        [CLS, 30, SEP, 40, 41, 42, 43, 44],
        [CLS, 45, SEP],
    ]
    # A block opens with a segment: a document's rest, or ([CLS] and) the document that starts right there.
    assert [starts.tolist() for starts in blocks["document_starts"]] == [[0, 5], [0], [0, 3], [0]]


def test_document_starts_are_part_of_the_store_key():
    tokenizer = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    keys = {
        store_key([], 1.0, "text", tokenizer, ExampleSpec("text", 64, (), (SEP,), document_mask=mask))[0]
        for mask in (False, True)
    }
    assert len(keys) == 2, "a store without document starts must not be served for packing_document_mask"


# --- positions, labels and masks --------------------------------------------------------------------------
def test_clm_labels_hide_each_documents_first_token_and_positions_restart():
    batch = {
        "input_ids": [np.array([50, 51, SEP, 60, 61, 62, SEP, 70]), np.array([80, SEP, 90])],
        "document_starts": [np.array([0, 3, 7]), np.array([0, 2])],
        "example_id": np.arange(2),
    }
    tensors = collate(batch, _spec(CLM), stream=0)
    assert tensors["position_ids"][0, :8].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert tensors["position_ids"][1, :3].tolist() == [0, 1, 0]
    assert tensors["document_ids"][0, :8].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert (tensors["document_ids"][1, 3:] == -1).all(), "padding is a segment of its own"
    labels = tensors["labels"]
    assert labels[0, [0, 3, 7]].tolist() == [IGNORE_INDEX] * 3 and labels[1, [0, 2]].tolist() == [IGNORE_INDEX] * 2
    assert labels[0, [1, 2, 4, 5, 6]].tolist() == [51, SEP, 61, 62, SEP]
    # Next-token targets: every real token after the first of its document.
    assert tensors["n_targets"] == 5 + 1
    without = collate({k: v for k, v in batch.items() if k != "document_starts"}, _spec(CLM), stream=0)
    assert without["n_targets"] == 7 + 2 and "position_ids" not in without


@pytest.mark.parametrize(
    "model_type,attn",
    [
        ("gpt2", "sdpa"),
        ("gpt2", "eager"),
        ("bert", "sdpa"),
        ("bert", "eager"),
        ("roberta", "sdpa"),
        ("distilbert", "sdpa"),
    ],
)
def test_a_documents_logits_in_a_packed_block_equal_its_logits_alone(model_type, attn):
    model = _model(model_type, attn)
    objective = CLM if model_type == "gpt2" else MLM
    prefix = () if objective == CLM else (CLS,)
    spec = ExampleSpec("text", 24, prefix, (SEP,), document_mask=True)
    blocks = _blocks(spec, _documents())
    assert len(blocks["input_ids"]) == 3 and len(blocks["input_ids"][-1]) < 24, "the last block is padded"
    collator = _spec(CLM)  # unmasked ids: the comparison is of the model, not of the masking
    packed = collate(blocks, collator, stream=0)
    unmasked = collate({k: v for k, v in blocks.items() if k != "document_starts"}, collator, stream=0)
    with torch.no_grad():
        with_mask = model(**model_inputs(model, packed, objective)).logits
        without_mask = model(**model_inputs(model, unmasked, objective)).logits
        worst_with, worst_without, segments = 0.0, 0.0, 0
        for row, start, end in _segments(blocks):
            # Alone: the model's own call on the segment, with its own default positions.
            alone = model(
                input_ids=torch.as_tensor(blocks["input_ids"][row][start:end], dtype=torch.long)[None]
            ).logits[0]
            worst_with = max(worst_with, float((with_mask[row, start:end] - alone).abs().max()))
            if start > 0:
                worst_without = max(worst_without, float((without_mask[row, start:end] - alone).abs().max()))
            segments += 1
    assert segments >= 6
    assert worst_with < 1e-5, f"a document sees the others in its block: {worst_with}"
    assert worst_without > 1e-3, (
        "without the mask the later documents see the earlier ones (else this test checks nothing)"
    )


def test_the_clm_loss_of_a_packed_block_is_the_sum_of_its_documents_losses():
    model = _model("gpt2")
    blocks = _blocks(ExampleSpec("text", 24, (), (SEP,), document_mask=True), _documents(seed=1))
    with torch.no_grad():
        packed = forward_loss_sums(model, collate(blocks, _spec(CLM), stream=0), CLM)["target_loss"]
        alone = sum(
            forward_loss_sums(
                model,
                collate(
                    {"input_ids": [blocks["input_ids"][row][a:b]], "example_id": np.arange(1)}, _spec(CLM), stream=0
                ),
                CLM,
            )["target_loss"]
            for row, a, b in _segments(blocks)
        )
        unmasked = forward_loss_sums(
            model, collate({k: v for k, v in blocks.items() if k != "document_starts"}, _spec(CLM), stream=0), CLM
        )["target_loss"]
    assert math.isclose(float(packed), float(alone), rel_tol=1e-5)
    assert not math.isclose(float(unmasked), float(alone), rel_tol=1e-2)


def test_electra_keeps_both_models_inside_each_document():
    torch.manual_seed(0)
    pair = ElectraPair(
        ElectraForMaskedLM(ElectraConfig(vocab_size=VOCAB, **{**TINY_ELECTRA, **TINY_GENERATOR})),
        ElectraForPreTraining(ElectraConfig(vocab_size=VOCAB, **TINY_ELECTRA)),
        tie_embeddings=True,
    ).eval()
    blocks = _blocks(ExampleSpec("text", 24, (CLS,), (SEP,), document_mask=True), _documents(seed=2))
    batch = collate(blocks, _spec(ELECTRA), stream=0)
    assert batch["n_targets"] > 5
    with torch.no_grad():
        packed = forward_loss_sums(pair, batch, ELECTRA)
        alone: dict = {}
        for row, a, b in _segments(blocks):
            # The packed batch's own masked ids, labels and sampling numbers, cut to the segment.
            part = {k: batch[k][row : row + 1, a:b] for k in ("input_ids", "labels", "sampling_uniform")}
            part["attention_mask"] = torch.ones_like(part["input_ids"])
            part["n_input_tokens"] = b - a
            for key, value in forward_loss_sums(pair, part, ELECTRA).items():
                # Scalar sums, and in evaluation the discriminator's logit histograms (one count per bin).
                if value.dim():
                    alone[key] = [x + y for x, y in zip(alone.get(key, [0] * len(value)), value.tolist())]
                else:
                    alone[key] = alone.get(key, 0) + float(value)
    for key in ("target_loss", "token_loss"):
        assert math.isclose(float(packed[key]), alone[key], rel_tol=1e-5), key
    assert [int(packed[k]) for k in ("true_positives", "false_positives")] == [
        alone["true_positives"],
        alone["false_positives"],
    ]
    for key in (REPLACED_HISTOGRAM, ORIGINAL_HISTOGRAM):
        assert packed[key].tolist() == alone[key], key


# --- what is refused, before anything starts ---------------------------------------------------------------
def test_packing_document_mask_needs_packed_text_and_a_model_that_takes_it():
    with pytest.raises(ConfigError, match="packing_document_mask.*dataset_type='text'"):
        LanguageModelingArgs.from_dict({"packing_document_mask": True, "dataset_type": "line_by_line"}).validate()
    LanguageModelingArgs.from_dict({"packing_document_mask": True, "dataset_type": "text"}).validate()

    openai = small_config("openai-gpt", VOCAB, 32)
    with pytest.raises(
        ConfigError, match="packing_document_mask.*openai-gpt.*Set packing_document_mask=False, or use one of gpt2"
    ):
        check_document_mask_support(True, "openai-gpt", [openai])
    check_document_mask_support(False, "openai-gpt", [openai])
    # Flash and flex attention keep documents apart by position ids (tests/test_line_packing.py); paged attention
    # does not.
    paged = _model("gpt2").config
    paged._attn_implementation = "paged|eager"
    with pytest.raises(ConfigError, match=r"'paged\|eager' attention.*attn_implementation='sdpa'"):
        check_document_mask_support(True, "gpt2", [paged])


# --- one run ---------------------------------------------------------------------------------------------------
def test_a_gpt2_run_with_document_masks_trains_on_a_store_that_carries_them(ray_session, corpus, tmp_path):
    args = tiny_args(
        tmp_path / "out",
        mlm=False,
        vocab_size=400,
        dataset_type="text",
        packing_document_mask=True,
        config=TINY_GPT2,
        block_size=64,
        max_steps=3,
        train_batch_size=8,
        learning_rate=3e-3,
        warmup_steps=1,
        logging_steps=1,
        save_steps=-1,
        cache_dir=str(tmp_path / "cache"),
        storage_path=str(tmp_path / "ray"),
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[1])
    global_step, train_loss = model.train_model(corpus[1])
    assert global_step == 3 and math.isfinite(train_loss)
    events = map(json.loads, (tmp_path / "out" / "training_log.jsonl").read_text().splitlines())
    losses = [event["loss"] for event in events if event["kind"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]

    (manifest,) = glob.glob(str(tmp_path / "cache" / "*" / "manifest.json"))
    store = read_store(os.path.dirname(manifest))
    rows = store.block_rows()
    batch = BlockReader(store).examples(
        np.repeat(np.arange(len(rows)), rows), np.concatenate([np.arange(n) for n in rows])
    )
    eos = model.tokenizer.eos_token_id
    assert len(batch["document_starts"]) == len(batch["input_ids"]) == store.num_examples > 10
    for ids, starts in zip(batch["input_ids"], batch["document_starts"]):
        # One line, one document: they start at 0 and right after each eos.
        assert starts.tolist() == sorted({0, *(np.flatnonzero(ids[:-1] == eos) + 1).tolist()})
    # Evaluation reads the store through Ray Data's numpy batches.
    evaluated = collate(store.dataset().take_batch(4, batch_format="numpy"), _spec(CLM), stream=0)
    assert (
        evaluated["position_ids"].shape == evaluated["input_ids"].shape and (evaluated["position_ids"][:, 0] == 0).all()
    )
