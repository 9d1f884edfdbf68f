"""Tokenizers: load a pretrained one, or train one from scratch on text files (or a sample of them) -> a HF fast
tokenizer.

From scratch, each family gets the kind of tokenizer its pretrained models use: WordPiece for
BERT-likes (bert, distilbert, electra, ...), byte-level BPE for everything else (gpt2, roberta, ...).
Normalisation (lowercasing, accents) lives inside the saved tokenizer.json, so the tokenizer is used
exactly as it was trained (Simple Transformers trained cased and loaded lowercased).
"""

from __future__ import annotations

import os
import string
import unicodedata
from typing import Iterator, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from raylm.config import LanguageModelingArgs
from raylm.console import logger
from raylm.data.datasets import ExampleSpec
from raylm.data.sources import check_text_files, iter_lines, resolve_text_files, sample_lines
from raylm.errors import ConfigError, ModelError

WORDPIECE_MODEL_TYPES = frozenset(
    {"bert", "distilbert", "electra", "mobilebert", "convbert", "megatron-bert", "squeezebert", "funnel", "layoutlm"}
)
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BPE_ROLES = ("bos_token", "pad_token", "eos_token", "unk_token", "mask_token")


def build_tokenizer(
    model_type: str, source: Optional[str], train_files, args: LanguageModelingArgs, is_causal: bool, **kwargs
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model: loaded from `source` (tokenizer_name, else the model's own), or, with neither,
    trained on `train_files` (LanguageModelingModel's argument) with args.vocab_size."""
    if source:
        return load_tokenizer(source, trust_remote_code=args.trust_remote_code, **kwargs)
    if train_files is None:
        raise ModelError(
            "model_name and tokenizer_name are not set, so a tokenizer must be trained, but train_files was not given",
            "Pass train_files=<the training text> to LanguageModelingModel (or set tokenizer_name)",
        )
    if args.vocab_size is None:
        raise ModelError(
            "Training from scratch needs the tokenizer's vocab_size, which is not set",
            "Set args.vocab_size, e.g. model_args.vocab_size = 30000",
        )
    files = resolve_text_files(train_files, role="train_files")
    check_text_files(files, role="train_files", text_column=args.text_column)
    sample = f" (a sample of about {args.tokenizer_sample_mb:g} MB)" if args.tokenizer_sample_mb is not None else ""
    logger.info(f"Training a {args.vocab_size}-token tokenizer on {len(files)} file(s){sample}.")
    return train_tokenizer(model_type, files, args, is_causal=is_causal)


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, **from_pretrained_kwargs
) -> PreTrainedTokenizerBase:
    """A pretrained tokenizer from a hub name or folder, with a clear error when it cannot be read.

    trust_remote_code: the user's own setting (args.trust_remote_code), never a folder's.
    """
    if os.path.isdir(name_or_path) and not _has_tokenizer_files(name_or_path):
        raise ModelError(
            f"The folder {name_or_path!r} has no tokenizer files (tokenizer.json, vocab.txt, vocab.json or *.model)",
            "Point tokenizer_name (or model_name) to a folder saved by save_pretrained, or leave both unset and pass "
            "train_files to train one",
        )
    try:
        return AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Cannot load a tokenizer from {name_or_path!r}: {str(err).splitlines()[0]}",
            "Use a local folder saved by save_pretrained, or a hub name reachable from this machine",
        ) from None


def _has_tokenizer_files(folder: str) -> bool:
    names = set(os.listdir(folder))
    return bool(names & {"tokenizer.json", "vocab.txt", "vocab.json"}) or any(n.endswith(".model") for n in names)


def train_tokenizer(
    model_type: str, files: list[str], args: LanguageModelingArgs, is_causal: bool
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of the family's kind on `files`, honouring vocab_size, min_frequency and specials."""
    if model_type in WORDPIECE_MODEL_TYPES:
        tokenizer = _train_wordpiece(files, args)
        roles = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), WORDPIECE_SPECIAL_TOKENS))
    else:
        tokenizer = _train_byte_level_bpe(files, args, is_causal)
        roles = dict(zip(_BPE_ROLES, args.special_tokens))
    extra = [
        t for t in (args.special_tokens if model_type not in WORDPIECE_MODEL_TYPES else []) if t not in roles.values()
    ]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, additional_special_tokens=extra or None, **roles)


def tokenizer_training_texts(files: list[str], args: LanguageModelingArgs) -> Iterator[str]:
    """The documents a tokenizer learns from: all of them, or about tokenizer_sample_mb spread over the corpus."""
    if args.tokenizer_sample_mb is None:
        return iter_lines(files, args.text_column)
    return sample_lines(files, args.tokenizer_sample_mb, args.shard_size_mb, args.text_column)


def _train_wordpiece(files: list[str], args: LanguageModelingArgs) -> Tokenizer:
    normalizer = normalizers.BertNormalizer(
        clean_text=args.clean_text,
        handle_chinese_chars=args.handle_chinese_chars,
        strip_accents=args.strip_accents,
        lowercase=args.do_lower_case,
    )
    # tokenizers' trainer gives each continuing-subword token ("##e") its id in hash-map order as it
    # meets it, and breaks ties between equally frequent merges by those ids, so the same text trained
    # a different vocabulary each run (huggingface/tokenizers#1794). Listed up front in a sorted
    # order, they already have their ids when training starts; they are taken out of the specials after.
    continuing = _continuing_subword_tokens(tokenizer_training_texts(files, args), normalizer)
    trainer = trainers.WordPieceTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=WORDPIECE_SPECIAL_TOKENS + continuing,
        continuing_subword_prefix="##",
        show_progress=False,  # its bars print blank lines when stderr is not a terminal; raylm logs the step instead
    )
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer, trained.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    trained.train_from_iterator(tokenizer_training_texts(files, args), trainer=trainer)
    tokenizer = Tokenizer(
        models.WordPiece(trained.get_vocab(with_added_tokens=False), unk_token="[UNK]", continuing_subword_prefix="##")
    )
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(WORDPIECE_SPECIAL_TOKENS)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _continuing_subword_tokens(texts: Iterator[str], normalizer) -> list[str]:
    """ "##" + every character that can continue a word of `texts` after normalisation, sorted.

    BertNormalizer works character by character, so normalising each distinct character suffices.
    Whitespace and punctuation never continue a word (BertPreTokenizer splits there), nor do the
    CJK characters the normalizer puts spaces around.
    """
    raw = set()
    for text in texts:
        raw.update(text)
    continuing = set()
    for char in raw:
        normalized = normalizer.normalize_str(char)
        if normalized.strip() == normalized:
            continuing.update(c for c in normalized if not (c.isspace() or _is_punctuation(c)))
    return ["##" + c for c in sorted(continuing)]


def _is_punctuation(char: str) -> bool:
    """BertPreTokenizer's rule: ASCII punctuation or a Unicode punctuation category."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def _train_byte_level_bpe(files: list[str], args: LanguageModelingArgs, is_causal: bool) -> Tokenizer:
    if len(args.special_tokens) < len(_BPE_ROLES):
        raise ModelError(
            f"special_tokens needs at least {len(_BPE_ROLES)} entries (bos, pad, eos, unk, mask), got "
            f"{args.special_tokens!r}",
            'Use the default ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] or list your own in that order',
        )
    tokenizer = Tokenizer(models.BPE())
    if args.do_lower_case:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=list(args.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_training_texts(files, args), trainer=trainer)
    if is_causal:
        # GPT-2 style: no tokens added around a text; raylm puts eos between documents itself (document_separator).
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos, eos = args.special_tokens[0], args.special_tokens[2]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} {eos} $B:1 {eos}:1",
            special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
        )
    return tokenizer


def special_token_layout(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one text ([CLS]/[SEP], <s>/</s>, or nothing for GPT-2)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def document_layout(
    tokenizer: PreTrainedTokenizerBase, is_causal: bool, packed: bool, separate_documents: bool
) -> tuple[list[int], list[int]]:
    """The ids before an example and after each document: the tokenizer's own ([CLS]/[SEP], <s>/</s>), and a causal LM's
    eos where its tokenizer adds none.

    Without separate_documents, a causal LM's documents and the documents of a packed block end with nothing
    (a masked model's single lines keep their tokenizer's format).
    """
    prefix, suffix = special_token_layout(tokenizer)
    if not separate_documents and (is_causal or packed):
        return prefix, []
    if is_causal and not suffix and tokenizer.eos_token_id is not None:
        # Causal LMs learn where a document ends from the eos between documents.
        suffix = [tokenizer.eos_token_id]
    return prefix, suffix


def example_spec(
    tokenizer: PreTrainedTokenizerBase,
    is_causal: bool,
    args: LanguageModelingArgs,
    block_size: int,
    document_mask: bool,
) -> ExampleSpec:
    """How the example store cuts documents into examples for this tokenizer and args (the store's key holds it).

    document_mask: the examples record where their documents start (packing.takes_document_mask): `text` blocks
    with packing_document_mask, and `simple` / `line_by_line` rows of several whole lines.
    """
    prefix, suffix = document_layout(
        tokenizer, is_causal, args.normalized_dataset_type == "text", args.document_separator
    )
    spec = ExampleSpec(
        args.normalized_dataset_type,
        block_size,
        tuple(prefix),
        tuple(suffix),
        args.sliding_window,
        args.stride,
        document_mask,
    )
    if block_size <= len(prefix) + len(suffix):
        raise ConfigError(
            f"block_size {block_size} leaves no room for text next to the {len(prefix) + len(suffix)} special tokens",
            "Set block_size (or max_seq_length) to at least 16",
        )
    return spec
