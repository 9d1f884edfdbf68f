"""Tokenizers trained from scratch: casing and specials survive a save/reload; every format; a bounded sample of a
large corpus."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from raylm import ConfigError, LanguageModelingArgs
from raylm.data.sources import plan_shards, sample_shards
from raylm.data.tokenization import document_layout, special_token_layout, tokenizer_training_texts, train_tokenizer
from raylm.errors import DataError


def _corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(["Hello World from Python", "hello world from python"] * 200), encoding="utf-8")
    return [str(path)]


def test_wordpiece_trained_cased_stays_cased_after_reload(tmp_path):
    args = LanguageModelingArgs.from_dict({"vocab_size": 100, "do_lower_case": False})
    tokenizer = train_tokenizer("bert", _corpus(tmp_path), args, is_causal=False)
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    upper, lower = reloaded.tokenize("Hello"), reloaded.tokenize("hello")
    assert upper != lower and upper == tokenizer.tokenize("Hello")
    assert special_token_layout(reloaded) == ([reloaded.cls_token_id], [reloaded.sep_token_id])


def test_wordpiece_training_gives_the_same_vocabulary_every_time(corpus):
    # tokenizers' trainer alone gave a different vocabulary (and different ids) nearly every run on this text.
    args = LanguageModelingArgs.from_dict({"vocab_size": 3000})
    trained = [train_tokenizer("bert", [corpus[0]], args, is_causal=False) for _ in range(4)]
    assert len({tokenizer.backend_tokenizer.to_str() for tokenizer in trained}) == 1
    tokenizer = trained[0]
    assert len(tokenizer) == 3000 and sorted(tokenizer.all_special_tokens) == [
        "[CLS]",
        "[MASK]",
        "[PAD]",
        "[SEP]",
        "[UNK]",
    ]
    # The continuing-subword tokens listed up front are ordinary pieces of words, not special tokens.
    pieces = tokenizer.tokenize("docstrings")
    assert pieces[0] == "doc" and all(piece.startswith("##") for piece in pieces[1:])
    assert tokenizer.decode(tokenizer("docstrings")["input_ids"], skip_special_tokens=True) == "docstrings"


def test_byte_level_bpe_for_causal_lm_adds_no_specials(tmp_path):
    args = LanguageModelingArgs.from_dict({"vocab_size": 300})
    tokenizer = train_tokenizer("gpt2", _corpus(tmp_path), args, is_causal=True)
    assert special_token_layout(tokenizer) == ([], [])
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>" and tokenizer.mask_token == "<mask>"
    assert tokenizer.decode(tokenizer("Hello World")["input_ids"]) == "Hello World"


def test_documents_end_with_their_objectives_separator_unless_told_not_to(tmp_path):
    bert = train_tokenizer(
        "bert", _corpus(tmp_path), LanguageModelingArgs.from_dict({"vocab_size": 100}), is_causal=False
    )
    gpt2 = train_tokenizer(
        "gpt2", _corpus(tmp_path), LanguageModelingArgs.from_dict({"vocab_size": 300}), is_causal=True
    )
    sep, eos = [bert.sep_token_id], [gpt2.eos_token_id]
    # Per line ('simple') and packed ('text'), with document_separator and without.
    assert [document_layout(bert, False, packed, True)[1] for packed in (False, True)] == [sep, sep]
    assert [document_layout(bert, False, packed, False)[1] for packed in (False, True)] == [
        sep,
        [],
    ]  # a line alone keeps [CLS] line [SEP]
    assert [document_layout(gpt2, True, packed, True)[1] for packed in (False, True)] == [eos, eos]
    assert [document_layout(gpt2, True, packed, False)[1] for packed in (False, True)] == [[], []]


# --- tokenizer_sample_mb: a tokenizer learned from a bounded sample spread over the corpus ---------------

SHARD_BYTES = 2048
SHARD_MB = SHARD_BYTES / 2**20


def _topic_word(topic: int) -> str:
    return "topic" + chr(97 + topic // 26) + chr(97 + topic % 26)


def _sorted_by_topic(path, topics: int = 32) -> list[str]:
    """A plain text corpus sorted by topic: shard i (2 KB) holds only the 7-letter word of topic i, so the
    whole words in a tokenizer's vocabulary say which shards it learned from."""
    line = " ".join([_topic_word(0)] * 16) + "\n"
    assert SHARD_BYTES % len(line) == 0  # every topic fills its shard exactly, no line straddles two
    path.write_text(
        "".join(line.replace(_topic_word(0), _topic_word(t)) * (SHARD_BYTES // len(line)) for t in range(topics)),
        encoding="utf-8",
    )
    return [str(path)]


def _learned_topics(tokenizer, topics: int = 32) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {t for t in range(topics) if _topic_word(t) in vocab}


def _sample_args(sample_mb, **overrides) -> LanguageModelingArgs:
    return LanguageModelingArgs.from_dict(
        {"vocab_size": 1000, "shard_size_mb": SHARD_MB, "tokenizer_sample_mb": sample_mb, **overrides}
    )


def test_the_tokenizer_learns_from_about_the_sample_spread_over_the_corpus(tmp_path):
    files = _sorted_by_topic(tmp_path / "sorted.txt")
    whole = train_tokenizer("bert", files, _sample_args(None), is_causal=False)
    assert _learned_topics(whole) == set(range(32))  # the vocabulary has room for every topic
    sampled = train_tokenizer("bert", files, _sample_args(4 * SHARD_MB), is_causal=False)
    learned = _learned_topics(sampled)
    # 4 shards' worth of budget: 4 topics read (one more shard at most), from both halves and the last quarter.
    assert 4 <= len(learned) <= 5, learned
    assert min(learned) < 16 <= max(learned) and max(learned) >= 24, learned


def test_sampled_shards_total_about_the_budget_and_span_the_list(tmp_path):
    shards = plan_shards(_sorted_by_topic(tmp_path / "sorted.txt", topics=100), SHARD_MB)
    for budget_shards in (1, 3, 10, 37):
        chosen = sample_shards(shards, budget_shards * SHARD_MB, SHARD_MB)
        planned = sum(min(shard.end - shard.start, limit) for shard, limit in chosen)
        assert budget_shards * SHARD_BYTES <= planned <= (budget_shards + 1) * SHARD_BYTES
        indices = sorted(shard.index for shard, _ in chosen)
        assert len(set(indices)) == len(indices)
        if budget_shards > 1:
            # No gap wider than about two even spacings: the sample reaches the end as well as the start.
            gaps = [b - a for a, b in zip([-1] + indices, indices + [len(shards)])]
            assert max(gaps) <= 2 * len(shards) / budget_shards + 1, indices
    assert sorted(shard.index for shard, _ in sample_shards(shards, 1000.0, SHARD_MB)) == list(range(len(shards)))


def test_the_text_read_stays_within_the_budget_plus_one_shard(tmp_path):
    files = _sorted_by_topic(tmp_path / "sorted.txt", topics=64)
    for budget_mb in (SHARD_MB / 2, 5.5 * SHARD_MB, 20 * SHARD_MB):
        read = sum(len(text.encode()) + 1 for text in tokenizer_training_texts(files, _sample_args(budget_mb)))
        assert budget_mb * 2**20 <= read <= budget_mb * 2**20 + SHARD_BYTES, (budget_mb, read)
    everything = sum(len(text.encode()) + 1 for text in tokenizer_training_texts(files, _sample_args(None)))
    assert everything == 64 * SHARD_BYTES


def _jsonl_gz_by_topic(folder, files: int, records: int) -> list[str]:
    paths = []
    for topic in range(files):
        path = folder / f"part-{topic:02d}.jsonl.gz"
        line = json.dumps({"id": topic, "text": " ".join([_topic_word(topic)] * 16)}) + "\n"
        path.write_bytes(gzip.compress((line * records).encode()))
        paths.append(str(path))
    return paths


def test_whole_compressed_files_larger_than_the_budget_are_read_only_in_part(tmp_path):
    # 8 files of 32 KB of text (gzip shrinks them to a few hundred bytes), a 32 KB budget: every file gives
    # a 4 KB piece, none is read whole.
    files = _jsonl_gz_by_topic(tmp_path, files=8, records=256)
    texts = list(tokenizer_training_texts(files, _sample_args(16 * SHARD_MB)))
    read = sum(len(text.encode()) + 1 for text in texts)
    assert 16 * SHARD_BYTES <= read <= 16 * SHARD_BYTES + 128, read
    assert {text.split()[0] for text in texts} == {_topic_word(t) for t in range(8)}
    tokenizer = train_tokenizer("gpt2", files, _sample_args(16 * SHARD_MB), is_causal=True)
    assert {t for t in range(8) if "Ġ" + _topic_word(t) in tokenizer.get_vocab()} == set(range(8))


def test_a_whole_file_is_read_only_as_far_as_the_sample_needs(tmp_path):
    # A gzip file cut short near its end: reading it whole fails there, so a sample of its head that
    # succeeds has not read (nor decompressed) the rest.
    path = tmp_path / "cut.jsonl.gz"
    records = "".join(
        json.dumps({"id": i, "text": f"record {i} " + _topic_word(i % 32)}) + "\n" for i in range(100_000)
    )
    whole = gzip.compress(records.encode())
    path.write_bytes(whole[: len(whole) - 64])
    with pytest.raises(DataError, match="could not be read as gzip"):
        list(tokenizer_training_texts([str(path)], _sample_args(None)))
    assert 4 * SHARD_BYTES <= sum(
        len(text.encode()) + 1 for text in tokenizer_training_texts([str(path)], _sample_args(4 * SHARD_MB))
    )


def test_a_parquet_file_larger_than_the_budget_is_read_only_in_part(tmp_path):
    path = tmp_path / "big.parquet"
    texts = [" ".join([_topic_word(i % 32)] * 16) for i in range(4096)]  # 512 KB of text
    pq.write_table(pa.table({"text": texts}), str(path), row_group_size=512)
    read = sum(len(text.encode()) + 1 for text in tokenizer_training_texts([str(path)], _sample_args(8 * SHARD_MB)))
    assert 8 * SHARD_BYTES <= read <= 8 * SHARD_BYTES + 128, read


def test_the_sample_is_the_same_every_time(tmp_path):
    files = _sorted_by_topic(tmp_path / "sorted.txt")
    args = _sample_args(3 * SHARD_MB)
    first, second = list(tokenizer_training_texts(files, args)), list(tokenizer_training_texts(files, args))
    assert first and first == second
    vocabularies = [set(train_tokenizer("bert", files, args, is_causal=False).get_vocab()) for _ in range(2)]
    assert vocabularies[0] == vocabularies[1]


@pytest.mark.parametrize("value", [0, -5.0, float("nan"), float("inf"), "100MB"])
def test_a_bad_tokenizer_sample_mb_is_named(value):
    with pytest.raises(ConfigError, match="tokenizer_sample_mb"):
        LanguageModelingArgs.from_dict({"tokenizer_sample_mb": value}).validate()


def test_a_tokenizer_trains_from_json_lines_gz_and_parquet(tmp_path):
    texts = [" ".join([_topic_word(i % 4)] * 8) for i in range(200)]
    jsonl_gz = tmp_path / "c.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress("".join(json.dumps({"url": "x", "body": t}) + "\n" for t in texts).encode()))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": texts}), str(parquet), row_group_size=50)
    for path in (jsonl_gz, parquet):
        tokenizer = train_tokenizer(
            "gpt2",
            [str(path)],
            LanguageModelingArgs.from_dict({"vocab_size": 400, "text_column": "body"}),
            is_causal=True,
        )
        assert {"Ġ" + _topic_word(t) for t in range(4)} <= set(tokenizer.get_vocab()), path.name
