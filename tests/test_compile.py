"""torch_compile: the compiled model trains to the same losses as eager, without recompiling after its first steps."""

import os

import pytest
import torch
from conftest import TINY_GPT2, read_trace_steps, read_training_log, tiny_args
from safetensors import safe_open

from raylm import ConfigError, LanguageModelingArgs, LanguageModelingModel

# One layer: inductor's compile is the test's cost. Dropout off: inductor draws its dropout masks from its own RNG,
# so with dropout on the two runs would train on different masks and only their trends could be compared.
SMALL_GPT2 = {**TINY_GPT2, "n_layer": 1, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
# Inductor fuses and reorders float32 reductions (softmax, layer norm, the loss sum), so an op can differ from
# eager by a few ulps (~1e-7 relative); measured: 8e-8 at step 1, equal after. 1e-5 leaves room for the
# updates to carry such differences through AdamW, which divides each gradient by its own running scale.
RTOL = 1e-5


def _train(tmp_path, corpus, name, **overrides):
    out, trace = tmp_path / name, tmp_path / f"{name}-trace"
    trace.mkdir()
    args = tiny_args(
        out,
        mlm=False,
        vocab_size=400,
        dataset_type="text",
        block_size=64,
        learning_rate=3e-3,
        max_steps=4,
        logging_steps=1,
        save_steps=0,
        **overrides,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    model.train_model(corpus[0], _diagnostics={"trace_dir": str(trace)})
    # A rank's loss is its share of the step's global mean (its sums over the global counts): the ranks' add up to it.
    ranks = read_trace_steps(trace).values()
    losses = {step: sum(rank[step]["loss"] for rank in ranks) for step in next(iter(ranks))}
    progress = read_training_log(out, "train")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    return losses, progress, keys


def test_compiled_mlm_step_matches_eager_without_recompiling_per_masked_count():
    from torch._dynamo.utils import counters
    from transformers import BertConfig, BertForMaskedLM

    from raylm.models.modeling import forward_loss_sums
    from raylm.training.evaluation import batch_eval_sums
    from raylm.training.torch_compile import compile_model

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=400,
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    eager = BertForMaskedLM(config)
    compiled = BertForMaskedLM(config)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)

    def batch(n_targets):
        ids = torch.randint(5, 400, (4, 64))
        positions = torch.randperm(ids.numel())[:n_targets].sort().values
        labels = torch.full_like(ids, -100)
        labels.view(-1)[positions] = ids.view(-1)[positions]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "target_positions": positions,
            "n_targets": n_targets,
            "n_input_tokens": ids.numel(),
        }

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


def test_compiled_electra_step_matches_eager_and_keeps_one_embedding_table():
    from torch._dynamo.utils import counters
    from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    from raylm.models.electra import ElectraPair
    from raylm.models.modeling import combine_loss, forward_loss_sums
    from raylm.training.evaluation import batch_eval_sums
    from raylm.training.torch_compile import compile_model

    def pair(seed):
        torch.manual_seed(seed)
        shared = dict(
            vocab_size=400,
            embedding_size=32,
            num_hidden_layers=1,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        # The generator narrower than the discriminator, as raylm builds it: its embeddings go through a projection.
        return ElectraPair(
            ElectraForMaskedLM(ElectraConfig(**shared, hidden_size=16, num_attention_heads=1, intermediate_size=32)),
            ElectraForPreTraining(ElectraConfig(**shared, hidden_size=32, num_attention_heads=2, intermediate_size=64)),
            tie_embeddings=True,
        )

    eager, compiled = pair(0), pair(1)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    shared = compiled.generator.get_input_embeddings().weight
    assert compiled.discriminator.get_input_embeddings().weight is shared, (
        "compiling must not untie the shared embeddings"
    )
    assert set(compiled.state_dict()) == set(eager.state_dict())

    def batch(n_targets, real_lengths):
        # Padding after each row's real tokens, masked tokens among the real ones, as the collator makes them.
        ids = torch.randint(5, 400, (4, 64))
        attention = (torch.arange(64) < torch.tensor(real_lengths).unsqueeze(1)).long()
        ids[attention == 0] = 0
        real = attention.view(-1).nonzero().squeeze(1)
        positions = real[torch.randperm(real.numel())[:n_targets]]
        labels = torch.full_like(ids, -100)
        labels.view(-1)[positions] = ids.view(-1)[positions]
        ids.view(-1)[positions] = 4
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "labels": labels,
            "sampling_uniform": torch.rand(ids.shape),
            "target_positions": positions.sort().values,
            "n_targets": n_targets,
            "n_input_tokens": int(attention.sum()),
        }

    counts = ("true_positives", "false_positives", "false_negatives", "true_negatives")
    graphs = [counters["stats"]["unique_graphs"]]
    # Both the masked count (the generator's head) and the real-token count (the discriminator's loss) differ in
    # every batch.
    for n_targets, real_lengths in ((30, (64, 60, 50, 64)), (41, (64, 64, 57, 40)), (37, (48, 64, 64, 62))):
        tensors = batch(n_targets, real_lengths)
        expected = forward_loss_sums(eager, tensors, "electra")
        sums = forward_loss_sums(compiled, tensors, "electra")
        for key in ("target_loss", "token_loss"):
            assert float(sums[key].detach()) == pytest.approx(float(expected[key].detach()), rel=RTOL), (key, n_targets)
        # The same generator samples, so the same replaced tokens and discriminator decisions.
        assert [int(sums[k]) for k in counts] == [int(expected[k]) for k in counts]
        assert int(sums["true_positives"] + sums["false_negatives"]) > 0, "some samples replaced their token"
        for model, step_sums in ((eager, expected), (compiled, sums)):
            model.zero_grad()
            combine_loss(step_sums, n_targets, tensors["n_input_tokens"], 50.0).backward()
        # The gradient of the shared table, reached by the generator's softmax and both models' inputs, flows
        # through the compiled backward. Measured against eager: at most 6e-8 apart (the largest entry is 0.2); an
        # entry that is a small sum of larger terms differs by up to 3e-5 of itself, hence rtol 1e-4 with atol 1e-6.
        # A lost part of the gradient (one model's) would be off by far more.
        assert shared.grad is not None and float(shared.grad.abs().sum()) > 0
        assert torch.allclose(shared.grad, eager.generator.get_input_embeddings().weight.grad, rtol=1e-4, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    # The first batch compiles one graph (no break at a shape that depends on the data); the next counts reuse it.
    assert graphs[1] == graphs[0] + 1 and graphs[2:] == [graphs[1]] * 2, graphs
    assert compiled.shares_embeddings()

    # Evaluation (eval mode, no gradients) compiles once more, then reuses its graph.
    eager.eval()
    compiled.eval()
    with torch.inference_mode():
        for n_targets, real_lengths in ((33, (64, 64, 64, 30)), (28, (55, 64, 64, 64))):
            tensors = batch(n_targets, real_lengths)
            expected = batch_eval_sums(eager, tensors, "electra")
            stats = batch_eval_sums(compiled, tensors, "electra")
            for key in ("target_loss", "token_loss"):
                assert stats[key] == pytest.approx(expected[key], rel=RTOL), key
            assert [stats[k] for k in counts] == [expected[k] for k in counts]
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[4] == graphs[3] + 1 and graphs[5] == graphs[4], graphs


# 2.2 MB of float32 weights: over DDP's first gradient bucket (1 MB), whose boundary then falls inside the block's
# MLP, so DDPOptimizer splits the graph in two there. One block: inductor's cold compile of the two DDP tests takes
# 110 s here, against 146 s for two blocks of 128.
BUCKETED_GPT2 = {**SMALL_GPT2, "n_embd": 192}
VOCAB = 400  # _train's too


def _two_rank_ddp_steps(rank: int, rendezvous: str, out: str) -> None:
    """One rank of a 2-rank gloo group (torch.multiprocessing): the same DDP-wrapped GPT-2, eager and compiled by
    compile_model, through three AdamW steps (the last one shorter, as an epoch's last) and two evaluations of the
    unwrapped module; what each run saw, saved to out/rank{rank}.pt."""
    import logging

    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.parallelism import ddp_options, unwrap
    from raylm.training.torch_compile import compile_model

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    ddp_optimizer_logs = []
    handler = logging.Handler()
    handler.emit = lambda record: ddp_optimizer_logs.append(record.getMessage())
    ddp_optimizer_log = logging.getLogger("torch._dynamo.backends.distributed")
    ddp_optimizer_log.setLevel(logging.INFO)
    ddp_optimizer_log.addHandler(handler)

    def ids(seed, length):
        return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))

    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**BUCKETED_GPT2, vocab_size=VOCAB))
        ddp = DistributedDataParallel(model, **ddp_options(model))  # as Ray Train's prepare_model wraps it
        if compiled:
            compile_model(ddp)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
        losses = []
        for length in (64, 64, 48):
            # Each rank its own rows (the all-reduced gradient is their mean), the same each step: the loss falls.
            batch = ids(rank, 64)[:, :length]
            loss = ddp(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        module = unwrap(ddp).eval()
        eval_losses, graphs = [], [counters["stats"]["unique_graphs"]]
        with torch.inference_mode():
            for seed, length in ((100, 64), (101, 40)):
                batch = ids(seed, length)
                eval_losses.append(float(module(input_ids=batch, labels=batch).loss))
                graphs.append(counters["stats"]["unique_graphs"])
        runs[compiled] = {
            "losses": losses,
            "eval_losses": eval_losses,
            "graphs_by_evaluation": graphs,
            "wrapper_compiled": ddp._compiled_call_impl is not None,
            "names": sorted(module.state_dict()),
        }
    torch.save({"runs": runs, "ddp_optimizer_logs": ddp_optimizer_logs}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_compiled_ddp_model_splits_at_the_gradient_buckets_and_has_eager_losses(tmp_path):
    """torch_compile under DDP: the DDP wrapper is what is compiled, dynamo's DDPOptimizer splits its graph at the
    gradient buckets (each bucket's all-reduce overlaps the backward of the layers before it), the losses are eager's,
    evaluation of the unwrapped module runs compiled code, and the weight names stay plain for the checkpoint."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_ddp_steps, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        held = torch.load(tmp_path / f"rank{rank}.pt")
        eager, compiled = held["runs"][False], held["runs"][True]
        assert (eager["wrapper_compiled"], compiled["wrapper_compiled"]) == (False, True)
        buckets = [int(m.split(" created ")[1].split()[0]) for m in held["ddp_optimizer_logs"] if " created " in m]
        assert buckets and min(buckets) >= 2, held["ddp_optimizer_logs"]
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=RTOL), (rank, compiled, eager)
        assert compiled["losses"][2] < compiled["losses"][0]  # it trains
        assert compiled["eval_losses"] == pytest.approx(eager["eval_losses"], rel=RTOL)
        # The first evaluation compiles the module's eval graph, the second (another length) reuses it; eager
        # compiles nothing.
        first, after_one, after_two = compiled["graphs_by_evaluation"]
        assert after_one > first and after_two == after_one, compiled["graphs_by_evaluation"]
        assert len(set(eager["graphs_by_evaluation"])) == 1
        assert compiled["names"] == eager["names"] and not any("_orig_mod" in name for name in compiled["names"])


def test_a_compiled_two_worker_run_has_the_eager_losses_compiles_once_and_saves_plain_weight_names(
    ray_session, corpus, tmp_path
):
    """The DDP-wrapped compile on Ray Train's worker group, as on every cluster (DDPOptimizer splits BUCKETED_GPT2 in
    two, see the test above): 2 workers of 5 sequences take the steps of eager's one worker of 10 in the driver, with
    its losses; nothing is compiled again after step 1; the saved folder has eager's weight names."""
    from raylm.models.linear_cross_entropy import CHUNK_TOKENS

    # A rank's tokens per step: more than one chunk of the chunked output layer and loss, not a whole number of them.
    assert 5 * 64 > CHUNK_TOKENS and 5 * 64 % CHUNK_TOKENS
    eager_losses, eager_progress, eager_keys = _train(
        tmp_path, corpus, "eager", config=BUCKETED_GPT2, train_batch_size=10
    )
    job = {"config": BUCKETED_GPT2, "num_workers": 2, "train_batch_size": 5}
    losses, progress, keys = _train(tmp_path, corpus, "compiled", torch_compile=True, **job)

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
    assert keys == eager_keys and not any("_orig_mod" in k for k in keys)


def test_torch_compile_is_a_checked_flag():
    assert LanguageModelingArgs().torch_compile is False
    args = LanguageModelingArgs.from_dict({"torch_compile": "yes"})
    with pytest.raises(ConfigError, match=r"torch_compile must be .*got 'yes'"):
        args.validate()
