"""Parallelism: a worker's model -> on its device, wrapped in DDP or sharded with FSDP2, with the matching gradient
scaler; the sharded weights -> gathered whole on rank 0 for a checkpoint's Hugging Face export; a checkpoint's full
optimizer state (optimizer.pt) -> back on the ranks, whichever strategy wrote it.

DDP keeps a whole copy of the model on every rank and all-reduces the gradients; FSDP2's `fully_shard` keeps a shard
of each transformer block per rank and all-gathers it just before the block runs (parallel_strategy).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import ray
import ray.train.torch
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from raylm.config import LanguageModelingArgs
from raylm.errors import ModelError
from raylm.training import in_process

CPU_FALLBACK_NOTICE = "Ray gave the workers GPUs, but torch sees no CUDA device on their nodes: training on CPU."


def worker_device() -> torch.device:
    """Ray's device for this worker, float32 matmuls on TF32 there (allow_tf32); the CPU when Ray gave it a GPU
    that torch cannot use.

    A GPU in Ray is a resource count, which a node can offer without a device torch can use (a
    CPU-only torch build, a broken driver, logical GPUs on a test cluster); Ray Train would still
    hand out cuda:0. The run then trains on the CPU (launcher.DeviceAwareTorchConfig keeps its
    process group off NCCL) and the driver says so (falls_back_to_cpu). A run in the driver
    (in_process.py) is a CPU run, whatever devices the driver's machine has.
    """
    if in_process.in_driver():
        return torch.device("cpu")
    device = ray.train.torch.get_device()
    device = device if device.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")
    allow_tf32(device)
    return device


def allow_tf32(device: torch.device) -> None:
    """float32 matmuls on TF32 tensor cores on a CUDA device (torch's default is full float32, up to 8x slower on an
    A100/H100; cuDNN's convolutions already use TF32); a 10-bit mantissa, which training does not notice, as in nanoGPT
    and torchtitan. Through the legacy setter: on torch 2.13, once a backend's precision is set with the newer
    `torch.backends.*.fp32_precision` API, torch.get_float32_matmul_precision() raises, and Inductor's autotuning
    still calls it."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def falls_back_to_cpu(device: torch.device) -> bool:
    """Whether this worker trains on the CPU although Ray gave it GPUs (worker_device says why)."""
    return device.type == "cpu" and not in_process.in_driver() and bool(ray.get_gpu_ids())


def parallelize(
    model: torch.nn.Module, args: LanguageModelingArgs, device: torch.device, param_dtype: Optional[torch.dtype]
) -> torch.nn.Module:
    """The model on `device`, sharded (parallel_strategy fsdp, in place) or wrapped in DDP by Ray Train."""
    if args.parallel_strategy == "fsdp":
        return shard_model(model, device, param_dtype, args.fsdp_cpu_offload)
    return ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy_kwargs=ddp_options(model))


def ddp_options(model: torch.nn.Module) -> dict:
    """DDP's settings for a model: gradients kept in DDP's buckets (no copy of every gradient per step), and buffers
    synced from rank 0 before each forward only where training changes them (BatchNorm's running statistics);
    transformers' buffers (position ids, causal masks) are constants."""
    has_running_statistics = any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())
    return {"gradient_as_bucket_view": True, "forward_sync_buffers": has_running_statistics}


def require_every_gradient(model: torch.nn.Module) -> None:
    """After a backward under DDP: fail when a parameter got no gradient. DDP waits for every parameter's gradient
    before it reduces their bucket, so such a parameter leaves its bucket unreduced and DDP fails at the next step.
    A loop over the parameters' names, nothing on the device."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    missing = [name for name, p in model.module.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise ModelError(
            f"{len(missing)} parameters never reach the loss (e.g. {', '.join(missing[:3])}), and DDP needs every "
            "trainable parameter's gradient to reduce the gradients over the workers",
            "Freeze them before train_model (param.requires_grad_(False), e.g. for a pooler the language-model loss "
            "does not use), or load the model without them",
        )


def gradient_scaler(fsdp: bool, enabled: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler (a no-op unless `enabled`).

    Each FSDP rank sees only its shard of the gradients: ShardedGradScaler all-reduces "found an
    overflow", so every rank skips the same steps (torch's GradScaler would let the shards part ways).
    """
    return ShardedGradScaler("cuda", enabled=enabled) if fsdp else torch.amp.GradScaler("cuda", enabled=enabled)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # FSDP2 shards the model in place: it has no wrapper to look through.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# fsdp_reduce_scatter_every_micro_batch None: on from this size of the model's unsharded float32 gradients (the
# field's help says why).
REDUCE_SCATTER_EVERY_MICRO_BATCH_FROM_BYTES = 2**30


def reduces_every_micro_batch(model: torch.nn.Module, args: LanguageModelingArgs) -> bool:
    """Whether FSDP reduce-scatters each micro-batch's gradients (fsdp_reduce_scatter_every_micro_batch, None
    resolved by the model's size); False for an unsharded model."""
    if not isinstance(model, FSDPModule):
        return False
    if args.fsdp_reduce_scatter_every_micro_batch is not None:
        return args.fsdp_reduce_scatter_every_micro_batch
    # A sharded parameter's numel is the whole tensor's.
    unsharded_gradient_bytes = 4 * sum(p.numel() for p in model.parameters())
    return unsharded_gradient_bytes >= REDUCE_SCATTER_EVERY_MICRO_BATCH_FROM_BYTES


def gradient_sync(
    model: torch.nn.Module, world_size: int, is_accumulating: bool, reduce_every_micro_batch: bool = False
):
    """The context of one micro-batch's backward: no gradient reduction while accumulating (the last micro-batch
    reduces the sum), unless FSDP reduce-scatters every micro-batch (reduces_every_micro_batch)."""
    if isinstance(model, FSDPModule):
        # Without a reduce-scatter FSDP keeps the accumulating gradients unsharded (whole-model size, float32) until
        # the last micro-batch's; with one, each micro-batch's gradients are added into the rank's shards.
        model.set_requires_gradient_sync(reduce_every_micro_batch or not is_accumulating)
        return contextlib.nullcontext()
    return model.no_sync() if world_size > 1 and is_accumulating else contextlib.nullcontext()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as the whole model sees it: under FSDP each rank holds the part of its shards (a norm of its shards'
    gradients), and the whole is one all-reduce away."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers of a model (each member of a ModuleList of one class: GPT-2's transformer.h, BERT's and
    both ELECTRA towers' encoder.layer), less any that holds a parameter also used outside it.

    transformers' `_no_split_modules` would name them, but BERT and ELECTRA leave it None. A block
    sharing a parameter with the rest of the model must not become an FSDP unit of its own: the
    shared tensor would then belong to two units.
    """
    owners: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    blocks = []
    for list_name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len({type(child) for child in module}) != 1:
            continue
        for index, block in enumerate(module):
            prefix = f"{list_name}.{index}."
            if all(name.startswith(prefix) for param in block.parameters() for name in owners[id(param)]):
                blocks.append(block)
    return blocks


def shard_model(
    model: torch.nn.Module, device: torch.device, param_dtype: Optional[torch.dtype], cpu_offload: bool
) -> torch.nn.Module:
    """parallel_strategy fsdp: FSDP2's fully_shard on each transformer block, then on the whole model (in place).

    The root unit holds what no block does: the embeddings, the final norm and the output layer, so tied
    weights (GPT-2's output layer and token embeddings, ELECTRA's embeddings shared by both towers) stay
    one tensor in one unit. Each block's weights are all-gathered just before it runs and freed after.
    param_dtype (bf16/fp16 on GPU): the gathered weights are cast to it; gradients are reduced in float32.
    """
    precision = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    # A model whose parameters are on the meta device (model_setup.meta_skeleton) is sharded before it has weights.
    on_meta = device.type != "meta" and any(p.is_meta for p in model.parameters())
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()} if on_meta else {}
    if not on_meta:
        # On the device first, buffers included; under CPU offload fully_shard then moves the shards back to the CPU.
        model.to(device)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=precision, offload_policy=offload)
    # The root casts no inputs: ELECTRA's sampling uniforms must keep float32's resolution.
    fully_shard(model, mp_policy=dataclasses.replace(precision, cast_forward_inputs=False), offload_policy=offload)
    if on_meta:
        # Each rank allocates only its shards (uninitialised: the weights are loaded next, load_from_rank0 or the
        # checkpoint's shards). to_empty empties the buffers too, and the ones no state dict holds (position ids,
        # rotary inv_freq) would stay garbage: they get the skeleton's values back.
        model.to_empty(device=device)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    return model


def load_from_rank0(model: torch.nn.Module, whole: Optional[torch.nn.Module]) -> None:
    """The weights of rank 0's `whole` model (None on the other ranks) into every rank's shards, broadcast one tensor
    at a time, so no other rank ever holds the whole model. Every rank must call it."""
    state = {}
    if whole is not None:
        # A tied weight (ELECTRA's shared embeddings, GPT-2's output layer) goes under the first of its names only:
        # torch's loader has no tensor of its own for the others, and that one tensor is theirs too. Hence
        # strict=False, the state being the same model's whole state dict less those names.
        tied_names = {name for name, _ in whole.named_parameters(remove_duplicate=False)}
        tied_names -= {name for name, _ in whole.named_parameters()}
        state = {name: value for name, value in whole.state_dict().items() if name not in tied_names}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)


def full_model_state(model: torch.nn.Module) -> dict:
    """The sharded model's whole state dict on rank 0's CPU (empty on the other ranks); every rank must call it.

    The gathered tensors are copies, so tied weights come back as separate tensors; they are made one
    again, so save_pretrained writes (and drops the tied names) exactly as for an unsharded model.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            primary = first_name.setdefault(id(param), name)
            if primary != name and name in state:
                state[name] = state[primary]
    return state


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state, in either form: torch's own (parameters by index, written by a DDP run) or
    the full state dict by parameter name (written by an FSDP run, for any world size)."""
    if not isinstance(model, FSDPModule) and not _keyed_by_name(saved):
        optimizer.load_state_dict(saved)
        return
    if not _keyed_by_name(saved):
        # build_optimizer orders the parameters the same way whatever the strategy, so index i names the same one.
        names = {id(param): name for name, param in model.named_parameters()}
        ordered = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
        saved = {
            "state": {ordered[i]: value for i, value in saved["state"].items()},
            "param_groups": [
                {**group, "params": [ordered[i] for i in group["params"]]} for group in saved["param_groups"]
            ],
        }
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(optimizer_state: dict) -> bool:
    return any(isinstance(key, str) for key in optimizer_state["state"])


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards under FSDP, the whole model under DDP (a tied weight
    once)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())
