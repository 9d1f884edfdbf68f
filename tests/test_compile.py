"""torch_compile: the compiled model trains to the same losses as eager, without recompiling after its first steps."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from raylm import ConfigError, LanguageModelingArgs, LanguageModelingModel

from conftest import TINY_GPT2, tiny_args

# One layer: inductor's compile is the test's cost. Dropout off: inductor draws its dropout masks from its own RNG, so with dropout on the two runs would
# train on different masks and only their trends could be compared.
SMALL_GPT2 = {**TINY_GPT2, "n_layer": 1, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# Inductor fuses and reorders float32 reductions (softmax, layer norm, the loss sum), so an op can differ from
# eager by a few ulps (~1e-7 relative); measured: 8e-8 at step 1, equal after. 1e-5 leaves room for the
# updates to carry such differences through AdamW, which divides each gradient by its own running scale.
RTOL = 1e-5


def _train(tmp_path, corpus, name, **overrides):
    out, trace = tmp_path / name, tmp_path / f"{name}-trace"
    trace.mkdir()
    args = tiny_args(out, mlm=False, vocab_size=400, dataset_type="text", config=SMALL_GPT2, block_size=64,
                     learning_rate=3e-3, train_batch_size=4, max_steps=4, logging_steps=1, save_steps=0, **overrides)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    model.train_model(corpus[0], _diagnostics={"trace_dir": str(trace)})
    losses = {r["step"]: r["loss"] for r in map(json.loads, open(trace / "rank0.jsonl", encoding="utf-8")) if "step" in r}
    progress = [r for r in map(json.loads, open(out / "training_log.jsonl", encoding="utf-8")) if r.get("kind") == "train"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    return losses, progress, keys


def test_compiled_clm_run_has_eager_losses_and_compiles_once(ray_session, corpus, tmp_path):
    eager_losses, eager_progress, eager_keys = _train(tmp_path, corpus, "eager")
    losses, progress, keys = _train(tmp_path, corpus, "compiled", torch_compile=True)

    assert sorted(losses) == sorted(eager_losses) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert losses[step] == pytest.approx(eager_losses[step], rel=RTOL), (step, losses, eager_losses)
    assert losses[4] < losses[1]  # it trains, it does not just replay step 1

    assert "compile_seconds" not in eager_progress[-1]
    by_step = {r["global_step"]: r for r in progress}
    assert by_step[1]["compiled_graphs"] >= 1 and by_step[1]["compile_seconds"] > 0
    # Steps 2-4 have the shapes of step 1: nothing is compiled again.
    assert [by_step[s]["recompilations"] for s in (1, 2, 3, 4)] == [0, 0, 0, 0]
    assert by_step[4]["compiled_graphs"] == by_step[1]["compiled_graphs"]
    assert by_step[4]["compile_seconds"] == by_step[1]["compile_seconds"]

    # The saved model is the plain one: the same weight names as eager, none under torch.compile's _orig_mod.
    assert keys == eager_keys
    assert not any("_orig_mod" in k for k in keys)


def test_compiled_mlm_step_matches_eager_without_recompiling_per_masked_count():
    from torch._dynamo.utils import counters
    from transformers import BertConfig, BertForMaskedLM

    from raylm.evaluation import batch_eval_sums
    from raylm.modeling import forward_loss_sums
    from raylm.worker import compile_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=400, num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    eager = BertForMaskedLM(config)
    compiled = BertForMaskedLM(config)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)

    def batch(n_targets):
        ids = torch.randint(5, 400, (4, 64))
        positions = torch.randperm(ids.numel())[:n_targets].sort().values
        labels = torch.full_like(ids, -100)
        labels.view(-1)[positions] = ids.view(-1)[positions]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "target_positions": positions,
                "n_targets": n_targets, "n_input_tokens": ids.numel()}

    graphs = [counters["stats"]["unique_graphs"]]
    # The masked count differs in every batch, as it does between MLM batches.
    for n_targets in (30, 41, 37):
        tensors = batch(n_targets)
        expected = forward_loss_sums(eager, tensors, "mlm")["target_loss"]
        loss = forward_loss_sums(compiled, tensors, "mlm")["target_loss"]
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=RTOL)
        graphs.append(counters["stats"]["unique_graphs"])
    # The first batch compiles; the next counts reuse its graph.
    assert graphs[1] > graphs[0] and graphs[2:] == [graphs[1]] * 2, graphs

    # Evaluation (eval mode, no gradients) compiles once more, then also reuses its graph.
    eager.eval()
    compiled.eval()
    with torch.inference_mode():
        for n_targets in (33, 28):
            tensors = batch(n_targets)
            expected = batch_eval_sums(eager, tensors, "mlm")["target_loss"]
            assert batch_eval_sums(compiled, tensors, "mlm")["target_loss"] == pytest.approx(expected, rel=RTOL)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[4] == graphs[3] + 1 and graphs[5] == graphs[4], graphs


def test_torch_compile_is_a_checked_flag():
    assert LanguageModelingArgs().torch_compile is False
    args = LanguageModelingArgs.from_dict({"torch_compile": "yes"})
    with pytest.raises(ConfigError, match=r"torch_compile must be .*got 'yes'"):
        args.validate()
