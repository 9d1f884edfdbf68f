"""Model FLOPs per token and device peak FLOP/s -> model FLOPs utilisation (MFU).

The estimate is PaLM's (Chowdhury et al. 2022, appendix B), the one nanoGPT's `estimate_mfu` uses:

    training FLOPs per token = 6 * N  +  12 * n_layer * d_model * seq_len

6·N: a forward pass does one multiply-add (2 FLOPs) per weight per token, the backward pass twice
that. N counts the weights that take part in matmuls: every parameter except embedding tables that
are only looked up (position and token-type embeddings, and a token embedding not tied to the
output layer); a tied token embedding counts once, as the output projection. 12·L·d·T: the two
attention matmuls (QKᵀ and AV), 2·2·d·T FLOPs per layer per token forward, times 3 for
forward + backward; causal masking is not subtracted (PaLM's convention). A masked LM's output
layer (and ELECTRA's generator head) runs on the masked tokens only (modeling._rows_selected,
ElectraPair.forward), so its weights count for mlm_probability of the tokens.

MFU counts only these model FLOPs (no recomputation, no padding) against the device's dense peak
for the compute dtype, found by the device's name in _GPU_PEAKS (a MIG slice: its share of the SMs).
CPUs have no reliable published peak, so `peak_flops_per_second` is None for them and MFU is not
reported; bench/throughput.py measures a matmul peak on the spot instead.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import torch

from raylm.models.modeling import masked_lm_vocab_projection


class GpuPeak(NamedTuple):
    """A GPU's dense (no sparsity) peak FLOP/s per compute dtype, and its streaming multiprocessors."""

    half: float  # bf16/fp16 on tensor cores
    tf32: float  # float32 matmuls on tensor cores (torch.backends.cuda.matmul.fp32_precision "tf32")
    fp32: float  # float32 without tensor cores ("ieee", torch's default)
    sms: int  # of the whole GPU: a MIG slice computes on its share of them


# Keyed by the words that name the GPU in torch.cuda.get_device_name (lowercase, split at anything not a letter
# or digit); the entry with the most words that all appear wins, so "NVIDIA L40" is not the L4, "NVIDIA RTX
# A1000" not the A100, and "H100 PCIe" not the SXM part. Figures are NVIDIA's datasheets' dense values (those
# listed "with sparsity" halved).
_GPU_PEAKS = {
    # H100 datasheet (SXM5 / PCIe / NVL columns); 132, 114 and 132 SMs (Hopper architecture whitepaper).
    ("h100",): GpuPeak(989e12, 494.7e12, 66.9e12, 132),
    ("h100", "pcie"): GpuPeak(756e12, 378e12, 51.2e12, 114),
    ("h100", "nvl"): GpuPeak(835e12, 417.5e12, 60e12, 132),
    # H200 datasheet (SXM / NVL columns); the GH200 datasheet's Hopper GPU: H100 SXM5's figures.
    ("h200",): GpuPeak(989e12, 494.7e12, 66.9e12, 132),
    ("h200", "nvl"): GpuPeak(835e12, 417.5e12, 60e12, 132),
    ("gh200",): GpuPeak(989e12, 494.7e12, 66.9e12, 132),
    # HGX B200 datasheet, per GPU (an 8-GPU board's 36 / 18 PFLOPS with sparsity, 600 TFLOPS fp32, over 8).
    ("b200",): GpuPeak(2250e12, 1125e12, 75e12, 148),
    # A100 datasheet (SXM4 and PCIe alike); A30 datasheet.
    ("a100",): GpuPeak(312e12, 156e12, 19.5e12, 108),
    ("a30",): GpuPeak(165e12, 82e12, 10.3e12, 56),
    # A40, A10 datasheets. AWS's A10G is an A10 variant (80 SMs) without a datasheet: read its MFU as approximate.
    ("a40",): GpuPeak(149.7e12, 74.8e12, 37.4e12, 84),
    ("a10",): GpuPeak(125e12, 62.5e12, 31.2e12, 72),
    ("a10g",): GpuPeak(125e12, 62.5e12, 31.2e12, 80),
    # L40S, L40, L4 datasheets.
    ("l40s",): GpuPeak(362e12, 183e12, 91.6e12, 142),
    ("l40",): GpuPeak(181e12, 90.5e12, 90.5e12, 142),
    ("l4",): GpuPeak(121e12, 60e12, 30.3e12, 58),
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


def model_training_flops_per_token(
    model: torch.nn.Module, seq_len: int, mlm_probability: Optional[float] = None
) -> Optional[int]:
    """The estimate for a Hugging Face model (an ELECTRA pair: generator + discriminator) at seq_len tokens per example.

    mlm_probability: the share of tokens masked (args.mlm_probability); the weights that run on the masked
    tokens only (see the module docstring) count for that share. None: every weight runs on every token,
    as in a causal LM. None is returned when a config does not say its depth and width under the standard
    names (every config maps num_hidden_layers/hidden_size onto its own, e.g. GPT-2's n_layer/n_embd).
    """
    pair = hasattr(model, "generator") and hasattr(model, "discriminator")
    halves = [model.generator, model.discriminator] if pair else [model]
    total = 0.0
    for half in halves:
        n_layer, d_model = getattr(half.config, "num_hidden_layers", None), getattr(half.config, "hidden_size", None)
        if not n_layer or not d_model:
            return None
        if pair:
            target_only = [half.generator_predictions, half.get_output_embeddings()] if half is model.generator else []
        else:
            target_only = [layer] if (layer := masked_lm_vocab_projection(half)) is not None else []
        n_target_only = sum(p.numel() for module in target_only for p in module.parameters())
        share = 1.0 if mlm_probability is None else mlm_probability
        total += training_flops_per_token(matmul_parameters(half), n_layer, d_model, seq_len)
        total -= 6 * n_target_only * (1.0 - share)
    return round(total)


def gpu_peak(device_name: str) -> Optional[GpuPeak]:
    """The _GPU_PEAKS entry with the most name words, all found in device_name; None for a GPU not in it."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    matches = [key for key in _GPU_PEAKS if words.issuperset(key)]
    return _GPU_PEAKS[max(matches, key=len)] if matches else None


def dense_peak_flops_per_second(
    device_name: str, multiprocessor_count: int, compute_dtype: torch.dtype, tf32_matmuls: bool
) -> Optional[float]:
    """A named GPU's dense peak for the dtype its matmuls run in; a MIG slice ("... MIG 3g.40gb") gets its
    share of the whole GPU's SMs. None for a GPU not in _GPU_PEAKS."""
    peak = gpu_peak(device_name)
    if peak is None:
        return None
    if compute_dtype in (torch.bfloat16, torch.float16):
        flops = peak.half
    else:
        flops = peak.tf32 if tf32_matmuls else peak.fp32
    if "mig" in re.findall(r"[a-z0-9]+", device_name.lower()):
        flops *= min(1.0, multiprocessor_count / peak.sms)
    return flops


def peak_flops_per_second(device: torch.device, compute_dtype: torch.dtype) -> Optional[float]:
    """The device's dense peak for the dtype the matmuls run in; None for CPUs and GPUs not in the table."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return dense_peak_flops_per_second(
        properties.name, properties.multi_processor_count, compute_dtype, cuda_matmuls_use_tf32()
    )


def cuda_matmuls_use_tf32() -> bool:
    """Whether float32 matmuls on CUDA run on TF32, however it was set: read through the newer fp32_precision API
    (the legacy torch.get_float32_matmul_precision() raises once any backend was set through the newer one; the newer
    getters read either). "none" defers to the global setting."""
    precision = torch.backends.cuda.matmul.fp32_precision
    return (precision if precision != "none" else torch.backends.fp32_precision) == "tf32"
