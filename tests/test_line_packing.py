"""`simple` / `line_by_line`: several whole lines per row, each a sample of its own (datasets.packed_lines).

A line inside a packed row must be computed exactly as the same line alone in a row of its own (what
these dataset types gave before lines were packed): same logits, same loss, for GPT-2, BERT and ELECTRA;
evaluation's loss must not depend on how lines were packed; and an epoch of short lines must take
about tokens / (batch * block_size) steps, not one step per train_batch_size lines.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BERT, TINY_GPT2, small_config, tiny_args
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.data.collators import ELECTRA_MASKING, EVAL_STREAM, IGNORE_INDEX, CollatorSpec, collate
from raylm.data.datasets import ExampleSpec, line_examples, packed_lines
from raylm.data.epoch_data import RankExamples, epoch_order, rank_steps
from raylm.data.example_store import BlockReader, stored_examples
from raylm.data.packing import check_document_mask_support, takes_document_mask
from raylm.data.tokenization import train_tokenizer
from raylm.errors import ConfigError
from raylm.models.electra import ElectraPair
from raylm.models.modeling import CLM, ELECTRA, MLM, forward_loss_sums, model_inputs
from raylm.training.checkpoints import read_trainer_state
from raylm.training.evaluation import batch_eval_sums, summarize

VOCAB = 60
PAD, CLS, SEP, MASK = 0, 1, 2, 3
BLOCK = 32


def _lines(seed=0, count=14, shortest=2, longest=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, VOCAB, size=n).tolist() for n in rng.integers(shortest, longest + 1, size=count)]


def _spec(objective: str, block_size: int = BLOCK, dataset_type: str = "simple") -> ExampleSpec:
    # A causal LM's line ends with eos (SEP stands in for it); a masked model's line is [CLS] line [SEP].
    prefix = () if objective == CLM else (CLS,)
    return ExampleSpec(dataset_type, block_size, prefix, (SEP,), document_mask=True)


def _rows(spec: ExampleSpec, token_lists) -> dict:
    """Packed rows as a training rank reads them from the store."""
    values, offsets, starts, start_offsets = packed_lines(token_lists, spec)
    return {
        "input_ids": [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        "document_starts": [starts[a:b] for a, b in zip(start_offsets[:-1], start_offsets[1:])],
        "example_id": np.arange(len(offsets) - 1),
    }


def _segments(rows: dict):
    """(row, start, end) of every line of every row."""
    for row, (ids, starts) in enumerate(zip(rows["input_ids"], rows["document_starts"])):
        bounds = [*starts.tolist(), len(ids)]
        yield from ((row, a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def _collator(objective: str) -> CollatorSpec:
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


def _model(model_type: str):
    torch.manual_seed(0)
    config = small_config(model_type, VOCAB, BLOCK)
    auto = AutoModelForCausalLM if model_type == "gpt2" else AutoModelForMaskedLM
    return auto.from_config(config).eval()


# --- the rows ---------------------------------------------------------------------------------------------------
def test_packed_lines_hold_whole_lines_in_file_order_and_mark_where_each_starts():
    spec = ExampleSpec("simple", 8, (CLS,), (SEP,), document_mask=True)
    rows = _rows(spec, [[10, 11], [20, 21, 22, 23, 24, 25, 26, 27], [30], [40, 41, 42], [50]])
    # The 8-token line fills a row of its own, truncated to 6 + its specials; the others share two rows.
    assert [ids.tolist() for ids in rows["input_ids"]] == [
        [CLS, 10, 11, SEP, CLS, 50, SEP],
        [CLS, 20, 21, 22, 23, 24, 25, SEP],
        [CLS, 30, SEP, CLS, 40, 41, 42, SEP],
    ]
    assert [starts.tolist() for starts in rows["document_starts"]] == [[0, 4], [0], [0, 3]]


@pytest.mark.parametrize("sliding_window", [False, True])
def test_every_line_example_is_in_exactly_one_row_and_short_lines_fill_their_rows(sliding_window):
    # Short lines, and a few longer than a row: truncated, or cut into windows.
    lines = _lines(seed=3, count=400, shortest=1, longest=20) + _lines(seed=4, count=10, shortest=40, longest=60)
    spec = ExampleSpec("simple", BLOCK, (CLS,), (SEP,), sliding_window, 0.5, document_mask=True)
    rows = _rows(spec, lines)
    alone = line_examples(lines, spec)
    packed = [rows["input_ids"][row][a:b].tolist() for row, a, b in _segments(rows)]
    assert sorted(packed) == sorted(alone) and len(packed) == len(alone) > len(lines) * (1 if sliding_window else 0)
    assert all(len(ids) <= BLOCK for ids in rows["input_ids"])
    tokens = sum(map(len, alone))
    # Best fit decreasing: about as few rows as the tokens need, far fewer than one per line.
    assert len(rows["input_ids"]) <= math.ceil(tokens / BLOCK * 1.03) and len(rows["input_ids"]) < len(alone) / 2


def test_only_models_that_take_a_document_mask_get_packed_lines():
    gpt2, openai = small_config("gpt2", VOCAB, BLOCK), small_config("openai-gpt", VOCAB, BLOCK)
    gpt2._attn_implementation = openai._attn_implementation = "sdpa"
    assert takes_document_mask([gpt2]) and not takes_document_mask([openai])
    eager = small_config("gpt2", VOCAB, BLOCK)
    eager._attn_implementation = "eager"
    assert takes_document_mask([eager]) and not takes_document_mask([gpt2, eager]), "one mask for both halves"


# --- a line packed is the line alone ----------------------------------------------------------------------------
def _line_losses(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """The summed loss of one line's positions ([length, vocab] logits and [length] labels)."""
    if causal:
        logits, labels = logits[:-1], labels[1:]
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_a_lines_logits_and_loss_in_a_packed_row_equal_its_logits_and_loss_alone(model_type):
    model = _model(model_type)
    objective = CLM if model_type == "gpt2" else MLM
    rows = _rows(_spec(objective), _lines())
    assert len(rows["input_ids"]) < 14 / 2, "several lines share each row (else this test checks nothing)"
    packed = collate(rows, _collator(objective), stream=0)
    unpacked = collate({k: v for k, v in rows.items() if k != "document_starts"}, _collator(objective), stream=0)
    assert objective == CLM or (packed["labels"] != IGNORE_INDEX).sum() > 10
    with torch.no_grad():
        logits = model(**model_inputs(model, packed, objective)).logits
        leaking = model(**model_inputs(model, unpacked, objective)).logits
        worst, worst_leak, loss_alone_total = 0.0, 0.0, 0.0
        for row, a, b in _segments(rows):
            # Alone: the line in a row of its own (the ids the collator gave it, masked for BERT), default positions.
            ids, labels = packed["input_ids"][row, a:b], packed["labels"][row, a:b].clone()
            if objective == CLM:
                labels[0] = IGNORE_INDEX
            alone = model(input_ids=ids[None]).logits[0]
            worst = max(worst, float((logits[row, a:b] - alone).abs().max()))
            if a > 0:
                worst_leak = max(worst_leak, float((leaking[row, a:b] - alone).abs().max()))
            loss_packed = _line_losses(logits[row, a:b], labels, objective == CLM)
            loss_alone = _line_losses(alone, labels, objective == CLM)
            assert math.isclose(float(loss_packed), float(loss_alone), rel_tol=1e-5, abs_tol=1e-6)
            loss_alone_total += float(loss_alone)
        total = forward_loss_sums(model, packed, objective)["target_loss"]
    assert worst < 1e-5, f"a line sees the other lines of its row: {worst}"
    assert worst_leak > 1e-3, "without the document mask later lines see earlier ones (else this checks nothing)"
    assert math.isclose(float(total), loss_alone_total, rel_tol=1e-5)


def test_an_electra_lines_losses_in_a_packed_row_equal_its_losses_alone():
    torch.manual_seed(0)
    config = small_config("electra", VOCAB, BLOCK)
    pair = ElectraPair(ElectraForMaskedLM(config), ElectraForPreTraining(config), tie_embeddings=True).eval()
    rows = _rows(_spec(ELECTRA), _lines(seed=2))
    batch = collate(rows, _collator(ELECTRA), stream=0)
    assert batch["n_targets"] > 10 and len(rows["input_ids"]) < 14 / 2
    with torch.no_grad():
        packed = forward_loss_sums(pair, batch, ELECTRA)
        alone: dict = {}
        for row, a, b in _segments(rows):
            part = {k: batch[k][row : row + 1, a:b] for k in ("input_ids", "labels", "sampling_uniform")}
            part["attention_mask"] = torch.ones_like(part["input_ids"])
            part["n_input_tokens"] = b - a
            for key, value in forward_loss_sums(pair, part, ELECTRA).items():
                if not value.dim():
                    alone[key] = alone.get(key, 0.0) + float(value)
        unmasked = forward_loss_sums(pair, {k: v for k, v in batch.items() if k != "document_ids"}, ELECTRA)
    for key in ("target_loss", "token_loss"):
        assert math.isclose(float(packed[key]), alone[key], rel_tol=1e-5), key
    # An untrained pair barely tells contexts apart: the lines leaking into each other move its loss by ~5e-4.
    for key in ("target_loss", "token_loss"):
        leak, error = (abs(float(sums[key]) - alone[key]) for sums in (unmasked, packed))
        assert leak > 1e-5 * alone[key] and leak > 30 * error, f"{key}: else this test checks nothing"
    for key in ("true_positives", "false_positives", "true_negatives", "false_negatives"):
        assert int(packed[key]) == alone[key], key


def test_eval_loss_does_not_depend_on_how_lines_were_packed():
    """A causal LM's evaluation (no random masks in its targets): one line a row, or packed into rows of two sizes."""
    model = _model("gpt2")
    lines = _lines(seed=5, count=40, longest=22)  # each line and its eos fit the smaller rows whole
    layouts = {
        "alone": {"input_ids": [np.asarray(ids) for ids in line_examples(lines, _spec(CLM))]},
        "rows of 32": _rows(_spec(CLM), lines),
        "rows of 24": _rows(_spec(CLM, block_size=24), lines),
    }
    results = {}
    for name, rows in layouts.items():
        totals: dict = {}
        count = len(rows["input_ids"])
        for first in range(0, count, 4):
            batch = {k: v[first : first + 4] for k, v in rows.items() if k != "example_id"}
            batch["example_id"] = np.arange(first, min(first + 4, count))
            with torch.inference_mode():
                for key, value in batch_eval_sums(model, collate(batch, _collator(CLM), EVAL_STREAM), CLM).items():
                    totals[key] = totals.get(key, 0.0) + value
        results[name] = summarize(totals, CLM, 1.0)
    assert len(layouts["rows of 24"]["input_ids"]) > len(layouts["rows of 32"]["input_ids"]) > 0
    assert len({result["eval_tokens"] for result in results.values()}) == 1
    for name in ("rows of 32", "rows of 24"):
        assert math.isclose(results[name]["eval_loss"], results["alone"]["eval_loss"], rel_tol=1e-5), name


# --- one run ----------------------------------------------------------------------------------------------------
def _short_lines(corpus_path: str, path) -> int:
    """The sample corpus cut into sentences, one a line (a corpus of short lines); returns their count."""
    text = open(corpus_path, encoding="utf-8").read()
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(". ") if len(s.split()) >= 3]
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return len(sentences)


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_a_simple_epoch_of_short_lines_takes_about_tokens_over_batch_times_block_steps(
    ray_session, corpus, tmp_path, model_type
):
    masked = model_type == "bert"
    lines_path = tmp_path / "short.txt"
    n_lines = _short_lines(corpus[1], lines_path)
    block_size, batch_size = 128, 4
    args = tiny_args(
        tmp_path / "out",
        mlm=masked,
        vocab_size=400,
        dataset_type="simple",
        config=TINY_BERT if masked else TINY_GPT2,
        block_size=block_size,
        train_batch_size=batch_size,
        num_train_epochs=1,
        logging_steps=1,
        save_steps=-1,
        cache_dir=str(tmp_path / "cache"),
    )
    model = LanguageModelingModel(model_type, None, args=args, train_files=str(lines_path))
    global_step, train_loss = model.train_model(str(lines_path))
    assert math.isfinite(train_loss)
    # Every line and its specials (a causal LM's eos; [CLS] and [SEP]), truncated to block_size.
    encoded = model.tokenizer([line for line in lines_path.read_text().splitlines() if line.strip()])["input_ids"]
    extra = 0 if masked else 1
    tokens = sum(min(len(ids) + extra, block_size) for ids in encoded)
    assert tokens / n_lines < block_size / 2, "the lines are short (else this checks nothing)"
    assert math.ceil(tokens / (batch_size * block_size)) <= global_step <= 1.05 * tokens / (batch_size * block_size) + 1
    assert global_step < n_lines / batch_size / 2
    # Every token of every line is trained on once.
    assert read_trainer_state(model.checkpoint_path).train_input_tokens == tokens


# --- padding-free attention (flash, flex): rows end to end, documents told apart by position ids -----------------
def test_padding_free_batches_lay_the_rows_real_tokens_end_to_end():
    rows = _rows(_spec(MLM), _lines(seed=6))
    padded = collate(rows, _collator(ELECTRA), stream=0)
    flat = collate(rows, dataclasses.replace(_collator(ELECTRA), padding_free=True), stream=0)
    real = padded["attention_mask"].bool()
    assert real.sum() < real.numel(), "the padded batch has padding (else this checks nothing)"
    for key in ("input_ids", "labels", "position_ids", "sampling_uniform"):
        assert flat[key].shape == (1, int(real.sum())), key
        assert torch.equal(flat[key][0], padded[key][real]), key
    assert flat["attention_mask"].all() and flat["n_targets"] == padded["n_targets"]
    assert torch.equal(flat["labels"].flatten()[flat["target_positions"]], padded["labels"][padded["labels"] != -100])
    # Every line is a segment of its own across the whole row: rows' segment numbers do not collide.
    segments = flat["document_ids"][0]
    assert (torch.diff(segments) >= 0).all() and len(segments.unique()) == sum(1 for _ in _segments(rows))
    assert (flat["position_ids"][0][torch.diff(segments, prepend=segments[:1] - 1) != 0] == 0).all()


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    """What flash attention's variable-length path computes, on the CPU: attention inside each segment, its
    bounds read from the position ids by transformers' own helper (no flash kernel runs on a CPU)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    assert attention_mask is None and query.shape[0] == 1, "a padding-free batch is one row without a mask"
    (bounds, _), _ = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"])
    causal = module.is_causal if is_causal is None else is_causal
    bounds = bounds.tolist()
    out = torch.cat(
        [
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling)
            for q, k, v in (
                (query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]) for a, b in zip(bounds[:-1], bounds[1:])
            )
        ],
        dim=2,
    )
    return out.transpose(1, 2), None


@pytest.fixture
def varlen_flash_attention(monkeypatch):
    """flash_attention_2, as transformers dispatches it, computed by `_varlen_attention`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", _varlen_attention)
    return "flash_attention_2"


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "roberta", "camembert", "xlm-roberta", "electra"])
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_a_lines_logits_padding_free_equal_its_logits_alone(model_type, implementation, request):
    """One row without padding: flash attention gets the position ids alone (its variable-length path, emulated),
    SDPA raylm's block-diagonal mask over the row."""
    if implementation == "flash_attention_2":
        request.getfixturevalue("varlen_flash_attention")
    torch.manual_seed(0)
    objective = CLM if model_type == "gpt2" else MLM
    auto = AutoModelForCausalLM if objective == CLM else AutoModelForMaskedLM
    model = auto.from_config(small_config(model_type, VOCAB, BLOCK, pad_id=PAD)).eval()
    rows = _rows(_spec(objective), _lines(seed=7))
    flat = collate(rows, dataclasses.replace(_collator(CLM), padding_free=True), stream=0)
    with torch.no_grad():
        alone = [
            model(input_ids=torch.as_tensor(rows["input_ids"][r][a:b], dtype=torch.long)[None]).logits[0]
            for r, a, b in _segments(rows)
        ]
        model.config._attn_implementation = implementation
        inputs = model_inputs(model, flat, objective)
        logits = model(**inputs).logits[0]
    assert ("attention_mask" in inputs) == (implementation == "sdpa")
    assert torch.allclose(logits, torch.cat(alone), atol=1e-5), float((logits - torch.cat(alone)).abs().max())


def test_distilbert_with_flash_attention_keeps_one_line_a_row(varlen_flash_attention):
    """DistilBERT's layers never get the position ids, so under flash attention its lines would see each other."""
    config = small_config("distilbert", VOCAB, BLOCK)
    config._attn_implementation = varlen_flash_attention
    assert not takes_document_mask([config])
    with pytest.raises(ConfigError, match="flash_attention_2.*attn_implementation='sdpa'"):
        check_document_mask_support(True, "distilbert", [config])
    config._attn_implementation = "sdpa"
    assert takes_document_mask([config])


def test_an_electra_pairs_losses_padding_free_equal_its_losses_in_padded_rows(varlen_flash_attention):
    torch.manual_seed(0)
    config = small_config("electra", VOCAB, BLOCK)
    pair = ElectraPair(ElectraForMaskedLM(config), ElectraForPreTraining(config), tie_embeddings=True).eval()
    rows = _rows(_spec(ELECTRA), _lines(seed=8))
    with torch.no_grad():
        padded = forward_loss_sums(pair, collate(rows, _collator(ELECTRA), stream=0), ELECTRA)
        for half in (pair.generator, pair.discriminator):
            half.config._attn_implementation = varlen_flash_attention
        flat = collate(rows, dataclasses.replace(_collator(ELECTRA), padding_free=True), stream=0)
        padding_free = forward_loss_sums(pair, flat, ELECTRA)
    for key in ("target_loss", "token_loss"):
        assert math.isclose(float(padding_free[key]), float(padded[key]), rel_tol=1e-5), key
    for key in ("true_positives", "false_positives", "true_negatives", "false_negatives"):
        assert int(padding_free[key]) == int(padded[key]), key


# --- the store and the epoch ------------------------------------------------------------------------------------
def test_a_simple_store_of_packed_lines_is_rebuilt_the_same_and_read_as_the_same_global_batches(
    ray_session, corpus, tmp_path
):
    """Rows are formed once, in the store: a rebuild gives the same rows, and any worker count and any resume
    position read the same examples for each step (epoch_data), as for `text` blocks."""
    lines_path = tmp_path / "short.txt"
    _short_lines(corpus[0], lines_path)
    tokenizer = train_tokenizer(
        "gpt2", [str(lines_path)], LanguageModelingArgs.from_dict({"vocab_size": 400}), is_causal=True
    )
    spec = ExampleSpec("simple", 128, (), (tokenizer.eos_token_id,), document_mask=True)
    built = stored_examples([str(lines_path)], tokenizer, spec, 0.01, str(tmp_path / "cache"), rebuild=False)
    rebuilt = stored_examples([str(lines_path)], tokenizer, spec, 0.01, str(tmp_path / "cache"), rebuild=True)
    assert len(built.files) >= 3

    def read_all(store):
        block_rows = store.block_rows()
        return BlockReader(store).examples(
            np.repeat(np.arange(len(block_rows)), block_rows), np.concatenate([np.arange(n) for n in block_rows])
        )

    first, again = read_all(built), read_all(rebuilt)
    assert [ids.tolist() for ids in first["input_ids"]] == [ids.tolist() for ids in again["input_ids"]]
    assert [s.tolist() for s in first["document_starts"]] == [s.tolist() for s in again["document_starts"]]
    lines = [line for line in lines_path.read_text().splitlines() if line.strip()]
    assert sum(len(s) for s in first["document_starts"]) == len(lines) > 2 * built.num_examples

    def steps(world_size, position=0):
        order = epoch_order([built.block_rows()], None, seed=3, epoch=1, global_batch=24)
        per_rank = [
            list(rank_steps(RankExamples([BlockReader(built)], order), position, 24, 4, rank, world_size))
            for rank in range(world_size)
        ]
        return [
            sorted(int(i) for rank in per_rank for batch in rank[step] for i in batch["example_id"])
            for step in range(len(per_rank[0]))
        ]

    one = steps(1)
    assert steps(2) == steps(3) == one and len(one) == -(-built.num_examples // 24)
    assert steps(2, position=5 * 24) == one[5:], "a resume at a step's position reads the rest of the same epoch"
