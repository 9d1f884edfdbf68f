"""Model FLOPs per token and device peak FLOP/s -> model FLOPs utilisation (MFU).

The estimate is PaLM's (Chowdhury et al. 2022, appendix B), the one nanoGPT's `estimate_mfu` uses:

    training FLOPs per token = 6 * N  +  12 * n_layer * d_model * seq_len

6·N: a forward pass does one multiply-add (2 FLOPs) per weight per token, the backward pass twice
that. N counts the weights that take part in matmuls: every parameter except embedding tables that
are only looked up (position and token-type embeddings, and a token embedding not tied to the
output layer); a tied token embedding counts once, as the output projection. 12·L·d·T: the two
attention matmuls (QKᵀ and AV), 2·2·d·T FLOPs per layer per token forward, times 3 for
forward + backward; causal masking is not subtracted (PaLM's convention).

MFU counts only these model FLOPs (no recomputation, no padding) against the device's dense peak
for the compute dtype. CPUs have no reliable published peak, so `peak_flops_per_second` is None for
them and MFU is not reported; bench/throughput.py measures a matmul peak on the spot instead.
"""

from __future__ import annotations

from typing import Optional

import torch

# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets: (bf16/fp16 tensor, tf32 tensor, fp32).
# The A10G entry is the A10 datasheet's; AWS's A10G is a variant, so read its MFU as a lower bound.
_GPU_PEAK_FLOPS = {
    "h100 sxm": (989e12, 494.7e12, 66.9e12),
    "h100 pcie": (756e12, 378e12, 51.2e12),
    "h100 nvl": (835e12, 417.5e12, 60e12),
    "h200 nvl": (835e12, 417.5e12, 60e12),
    "h200": (989e12, 494.7e12, 66.9e12),
    "a100": (312e12, 156e12, 19.5e12),
    "l40s": (362e12, 183e12, 91.6e12),
    "l4": (121e12, 60e12, 30.3e12),
    "a10g": (125e12, 62.5e12, 31.2e12),
}


def matmul_parameters(model: torch.nn.Module) -> int:
    """N of the 6·N term: unique parameters, less embedding tables that are only looked up (see the module
    docstring)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = getattr(output, "weight", None)
    lookup_only = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding) and module.weight is not output_weight
    )
    # parameters() yields a tied weight once.
    return sum(p.numel() for p in model.parameters()) - lookup_only


def training_flops_per_token(n_matmul_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """6·N + 12·n_layer·d_model·seq_len (forward + backward, one token of a seq_len-token example)."""
    return 6 * n_matmul_params + 12 * n_layer * d_model * seq_len


def model_training_flops_per_token(model: torch.nn.Module, seq_len: int) -> Optional[int]:
    """The estimate for a Hugging Face model (an ELECTRA pair: generator + discriminator) at seq_len tokens per example.

    None when a config does not say its depth and width under the standard names (every
    config maps num_hidden_layers/hidden_size onto its own, e.g. GPT-2's n_layer/n_embd).
    """
    halves = [getattr(model, name) for name in ("generator", "discriminator") if hasattr(model, name)] or [model]
    total = 0
    for half in halves:
        n_layer, d_model = getattr(half.config, "num_hidden_layers", None), getattr(half.config, "hidden_size", None)
        if not n_layer or not d_model:
            return None
        total += training_flops_per_token(matmul_parameters(half), n_layer, d_model, seq_len)
    return total


def _gpu_key(device_name: str) -> Optional[str]:
    name = device_name.lower()
    if "h100" in name:
        return "h100 nvl" if "nvl" in name else "h100 pcie" if "pcie" in name else "h100 sxm"
    if "h200" in name:
        return "h200 nvl" if "nvl" in name else "h200"
    for key in ("a100", "l40s", "a10g", "l4"):
        if key in name:
            return key
    return None


def peak_flops_per_second(device: torch.device, compute_dtype: torch.dtype) -> Optional[float]:
    """The device's dense peak for the dtype the matmuls run in; None for CPUs and GPUs not in the table."""
    if device.type != "cuda":
        return None
    key = _gpu_key(torch.cuda.get_device_name(device))
    if key is None:
        return None
    half, tf32, fp32 = _GPU_PEAK_FLOPS[key]
    if compute_dtype in (torch.bfloat16, torch.float16):
        return half
    return tf32 if torch.get_float32_matmul_precision() != "highest" else fp32
