"""A causal LM's output layer and cross-entropy in one pass over chunks of tokens, never holding [tokens, vocab] logits.

The logits are the largest tensors of a small or mid-size LM's step (16 x 128 tokens x a 10,000-token
vocabulary: 82 MB in float32, and as much again for their log-softmax and each gradient; a 128k
vocabulary at 16k tokens: 8 GB each), and the softmax over them is bound by memory traffic, not
arithmetic. Here each chunk of tokens gets its logits, its loss and their gradient (softmax minus
the one-hot target) at once, while the chunk is in cache, and only the gradients of the hidden
states and the weight are kept for the backward pass. The result is the sum of F.cross_entropy over
the labelled tokens, with the same gradients up to float rounding (tests/test_training.py).

Under autocast the weight is cast to the autocast dtype once per call, as the output layer's own
matmul would cast it, and every matmul reads its operands in that dtype; the softmax runs in float32,
and the loss and the weight's gradient are summed over chunks in float32 (tests/test_decoders.py).
On this 2-core machine the output layer and loss of that step, forward and backward, take 45-70 ms
instead of 120 ms, and the seed's GPT-2 trains its epoch in 0.68x Simple Transformers' time instead
of 1.01x (bench/peer.py).
"""

from __future__ import annotations

import torch

# Tokens per chunk on a CPU: 256 x 10,000 float32 logits (10 MB) was the fastest on a 2-core CPU (64-1024 tried).
CHUNK_TOKENS = 256
# Logits per chunk on a GPU: 2**28 is 1 GiB in float32 (2 GiB at the chunk's peak, with its gradient
# and the matmul's output), i.e. 2,048 tokens of a 128k vocabulary, 5,248 of GPT-2's 50,257. Each
# chunk reads and writes the float32 weight gradient once, so fewer, larger chunks cost less traffic.
DEVICE_CHUNK_LOGITS = 2**28


def chunk_tokens(device: torch.device, vocab_size: int) -> int:
    """Tokens per chunk: CHUNK_TOKENS on a CPU, else DEVICE_CHUNK_LOGITS / vocab_size in multiples of 128."""
    if device.type == "cpu":
        return CHUNK_TOKENS
    return max(128, DEVICE_CHUNK_LOGITS // vocab_size // 128 * 128)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over tokens with a label (not -100) of cross_entropy(hidden @ weight.T, label), in float32.

    hidden [tokens, width]; weight [vocab, width]; labels [tokens]. Under autocast the matmuls run in
    the autocast dtype, as the output layer's would, and the softmax in float32.
    """
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _loss_sum(hidden, weight, labels)
    return _LinearCrossEntropySum.apply(hidden, weight, labels)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden_chunk @ weight.t()).float()


def _chunk_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, log-sum-exp per token, labels with -100 replaced by 0, labelled mask) of one chunk."""
    labelled = labels != -100
    targets = torch.where(labelled, labels, 0)
    log_normalizer = torch.logsumexp(logits, dim=1)
    target_logits = logits.gather(1, targets[:, None])[:, 0]
    return ((log_normalizer - target_logits) * labelled).sum(), log_normalizer, targets, labelled


def _loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(hidden)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    chunk = chunk_tokens(hidden.device, weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[start : start + chunk], weight)
        total = total + _chunk_loss(logits, labels[start : start + chunk])[0]
    return total


def _add_weight_grad(
    grad_weight: torch.Tensor, grad_logits: torch.Tensor, grad_logits_in: torch.Tensor, hidden_chunk: torch.Tensor
) -> None:
    """grad_weight (float32) += grad_logits_in.T @ hidden_chunk, both operands in the compute dtype.

    A bf16 product (fp32's range) is formed by a bf16 matmul and added in float32; CUDA's add reads
    the two dtypes as they are, and the caching allocator hands the product the same block each chunk.
    A CPU's add would first copy a weight-sized bf16 product to float32, and an fp16 product of
    thousands of tokens can pass fp16's 65,504 before GradScaler's scale could help: these form the
    product in a float32 matmul, in place. Its operands hold compute-dtype values (grad_logits is
    overwritten with its rounded copy), whose products are exact in float32: the same sum as a
    compute-dtype matmul that accumulates in float32.
    """
    if grad_logits_in.dtype == torch.bfloat16 and grad_weight.device.type != "cpu":
        grad_weight += grad_logits_in.t() @ hidden_chunk
        return
    if grad_logits_in is not grad_logits:
        grad_logits.copy_(grad_logits_in)
    grad_weight.addmm_(grad_logits.t(), hidden_chunk.float())


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        # Cast once per call, not per chunk: the weight is the largest operand.
        hidden_in, weight_in = hidden.to(dtype), weight.to(dtype)
        chunk = chunk_tokens(hidden.device, weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden_in)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            logits = _chunk_logits(hidden_in[start:stop], weight_in)
            loss, log_normalizer, targets, labelled = _chunk_loss(logits, labels[start:stop])
            total += loss
            # d loss / d logits = softmax - one_hot(target) on labelled tokens, 0 elsewhere: in place.
            grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
            grad_logits[torch.arange(len(targets), device=logits.device), targets] -= 1
            grad_logits.mul_(labelled[:, None])
            grad_logits_in = grad_logits.to(dtype)
            grad_hidden[start:stop] = grad_logits_in @ weight_in
            _add_weight_grad(grad_weight, grad_logits, grad_logits_in, hidden_in[start:stop])
        ctx.input_dtypes = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        # Scaled in float32, then cast: the scale (GradScaler's, under fp16) reaches them before any rounding.
        return (grad_hidden.float() * grad_total).to(hidden_dtype), (grad_weight * grad_total).to(weight_dtype), None
