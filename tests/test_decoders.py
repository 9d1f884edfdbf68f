"""Llama-, Qwen2- and Mistral-style decoders get what GPT-2 gets: the chunked output layer and loss, the document
mask of packed blocks, and FSDP, torch.compile and resumed runs (tiny models built from their configs)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DECODER, read_trace, tiny_args
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from raylm import LanguageModelingModel
from raylm.data.collators import CollatorSpec, collate
from raylm.data.datasets import ExampleSpec, document_starts, packed_blocks
from raylm.data.packing import check_document_mask_support
from raylm.errors import ConfigError
from raylm.models.modeling import CLM, _causal_lm_output_layer, forward_loss_sums, model_inputs

VOCAB, PAD, EOS = 97, 0, 2
DECODERS = {
    "llama": TINY_DECODER,
    "qwen2": TINY_DECODER,  # adds biases to the query, key and value projections
    "mistral": {**TINY_DECODER, "sliding_window": None},
}


def tiny_decoder(model_type: str, attn_implementation: str = "sdpa", **overrides):
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](vocab_size=VOCAB, **{**DECODERS.get(model_type, {}), **overrides})
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config).eval()


# --- the chunked output layer and loss ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type,overrides,chunked",
    [
        ("llama", {}, True),
        ("qwen2", {}, True),
        ("mistral", {}, True),
        ("gpt2", dict(n_layer=1, n_embd=32, n_head=2, n_positions=64), True),
        # Soft-capped, scaled or biased logits are not the layer's plain output: the logits path serves them.
        ("gemma2", dict(**TINY_DECODER, head_dim=8), False),
        ("cohere", TINY_DECODER, False),
        ("granite", dict(**TINY_DECODER, logits_scaling=4.0), False),
        ("phi", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4), False),
    ],
)
def test_the_chunked_loss_serves_decoders_whose_logits_are_the_output_layers_own(model_type, overrides, chunked):
    model = tiny_decoder(model_type, "eager", **overrides)
    layer = _causal_lm_output_layer(model)
    assert (layer is model.get_output_embeddings()) if chunked else layer is None


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_decoders_chunked_loss_and_gradients_are_the_logits_paths(model_type):
    model = tiny_decoder(model_type)
    input_ids = torch.randint(3, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[2, 10:] = -100  # padding
    attention_mask = (labels != -100).long()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    batch["n_input_tokens"] = int(attention_mask.sum())  # as the collator counts them
    projected = []
    model.get_output_embeddings().register_forward_hook(
        lambda _, inputs, output: projected.append(output.shape[:-1].numel())
    )
    ours = forward_loss_sums(model, batch, CLM)["target_loss"]
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    # The chunked loss took the output layer's input: the layer made logits for no token at all.
    assert projected == [0, 3 * 16]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.backward()
    # Summed in another order than F.cross_entropy's: float32 rounding (measured up to 2.3e-7 of ~1e-2 gradients).
    for grad, param in zip(ours_grads, model.parameters()):
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-6)


# --- the document mask of packed blocks ----------------------------------------------------------------------
def _packed_blocks(block_size: int, seed: int) -> dict:
    """Five documents of 4-18 tokens packed into blocks of `block_size`, as a training rank reads them."""
    rng = np.random.default_rng(seed)
    documents = [rng.integers(3, VOCAB, size=n).tolist() for n in (7, 13, 4, 18, 9)]
    spec = ExampleSpec("text", block_size, (), (EOS,), document_mask=True)
    values, offsets = packed_blocks(documents, spec)
    start_values, start_offsets = document_starts(documents, spec)
    return {
        "input_ids": [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        "document_starts": [start_values[a:b] for a, b in zip(start_offsets[:-1], start_offsets[1:])],
        "example_id": np.arange(len(offsets) - 1),
    }


def _segments(blocks: dict):
    """(block, start, end) of every document (or document part) of every block."""
    for row, (ids, starts) in enumerate(zip(blocks["input_ids"], blocks["document_starts"])):
        bounds = [*starts.tolist(), len(ids)]
        yield from ((row, a, b) for a, b in zip(bounds[:-1], bounds[1:]))


COLLATOR = CollatorSpec(
    objective=CLM, pad_id=PAD, mask_id=PAD, vocab_size=VOCAB, special_ids=(PAD, EOS), mlm_probability=0.15, seed=1
)


@pytest.mark.parametrize(
    "model_type,attn",
    [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa")],
)
def test_a_documents_logits_in_a_packed_block_equal_its_logits_alone(model_type, attn):
    model = tiny_decoder(model_type, attn)
    check_document_mask_support(True, model_type, [model.config])  # served, not refused
    blocks = _packed_blocks(24, seed=0)
    assert len(blocks["input_ids"]) == 3 and len(blocks["input_ids"][-1]) < 24, "the last block is padded"
    packed = collate(blocks, COLLATOR, stream=0)
    unmasked = collate({k: v for k, v in blocks.items() if k != "document_starts"}, COLLATOR, stream=0)
    worst_with, worst_without, segments = 0.0, 0.0, 0
    with torch.no_grad():
        with_mask = model(**model_inputs(model, packed, CLM)).logits
        without_mask = model(**model_inputs(model, unmasked, CLM)).logits
        for row, start, end in _segments(blocks):
            ids = torch.as_tensor(blocks["input_ids"][row][start:end], dtype=torch.long)[None]
            alone = model(input_ids=ids).logits[0]  # the model's own call, with its own positions and mask
            worst_with = max(worst_with, float((with_mask[row, start:end] - alone).abs().max()))
            if start > 0:
                worst_without = max(worst_without, float((without_mask[row, start:end] - alone).abs().max()))
            segments += 1
    assert segments >= 6
    # Rotary positions make attention depend on distances only: here the mask is what keeps a document alone.
    assert worst_with < 1e-5, f"a document sees the others in its block: {worst_with}"
    assert worst_without > 1e-3, "without the mask the later documents see the earlier ones (else nothing is checked)"


def test_a_decoders_packed_loss_is_the_sum_of_its_documents_losses():
    model = tiny_decoder("llama")
    blocks = _packed_blocks(24, seed=1)
    with torch.no_grad():
        packed = forward_loss_sums(model, collate(blocks, COLLATOR, stream=0), CLM)["target_loss"]
        alone = sum(
            forward_loss_sums(
                model,
                collate({"input_ids": [blocks["input_ids"][row][a:b]], "example_id": np.arange(1)}, COLLATOR, 0),
                CLM,
            )["target_loss"]
            for row, a, b in _segments(blocks)
        )
    assert math.isclose(float(packed), float(alone), rel_tol=1e-5)


def test_a_sliding_attention_window_is_refused_with_the_document_mask():
    windowed = CONFIG_MAPPING["mistral"](vocab_size=VOCAB, **{**TINY_DECODER, "sliding_window": 16})
    with pytest.raises(ConfigError, match=r"sliding attention window \(16 tokens\).*'sliding_window': None"):
        check_document_mask_support(True, "mistral", [windowed])
    check_document_mask_support(False, "mistral", [windowed])
    gemma2 = CONFIG_MAPPING["gemma2"](vocab_size=VOCAB, **TINY_DECODER)
    with pytest.raises(ConfigError, match="gemma2.*not one raylm has checked"):
        check_document_mask_support(True, "gemma2", [gemma2])


# --- FSDP, resume and torch.compile, on packed blocks with the document mask ----------------------------------
# One layer: inductor's compile of the resumed run is this section's main cost.
TINY_RUN = {**TINY_DECODER, "num_hidden_layers": 1}
RUN_STEPS = 4
# fp32 on CPU: the resumed run sums each step's loss over one rank's two micro-batches where the FSDP run summed
# the two ranks' shares, and inductor fuses float32 reductions: ulp-level (~1e-7) differences, far below a wrong
# gradient's effect (1e-2), that AdamW carries into the next step.
RTOL = 1e-5


def _fsdp_run(model_type: str, root, corpus, **overrides) -> dict:
    """A tiny decoder trained from scratch with FSDP on 2 workers, packed blocks with the document mask, a checkpoint
    every 2 steps: {"out", "steps", "starts"}."""
    args = tiny_args(
        root / "out",
        mlm=False,
        vocab_size=400,
        dataset_type="text",
        packing_document_mask=True,
        config=TINY_RUN,
        block_size=64,
        learning_rate=3e-3,
        train_batch_size=4,
        max_steps=RUN_STEPS,
        logging_steps=1,
        save_steps=2,
        num_workers=2,
        parallel_strategy="fsdp",
        **overrides,
    )
    model = LanguageModelingModel(model_type, None, args=args, train_files=corpus[0])
    (root / "trace").mkdir()
    global_step, _ = model.train_model(corpus[0], _diagnostics={"trace_dir": str(root / "trace")})
    assert global_step == RUN_STEPS
    steps, starts = read_trace(root / "trace")
    return {"model_type": model_type, "out": str(root / "out"), "steps": steps, "starts": starts}


@pytest.fixture(scope="module")
def qwen2_fsdp_run(ray_session, corpus, tmp_path_factory):
    """Qwen2's checkpoints uploaded asynchronously: each rank's shards on Ray's upload thread; at step 4 every rank
    waits for step 2's upload before the checkpoint's collectives."""
    return _fsdp_run("qwen2", tmp_path_factory.mktemp("qwen2_fsdp"), corpus, checkpoint_upload_mode="async")


@pytest.fixture(scope="module")
def llama_fsdp_run(ray_session, corpus, tmp_path_factory):
    return _fsdp_run("llama", tmp_path_factory.mktemp("llama_fsdp"), corpus)


RUNS = [("qwen2_fsdp_run", "Qwen2ForCausalLM"), ("llama_fsdp_run", "LlamaForCausalLM")]


@pytest.mark.parametrize("run, architecture", RUNS)
def test_a_decoder_trains_sharded_and_saves_a_hugging_face_folder(run, architecture, request):
    run = request.getfixturevalue(run)
    steps, starts = run["steps"], run["starts"]
    saved = AutoModelForCausalLM.from_pretrained(run["out"])
    assert saved.config.architectures == [architecture]
    full_mb = sum(p.numel() * p.element_size() for p in saved.parameters()) / 2**20
    for rank in (0, 1):
        assert sorted(steps[rank]) == list(range(1, RUN_STEPS + 1))
        assert all(math.isfinite(record["loss"]) for record in steps[rank].values())
        [start] = starts[rank]
        # Each rank holds half of every block's and the root's weights.
        assert start["parallel_strategy"] == "fsdp" and start["param_memory_mb"] == pytest.approx(full_mb / 2, rel=0.1)
    # The global loss (the ranks' shares summed) falls: the steps train.
    assert steps[0][RUN_STEPS]["loss"] + steps[1][RUN_STEPS]["loss"] < steps[0][1]["loss"] + steps[1][1]["loss"]


@pytest.mark.parametrize("run", [run for run, _ in RUNS])
def test_a_sharded_decoders_checkpoint_resumes_compiled_on_one_worker_with_its_losses(run, corpus, tmp_path, request):
    """The FSDP run's checkpoint at step 2, resumed on one worker in the driver (DDP, twice the accumulation: the
    same global batches) with torch_compile: steps 3 and 4 have the FSDP run's global losses, and nothing is
    compiled again after the first step."""
    run = request.getfixturevalue(run)
    resumed = LanguageModelingModel(
        run["model_type"],
        os.path.join(run["out"], "checkpoint-2"),
        args={
            "output_dir": str(tmp_path / "out"),
            "num_workers": 1,
            "parallel_strategy": "ddp",
            "gradient_accumulation_steps": 2,
            "torch_compile": True,
        },
    )
    assert resumed.args.packing_document_mask
    (tmp_path / "trace").mkdir()
    global_step, _ = resumed.train_model(corpus[0], _diagnostics={"trace_dir": str(tmp_path / "trace")})
    steps, starts = read_trace(tmp_path / "trace")
    assert global_step == RUN_STEPS and [start["resumed_from"] for start in starts[0]] == [2]
    assert sorted(steps[0]) == [3, 4]
    reference = run["steps"]
    for step, record in steps[0].items():
        assert sorted(record["example_ids"]) == sorted(
            reference[0][step]["example_ids"] + reference[1][step]["example_ids"]
        )
        assert record["loss"] == pytest.approx(reference[0][step]["loss"] + reference[1][step]["loss"], rel=RTOL), step
    progress = [
        r
        for r in map(json.loads, open(tmp_path / "out" / "training_log.jsonl", encoding="utf-8"))
        if r.get("kind") == "train"
    ]
    assert [r["global_step"] for r in progress] == [3, 4]
    assert progress[0]["compiled_graphs"] >= 1 and [r["recompilations"] for r in progress] == [0, 0]


# --- the optimizer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_weight_decay_skips_the_norms_and_biases_of_a_modern_decoder(model_type):
    from raylm.config import LanguageModelingArgs
    from raylm.training.optim import build_optimizer

    model = tiny_decoder(model_type)
    optimizer = build_optimizer(model, LanguageModelingArgs(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    names = {id(p): name for name, p in model.named_parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    # Llama names its norms input_layernorm / post_attention_layernorm / model.norm: none of GPT-2's or BERT's names.
    assert {names[i] for i in plain} == {n for n, p in model.named_parameters() if p.ndim < 2}
    assert any("input_layernorm" in names[i] for i in plain) and "model.norm.weight" in {names[i] for i in plain}
    assert all(model.get_parameter(names[i]).ndim == 2 for i in decayed) and len(decayed) > 0
