"""Document-aware packing: where documents start inside packed blocks -> per-token document ids and
position ids (collators.py), the block-diagonal attention mask and position ids the model takes
(modeling.py), and which models take them.

A packed `text` block holds the end of one document, whole documents and the start of another; a
block's segments start at its `document_starts` (datasets.packed_blocks; the first is always 0, and
the block's prefix token, e.g. [CLS], belongs to the first segment). With `packing_document_mask`
each segment is a sequence of its own: positions count from 0 at its start, and a token attends
only to tokens of its segment (and, causally, not to later ones). A document then gets the same
logits inside a block as alone, at the price of an explicit [batch, 1, L, L] mask: SDPA cannot use
its mask-free causal kernels, and the mask costs batch * L * L bytes per step (2 MB at 8 x 512).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from raylm.errors import ConfigError

PAD_DOCUMENT = -1  # padding is a segment of its own, so no real token attends to it and no row is all masked

# Verified: a document's logits in a packed block equal its logits alone (tests/test_packing.py).
# Others either build their masks from a 2D padding mask only (openai-gpt, longformer), or approximate
# attention (nystromformer), so a 4D mask would be rejected or not exact.
DOCUMENT_MASK_MODEL_TYPES = ("gpt2", "bert", "distilbert", "roberta", "camembert", "xlm-roberta", "electra")
# These count positions from padding_idx + 1 (their embeddings' padding row has no gradient).
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "camembert", "xlm-roberta"})
_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def document_layout(
    document_starts: Sequence[np.ndarray], lengths: Sequence[int], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """[batch, width] document ids (segment number in the row, PAD_DOCUMENT past `lengths`) and position ids (0 at each segment start)."""
    document_ids = np.full((len(lengths), width), PAD_DOCUMENT, dtype=np.int64)
    position_ids = np.zeros((len(lengths), width), dtype=np.int64)
    for row, (starts, length) in enumerate(zip(document_starts, lengths)):
        starts = np.asarray(starts, dtype=np.int64)
        marks = np.zeros(length, dtype=np.int64)
        marks[starts[starts < length]] = 1
        segment = np.cumsum(marks) - 1
        document_ids[row, :length] = segment
        position_ids[row, :length] = np.arange(length) - starts[segment]
    return document_ids, position_ids


def document_attention_mask(document_ids: torch.Tensor, causal: bool, implementation: str) -> torch.Tensor:
    """[batch, 1, L, L] mask: a token sees the tokens of its own segment (only earlier ones when `causal`).

    Boolean (True = attend) for SDPA; additive for eager attention, which adds it to the scores: float32,
    so that its minimum stays finite when added to fp16/bf16 scores (the sum is promoted to float32).
    """
    allowed = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        length = document_ids.shape[1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
    return allowed


def position_offset(config) -> int:
    """What a model adds to 0-based positions (RoBERTa-style models start after their padding index)."""
    return (config.pad_token_id or 0) + 1 if config.model_type in _POSITIONS_AFTER_PADDING else 0


def document_inputs(config, batch: dict, causal: bool) -> Optional[dict]:
    """{"attention_mask": 4D, "position_ids"} for a batch with document ids, else None (the model's own masks and positions)."""
    if "document_ids" not in batch:
        return None
    return {
        "attention_mask": document_attention_mask(batch["document_ids"], causal, config._attn_implementation),
        "position_ids": batch["position_ids"] + position_offset(config),
    }


def takes_document_mask(configs: Sequence) -> bool:
    """Whether these models (an ELECTRA pair's two) take a document mask: checked types, one SDPA or eager attention."""
    implementations = {config._attn_implementation for config in configs}
    return (
        len(implementations) == 1
        and implementations <= set(_ATTENTION_IMPLEMENTATIONS)
        and all(config.model_type in DOCUMENT_MASK_MODEL_TYPES for config in configs)
    )


def check_document_mask_support(packing_document_mask: bool, model_type: str, configs: Sequence) -> None:
    """ConfigError, before anything starts, when `packing_document_mask` is on for a model that cannot take it."""
    if not packing_document_mask:
        return
    implementations = {config._attn_implementation for config in configs}
    if len(implementations) > 1:
        raise ConfigError(
            f"packing_document_mask builds one mask for both ELECTRA models, and they use different attention ({', '.join(sorted(map(str, implementations)))})",
            "Set packing_document_mask=False, or give the generator and discriminator the same attn_implementation",
        )
    for config in configs:
        if config.model_type not in DOCUMENT_MASK_MODEL_TYPES:
            raise ConfigError(
                f"packing_document_mask needs a model that takes position ids and a 4D attention mask, and {model_type!r} ({config.model_type}) is not one raylm has checked",
                f"Set packing_document_mask=False, or use one of {', '.join(DOCUMENT_MASK_MODEL_TYPES)}",
            )
        implementation = config._attn_implementation
        if implementation not in _ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"packing_document_mask builds a block-diagonal mask for SDPA or eager attention, and this model uses {implementation!r} attention",
                "Set packing_document_mask=False, or load the model with attn_implementation='sdpa'",
            )
