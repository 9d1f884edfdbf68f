"""Document-aware packing: where documents start inside packed rows -> per-token document ids and
position ids (collators.py), the attention inputs that keep documents apart (modeling.py), and which
models and attention implementations take them.

A packed row holds several documents: a `text` block the end of one document, whole documents and the
start of another (datasets.packed_blocks, with `packing_document_mask`); a `simple` / `line_by_line` row
several whole lines (datasets.packed_lines). A row's segments start at its `document_starts` (the first
is always 0, and a `text` block's prefix token, e.g. [CLS], belongs to the first segment). Each segment
is a sequence of its own: positions count from 0 at its start, and a token attends only to tokens of its
segment (and, causally, not to later ones). A document then gets the same logits inside a row as alone.

How attention is kept inside a segment depends on the model's attention implementation:
* `sdpa` and `eager` (the default on CPU, and transformers' default on GPU): an explicit
  [batch, 1, L, L] block-diagonal mask. SDPA then cannot use its mask-free flash kernel on a GPU, and the
  mask costs batch * L * L bytes per step (2 MB at 8 x 512).
* `flash_attention_2/3/4` and `flex_attention` (padding-free): the collator lays the micro-batch's rows
  end to end in one row without padding, and the model gets position ids alone, no mask. transformers
  reads where positions restart: flash attention's variable-length kernels get each segment's bounds
  (cu_seqlens), FlexAttention a BlockMask that skips the blocks across segments.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from raylm.errors import ConfigError

PAD_DOCUMENT = -1  # padding is a segment of its own, so no real token attends to it and no row is all masked

# Verified: a document's logits in a packed block equal its logits alone (tests/test_packing.py; llama,
# qwen2 and mistral in tests/test_decoders.py: transformers' create_causal_mask passes a 4D mask through as
# given, and their rotary positions come from position_ids). Others either build their masks from a 2D
# padding mask only (openai-gpt, longformer), or approximate attention (nystromformer), so a 4D mask would
# be rejected or not exact.
DOCUMENT_MASK_MODEL_TYPES = (
    "gpt2",
    "llama",
    "qwen2",
    "mistral",
    "bert",
    "distilbert",
    "roberta",
    "camembert",
    "xlm-roberta",
    "electra",
)
# Verified to pass the position ids down to a padding-free attention (tests/test_line_packing.py, with flash
# attention's variable-length path emulated on the CPU); DistilBERT's layers do not get them.
PADDING_FREE_MODEL_TYPES = ("gpt2", "bert", "roberta", "camembert", "xlm-roberta", "electra")
# These count positions from padding_idx + 1 (their embeddings' padding row has no gradient).
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "camembert", "xlm-roberta"})
DENSE_MASK_ATTENTION = ("sdpa", "eager")
# Segments told apart by position ids alone, in one row without padding (transformers' packed-sequence format).
PADDING_FREE_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_ATTENTION_IMPLEMENTATIONS = DENSE_MASK_ATTENTION + PADDING_FREE_ATTENTION


def document_layout(
    document_starts: Sequence[np.ndarray], lengths: Sequence[int], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """[batch, width] document ids (segment number in the row, PAD_DOCUMENT past `lengths`) and position ids
    (0 at each segment start)."""
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
    """For a batch with document ids: {"attention_mask": 4D, "position_ids"}, or {"position_ids"} alone for a
    padding-free attention (the batch is one row, see `flatten_rows`); else None (the model's own masks and positions).
    """
    if "document_ids" not in batch:
        return None
    positions = batch["position_ids"] + position_offset(config)
    if config._attn_implementation in PADDING_FREE_ATTENTION:
        return {"position_ids": positions}
    return {
        "attention_mask": document_attention_mask(batch["document_ids"], causal, config._attn_implementation),
        "position_ids": positions,
    }


def padding_free(configs: Sequence) -> bool:
    """Whether these models' attention reads segments from position ids (so the collator lays rows end to end)."""
    return all(config._attn_implementation in PADDING_FREE_ATTENTION for config in configs)


def flatten_rows(attention: np.ndarray, document_ids: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """[batch, width] arrays -> [1, tokens]: every row's real tokens end to end, padding dropped.

    Document ids are renumbered so that each row's stay apart from the next row's (their segments were
    numbered from 0 in every row); the arrays follow in the order given.
    """
    keep = attention.astype(bool)
    documents_before = np.concatenate([[0], np.cumsum(document_ids.max(axis=1, initial=-1) + 1)[:-1]])
    renumbered = np.where(keep, document_ids + documents_before[:, None], PAD_DOCUMENT)
    return [renumbered[keep][None], *(array[keep][None] for array in arrays)]


def takes_document_mask(configs: Sequence) -> bool:
    """Whether these models (an ELECTRA pair's two) keep packed documents apart: see `document_mask_refusal`."""
    return document_mask_refusal(configs, "the model") is None


def check_document_mask_support(packing_document_mask: bool, model_type: str, configs: Sequence) -> None:
    """ConfigError, before anything starts, when `packing_document_mask` is on for a model that cannot take it."""
    refusal = document_mask_refusal(configs, model_type) if packing_document_mask else None
    if refusal is not None:
        raise ConfigError(*refusal)


def document_mask_refusal(configs: Sequence, model_type: str) -> Optional[tuple[str, str]]:
    """Why these models cannot keep packed documents apart, as (what, fix), or None when they can: each of
    a checked type, all with one attention implementation, a padding-free one only where its model passes the
    position ids down to it."""
    implementations = {config._attn_implementation for config in configs}
    if len(implementations) > 1:
        return (
            "packing_document_mask builds one mask for both ELECTRA models, and they use different attention "
            f"({', '.join(sorted(map(str, implementations)))})",
            "Set packing_document_mask=False, or give the generator and discriminator the same attn_implementation",
        )
    for config in configs:
        if config.model_type not in DOCUMENT_MASK_MODEL_TYPES:
            return (
                "packing_document_mask needs a model that takes position ids and a 4D attention mask, and "
                f"{model_type!r} ({config.model_type}) is not one raylm has checked",
                f"Set packing_document_mask=False, or use one of {', '.join(DOCUMENT_MASK_MODEL_TYPES)}",
            )
        if getattr(config, "sliding_window", None) is not None:
            return (
                "packing_document_mask gives every layer one block-diagonal mask, which would drop this "
                f"{config.model_type} model's sliding attention window ({config.sliding_window} tokens)",
                "Set packing_document_mask=False, or, when block_size is at most the window, set "
                "args.config={'sliding_window': None}",
            )
        implementation = config._attn_implementation
        padding_free_unchecked = (
            implementation in PADDING_FREE_ATTENTION and config.model_type not in PADDING_FREE_MODEL_TYPES
        )
        if implementation not in _ATTENTION_IMPLEMENTATIONS or padding_free_unchecked:
            return (
                "packing_document_mask keeps documents apart with a mask (SDPA, eager) or position ids (flash or flex "
                f"attention, for {', '.join(PADDING_FREE_MODEL_TYPES)}), and this {config.model_type} model uses "
                f"{implementation!r} attention",
                "Set packing_document_mask=False, or load the model with attn_implementation='sdpa'",
            )
    return None
