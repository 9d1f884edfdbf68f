"""The chunked output layer and loss under autocast: the weight stays in the autocast dtype, is cast once per
call, and no weight-sized tensor is made per chunk; the loss and gradients are the logits path's."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from raylm.models.linear_cross_entropy import CHUNK_TOKENS, chunk_tokens, linear_cross_entropy_sum

VOCAB, WIDTH = 1000, 48
CHUNKS = 5


class WeightOperandDtypes(TorchDispatchMode):
    """The dtypes in which matrix products read a [VOCAB, WIDTH] operand (the weight or its transpose)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        operands = (
            args[:2]
            if packet is torch.ops.aten.mm
            else args[1:3]
            if packet in (torch.ops.aten.addmm, torch.ops.aten.addmm_)
            else ()
        )
        self.dtypes += [op.dtype for op in operands if sorted(op.shape) == sorted((VOCAB, WIDTH))]
        return func(*args, **(kwargs or {}))


def weight_sized_allocations(run) -> list[int]:
    """Bytes of each allocation of VOCAB x WIDTH 2- or 4-byte elements that `run` makes (and keeps past the op)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    sizes = {VOCAB * WIDTH * 2, VOCAB * WIDTH * 4}
    return sorted(event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage in sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_reads_the_weight_in_the_autocast_dtype_and_casts_it_once(dtype):
    torch.manual_seed(0)
    tokens = (CHUNKS - 1) * CHUNK_TOKENS + 37
    hidden = torch.randn(tokens, WIDTH, requires_grad=True)
    weight = (0.1 * torch.randn(VOCAB, WIDTH)).requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,))
    labels[::7] = -100
    operands = WeightOperandDtypes()
    losses = []

    def chunked_loss():
        with torch.autocast("cpu", dtype=dtype), operands:
            losses.append(linear_cross_entropy_sum(hidden, weight, labels))

    allocations = weight_sized_allocations(chunked_loss)
    # Every product with the weight (each chunk's logits and hidden-state gradient) reads it in `dtype`...
    assert len(operands.dtypes) >= 2 * CHUNKS and set(operands.dtypes) == {dtype}, operands.dtypes
    # ...and over all chunks only two weight-sized tensors are made: its cast to `dtype` and the
    # float32 sum of its gradient (not a product or a float32 copy per chunk).
    assert allocations == [VOCAB * WIDTH * 2, VOCAB * WIDTH * 4]

    # The logits path in float32: the same loss and gradients within half-precision rounding.
    [chunked] = losses
    whole = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum")
    upstream = 2.0**16 / 1024 if dtype == torch.float16 else 0.5  # GradScaler's initial scale under fp16
    (upstream * chunked).backward()
    chunked_grads = hidden.grad / upstream, weight.grad / upstream
    hidden.grad, weight.grad = None, None
    whole.backward()
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-2)
    for ours, reference in zip(chunked_grads, (hidden.grad, weight.grad)):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        assert float((ours - reference).norm() / reference.norm()) < 1e-2


def test_chunks_are_sized_for_the_device():
    assert chunk_tokens(torch.device("cpu"), 128_256) == CHUNK_TOKENS
    # On a GPU, thousands of tokens: a chunk's float32 logits take 1 GiB whatever the vocabulary.
    assert chunk_tokens(torch.device("cuda"), 128_256) == 2048
    assert chunk_tokens(torch.device("cuda"), 50_257) == 5248
    assert chunk_tokens(torch.device("cuda"), 10_000) == 26_752
