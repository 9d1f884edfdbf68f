"""parallel_strategy fsdp (FSDP2's fully_shard over 2 CPU workers on gloo): the losses of DDP, half its parameter
memory per rank, checkpoints that are Hugging Face folders and resume exactly (also onto another world size),
ELECTRA's shared embeddings kept.

One DDP and one FSDP run of the same job serve most tests (module fixtures); each run is a few steps of a tiny GPT-2.
"""

import json
import os

import pytest
import torch
from conftest import (
    GPT2_NO_DROPOUT,
    TINY_BERT,
    TINY_DECODER,
    TINY_ELECTRA,
    TINY_GENERATOR,
    TINY_GPT2,
    assert_same_weights,
    read_trace,
    tiny_args,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForPreTraining,
    AutoTokenizer,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from raylm import ConfigError, LanguageModelingArgs, LanguageModelingModel, ModelError
from raylm.models.electra import DISCRIMINATOR_SUBDIR, GENERATOR_SUBDIR
from raylm.models.sharded_weights import SHARDED_STATE_DIR

# GPT2_NO_DROPOUT: the resume onto one worker draws dropout masks from another RNG stream than the 2-worker run,
# and with dropout only a trend could be compared. Every dimension is even, so FSDP's dim-0 shards split each
# tensor in two.
STEPS = 6
# fp32 on CPU: FSDP reduce-scatters each gradient where DDP all-reduces it in buckets, and clipping's norm sums
# the shards' norms, so sums may be taken in another order: ulp-level (~1e-7) differences that AdamW's division
# by the running scale carries into later steps. Measured with 2 ranks: identical losses (a sum of two values has
# one order), so 1e-5 is headroom for other world sizes and kernels, far below a wrong gradient's effect (1e-2).
RTOL = 1e-5


def _job(out, **overrides):
    # Two micro-batches per step (gradient accumulation), an evaluation and a checkpoint every 3 steps.
    return tiny_args(
        out,
        mlm=False,
        vocab_size=500,
        dataset_type="text",
        config=GPT2_NO_DROPOUT,
        block_size=64,
        learning_rate=3e-3,
        train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        logging_steps=1,
        save_steps=3,
        evaluate_during_training=True,
        evaluate_during_training_steps=3,
        num_workers=2,
        **overrides,
    )


def _train(model, train_file, trace_dir, eval_file=None):
    os.makedirs(trace_dir)
    result = model.train_model(train_file, eval_file=eval_file, _diagnostics={"trace_dir": str(trace_dir)})
    return result, read_trace(str(trace_dir))


@pytest.fixture(scope="module")
def runs(ray_session, corpus, tmp_path_factory):
    """The same 2-worker job under ddp and fsdp: {strategy: {"out", "scores", "steps", "starts"}}."""
    root = tmp_path_factory.mktemp("fsdp")
    found = {}
    for strategy in ("ddp", "fsdp"):
        out = root / strategy
        model = LanguageModelingModel("gpt2", None, args=_job(out, parallel_strategy=strategy), train_files=corpus[0])
        (global_step, scores), (steps, starts) = _train(
            model, corpus[0], root / f"{strategy}-trace", eval_file=corpus[1]
        )
        assert global_step == STEPS
        found[strategy] = {"out": str(out), "scores": scores, "steps": steps, "starts": starts}
    return found


def test_fsdp_has_the_per_step_losses_of_ddp(runs):
    ddp, fsdp = runs["ddp"]["steps"], runs["fsdp"]["steps"]
    for rank in (0, 1):
        assert sorted(fsdp[rank]) == sorted(ddp[rank]) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert fsdp[rank][step]["example_ids"] == ddp[rank][step]["example_ids"]
            a, b = fsdp[rank][step]["loss"], ddp[rank][step]["loss"]
            assert a == pytest.approx(b, rel=RTOL), (rank, step, a, b)
    # Each rank's trace holds its share of the step's loss; the global loss falls (6.23 -> 5.91 measured): the
    # steps differ.
    assert ddp[0][STEPS]["loss"] + ddp[1][STEPS]["loss"] < ddp[0][1]["loss"] + ddp[1][1]["loss"] - 0.2
    # Evaluation during training runs on the sharded model too.
    assert runs["fsdp"]["scores"]["eval_loss"] == pytest.approx(runs["ddp"]["scores"]["eval_loss"], rel=RTOL)


def test_fsdp_holds_half_the_parameter_memory_per_rank(runs):
    for rank in (0, 1):
        [ddp_start], [fsdp_start] = runs["ddp"]["starts"][rank], runs["fsdp"]["starts"][rank]
        assert (ddp_start["parallel_strategy"], fsdp_start["parallel_strategy"]) == ("ddp", "fsdp")
        assert fsdp_start["param_memory_mb"] == pytest.approx(ddp_start["param_memory_mb"] / 2, rel=0.1), (
            ddp_start,
            fsdp_start,
        )
    # The whole model, counted once: 2 layers of 64 wide over 500 tokens and 128 positions is ~0.54 MB of float32.
    assert 0.4 < runs["ddp"]["starts"][0][0]["param_memory_mb"] < 0.7
    progress = [
        r
        for r in map(json.loads, open(os.path.join(runs["fsdp"]["out"], "training_log.jsonl"), encoding="utf-8"))
        if r.get("kind") == "train"
    ]
    assert progress[-1]["param_memory_mb"] == pytest.approx(runs["fsdp"]["starts"][0][0]["param_memory_mb"])
    # A CPU worker reports its process's peak resident set: torch and transformers alone take well over 100 MB.
    assert progress[-1]["peak_memory_mb"] > 100


def test_fsdp_output_is_a_hugging_face_folder_with_the_ddp_weights(runs, corpus):
    from safetensors import safe_open

    keys = {}
    for strategy in ("ddp", "fsdp"):
        with safe_open(os.path.join(runs[strategy]["out"], "model.safetensors"), "pt") as f:
            keys[strategy] = set(f.keys())
    # Tied weights saved once, as for an unsharded model.
    assert keys["fsdp"] == keys["ddp"]
    fsdp, ddp = (AutoModelForCausalLM.from_pretrained(runs[s]["out"]).eval() for s in ("fsdp", "ddp"))
    assert fsdp.config.architectures == ["GPT2LMHeadModel"]
    assert_same_weights(fsdp.state_dict(), ddp.state_dict())
    # best_model/ too, exported by the driver from a sharded checkpoint, without its run state.
    best = os.path.join(runs["fsdp"]["out"], "best_model")
    assert not set(os.listdir(best)) & {SHARDED_STATE_DIR, "trainer_state.json", "scheduler.pt"}
    best_ddp = AutoModelForCausalLM.from_pretrained(os.path.join(runs["ddp"]["out"], "best_model"))
    assert_same_weights(AutoModelForCausalLM.from_pretrained(best).state_dict(), best_ddp.state_dict())
    # The reloaded model gives raylm's own evaluation of it (the last one during training, at the final step).
    tokenizer = AutoTokenizer.from_pretrained(runs["fsdp"]["out"])
    reloaded = LanguageModelingModel(
        "gpt2", runs["fsdp"]["out"], args={"output_dir": runs["fsdp"]["out"] + "/reload", "num_workers": 1}
    )
    assert reloaded.eval_model(corpus[1])["eval_loss"] == pytest.approx(
        runs["fsdp"]["scores"]["eval_loss"][-1], rel=1e-6
    )
    assert len(tokenizer) <= fsdp.config.vocab_size


def _shard_bytes(checkpoint):
    """{file name: bytes} of a checkpoint's DCP shards."""
    folder = os.path.join(checkpoint, SHARDED_STATE_DIR)
    return {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}


def test_fsdp_checkpoint_holds_each_ranks_shards_and_no_gathered_weights(runs):
    checkpoint = os.path.join(runs["fsdp"]["out"], "checkpoint-3")
    names = set(os.listdir(checkpoint))
    # No gathered state: neither the whole weights nor the whole optimizer state in a file of their own.
    assert not names & {"model.safetensors", "pytorch_model.bin", "optimizer.pt"}, names
    assert {"config.json", "trainer_state.json", "scheduler.pt", "rng_states.pt", "tokenizer.json"} <= names
    shards = _shard_bytes(checkpoint)
    assert set(shards) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # Each rank wrote its own half of the weights and AdamW's two moments (a gather to rank 0 would leave rank 1
    # nothing to write): every tensor of the tiny GPT-2 splits evenly over the two ranks. Measured: 1.04 and 1.12 MB
    # for 3 x 0.56 MB (the tied output layer is saved under both names, and DCP adds a header per tensor).
    parameter_bytes = runs["ddp"]["starts"][0][0]["param_memory_mb"] * 2**20
    written = shards["__0_0.distcp"] + shards["__1_0.distcp"]
    assert 3 * parameter_bytes < written < 4.5 * parameter_bytes, (shards, parameter_bytes)
    for rank in (0, 1):
        assert 0.4 < shards[f"__{rank}_0.distcp"] / written < 0.6, shards
    # The Auto classes cannot read the shards (docs/checkpoints.md says so); raylm can (the resume test).
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_fsdp_resumes_a_checkpoint_exactly_and_onto_one_worker(runs, corpus, tmp_path):
    reference = runs["fsdp"]["steps"]
    checkpoint = os.path.join(runs["fsdp"]["out"], "checkpoint-3")
    # The resumed run's checkpoints also hold the Hugging Face weights (gathered to rank 0).
    same = LanguageModelingModel(
        "gpt2",
        checkpoint,
        args={
            "output_dir": str(tmp_path / "same"),
            "num_workers": 2,
            "evaluate_during_training": False,
            "fsdp_checkpoint_hf_weights": True,
        },
    )
    assert same.args.parallel_strategy == "fsdp"
    (global_step, _), (steps, starts) = _train(same, corpus[0], tmp_path / "same-trace")
    assert global_step == STEPS and [s["resumed_from"] for s in starts[0]] == [3]
    exported = os.path.join(tmp_path / "same", "checkpoint-6")
    assert set(_shard_bytes(exported)) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    # The gathered weights are the uninterrupted run's at step 6.
    assert_same_weights(
        AutoModelForCausalLM.from_pretrained(exported).state_dict(),
        AutoModelForCausalLM.from_pretrained(runs["fsdp"]["out"]).state_dict(),
    )
    for rank in (0, 1):
        assert sorted(steps[rank]) == [4, 5, 6]
        for step, record in steps[rank].items():
            assert record["example_ids"] == reference[rank][step]["example_ids"]
            # Bit-identical: the same weights, full optimizer state and data after the restore, sharded the same way.
            assert record["loss"] == reference[rank][step]["loss"], (rank, step)

    # One worker with twice the accumulation: the same global batches, from the full (unsharded) optimizer state.
    one = LanguageModelingModel(
        "gpt2",
        checkpoint,
        args={
            "output_dir": str(tmp_path / "one"),
            "num_workers": 1,
            "gradient_accumulation_steps": 4,
            "evaluate_during_training": False,
        },
    )
    (global_step, _), (steps, _) = _train(one, corpus[0], tmp_path / "one-trace")
    assert global_step == STEPS and sorted(steps[0]) == [4, 5, 6]
    for step, record in steps[0].items():
        both_ranks = reference[0][step]["example_ids"] + reference[1][step]["example_ids"]
        assert sorted(record["example_ids"]) == sorted(both_ranks)
        # The one rank's loss is the global one, the sum of the two ranks' shares.
        assert record["loss"] == pytest.approx(reference[0][step]["loss"] + reference[1][step]["loss"], rel=RTOL), step


def test_fsdp_electra_keeps_the_shared_embeddings_one_tensor(ray_session, corpus, tmp_path):
    args = tiny_args(
        tmp_path / "out",
        vocab_size=400,
        dataset_type="text",
        block_size=64,
        config=TINY_ELECTRA,
        generator_config=TINY_GENERATOR,
        learning_rate=3e-3,
        train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        save_steps=3,
        num_workers=2,
        parallel_strategy="fsdp",
    )
    model = LanguageModelingModel("electra", None, args=args, train_files=corpus[0])
    initial = model.model.generator.get_input_embeddings().weight.detach().clone()
    (global_step, _), (steps, _) = _train(model, corpus[0], tmp_path / "trace")
    assert global_step == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps[0].values())
    out = str(tmp_path / "out")
    generator = ElectraForMaskedLM.from_pretrained(os.path.join(out, GENERATOR_SUBDIR))
    discriminator = ElectraForPreTraining.from_pretrained(os.path.join(out, DISCRIMINATOR_SUBDIR))
    trained = generator.get_input_embeddings().weight
    assert not torch.allclose(trained, initial), "the shared embeddings did not train"
    assert torch.equal(discriminator.get_input_embeddings().weight, trained)
    top = AutoModelForPreTraining.from_pretrained(out)
    assert torch.equal(top.get_input_embeddings().weight, trained)
    # The pair raylm reloads shares them again.
    assert model.model.shares_embeddings() and torch.equal(model.model.generator.get_input_embeddings().weight, trained)

    # The sharded checkpoint of the same step: raylm reads the pair from its shards, still sharing the embeddings...
    checkpoint = os.path.join(out, "checkpoint-3")
    assert not os.path.exists(os.path.join(checkpoint, GENERATOR_SUBDIR, "model.safetensors"))
    resumable = LanguageModelingModel("electra", checkpoint, args={"output_dir": str(tmp_path / "again")})
    assert resumable.model.shares_embeddings()
    assert torch.equal(resumable.model.discriminator.get_input_embeddings().weight, trained)
    assert torch.equal(resumable.model.generator.generator_lm_head.weight, generator.generator_lm_head.weight)
    # ...while a half of it, read as a Hugging Face folder, is a raylm error that names the fix.
    with pytest.raises(ModelError, match="fsdp_checkpoint_hf_weights=True"):
        LanguageModelingModel(
            "electra",
            "electra",
            generator_name=os.path.join(checkpoint, GENERATOR_SUBDIR),
            discriminator_name=os.path.join(checkpoint, DISCRIMINATOR_SUBDIR),
            args={"output_dir": str(tmp_path / "parts")},
        )


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"parallel_strategy": "zero3"}, r"parallel_strategy 'zero3' is not one of ddp, fsdp"),
        ({"fsdp_cpu_offload": True}, r"fsdp_cpu_offload .* parallel_strategy is 'ddp'"),
        (
            {"fsdp_reduce_scatter_every_micro_batch": True},
            r"fsdp_reduce_scatter_every_micro_batch .* parallel_strategy is 'ddp'",
        ),
        (
            {"parallel_strategy": "fsdp", "torch_compile": True},
            r"torch_compile is not supported with parallel_strategy 'fsdp'",
        ),
    ],
)
def test_fsdp_settings_are_checked_before_anything_starts(values, expected, corpus, tmp_path):
    with pytest.raises(ConfigError, match=expected):
        LanguageModelingArgs.from_dict(values).validate()
    # The model's constructor checks them before it tokenizes or starts Ray.
    with pytest.raises(ConfigError, match=expected):
        LanguageModelingModel(
            "gpt2",
            None,
            args=tiny_args(tmp_path, mlm=False, vocab_size=500, config=TINY_GPT2, **values),
            train_files=corpus[0],
        )


def test_block_finder_leaves_a_block_sharing_weights_to_the_root():
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.parallelism import transformer_blocks

    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=100))
    assert transformer_blocks(model) == list(model.transformer.h)
    # A weight of block 1 reused by block 0: neither may be a unit of its own.
    model.transformer.h[0].mlp.c_fc.weight = model.transformer.h[1].mlp.c_fc.weight
    assert transformer_blocks(model) == []


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group in this process, for FSDP without Ray."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_optimizer_state_crosses_between_ddp_and_fsdp_checkpoints(one_rank_group, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.optim import build_optimizer
    from raylm.training.parallelism import load_optimizer_state, shard_model

    def trained_once():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100))
        optimizer = build_optimizer(model, LanguageModelingArgs(), torch.device("cpu"))
        ids = torch.randint(0, 100, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        return model, optimizer

    model, optimizer = trained_once()
    by_name = {name: optimizer.state[param] for name, param in model.named_parameters()}
    ddp_state = optimizer.state_dict()  # what a DDP checkpoint holds: parameters by index

    sharded, sharded_optimizer = trained_once()
    sharded = shard_model(sharded, torch.device("cpu"), None, cpu_offload=False)
    sharded_optimizer = build_optimizer(sharded, LanguageModelingArgs(), torch.device("cpu"))  # fresh: no moments
    load_optimizer_state(sharded, sharded_optimizer, ddp_state)
    for name, param in sharded.named_parameters():
        restored = sharded_optimizer.state[param]
        assert torch.equal(restored["exp_avg"].full_tensor(), by_name[name]["exp_avg"]), name
        assert float(restored["step"]) == 1.0

    # ...and an FSDP checkpoint's state (by name, unsharded) into a plain model, as a DDP run resumes it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    fsdp_state = get_optimizer_state_dict(
        sharded, sharded_optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    assert all(isinstance(key, str) for key in fsdp_state["state"])
    plain, _ = trained_once()
    plain.zero_grad(
        set_to_none=True
    )  # as at a resume: torch's loader initialises the state only where no gradients are
    plain_optimizer = build_optimizer(plain, LanguageModelingArgs(), torch.device("cpu"))
    load_optimizer_state(plain, plain_optimizer, fsdp_state)
    for name, param in plain.named_parameters():
        assert torch.equal(plain_optimizer.state[param]["exp_avg_sq"], by_name[name]["exp_avg_sq"]), name

    # ...and a sharded FSDP checkpoint's DCP shards into a fresh plain model and optimizer, as a DDP run resumes it.
    from raylm.training.sharded_state import load_sharded_state, save_sharded_state

    save_sharded_state(str(tmp_path), sharded, sharded_optimizer)
    torch.manual_seed(1)
    fresh = GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100))
    fresh_optimizer = build_optimizer(fresh, LanguageModelingArgs(), torch.device("cpu"))
    load_sharded_state(str(tmp_path), fresh, fresh_optimizer)
    for (name, param), shard in zip(fresh.named_parameters(), sharded.parameters()):
        assert torch.equal(param, shard.full_tensor()), name
        assert torch.equal(fresh_optimizer.state[param]["exp_avg"], by_name[name]["exp_avg"]), name
        assert float(fresh_optimizer.state[param]["step"]) == 1.0


def test_cpu_offload_trains_as_the_shards_in_place(one_rank_group):
    from torch.distributed.fsdp import CPUOffloadPolicy
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.parallelism import shard_model

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = shard_model(
            GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100)),
            torch.device("cpu"),
            None,
            cpu_offload=offload,
        )
        assert isinstance(model._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy) == offload
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    # On a CPU the "offloaded" shards live where they were; on a GPU this is the step that runs on the CPU instead.
    assert losses[1] == losses[0]


def _two_rank_training_state(rank: int, rendezvous: str, out: str, reduce_every_micro_batch: bool) -> None:
    """One rank of a 2-rank gloo group (torch.multiprocessing): a sharded GPT-2 through three accumulated
    micro-batches and an AdamW step, as worker.py runs them; what each rank holds, saved to out/rank{rank}.pt."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.optim import build_optimizer
    from raylm.training.parallelism import gradient_sync, parameter_bytes, shard_model

    def local_bytes(tensor):
        return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).numel() * tensor.element_size()

    def unsharded_gradient_bytes():
        # What FSDP keeps between micro-batches that no reduce-scatter has sharded yet: the gradient on each
        # parameter's unsharded tensor (or, under mixed precision, its float32 copy).
        fsdp_params = [
            fsdp_param
            for module in model.modules()
            if isinstance(module, FSDPModule)
            for group in module._get_fsdp_state()._fsdp_param_groups
            for fsdp_param in group.fsdp_params
        ]
        kept = [getattr(f, "_unsharded_param", None) for f in fsdp_params]
        kept = [p.grad for p in kept if p is not None] + [f.unsharded_accumulated_grad for f in fsdp_params]
        return sum(local_bytes(grad) for grad in kept if grad is not None)

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = shard_model(
        GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100)), torch.device("cpu"), None, cpu_offload=False
    )
    optimizer = build_optimizer(model, LanguageModelingArgs(), torch.device("cpu"))
    grads_while_accumulating, sharded_bytes, unsharded_bytes, losses = [], [], [], []
    for index, ids in enumerate(_micro_batches()):
        with gradient_sync(model, 2, is_accumulating=index < 2, reduce_every_micro_batch=reduce_every_micro_batch):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        losses.append(float(loss.detach()))
        grads_while_accumulating.append(sum(p.grad is not None for p in model.parameters()))
        sharded_bytes.append(sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None))
        unsharded_bytes.append(unsharded_gradient_bytes())
    gradients = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    gradient_bytes = sum(local_bytes(p.grad) for p in model.parameters())
    optimizer.step()
    optimizer_bytes = sum(
        local_bytes(value) for state in optimizer.state.values() for value in state.values() if value.dim() > 0
    )
    torch.save(
        {
            "grads_after_each_micro_batch": grads_while_accumulating,
            "sharded_gradient_bytes_after_each_micro_batch": sharded_bytes,
            "unsharded_gradient_bytes_after_each_micro_batch": unsharded_bytes,
            "losses": losses,
            "gradients": gradients,
            "bytes": {"parameters": parameter_bytes(model), "gradients": gradient_bytes, "optimizer": optimizer_bytes},
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _micro_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (2, 16), generator=generator) for _ in range(3)]


def _two_ranks_and_the_plain_model(tmp_path, reduce_every_micro_batch: bool):
    """What each of the two ranks held (see _two_rank_training_state), and the unsharded model that ran the same
    micro-batches: its per-micro-batch losses, gradients and parameter bytes."""
    import torch.multiprocessing as mp
    from transformers import GPT2Config, GPT2LMHeadModel

    mp.spawn(
        _two_rank_training_state, args=(str(tmp_path / "rendezvous"), str(tmp_path), reduce_every_micro_batch), nprocs=2
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100))
    losses = []
    for ids in _micro_batches():
        loss = plain(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss.detach()))
    parameters = {name: p for name, p in plain.named_parameters()}
    whole_bytes = sum(p.numel() * p.element_size() for p in parameters.values())
    return ranks, losses, parameters, whole_bytes


def _assert_gradients_and_shards_of_the_plain_model(held, losses, parameters, whole_bytes):
    assert held["losses"] == pytest.approx(losses, rel=RTOL)
    for name, gradient in held["gradients"].items():
        torch.testing.assert_close(gradient, parameters[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    # Every dimension is even: each rank holds exactly half of the weights, their gradients and AdamW's
    # two moments (a DDP rank holds all of them).
    assert held["bytes"] == {"parameters": whole_bytes / 2, "gradients": whole_bytes / 2, "optimizer": whole_bytes}


def test_fsdp_shards_gradients_and_optimizer_state_and_reduces_only_the_last_micro_batch(tmp_path):
    """Both ranks run the same micro-batches, so the averaged gradient is one rank's sum over the three.
    While accumulating, no sharded gradient exists: the unsharded sums wait for the last micro-batch's
    reduce-scatter, which alone writes the shards' .grad."""
    ranks, losses, parameters, whole_bytes = _two_ranks_and_the_plain_model(tmp_path, reduce_every_micro_batch=False)
    parameter_count = len(parameters)
    for held in ranks:
        assert held["grads_after_each_micro_batch"] == [0, 0, parameter_count]
        # Meanwhile each rank keeps the whole model's gradients, unsharded (float32 here, as FSDP keeps them).
        assert held["unsharded_gradient_bytes_after_each_micro_batch"] == [whole_bytes, whole_bytes, 0]
        _assert_gradients_and_shards_of_the_plain_model(held, losses, parameters, whole_bytes)


def test_fsdp_reduce_scatter_every_micro_batch_keeps_only_the_shard_of_the_gradients(tmp_path):
    """fsdp_reduce_scatter_every_micro_batch: from the first micro-batch on, each rank holds only its half of the
    gradients, summed into as the micro-batches go, and nothing unsharded; the step's gradients are the same sums."""
    ranks, losses, parameters, whole_bytes = _two_ranks_and_the_plain_model(tmp_path, reduce_every_micro_batch=True)
    for held in ranks:
        assert held["grads_after_each_micro_batch"] == [len(parameters)] * 3
        assert held["sharded_gradient_bytes_after_each_micro_batch"] == [whole_bytes / 2] * 3
        assert held["unsharded_gradient_bytes_after_each_micro_batch"] == [0, 0, 0]
        _assert_gradients_and_shards_of_the_plain_model(held, losses, parameters, whole_bytes)


@pytest.mark.parametrize("reduce_every_micro_batch", [False, True])
def test_the_training_loops_optimizer_step_lets_fsdp_reduce_only_its_last_micro_batch_unless_told_every_one(
    reduce_every_micro_batch, one_rank_group, monkeypatch
):
    """The tests above show what gradient_sync does with is_accumulating and fsdp_reduce_scatter_every_micro_batch;
    this one that the worker's optimizer step passes both: a loop that reduced every micro-batch (or none but the
    last) would train to the same losses, so no run could tell."""
    import contextlib
    import types

    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.models.modeling import CLM
    from raylm.training.optim import build_optimizer
    from raylm.training.parallelism import gradient_scaler, shard_model
    from raylm.training.worker import _Run

    model = shard_model(
        GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100)), torch.device("cpu"), None, cpu_offload=False
    )
    requested = []
    set_sync = model.set_requires_gradient_sync
    monkeypatch.setattr(
        model, "set_requires_gradient_sync", lambda sync, **options: (requested.append(sync), set_sync(sync, **options))
    )
    args = LanguageModelingArgs()
    optimizer = build_optimizer(model, args, torch.device("cpu"))
    # What _optimizer_step reads of the worker's run, for one FSDP rank.
    run = types.SimpleNamespace(
        model=model,
        device=torch.device("cpu"),
        world_size=1,
        reduce_per_micro_batch=reduce_every_micro_batch,
        _autocast=contextlib.nullcontext,
        job=types.SimpleNamespace(objective=CLM),
        args=args,
        scaler=gradient_scaler(fsdp=True, enabled=False),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        nonfinite=types.SimpleNamespace(record=lambda *_: None),
        state=types.SimpleNamespace(global_step=0),
    )
    batches = [
        {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), "n_input_tokens": ids.numel()}
        for ids in _micro_batches()
    ]
    _Run._optimizer_step(run, batches, global_targets=sum(ids.numel() for ids in _micro_batches()), global_inputs=0)
    assert requested == [reduce_every_micro_batch, reduce_every_micro_batch, True]


def test_reduce_scatter_every_micro_batch_is_on_by_default_from_a_gigabyte_of_gradients(one_rank_group):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.parallelism import (
        REDUCE_SCATTER_EVERY_MICRO_BATCH_FROM_BYTES,
        reduces_every_micro_batch,
        shard_model,
    )

    def sharded(**config):
        # On the meta device: sharding counts the parameters without allocating them.
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(**config))
        return shard_model(model, torch.device("meta"), None, cpu_offload=False)

    small = sharded(**GPT2_NO_DROPOUT, vocab_size=100)
    # GPT-2 medium (355M parameters, 1.4 GB of float32 gradients) and GPT-2 small (124M, 0.5 GB).
    medium = sharded(n_embd=1024, n_layer=24, n_head=16)
    gpt2_small = sharded(n_embd=768, n_layer=12, n_head=12)
    assert 4 * sum(p.numel() for p in medium.parameters()) > REDUCE_SCATTER_EVERY_MICRO_BATCH_FROM_BYTES
    auto = LanguageModelingArgs(parallel_strategy="fsdp")
    assert [reduces_every_micro_batch(m, auto) for m in (small, gpt2_small, medium)] == [False, False, True]
    for value in (True, False):
        chosen = LanguageModelingArgs(parallel_strategy="fsdp", fsdp_reduce_scatter_every_micro_batch=value)
        assert [reduces_every_micro_batch(m, chosen) for m in (small, medium)] == [value, value]
    # DDP has nothing to reduce-scatter.
    unsharded = GPT2LMHeadModel(GPT2Config(**GPT2_NO_DROPOUT, vocab_size=100))
    assert not reduces_every_micro_batch(unsharded, LanguageModelingArgs(fsdp_reduce_scatter_every_micro_batch=True))


@pytest.mark.parametrize(
    "model_class, config",
    [
        # Rotary inv_freq, a buffer no state dict holds.
        (
            "Qwen2ForCausalLM",
            {**TINY_DECODER, "vocab_size": 100},
        ),
        # Position and token type ids, buffers no state dict holds; the output layer tied to the embeddings.
        ("BertForMaskedLM", {**TINY_BERT, "vocab_size": 100}),
    ],
)
def test_a_model_sharded_from_its_meta_skeleton_is_the_model_rank_0_broadcast(one_rank_group, model_class, config):
    """parallel_strategy fsdp: a rank shards the model's skeleton (parameters on the meta device) and then receives
    rank 0's weights; the buffers that no state dict carries keep the model's values, so the logits are the same."""
    import transformers

    from raylm.training.model_setup import meta_skeleton
    from raylm.training.parallelism import load_from_rank0, shard_model

    cls = getattr(transformers, model_class)
    torch.manual_seed(0)
    whole = cls(cls.config_class(**config)).eval()
    skeleton = meta_skeleton(whole)
    assert all(p.is_meta for p in skeleton.parameters()) and not any(b.is_meta for b in skeleton.buffers())
    sharded = shard_model(skeleton, torch.device("cpu"), None, cpu_offload=False)
    load_from_rank0(sharded, whole)
    buffers = dict(whole.named_buffers())
    assert buffers and all(torch.equal(buffer, buffers[name]) for name, buffer in sharded.named_buffers())
    for name, param in sharded.named_parameters():
        assert torch.equal(param.full_tensor(), whole.get_parameter(name)), name
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(sharded.eval()(input_ids=ids).logits, whole(input_ids=ids).logits)
