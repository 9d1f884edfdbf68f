"""The FLOP estimate behind the reported MFU, checked against numbers worked out by hand."""

import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from raylm.models.flops import (
    _gpu_key,
    matmul_parameters,
    model_training_flops_per_token,
    peak_flops_per_second,
    training_flops_per_token,
)


def test_tiny_gpt2_flops_per_token_by_hand():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_layer=2, n_embd=64, n_head=2, n_positions=128))
    # wte 1000*64 (tied to lm_head, so a matmul) + 2 blocks * 49,984 + ln_f 128; wpe (128*64) is a lookup.
    # A block: ln_1 128 + c_attn 64*192+192 + attn c_proj 64*64+64 + ln_2 128 + c_fc 64*256+256 + mlp c_proj 256*64+64.
    assert matmul_parameters(model) == 64_000 + 2 * 49_984 + 128 == 164_096
    # 6 * 164,096 + 12 * 2 layers * 64 wide * 128 tokens
    assert model_training_flops_per_token(model, seq_len=128) == 984_576 + 196_608 == 1_181_184


def test_tiny_bert_excludes_position_and_token_type_tables():
    config = BertConfig(
        vocab_size=1000,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    model = BertForMaskedLM(config)
    # word embeddings 64,000 (tied decoder) + embedding LayerNorm 128 + 2 layers * 33,472
    # + MLM head: transform dense 64*64+64, its LayerNorm 128, decoder bias 1,000.
    # A layer: q, k, v, attention output 4 * (64*64+64) + LayerNorm 128 + 64*128+128 + 128*64+64 + LayerNorm 128.
    assert matmul_parameters(model) == 64_000 + 128 + 2 * 33_472 + 4_160 + 128 + 1_000 == 136_360
    assert model_training_flops_per_token(model, seq_len=64) == 6 * 136_360 + 12 * 2 * 64 * 64


def test_gpt2_124m_at_1024_tokens():
    # 124,439,808 parameters less wpe (1024*768): 6 * 123,653,376 + 12 * 12 * 768 * 1024, i.e. ~0.86 GFLOPs per token.
    assert training_flops_per_token(124_439_808 - 1024 * 768, 12, 768, 1024) == 741_920_256 + 113_246_208


def test_peak_lookup_by_device_name():
    assert _gpu_key("NVIDIA H100 80GB HBM3") == "h100 sxm"
    assert _gpu_key("NVIDIA H100 PCIe") == "h100 pcie"
    assert _gpu_key("NVIDIA H200") == "h200"
    assert _gpu_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert _gpu_key("NVIDIA L40S") == "l40s" and _gpu_key("NVIDIA L4") == "l4" and _gpu_key("NVIDIA A10G") == "a10g"
    assert _gpu_key("Tesla T4") is None
    # No published peak to hold a CPU to: MFU is not reported there.
    assert peak_flops_per_second(torch.device("cpu"), torch.bfloat16) is None
