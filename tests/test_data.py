"""The pure data stages: shards, example forming, masking, padding. No Ray."""

import numpy as np
import pytest

from raylm.data.collators import IGNORE_INDEX, CollatorSpec, collate
from raylm.data.datasets import ExampleSpec, line_examples, packed_examples
from raylm.data.documents import read_shard_lines
from raylm.data.sources import plan_shards


def test_shards_cover_every_line_exactly_once(tmp_path):
    lines = [f"line {i} " + "x" * (i % 37) for i in range(500)]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n\n   \n", encoding="utf-8")
    shards = plan_shards([str(path)], shard_size_mb=700 / 2**20)  # ~700-byte shards cut mid-line
    assert len(shards) > 10
    read = [line for shard in shards for line in read_shard_lines(shard)]
    assert read == lines


def test_packing_fills_blocks_and_keeps_the_tail():
    spec = ExampleSpec("text", block_size=4, prefix=(), suffix=(99,))
    blocks = packed_examples([[1, 2, 3], [4, 5], [6]], spec)
    assert blocks == [[1, 2, 3, 99], [4, 5, 99, 6], [99]]


def test_packing_with_cls_prefix():
    spec = ExampleSpec("text", block_size=4, prefix=(101,), suffix=(102,))
    assert packed_examples([[1, 2], [3, 4, 5]], spec) == [[101, 1, 2, 102], [101, 3, 4, 5], [101, 102]]


def test_line_examples_truncate_to_block_size_including_specials():
    spec = ExampleSpec("simple", block_size=5, prefix=(101,), suffix=(102,))
    assert line_examples([[1, 2, 3, 4, 5, 6], [7]], spec) == [[101, 1, 2, 3, 102], [101, 7, 102]]


def test_a_line_without_tokens_or_specials_is_no_example():
    # A causal LM without document_separator: nothing around a line; one that tokenizes to nothing leaves no empty row.
    assert line_examples([[1, 2], [], [3]], ExampleSpec("simple", block_size=5, prefix=(), suffix=())) == [[1, 2], [3]]
    assert line_examples([[]], ExampleSpec("simple", block_size=5, prefix=(), suffix=(9,))) == [[9]]


def test_sliding_window_splits_long_lines():
    spec = ExampleSpec("simple", block_size=4, prefix=(), suffix=(), sliding_window=True, stride=0.5)
    assert line_examples([list(range(8))], spec) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]


def _mlm_spec(**overrides):
    values = dict(
        objective="mlm", pad_id=0, mask_id=4, vocab_size=1000, special_ids=(0, 1, 2, 3, 4), mlm_probability=0.15, seed=7
    )
    values.update(overrides)
    return CollatorSpec(**values)


def _batch(rows, ids):
    return {
        "input_ids": np.array([np.array(r, dtype=np.int32) for r in rows], dtype=object),
        "example_id": np.array(ids),
    }


def test_mlm_masks_only_real_tokens_at_the_requested_rate():
    rng = np.random.default_rng(0)
    rows = [[2] + list(rng.integers(5, 1000, size=int(n))) + [3] for n in rng.integers(20, 120, size=400)]
    out = collate(_batch(rows, np.arange(400)), _mlm_spec(), stream=0)
    labels, inputs, attention = out["labels"].numpy(), out["input_ids"].numpy(), out["attention_mask"].numpy()
    selected = labels != IGNORE_INDEX
    original = np.where(selected, labels, 0)
    assert not selected[attention == 0].any(), "padding was masked"
    assert not np.isin(original[selected], [0, 1, 2, 3, 4]).any(), "a special token was masked"
    real = (attention == 1) & (out["input_ids"].numpy() != 2) & (out["input_ids"].numpy() != 3)
    assert 0.13 < selected.sum() / real.sum() < 0.17
    mask_share = (inputs[selected] == 4).mean()
    kept_share = (inputs[selected] == labels[selected]).mean()
    assert 0.77 < mask_share < 0.83 and 0.07 < kept_share < 0.13
    assert out["n_targets"] == selected.sum()


def test_mlm_mask_depends_on_example_and_epoch_not_on_batching():
    rows = [list(range(5, 5 + n)) for n in (30, 50, 70)]
    whole = collate(_batch(rows, [10, 11, 12]), _mlm_spec(), stream=3)
    alone = collate(_batch(rows[1:2], [11]), _mlm_spec(), stream=3)
    assert np.array_equal(whole["labels"][1, :52].numpy(), alone["labels"][0, :52].numpy())
    next_epoch = collate(_batch(rows, [10, 11, 12]), _mlm_spec(), stream=4)
    assert not np.array_equal(whole["labels"].numpy(), next_epoch["labels"].numpy())


def test_clm_labels_ignore_padding_and_count_shifted_targets():
    spec = _mlm_spec(objective="clm", mask_id=None)
    out = collate(_batch([[5, 6, 7], [8]], [0, 1]), spec, stream=0)
    labels = out["labels"].numpy()
    assert labels[0, :3].tolist() == [5, 6, 7] and (labels[0, 3:] == IGNORE_INDEX).all()
    assert labels[1, 0] == 8 and (labels[1, 1:] == IGNORE_INDEX).all()
    assert out["input_ids"].shape[1] % 8 == 0
    assert out["n_targets"] == 2  # tokens 6 and 7; the first token of each example has nothing before it


def test_mlm_without_mask_token_is_refused():
    with pytest.raises(ValueError, match="mask token"):
        collate(_batch([[5, 6]], [0]), _mlm_spec(mask_id=None), stream=0)
