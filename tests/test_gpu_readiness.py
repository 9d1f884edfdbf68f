"""What a first GPU run depends on, where a CPU can show it: progress kept off Ray Train's report barrier, gloo for
the CPU collectives of FSDP's CPU offload, packed blocks without a mask, TF32 on CUDA workers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, tiny_args

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.training import in_process


def test_progress_reaches_the_driver_every_logging_step_but_ray_at_most_once_per_controller_poll(
    ray_session, corpus, tmp_path, monkeypatch
):
    """ray.train.report is a barrier that waits for Ray's controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
    logging every step must not report to Ray every step, while the run log still gets every step."""
    progress_reports = []
    report = in_process.DriverTrainFnUtils.report

    def counting_report(self, metrics, checkpoint=None, **kwargs):
        if checkpoint is None and "loss" in metrics:
            progress_reports.append(metrics["global_step"])
        return report(self, metrics, checkpoint, **kwargs)

    monkeypatch.setattr(in_process.DriverTrainFnUtils, "report", counting_report)
    # The worker reads the controller's poll interval from the job's environment (the driver's, in the driver).
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3600")
    steps = 6
    args = tiny_args(tmp_path / "out", mlm=False, vocab_size=300, config=TINY_GPT2, max_steps=steps, logging_steps=1)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    model.train_model(corpus[0])

    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log if e["kind"] == "train"] == list(range(1, steps + 1))
    assert progress_reports == []


def test_cpu_offload_on_gpus_runs_cpu_collectives_on_gloo_and_gets_more_than_one_thread():
    """Under fsdp_cpu_offload the gradients are CPU DTensors: clipping's all-reduce on NCCL alone fails at the first
    optimizer step on GPUs. Ray is asked for a process group with gloo for CPU tensors beside NCCL."""
    from raylm.cluster import launcher

    offload = LanguageModelingArgs.from_dict({"parallel_strategy": "fsdp", "fsdp_cpu_offload": True})
    assert launcher.process_group_backend(offload, use_gpu=True) == "cpu:gloo,cuda:nccl"
    assert launcher.process_group_backend(offload, use_gpu=False) is None  # Ray's gloo
    assert launcher.process_group_backend(LanguageModelingArgs.from_dict({"parallel_strategy": "fsdp"}), True) is None
    assert launcher.cpus_per_worker(offload) > 1
    assert launcher.cpus_per_worker(LanguageModelingArgs.from_dict({"resources_per_worker": {"CPU": 2}})) == 2


def _clip_offloaded_shards(rank: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.training.optim import build_optimizer, clip_gradients
    from raylm.training.parallelism import gradient_scaler, shard_model

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=100))
    model = shard_model(model, torch.device("cpu"), None, cpu_offload=True)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = build_optimizer(model, LanguageModelingArgs(), torch.device("cpu"))
    grad = next(p.grad for p in model.parameters() if p.grad is not None)
    norm_before = clip_gradients(model, optimizer, gradient_scaler(fsdp=True, enabled=False), max_grad_norm=0.1)
    norm_after = clip_gradients(model, optimizer, gradient_scaler(fsdp=True, enabled=False), max_grad_norm=0.0)
    record = {"grad": type(grad).__name__, "device": grad.device.type, "before": float(norm_before)}
    record["after"] = float(norm_after)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def test_clipping_cpu_offloaded_shards_agrees_across_two_gloo_ranks(tmp_path):
    """The collectives clipping runs under offload, on CPU DTensors over a two-rank gloo group: the whole
    gradient's norm, the same on both ranks, clipped to max_grad_norm."""
    torch.multiprocessing.spawn(
        _clip_offloaded_shards, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True
    )
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["grad"] == "DTensor" and r["device"] == "cpu" for r in records)
    assert records[0]["before"] == records[1]["before"] > 0.1
    assert records[0]["after"] == records[1]["after"] == pytest.approx(0.1, rel=1e-4)


def test_packed_blocks_reach_the_model_without_a_mask_and_their_loss_is_unchanged():
    """A batch without padding goes to the model with attention_mask=None (no host-side padding check per forward,
    SDPA's mask-free kernel); a padded one keeps its mask. The loss is the all-ones mask's."""
    import numpy as np
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.data.collators import CollatorSpec, collate
    from raylm.models.modeling import forward_loss_sums

    torch.manual_seed(0)
    no_dropout = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = GPT2LMHeadModel(GPT2Config(**no_dropout, vocab_size=100))
    masks_seen = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: masks_seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    spec = CollatorSpec("clm", pad_id=0, mask_id=None, vocab_size=100, special_ids=(0,), mlm_probability=0.15, seed=0)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(1, 100, 16) for _ in range(2)]  # packed text: every example a full block

    packed = collate({"input_ids": blocks, "example_id": [0, 1]}, spec, stream=0)
    loss = forward_loss_sums(model, packed, "clm")["target_loss"]
    assert masks_seen == [None]
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"])).logits
    ids = packed["input_ids"]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)

    padded = collate({"input_ids": [blocks[0], blocks[1][:9]], "example_id": [0, 1]}, spec, stream=0)
    forward_loss_sums(model, padded, "clm")
    assert torch.equal(masks_seen[-1], padded["attention_mask"]) and not bool(padded["attention_mask"].all())


def test_cuda_workers_allow_tf32_and_cpu_workers_leave_precision_alone():
    """And both of torch's precision getters still answer: MFU reads the newer, Inductor's autotuning the legacy one,
    which raises on torch 2.13 once a backend's precision was set through the newer API."""
    from raylm.models.flops import cuda_matmuls_use_tf32
    from raylm.training.parallelism import allow_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = torch.get_float32_matmul_precision()
    try:
        allow_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == before == "highest" and not cuda_matmuls_use_tf32()
        allow_tf32(torch.device("cuda", 0))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32") and cuda_matmuls_use_tf32()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("gpus", [2, 0.5])
def test_resources_per_worker_with_other_than_one_gpu_is_a_config_error(gpus):
    """A worker trains on one device: 2 GPUs per worker would leave one idle, half a GPU would share it."""
    from raylm import ConfigError

    with pytest.raises(ConfigError, match=rf"reserves {gpus} GPUs per worker.*Set resources_per_worker's 'GPU' to 1"):
        LanguageModelingArgs.from_dict({"resources_per_worker": {"CPU": 2, "GPU": gpus}}).validate()
    LanguageModelingArgs.from_dict({"resources_per_worker": {"CPU": 2, "GPU": 1}}).validate()
    LanguageModelingArgs.from_dict({"resources_per_worker": {"CPU": 2}}).validate()


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_with_a_parameter_that_never_reaches_the_loss_fails_in_one_paragraph(one_rank_group):
    """A BERT whose encoder keeps its pooler (which masked language modeling never uses) leaves the pooler's DDP
    bucket unreduced, and DDP fails at the next step: the first step says which parameters and the fix instead.
    DDP's settings: gradients as bucket views, no buffer broadcast for transformers' constant buffers."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from raylm import ModelError
    from raylm.training.parallelism import ddp_options, require_every_gradient

    config = BertConfig(**TINY_BERT, vocab_size=100)
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    for keeps_pooler in (False, True):
        model = BertForMaskedLM(config)
        if keeps_pooler:
            model.bert = BertModel(config, add_pooling_layer=True)
        assert ddp_options(model) == {"gradient_as_bucket_view": True, "forward_sync_buffers": False}
        ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_options(model))
        ddp(input_ids=ids, labels=ids).loss.backward()
        if not keeps_pooler:
            require_every_gradient(ddp)
            continue
        with pytest.raises(ModelError, match=r"2 parameters never reach the loss \(e.g. bert.pooler.dense.weight") as e:
            require_every_gradient(ddp)
        assert "\n" not in str(e.value) and "requires_grad_(False)" in str(e.value)
    assert ddp_options(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))["forward_sync_buffers"]


def test_two_workers_training_a_model_with_a_parameter_that_never_reaches_the_loss_fail_in_one_paragraph(
    ray_session, corpus, tmp_path
):
    """The worker group's DDP step, end to end: BigBird's masked LM keeps its encoder's pooler, which the loss never
    uses. Without the check DDP would fail at step 2 with its own multi-line RuntimeError from inside Ray."""
    from raylm import ModelError

    big_bird = {**TINY_BERT, "attention_type": "original_full"}
    args = tiny_args(tmp_path / "out", config=big_bird, vocab_size=400, num_workers=2, max_steps=3, block_size=64)
    model = LanguageModelingModel("bigbird", None, args=args, train_files=corpus[0])
    with pytest.raises(ModelError, match=r"2 parameters never reach the loss \(e.g. bert.pooler.weight") as e:
        model.train_model(corpus[0])
    assert "\n" not in str(e.value) and "requires_grad_(False)" in str(e.value)


def test_eval_model_computes_in_the_runs_precision(ray_session):
    """evaluate (eval_model's) runs its batches under the run's autocast dtype, as training does: bf16 here on the CPU,
    which autocast serves as it serves a GPU, and float32 without one."""
    import dataclasses

    import numpy as np
    import ray
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.data.collators import CollatorSpec
    from raylm.training.evaluation import evaluate

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=100))
    seen = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    rng = np.random.default_rng(0)
    dataset = ray.data.from_items([{"input_ids": rng.integers(5, 100, 32), "example_id": i} for i in range(8)])
    spec = CollatorSpec("clm", pad_id=0, mask_id=None, vocab_size=100, special_ids=(0,), mlm_probability=0.15, seed=1)
    losses = {}
    for amp_dtype in (None, torch.bfloat16):
        seen.clear()
        results = evaluate(
            model, dataset, "clm", dataclasses.asdict(spec), 4, 1, False, 1, 1.0, amp_dtype=amp_dtype, in_process=True
        )
        assert set(seen) == {amp_dtype or torch.float32} and len(seen) == 2
        losses[amp_dtype] = results["eval_loss"]
    assert losses[torch.bfloat16] != losses[None] and losses[torch.bfloat16] == pytest.approx(losses[None], rel=2e-2)


def test_evaluation_during_training_brings_its_sums_to_the_host_once_whatever_the_batch_count(
    ray_session, corpus, tmp_path
):
    """rank_eval_sums adds every batch's sums up on the device and collates the batches on another thread: the thread
    that drives the device turns no tensor into a Python value per batch (on a GPU each such call waits for the device
    to finish), only once at the end. Its totals are, bit for bit, the host's sum of each batch's statistics."""
    import threading

    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.data.collators import EVAL_STREAM, CollatorSpec, collate
    from raylm.data.datasets import ExampleSpec
    from raylm.data.epoch_data import rank_part
    from raylm.data.example_store import BlockReader, stored_examples
    from raylm.data.tokenization import train_tokenizer
    from raylm.training import evaluation
    from raylm.training.collectives import Ranks
    from raylm.training.evaluation import batch_eval_sums, rank_eval_sums

    tokenizer = train_tokenizer(
        "gpt2", [corpus[1]], LanguageModelingArgs.from_dict({"vocab_size": 400}), is_causal=True
    )
    examples = ExampleSpec("text", 16, (), (tokenizer.eos_token_id,))
    reader = BlockReader(stored_examples([corpus[1]], tokenizer, examples, 1.0, str(tmp_path), rebuild=False))
    spec = CollatorSpec("clm", tokenizer.eos_token_id, None, 400, (tokenizer.eos_token_id,), 0.15, seed=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, vocab_size=400))
    ranks = Ranks(0, 1, torch.device("cpu"))

    def evaluated_counting_host_values(batch_size):
        """rank_eval_sums' totals, and each tensor -> Python value call on this thread meanwhile; also checks that
        another thread collates the batches."""
        driving_thread, host_values, collating_threads = threading.get_ident(), [], set()

        def collate_noting_the_thread(*args, **kwargs):
            collating_threads.add(threading.get_ident())
            return collate(*args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(evaluation, "collate", collate_noting_the_thread)
            for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):

                def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
                    if threading.get_ident() == driving_thread:
                        host_values.append(_name)
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            no_autocast = torch.autocast("cpu", enabled=False)
            totals = rank_eval_sums(model, reader, spec, "clm", batch_size, ranks, no_autocast, sharded=False)
        assert collating_threads and driving_thread not in collating_threads
        return totals, host_values

    num_examples, calls = reader.store.num_examples, {}
    assert num_examples > 4 * 64, num_examples  # several batches of 64, and 8 times as many of 8
    for batch_size in (64, 8):
        totals, calls[batch_size] = evaluated_counting_host_values(batch_size)
        assert model.training  # back in training mode
        expected: dict = {}
        with torch.inference_mode():
            for part in rank_part(reader, 0, 1, batch_size):
                for key, value in batch_eval_sums(model.eval(), collate(part, spec, EVAL_STREAM), "clm").items():
                    expected[key] = expected.get(key, 0.0) + value
        assert totals == expected, batch_size
        # Every example evaluated once (a shard's last block may be short).
        assert (num_examples - 1) * 16 < totals["n_inputs"] <= num_examples * 16
    # The one transfer of the totals, and transformers' host-side look at the mask of a padded batch (the store's
    # last block is short): the same for 8 times as many batches.
    assert calls[8] == calls[64] and calls[8].count("tolist") == 1 and len(calls[8]) < 4, calls
