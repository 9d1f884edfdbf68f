"""Collators: a numpy batch of examples -> padded tensors with the objective's labels. No Ray imports.

Masking draws its random numbers from a counter-based hash of (seed, stream, example id, position)
instead of a stateful generator. A mask therefore depends only on the example and the epoch: it is
fresh every epoch, identical for any batch size or worker count (evaluation uses a fixed stream),
and a restarted run re-creates the masks without any RNG state in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from raylm.data.packing import document_layout, flatten_rows
from raylm.errors import ModelError

IGNORE_INDEX = -100
EVAL_STREAM = 2**31 - 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, stream: int, example_ids: np.ndarray, length: int, salt: int) -> np.ndarray:
    """[batch, length] floats in [0, 1), a pure function of (seed, stream, example id, position, salt)."""
    key = _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(stream) * np.uint64(7919) + np.uint64(salt))
    per_example = _splitmix64(example_ids.astype(np.uint64) ^ key)
    positions = np.arange(length, dtype=np.uint64)
    bits = _splitmix64(per_example[:, None] + positions[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def pad_examples(input_ids, pad_id: int, multiple_of: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Ragged examples -> [batch, length] ids and attention mask; length rounded up to `multiple_of` for tensor
    cores."""
    lengths = [len(ids) for ids in input_ids]
    width = -(-max(lengths) // multiple_of) * multiple_of
    ids = np.full((len(input_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(input_ids), width), dtype=np.int64)
    for row, example in enumerate(input_ids):
        ids[row, : len(example)] = example
        mask[row, : len(example)] = 1
    return ids, mask


@dataclass(frozen=True)
class CollatorSpec:
    objective: str  # mlm | clm | electra
    pad_id: int
    mask_id: Optional[int]
    vocab_size: int
    special_ids: tuple[int, ...]
    mlm_probability: float
    seed: int
    # BERT's 80/10/10 by default; ELECTRA uses ELECTRA_MASKING.
    mask_replace_probability: float = 0.8
    random_replace_probability: float = 0.1
    # Batches with document starts are laid end to end in one row without padding (packing.flatten_rows), for
    # attention implementations that tell documents apart by their position ids (packing.PADDING_FREE_ATTENTION).
    padding_free: bool = False


# ELECTRA replaces every selected token with the mask token (paper, section 2; Simple Transformers
# too): the generator fills them all in, and its samples are what the discriminator must judge.
ELECTRA_MASKING = {"mask_replace_probability": 1.0, "random_replace_probability": 0.0}


def collator_spec(
    tokenizer, objective: str, mlm_probability: float, seed: int, padding_free: bool = False
) -> CollatorSpec:
    """The collator's settings for a tokenizer and an objective; the masked objectives need a mask token.

    padding_free: the model's attention tells packed documents apart by their position ids (packing.padding_free).
    """
    if objective != "clm" and tokenizer.mask_token_id is None:
        raise ModelError(
            "The tokenizer has no mask token, which masked language modeling needs",
            "Use a tokenizer with a mask token, or set mlm=False for a causal model",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return CollatorSpec(
        objective=objective,
        pad_id=pad_id,
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tuple(tokenizer.all_special_ids),
        mlm_probability=mlm_probability,
        seed=seed,
        **(ELECTRA_MASKING if objective == "electra" else {}),
        padding_free=padding_free,
    )


def collate(batch: dict, spec: CollatorSpec, stream: int, pin_memory: bool = False) -> dict:
    """Padded input_ids, attention_mask, labels (-100 where no loss), example_id and n_targets (tokens with a loss).

    Batches whose examples carry document_starts (packed `simple` rows, `text` with packing_document_mask) add
    document_ids and position_ids [batch, length] (packing.document_layout), and CLM labels are -100 at each
    document's first token. With spec.padding_free every [batch, length] tensor is [1, tokens] instead: the
    rows' real tokens end to end (packing.flatten_rows).

    MLM and ELECTRA batches add target_positions: the flat indices of the labelled tokens, found here on the CPU
    so the model's step can gather them on the device without waiting for it (no host sync).

    ELECTRA batches add sampling_uniform [batch, length]: the uniform numbers the generator's samples
    are drawn with, hashed like the masks so a sample depends only on the example and the epoch.
    """
    ids, attention = pad_examples(batch["input_ids"], spec.pad_id)
    example_ids = np.array(batch["example_id"], dtype=np.int64)  # a copy: Ray Data's numpy batches are read-only
    documents = None
    if "document_starts" in batch:
        documents = document_layout(
            batch["document_starts"], [len(example) for example in batch["input_ids"]], ids.shape[1]
        )
    if spec.objective == "clm":
        labels = np.where(attention == 1, ids, IGNORE_INDEX)
        if documents is not None:
            # A document's first token is not predicted from the document before it.
            labels[documents[1] == 0] = IGNORE_INDEX
        # The model predicts token t+1 from tokens <= t, so the first token of each example has no loss.
        n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    else:
        ids, labels = mask_tokens(ids, attention, example_ids, spec, stream)
        n_targets = int((labels != IGNORE_INDEX).sum())
    # Drawn per example and position before any flattening, so a sample does not depend on the layout.
    sampling_uniform = (
        hashed_uniform(spec.seed, stream, example_ids, ids.shape[1], salt=4).astype(np.float32)
        if spec.objective == "electra"
        else None
    )
    if documents is not None and spec.padding_free:
        extra = () if sampling_uniform is None else (sampling_uniform,)
        document_ids, positions, ids, labels, *extra = flatten_rows(
            attention, documents[0], documents[1], ids, labels, *extra
        )
        documents, attention = (document_ids, positions), np.ones_like(ids)
        sampling_uniform = extra[0] if extra else None
    tensors = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "example_id": torch.from_numpy(example_ids),
    }
    if documents is not None:
        tensors["document_ids"], tensors["position_ids"] = (torch.from_numpy(array) for array in documents)
    if spec.objective in ("mlm", "electra"):
        tensors["target_positions"] = torch.from_numpy(np.flatnonzero(labels != IGNORE_INDEX))
    if sampling_uniform is not None:
        tensors["sampling_uniform"] = torch.from_numpy(sampling_uniform)
    if pin_memory:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    tensors["n_targets"] = n_targets
    tensors["n_input_tokens"] = int(attention.sum())
    return tensors


def mask_tokens(
    ids: np.ndarray, attention: np.ndarray, example_ids: np.ndarray, spec: CollatorSpec, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """Select mlm_probability of the real, non-special tokens; replace 80% with mask, 10% random, 10% kept (the
    spec's rates)."""
    if spec.mask_id is None:
        raise ValueError("masked language modeling needs a tokenizer with a mask token")
    length = ids.shape[1]
    maskable = (attention == 1) & ~np.isin(ids, np.asarray(spec.special_ids, dtype=np.int64))
    selected = (hashed_uniform(spec.seed, stream, example_ids, length, salt=1) < spec.mlm_probability) & maskable
    labels = np.where(selected, ids, IGNORE_INDEX)
    action = hashed_uniform(spec.seed, stream, example_ids, length, salt=2)
    to_mask = selected & (action < spec.mask_replace_probability)
    to_random = selected & ~to_mask & (action < spec.mask_replace_probability + spec.random_replace_probability)
    random_ids = (hashed_uniform(spec.seed, stream, example_ids, length, salt=3) * spec.vocab_size).astype(np.int64)
    masked = np.where(to_mask, spec.mask_id, np.where(to_random, random_ids, ids))
    return masked, labels
