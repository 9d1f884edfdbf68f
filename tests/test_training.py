"""Training and evaluation through Ray: quality, reload, invariance, distribution, exact step counts."""

import collections
import math

import pytest
import ray
import torch
from conftest import (
    GPT2_NO_DROPOUT,
    TINY_GPT2,
    assert_same_weights,
    read_trace,
    read_trace_records,
    read_trace_steps,
    tiny_args,
)
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.cluster import launcher
from raylm.data.epoch_data import steps_per_epoch


def unigram_perplexity(tokenizer, train_path, test_path, skip_ids=()):
    """Perplexity of an add-one unigram model fitted on the training tokens, on the test tokens."""

    def tokens(path):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        return [t for row in ids for t in row if t not in skip_ids]

    counts = collections.Counter(tokens(train_path))
    total, vocab = sum(counts.values()), len(tokenizer)
    test = tokens(test_path)
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in test) / len(test)
    return math.exp(nll)


def test_clm_from_scratch_beats_untrained_and_unigram(gpt2_trained, corpus):
    model = gpt2_trained["model"]
    baseline = unigram_perplexity(model.tokenizer, *corpus)
    before, after = gpt2_trained["before"]["perplexity"], gpt2_trained["after"]["perplexity"]
    assert before > 500  # an untrained model is close to uniform over ~1,000 tokens
    assert after < before / 4, (before, after)
    assert after < 0.8 * baseline, (after, baseline)


def test_mlm_from_scratch_beats_untrained_and_unigram(bert_trained, corpus):
    model = bert_trained["model"]
    baseline = unigram_perplexity(model.tokenizer, *corpus, skip_ids=set(model.tokenizer.all_special_ids))
    before, after = bert_trained["before"]["perplexity"], bert_trained["after"]["perplexity"]
    assert after < before / 2, (before, after)
    assert after < 0.9 * baseline, (after, baseline)


def test_training_reports_steps_and_loss(gpt2_trained):
    assert gpt2_trained["global_step"] > 0
    assert (
        math.isfinite(gpt2_trained["train_loss"]) and gpt2_trained["train_loss"] < gpt2_trained["before"]["eval_loss"]
    )


def test_saved_model_reloads_with_auto_classes_to_the_same_loss(gpt2_trained, corpus):
    out = gpt2_trained["dir"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    auto = AutoModelForCausalLM.from_pretrained(out)
    trained = gpt2_trained["model"].model
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, auto.state_dict()[name]), name
    assert len(tokenizer) == auto.config.vocab_size
    # A dict merges into the model_args.json saved with the model (a LanguageModelingArgs would replace it).
    reloaded = LanguageModelingModel("gpt2", out, args={"output_dir": out + "/reload"})
    again = reloaded.eval_model(corpus[1])
    assert again["eval_loss"] == pytest.approx(gpt2_trained["after"]["eval_loss"], rel=1e-6)
    # The trained weights, not merely the final checkpoint's (which the in-memory model was also loaded from):
    # the training loop's own evaluation of its weights at the last step is what the saved model scores.
    assert again["eval_loss"] == pytest.approx(gpt2_trained["in_training"]["eval_loss"][-1], rel=1e-6)


def test_mlm_eval_is_repeatable_and_reloads(bert_trained, corpus):
    out = bert_trained["dir"]
    AutoModelForMaskedLM.from_pretrained(out)
    reloaded = LanguageModelingModel("bert", out, args={"output_dir": out + "/reload"})
    first, second = reloaded.eval_model(corpus[1]), reloaded.eval_model(corpus[1])
    assert first["eval_loss"] == second["eval_loss"]
    assert first["eval_loss"] == pytest.approx(bert_trained["after"]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("model_key", ["gpt2_trained", "bert_trained"])
def test_eval_does_not_depend_on_batch_size_or_workers(model_key, request, corpus, tmp_path, monkeypatch):
    """In the driver (raylm's local Ray) and on a pool of num_workers evaluation actors, as on any cluster."""
    from raylm import api
    from raylm.training import evaluation

    model = request.getfixturevalue(model_key)["model"]
    results = []
    for batch_size, workers, on_actors in [(1, 1, False), (32, 1, False), (32, 2, True)]:
        model.args.eval_batch_size, model.args.num_workers = batch_size, workers
        if on_actors:
            # What a cluster gets: eval_model passes in_process only on the local Ray that raylm started.
            monkeypatch.setattr(
                api, "evaluate", lambda *args, **kwargs: evaluation.evaluate(*args, **{**kwargs, "in_process": False})
            )
        results.append(model.eval_model(corpus[1], output_dir=str(tmp_path)))
        monkeypatch.undo()
    model.args.eval_batch_size, model.args.num_workers = 8, 1
    tokens = {r["eval_tokens"] for r in results}
    assert len(tokens) == 1
    # Padding changes the float summation order only.
    for other in results[1:]:
        assert other["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-5)


def test_fine_tuning_a_saved_model_lowers_eval_loss(gpt2_trained, corpus, tmp_path):
    args = tiny_args(tmp_path, mlm=False, learning_rate=1e-3, train_batch_size=16, dataset_type="text")
    model = LanguageModelingModel("gpt2", gpt2_trained["dir"], args=args)
    before = model.eval_model(corpus[1])["eval_loss"]
    model.train_model(corpus[0])
    after = model.eval_model(corpus[1])["eval_loss"]
    # Fine-tuning now trains with dropout on (it was silently off before); measured drop 0.0185.
    assert after < before - 0.01, (before, after)


# Steps of the two-worker run equal to the one-worker run's up to float rounding (test below).
STEPS_BEFORE_DRIFT = 25


def _no_dropout_run(corpus, out, trace, workers: int, epochs: int):
    """A tiny GPT-2 from scratch without dropout on `workers` ranks, a global batch of 16, evaluated by the training
    loop after its last step: (model, scores, stored examples, total steps)."""
    args = tiny_args(
        out,
        mlm=False,
        vocab_size=1000,
        dataset_type="text",
        config=GPT2_NO_DROPOUT,
        learning_rate=6e-3,
        train_batch_size=16 // workers,
        num_train_epochs=epochs,
        warmup_ratio=0.05,
        num_workers=workers,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    examples = model._stored_examples([corpus[0]], model.args, model.block_size)
    total_steps = epochs * steps_per_epoch(examples.num_examples, 16)
    trace.mkdir()
    _, scores = model.train_model(
        corpus[0],
        eval_file=corpus[1],
        _diagnostics={"trace_dir": str(trace)},
        args={
            "evaluate_during_training": True,
            "evaluate_during_training_steps": total_steps,
            "evaluate_each_epoch": False,
        },
    )
    return model, scores, examples, total_steps


def test_two_workers_match_one_and_use_every_example_once(gpt2_trained, corpus, tmp_path):
    """Two workers of 8 sequences (Ray Train's worker group) take the steps of one worker of 16 (in the driver): the
    same examples and loss at every step, and the same evaluation after the last one."""
    epochs = 2
    _, one_scores, _, _ = _no_dropout_run(corpus, tmp_path / "one", tmp_path / "one-trace", 1, epochs)
    model, scores, examples, total_steps = _no_dropout_run(corpus, tmp_path / "two", tmp_path / "two-trace", 2, epochs)
    one, two = read_trace_steps(tmp_path / "one-trace"), read_trace_steps(tmp_path / "two-trace")
    assert sorted(one) == [0] and sorted(two) == [0, 1]
    assert sorted(one[0]) == sorted(two[0]) == sorted(two[1]) == list(range(1, total_steps + 1))
    for step, record in one[0].items():
        ranks = [two[0][step], two[1][step]]
        assert sorted(record["example_ids"]) == sorted(ranks[0]["example_ids"] + ranks[1]["example_ids"]), step
        # A rank's loss is its share of the step's global mean (its sums over the global counts): the ranks' add up
        # to it. Only the order of float sums differs (the gradients' all-reduce): measured <= 1.1e-7 up to step 28.
        # Then AdamW turns that float noise into steps of the learning rate's size where the true gradient is ~0 (the
        # attention key bias, see assert_same_weights), and the runs drift apart: measured up to 1.1e-2 by step 98.
        loss = ranks[0]["loss"] + ranks[1]["loss"]
        assert loss == pytest.approx(record["loss"], rel=1e-6 if step <= STEPS_BEFORE_DRIFT else 3e-2), step
    assert scores["global_step"] == one_scores["global_step"] == [total_steps]
    print(f"eval_loss after {total_steps} steps: 2 workers {scores['eval_loss'][-1]}, 1 {one_scores['eval_loss'][-1]}")
    assert scores["eval_loss"][-1] == pytest.approx(one_scores["eval_loss"][-1], rel=2e-2)
    # The two ranks' evaluation at the last step covers the evaluation set once between them, and is what the saved
    # model scores.
    two_worker_eval = model.eval_model(corpus[1])
    assert scores["eval_tokens"] == [two_worker_eval["eval_tokens"]]
    assert scores["eval_loss"][-1] == pytest.approx(two_worker_eval["eval_loss"], rel=1e-6)
    state = model._last_state
    assert state.global_step == total_steps and state.train_examples == epochs * examples.num_examples

    per_epoch = collections.defaultdict(collections.Counter)
    for steps in two.values():
        assert sum(len(r["example_ids"]) for r in steps.values()) >= epochs * (examples.num_examples // 2 - 8), (
            "a worker idled"
        )
        for record in steps.values():
            per_epoch[record["epoch"]].update(record["example_ids"])
    assert sorted(per_epoch) == list(range(epochs))
    for used in per_epoch.values():
        assert len(used) == examples.num_examples and set(used.values()) == {1}
    # On raylm's local Ray the machine's cores (less the data stage's) are shared among the workers,
    # and each worker runs as many torch threads as it has CPUs.
    machine_cpus = int(ray.cluster_resources()["CPU"]) - launcher.DATA_STAGE_CPUS
    assert machine_cpus >= 2
    for trace_dir, workers in ((gpt2_trained["trace"], 1), (tmp_path / "two-trace", 2)):
        starts = read_trace(trace_dir)[1]
        assert sorted(starts) == list(range(workers))
        for rank in range(workers):
            [start] = starts[rank]
            assert start["torch_threads"] == machine_cpus // workers, (workers, start)


def test_resources_per_worker_wins_over_the_share_of_the_machine(ray_session):
    machine_cpus = int(ray.cluster_resources()["CPU"]) - launcher.DATA_STAGE_CPUS
    explicit = LanguageModelingArgs.from_dict({"num_workers": 1, "resources_per_worker": {"CPU": 1}})
    assert launcher.worker_resources(explicit, use_gpu=False) == {"CPU": 1}
    assert launcher.worker_resources(explicit, use_gpu=True) == {"CPU": 1, "GPU": 1}
    assert launcher.worker_resources(LanguageModelingArgs.from_dict({"num_workers": 1}), use_gpu=False) == {
        "CPU": machine_cpus
    }
    # An elastic run is sized for its most workers.
    assert launcher.worker_resources(LanguageModelingArgs.from_dict({"num_workers": [1, 2]}), use_gpu=False) == {
        "CPU": machine_cpus // 2
    }


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "camembert", "xlm-roberta", "electra"])
def test_mlm_loss_from_masked_positions_only_equals_the_full_logits_loss(model_type):
    import torch.nn.functional as F
    from transformers import AutoConfig

    from raylm.models.modeling import MLM, forward_loss_sums

    torch.manual_seed(0)
    small = {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 40,
        "vocab_size": 97,
        "n_layers": 1,
        "dim": 32,
        "n_heads": 2,
        "hidden_dim": 64,
        "embedding_size": 32,
    }
    model = AutoModelForMaskedLM.from_config(
        AutoConfig.for_model(model_type, **small)
    ).eval()  # no dropout: two equal forwards
    input_ids = torch.randint(5, 97, (3, 16))
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 9], labels[2, 15] = 11, 12, 13, 14
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "target_positions": (labels.reshape(-1) != -100).nonzero().squeeze(1),
        "n_input_tokens": input_ids.numel(),  # as the collator counts them
    }
    projection = model.get_output_embeddings()
    rows_projected = []
    projection.register_forward_hook(lambda _, inputs, output: rows_projected.append(output.shape[:-1].numel()))

    fast = forward_loss_sums(model, batch, MLM)["target_loss"]
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    full = F.cross_entropy(logits.reshape(-1, 97).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    full.backward()

    assert rows_projected == [4, 3 * 16], "the fast path projects the 4 labelled positions only"
    assert fast.item() == pytest.approx(full.item(), rel=1e-6)
    for fast_grad, param in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(fast_grad, param.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", ["gpt2", "openai-gpt"])
def test_clm_loss_predicts_each_next_token_and_ignores_padding(model_type):
    import torch.nn.functional as F
    from transformers import AutoConfig

    from raylm.models.modeling import CLM, forward_loss_sums

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, vocab_size=97, n_layer=1, n_embd=32, n_head=2, n_positions=40)
    ).eval()
    input_ids = torch.randint(0, 97, (3, 16))
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
    # Our loss took the output layer's input and computed no logits there (linear_cross_entropy.py).
    assert projected == [0, 3 * 16]
    # The textbook form: position t's logits against token t + 1.
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.backward()
    for grad, param in zip(ours_grads, model.parameters()):
        torch.testing.assert_close(grad, param.grad, rtol=1e-5, atol=1e-7)


def test_gpu_workers_on_a_ray_without_gpus_are_refused_before_anything_runs(ray_session, corpus, tmp_path):
    """use_gpu=True where no GPU can ever appear (this machine's local Ray): one paragraph naming the fix, instead of
    a run that waits for GPUs for good."""
    from raylm import ClusterError

    args = tiny_args(tmp_path / "out", mlm=False, vocab_size=300, config=TINY_GPT2, use_gpu=True, max_steps=2)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    with pytest.raises(ClusterError, match=r"has 0 GPU, but 1 worker x 1 GPU need 1\. Set use_gpu=False") as caught:
        model.train_model(corpus[0])
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_the_chunked_output_layer_and_loss_equal_the_logits_path(autocast):
    """linear_cross_entropy over several chunks with unlabelled tokens: the loss and both gradients of
    F.cross_entropy on the whole float32 logits, with and without grad, and under bf16 and fp16
    autocast (as on a GPU), fp16 with GradScaler's initial scale in the upstream gradient."""
    import torch.nn.functional as F

    from raylm.models.linear_cross_entropy import CHUNK_TOKENS, linear_cross_entropy_sum

    torch.manual_seed(0)
    tokens = 2 * CHUNK_TOKENS + 37
    hidden = torch.randn(tokens, 32, requires_grad=True)
    weight = (0.1 * torch.randn(500, 32)).requires_grad_()
    labels = torch.randint(0, 500, (tokens,))
    labels[::7] = -100
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        chunked = linear_cross_entropy_sum(hidden, weight, labels)
        with torch.no_grad():
            chunked_no_grad = linear_cross_entropy_sum(hidden, weight, labels)
    whole = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    # The upstream gradient: a loss mean's divisor, and under fp16 GradScaler's initial scale (2**16),
    # which must reach the gradients before they are cast to fp16, where a mean's gradient alone would
    # underflow. Powers of two scale exactly, so the comparison keeps its tolerance.
    upstream = 2.0**16 / 1024 if autocast == torch.float16 else 0.5
    (upstream * chunked).backward()
    chunked_grads = hidden.grad / upstream, weight.grad / upstream
    hidden.grad, weight.grad = None, None
    whole.backward()
    assert chunked.dtype == torch.float32 and chunked_no_grad.item() == chunked.item()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-2 if autocast else 1e-6)
    for ours, reference in zip(chunked_grads, (hidden.grad, weight.grad)):
        assert torch.isfinite(ours).all()
        if autocast:  # half-precision matmuls, accumulated in another order: compare whole tensors
            assert float((ours - reference).norm() / reference.norm()) < 1e-2
        else:
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_training_steps_are_the_textbook_loop_over_the_same_batches(gpt2_trained, corpus, tmp_path):
    """raylm's optimizer steps are a plain PyTorch loop's, step by step: AdamW, linear warmup and decay,
    clipping at max_grad_norm, each batch's mean next-token loss; the batches are the traced examples,
    packed here by hand (each line's tokens and eos, joined and cut into blocks). So a quality gap
    against another tool on the same data and initial weights is not in the loop (bench/RESULTS.md)."""
    from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

    block_size, batch_size, steps, learning_rate = 32, 4, 8, 3e-3
    tokenizer = AutoTokenizer.from_pretrained(gpt2_trained["dir"])
    torch.manual_seed(0)
    initial = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), **TINY_GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    )
    initial.save_pretrained(tmp_path / "initial")
    tokenizer.save_pretrained(tmp_path / "initial")
    args = tiny_args(
        tmp_path / "out",
        mlm=False,
        dataset_type="text",
        block_size=block_size,
        train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        warmup_ratio=0.25,
        num_workers=1,
    )
    trace = tmp_path / "trace"
    trace.mkdir()
    LanguageModelingModel("gpt2", str(tmp_path / "initial"), args=args).train_model(
        corpus[0], _diagnostics={"trace_dir": str(trace)}
    )
    traced = [record for record in read_trace_records(trace) if "step" in record]
    assert [record["step"] for record in traced] == list(range(1, steps + 1))

    with open(corpus[0], encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    stream = [
        token
        for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]
        for token in ids + [tokenizer.eos_token_id]
    ]
    blocks = torch.tensor(stream[: len(stream) // block_size * block_size]).view(-1, block_size)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "initial").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=steps)
    for record in traced:
        batch = blocks[record["example_ids"]]
        assert len(batch) == batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5), record["step"]
        assert record["lr"] == pytest.approx(scheduler.get_last_lr()[0], rel=1e-9)
    assert traced[-1]["loss"] < traced[0]["loss"] - 0.1, "the steps train: the loss falls"
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert_same_weights(trained, model.state_dict())


def test_config_name_sets_the_architecture_of_a_model_from_scratch(corpus, tmp_path):
    """config_name: a folder with a config.json (Hugging Face's), used instead of the type's defaults and
    args.config."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=48, n_head=3, n_positions=96).save_pretrained(tmp_path / "config")
    args = tiny_args(tmp_path / "out", mlm=False, vocab_size=300, config_name=str(tmp_path / "config"))
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    config = model.model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (1, 48, 3, 96)
    # As in Simple Transformers, a tokenizer trained for it sets the vocabulary (not the config's 50,257).
    assert config.vocab_size == len(model.tokenizer) < 400
    assert model.model.get_input_embeddings().num_embeddings == len(model.tokenizer)
