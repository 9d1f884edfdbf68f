"""The FLOP estimate behind the reported MFU, checked against numbers worked out by hand."""

import pytest
import torch
from conftest import TINY_BERT, TINY_ELECTRA, TINY_GENERATOR, TINY_GPT2
from transformers import (
    BertConfig,
    BertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    GPT2Config,
    GPT2LMHeadModel,
)

from raylm.models.electra import ElectraPair
from raylm.models.flops import (
    _GPU_PEAKS,
    dense_peak_flops_per_second,
    gpu_peak,
    matmul_parameters,
    model_training_flops_per_token,
    peak_flops_per_second,
    training_flops_per_token,
)


def test_tiny_gpt2_flops_per_token_by_hand():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, **TINY_GPT2))
    # wte 1000*64 (tied to lm_head, so a matmul) + 2 blocks * 49,984 + ln_f 128; wpe (128*64) is a lookup.
    # A block: ln_1 128 + c_attn 64*192+192 + attn c_proj 64*64+64 + ln_2 128 + c_fc 64*256+256 + mlp c_proj 256*64+64.
    assert matmul_parameters(model) == 64_000 + 2 * 49_984 + 128 == 164_096
    # 6 * 164,096 + 12 * 2 layers * 64 wide * 128 tokens
    assert model_training_flops_per_token(model, seq_len=128) == 984_576 + 196_608 == 1_181_184


def test_tiny_bert_excludes_position_and_token_type_tables():
    model = BertForMaskedLM(BertConfig(vocab_size=1000, **TINY_BERT))
    # word embeddings 64,000 (tied decoder) + embedding LayerNorm 128 + 2 layers * 33,472
    # + MLM head: transform dense 64*64+64, its LayerNorm 128, decoder bias 1,000.
    # A layer: q, k, v, attention output 4 * (64*64+64) + LayerNorm 128 + 64*128+128 + 128*64+64 + LayerNorm 128.
    assert matmul_parameters(model) == 64_000 + 128 + 2 * 33_472 + 4_160 + 128 + 1_000 == 136_360
    assert model_training_flops_per_token(model, seq_len=64) == 6 * 136_360 + 12 * 2 * 64 * 64


def test_a_masked_lms_vocabulary_projection_counts_for_the_masked_tokens_only():
    model = BertForMaskedLM(BertConfig(vocab_size=1000, **TINY_BERT))
    # raylm runs the decoder (64,000 tied weights + 1,000 biases) on the 15% masked tokens only; the
    # transform before it (dense, LayerNorm) runs on every token.
    flops = model_training_flops_per_token(model, seq_len=64, mlm_probability=0.15)
    assert flops == 6 * (136_360 - 65_000) + 6 * 65_000 * 0.15 + 12 * 2 * 64 * 64 == 584_964
    # ELECTRA's generator runs its whole head on the masked tokens: generator_predictions (dense from its width 32
    # to the embeddings' 64: 32*64+64, LayerNorm 128) and its output layer (64*1000 tied + 1,000); the
    # discriminator's head runs on every token.
    pair = ElectraPair(
        ElectraForMaskedLM(ElectraConfig(vocab_size=1000, **{**TINY_ELECTRA, **TINY_GENERATOR})),
        ElectraForPreTraining(ElectraConfig(vocab_size=1000, **TINY_ELECTRA)),
        tie_embeddings=True,
    )
    every_token = model_training_flops_per_token(pair, seq_len=64)
    masked_only = model_training_flops_per_token(pair, seq_len=64, mlm_probability=0.15)
    assert every_token - masked_only == round(6 * (2_112 + 128 + 65_000) * 0.85) == 342_924


def test_gpt2_124m_at_1024_tokens():
    # 124,439,808 parameters less wpe (1024*768): 6 * 123,653,376 + 12 * 12 * 768 * 1024, i.e. ~0.86 GFLOPs per token.
    assert training_flops_per_token(124_439_808 - 1024 * 768, 12, 768, 1024) == 741_920_256 + 113_246_208


def test_peak_lookup_by_device_name():
    assert gpu_peak("NVIDIA H100 80GB HBM3") == _GPU_PEAKS[("h100",)]  # the SXM part
    assert gpu_peak("NVIDIA H100 PCIe") == _GPU_PEAKS[("h100", "pcie")]
    assert gpu_peak("NVIDIA H200") == _GPU_PEAKS[("h200",)]
    assert gpu_peak("NVIDIA A100-SXM4-80GB") == _GPU_PEAKS[("a100",)]
    assert gpu_peak("NVIDIA L40S") == _GPU_PEAKS[("l40s",)] and gpu_peak("NVIDIA L4") == _GPU_PEAKS[("l4",)]
    assert gpu_peak("NVIDIA A10G") == _GPU_PEAKS[("a10g",)]
    assert gpu_peak("Tesla T4") is None
    # No published peak to hold a CPU to: MFU is not reported there.
    assert peak_flops_per_second(torch.device("cpu"), torch.bfloat16) is None


@pytest.mark.parametrize(
    "device_name, bf16_tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA B200", 2250),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA A30", 165),
        ("NVIDIA A40", 149.7),
        ("NVIDIA A10", 125),
        ("NVIDIA A10G", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),  # not the L4, whose name it contains
        ("NVIDIA L4", 121),
        ("NVIDIA RTX A1000 6GB Laptop GPU", None),  # not the A100, whose name it contains
        ("Tesla T4", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_each_gpu_gets_its_own_datasheet_peak(device_name, bf16_tflops):
    peak = gpu_peak(device_name)
    assert (peak.half / 1e12 if peak else None) == bf16_tflops
    if peak is not None:
        sms = peak.sms  # a whole GPU reports all its SMs
        assert dense_peak_flops_per_second(device_name, sms, torch.bfloat16, False) == peak.half
        assert dense_peak_flops_per_second(device_name, sms, torch.float16, False) == peak.half
        assert dense_peak_flops_per_second(device_name, sms, torch.float32, True) == peak.tf32
        assert dense_peak_flops_per_second(device_name, sms, torch.float32, False) == peak.fp32


def test_a_mig_slice_gets_its_share_of_the_gpus_peak():
    # A100's 1g.5gb slice computes on 14 of its 108 SMs, H100's 3g.40gb on 60 of 132 (what the slice reports).
    assert dense_peak_flops_per_second("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 14, torch.bfloat16, True) == (
        pytest.approx(312e12 * 14 / 108)
    )
    assert dense_peak_flops_per_second("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, torch.float32, True) == (
        pytest.approx(494.7e12 * 60 / 132)
    )
