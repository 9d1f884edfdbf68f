"""Optimizer and learning-rate schedule: the model's parameters and args -> AdamW or Adafactor (no weight decay on
biases and norms) and Simple Transformers' schedules by name; the accumulated gradients -> their norm, clipped to
max_grad_norm.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from raylm.config import LanguageModelingArgs
from raylm.training.parallelism import whole

# Biases and norm weights by name; any other vector (Llama's input_layernorm.weight, model.norm.weight) by shape.
NO_WEIGHT_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_")


def build_optimizer(model: torch.nn.Module, args: LanguageModelingArgs, device: torch.device) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if param.ndim < 2 or any(n in name for n in NO_WEIGHT_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if args.optimizer == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=args.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False)
    # One fused kernel over all parameters instead of ~10 ops per tensor: 6.5x less CPU time per step for a
    # 1.5M-parameter BERT on one CPU thread (7.9 ms vs 1.2 ms), and the usual choice on CUDA. FSDP's CPU shards
    # (DTensors) keep the per-tensor path, which DTensor dispatches op by op.
    sharded_on_cpu = device.type == "cpu" and any(isinstance(p, DTensor) for p in decay + plain)
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=tuple(args.adam_betas),
        eps=args.adam_epsilon,
        fused=device.type in ("cuda", "cpu") and not sharded_on_cpu,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, args: LanguageModelingArgs, total_steps: int):
    import transformers

    warmup = args.warmup_steps_for(total_steps)
    name = args.scheduler
    if name == "constant_schedule":
        return transformers.get_constant_schedule(optimizer)
    if name == "constant_schedule_with_warmup":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "cosine_schedule_with_warmup":
        return transformers.get_cosine_schedule_with_warmup(
            optimizer, warmup, total_steps, num_cycles=args.cosine_schedule_num_cycles
        )
    if name == "cosine_with_hard_restarts_schedule_with_warmup":
        return transformers.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, warmup, total_steps, num_cycles=int(args.cosine_schedule_num_cycles)
        )
    if name == "polynomial_decay_schedule_with_warmup":
        return transformers.get_polynomial_decay_schedule_with_warmup(
            optimizer,
            warmup,
            total_steps,
            lr_end=args.polynomial_decay_schedule_lr_end,
            power=args.polynomial_decay_schedule_power,
        )
    return transformers.get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def clip_gradients(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_grad_norm: float
) -> torch.Tensor:
    """The whole gradient's norm (a device tensor: no host sync), after clipping it to max_grad_norm when that is
    positive."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        # Only to tell a NaN/inf gradient (which would turn every weight NaN) from a finite one: one
        # fused pass over the gradients (still scaled under fp16, which overflows the same way), no host sync.
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return whole(grad_norm)
