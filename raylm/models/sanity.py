"""Quick sanity checks: (model, tokenizer, text) -> what the model makes of it, to see what it learned.

`generate` continues a prompt with a causal LM; `fill_mask` ranks the candidates for one masked
token with a masked LM. Both run on the driver, in the model's current device and without gradients.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from raylm.data.tokenization import special_token_layout
from raylm.errors import ConfigError, ModelError

# Mask spellings users type out of habit (RoBERTa/BPE and BERT/WordPiece); both mean the tokenizer's own.
MASK_SPELLINGS = ("<mask>", "[MASK]")


def generate(
    model, tokenizer, prompt: str, max_new_tokens: int = 20, do_sample: bool = False, **generate_kwargs
) -> str:
    """The prompt followed by the model's continuation (greedy unless do_sample; stops at end-of-document, which a model
    trained with document_separator=False never learned).

    The prompt gets the same leading special tokens as a training example, so the model sees what
    it saw at the start of a document; extra keyword arguments go to `model.generate`.
    """
    _require_head(
        model,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "generate",
        "a causal language model (gpt2, openai-gpt, causal)",
        "Use fill_mask(text) for masked models such as bert or roberta",
    )
    prefix, _ = special_token_layout(tokenizer)
    prompt_ids = prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ConfigError(
            "generate needs a prompt, but the prompt is empty and the tokenizer adds no start token",
            "Pass the beginning of a text to continue, e.g. model.generate('The cat')",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_kwargs.setdefault("pad_token_id", pad_id)
    with _inference(model) as device:
        input_ids = torch.tensor([prompt_ids], device=device)
        output_ids = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **generate_kwargs,
        )
    # Decode only the new tokens so the prompt comes back exactly as typed.
    continuation = tokenizer.decode(output_ids[0, len(prompt_ids) :].tolist(), skip_special_tokens=True)
    return prompt + continuation


def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[dict]:
    """The top_k tokens for the one mask in `text`, best first: [{"token", "token_id", "score", "sequence"}].

    `text` holds the tokenizer's mask token; "<mask>" and "[MASK]" are accepted for either kind of
    tokenizer. "score" is the softmax probability; "sequence" is the text with the token filled in.
    """
    _require_head(
        model,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "fill_mask",
        "a masked language model (bert, roberta, distilbert, electra's generator)",
        "Use generate(prompt) for causal models such as gpt2",
    )
    if tokenizer.mask_token is None:
        raise ModelError(
            "fill_mask needs a tokenizer with a mask token, and this one has none",
            "Use the tokenizer saved with the masked model",
        )
    for spelling in MASK_SPELLINGS:
        text = text.replace(spelling, tokenizer.mask_token)
    input_ids = tokenizer(text, add_special_tokens=True, truncation=True)["input_ids"]
    mask_positions = [position for position, token_id in enumerate(input_ids) if token_id == tokenizer.mask_token_id]
    if len(mask_positions) != 1:
        raise ConfigError(
            f"fill_mask needs exactly one mask in the text, found {len(mask_positions)} in {text!r}",
            f"Mark the one word to predict with {tokenizer.mask_token} (or <mask> / [MASK]), e.g. 'The cat sat on the "
            f"{tokenizer.mask_token}.'",
        )
    mask_position = mask_positions[0]
    with _inference(model) as device:
        logits = model(input_ids=torch.tensor([input_ids], device=device)).logits[0, mask_position]
    probabilities = torch.softmax(logits.float(), dim=-1)
    scores, token_ids = probabilities.topk(min(top_k, probabilities.numel()))
    candidates = []
    for score, token_id in zip(scores.tolist(), token_ids.tolist()):
        filled = input_ids[:mask_position] + [token_id] + input_ids[mask_position + 1 :]
        candidates.append(
            {
                "token": tokenizer.decode([token_id]).strip(),
                "token_id": token_id,
                "score": score,
                "sequence": tokenizer.decode(filled, skip_special_tokens=True),
            }
        )
    return candidates


def _require_head(model, head_classes_by_type: dict, function: str, needs: str, instead: str) -> None:
    head_classes = {
        name for names in head_classes_by_type.values() for name in ([names] if isinstance(names, str) else names)
    }
    if type(model).__name__ not in head_classes:
        raise ModelError(f"{function} needs {needs}, but the model is a {type(model).__name__}", instead)


@contextlib.contextmanager
def _inference(model) -> Iterator[torch.device]:
    """Eval mode (no dropout) and no gradients, then the model's previous mode back; yields its device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)
