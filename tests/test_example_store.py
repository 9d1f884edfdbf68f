"""The example store: tokenized once, reused only while nothing it depends on changed, counted without reading."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_BERT, TINY_GPT2, read_trace_records, read_trace_steps, tiny_args

from raylm import LanguageModelingArgs, LanguageModelingModel
from raylm.data.datasets import ExampleSpec
from raylm.data.example_store import MANIFEST, BlockReader, read_store, stored_examples
from raylm.data.tokenization import train_tokenizer

SHARD_MB = 0.01  # ~10 KB shards: the sample corpus makes several files, with rows not a multiple of 64


@pytest.fixture(scope="module")
def text(tmp_path_factory, corpus):
    """A private copy of the training text (tests here change it) and a byte-level BPE trained on it."""
    folder = tmp_path_factory.mktemp("store-text")
    path = folder / "train.txt"
    path.write_bytes(open(corpus[0], "rb").read()[: 60 * 1024])
    tokenizer = train_tokenizer(
        "gpt2", [str(path)], LanguageModelingArgs.from_dict({"vocab_size": 400}), is_causal=True
    )
    return {"path": str(path), "tokenizer": tokenizer}


def _spec(tokenizer, block_size=64):
    return ExampleSpec("text", block_size, (), (tokenizer.eos_token_id,))


def _examples(store) -> list[tuple[int, list[int]]]:
    """Every stored example in file order, read block by block as a training rank reads them."""
    block_rows = store.block_rows()
    batch = BlockReader(store).examples(
        np.repeat(np.arange(len(block_rows)), block_rows), np.concatenate([np.arange(n) for n in block_rows])
    )
    return [(int(example_id), ids.tolist()) for example_id, ids in zip(batch["example_id"], batch["input_ids"])]


def _mtimes(store) -> dict[str, int]:
    return {name: os.stat(os.path.join(store.folder, name)).st_mtime_ns for name in (*store.files, MANIFEST)}


def test_a_store_is_reused_unless_rebuilt_and_holds_what_tokenizing_gives(ray_session, text, tmp_path):
    spec = _spec(text["tokenizer"])
    built = stored_examples([text["path"]], text["tokenizer"], spec, SHARD_MB, str(tmp_path), rebuild=False)
    assert len(built.files) >= 5 and built.num_examples > 64 * len(built.files) // 2
    written = _mtimes(built)
    examples = _examples(built)
    assert [example_id for example_id, _ in examples] == sorted(example_id for example_id, _ in examples)
    assert len(examples) == built.num_examples
    # Every block but a shard's last is full; the text is all there (each line + eos).
    lines = [line for line in open(text["path"], encoding="utf-8").read().splitlines() if line.strip()]
    tokens = sum(len(ids) for _, ids in examples)
    assert tokens == sum(len(ids) + 1 for ids in text["tokenizer"](lines, add_special_tokens=False)["input_ids"])

    reused = stored_examples([text["path"]], text["tokenizer"], spec, SHARD_MB, str(tmp_path), rebuild=False)
    assert reused == built and _mtimes(reused) == written  # nothing rewritten

    rebuilt = stored_examples([text["path"]], text["tokenizer"], spec, SHARD_MB, str(tmp_path), rebuild=True)
    assert rebuilt == built and all(_mtimes(rebuilt)[name] > written[name] for name in written)
    assert _examples(rebuilt) == examples


def test_a_lone_shard_built_in_the_driver_holds_what_ray_data_tasks_build(ray_session, text, tmp_path):
    """One shard is tokenized in the driver, several by Ray Data tasks: the same examples either way,
    read from the JSON Lines field text_column names."""
    lines = [line for line in open(text["path"], encoding="utf-8").read().splitlines() if line.strip()]
    halves = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path, part in zip(halves, (lines[: len(lines) // 2], lines[len(lines) // 2 :])):
        path.write_text(
            "".join(json.dumps({"id": i, "body": line}) + "\n" for i, line in enumerate(part)), encoding="utf-8"
        )
    spec, tokenizer = _spec(text["tokenizer"]), text["tokenizer"]
    together = stored_examples(
        [str(p) for p in halves], tokenizer, spec, SHARD_MB, str(tmp_path / "tasks"), rebuild=False, text_column="body"
    )
    alone = [
        stored_examples(
            [str(p)], tokenizer, spec, SHARD_MB, str(tmp_path / f"driver-{p.stem}"), rebuild=False, text_column="body"
        )
        for p in halves
    ]
    assert len(together.files) == 2 and [len(store.files) for store in alone] == [1, 1]
    # Example ids differ only in the shard's index (b is shard 1 beside a, shard 0 alone).
    assert [ids for _, ids in _examples(together)] == [ids for store in alone for _, ids in _examples(store)]
    assert [example_id >> 32 for example_id, _ in _examples(together)] == [0] * alone[0].num_examples + [1] * alone[
        1
    ].num_examples
    tokens = sum(len(ids) for _, ids in _examples(together))
    assert tokens == sum(len(ids) + 1 for ids in tokenizer(lines, add_special_tokens=False)["input_ids"])


def test_the_stores_blocks_are_its_parquet_row_groups_and_hold_what_ray_data_reads(ray_session, text, tmp_path):
    store = stored_examples(
        [text["path"]], text["tokenizer"], _spec(text["tokenizer"]), SHARD_MB, str(tmp_path), rebuild=True
    )
    groups = [
        pq.ParquetFile(os.path.join(store.folder, name)).metadata.row_group(i).num_rows
        for name in store.files
        for i in range(pq.ParquetFile(os.path.join(store.folder, name)).num_row_groups)
    ]
    assert len(set(groups)) > 1  # guard: shards end in partial blocks, so the layout is not trivially uniform
    assert groups == store.block_rows()
    by_ray_data = sorted((int(row["example_id"]), list(row["input_ids"])) for row in store.dataset().take_all())
    assert by_ray_data == _examples(store)


def test_a_changed_file_tokenizer_or_setting_is_never_served_stale(ray_session, text, tmp_path):
    path, tokenizer = text["path"], text["tokenizer"]
    first = stored_examples([path], tokenizer, _spec(tokenizer), SHARD_MB, str(tmp_path), rebuild=False)

    other_tokenizer = train_tokenizer(
        "gpt2", [path], LanguageModelingArgs.from_dict({"vocab_size": 300}), is_causal=True
    )
    by_tokenizer = stored_examples(
        [path], other_tokenizer, _spec(other_tokenizer), SHARD_MB, str(tmp_path), rebuild=False
    )
    assert by_tokenizer.folder != first.folder
    by_block_size = stored_examples(
        [path], tokenizer, _spec(tokenizer, block_size=32), SHARD_MB, str(tmp_path), rebuild=False
    )
    assert by_block_size.folder != first.folder and by_block_size.num_examples > first.num_examples

    with open(path, "a", encoding="utf-8") as f:
        f.write("a brand new closing line about zebras\n")
    changed = stored_examples([path], tokenizer, _spec(tokenizer), SHARD_MB, str(tmp_path), rebuild=False)
    assert changed.folder != first.folder
    last_block = _examples(changed)[-1][1]
    assert "zebras" in tokenizer.decode(last_block)


def test_an_unfinished_build_is_not_reused(ray_session, text, tmp_path):
    spec = _spec(text["tokenizer"])
    store = stored_examples([text["path"]], text["tokenizer"], spec, SHARD_MB, str(tmp_path), rebuild=False)
    os.remove(os.path.join(store.folder, MANIFEST))
    os.remove(os.path.join(store.folder, store.files[0]))  # a build that stopped before its manifest
    assert read_store(store.folder) is None
    again = stored_examples([text["path"]], text["tokenizer"], spec, SHARD_MB, str(tmp_path), rebuild=False)
    assert again == store and os.path.isfile(os.path.join(store.folder, store.files[0]))


def test_a_worker_that_cannot_read_the_stores_manifest_fails_at_its_start_in_one_paragraph(ray_session, text, tmp_path):
    """A node that joined without the driver's mount (or a store removed meanwhile): the worker's first act is to
    read each store's manifest, and it fails there, before it even fetches the model, naming the store, its node
    and the fix."""
    import dataclasses

    import ray
    from ray.train import CheckpointConfig

    from raylm import ConfigError
    from raylm.training import in_process
    from raylm.training.store_access import readable_store
    from raylm.training.worker import WorkerJob, train_fn_per_worker

    spec = _spec(text["tokenizer"])
    store = stored_examples([text["path"]], text["tokenizer"], spec, SHARD_MB, str(tmp_path / "cache"), rebuild=False)
    assert readable_store(dataclasses.asdict(store), rank=0) == store
    elsewhere = tmp_path / "driver-only"
    os.rename(tmp_path / "cache", elsewhere)  # the store is where the driver built it, not where this node looks
    job = WorkerJob(
        args=tiny_args(tmp_path / "out").to_dict(),
        objective="clm",
        collator={},
        total_steps=1,
        model_ref=None,  # never fetched
        tokenizer_ref=None,
        train_examples=[dataclasses.asdict(store)],
    )
    utils = in_process.DriverTrainFnUtils(str(tmp_path / "runs"), "unreadable-store", CheckpointConfig())
    with pytest.raises(ConfigError) as refused:
        in_process.run(train_fn_per_worker, dataclasses.asdict(job), utils)
    message = str(refused.value)
    node = f"{ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()[:12]})"
    assert "\n" not in message
    assert message.startswith(f"Training worker rank 0 on node {node} ")
    assert f"example store '{store.folder}'" in message and MANIFEST in message
    assert "Set cache_dir" in message and "s3://" in message


def test_a_run_with_reprocess_off_trains_on_the_stored_examples_and_counts_its_epoch_from_them(
    ray_session, text, tmp_path
):
    cache = tmp_path / "cache"
    args = tiny_args(
        tmp_path / "out",
        mlm=False,
        tokenizer_name=None,
        vocab_size=400,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        train_batch_size=32,
        num_train_epochs=1,
        cache_dir=str(cache),
        shard_size_mb=SHARD_MB,
        storage_path=str(tmp_path / "runs"),
        reprocess_input_data=False,
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=text["path"])
    # What an earlier run (or eval_model) on the same text, tokenizer and settings left in the cache.
    stored = model._stored_examples([text["path"]], model.args, model.block_size)
    written = _mtimes(stored)
    trace = tmp_path / "trace"
    trace.mkdir()
    global_step, _ = model.train_model(text["path"], _diagnostics={"trace_dir": str(trace)})
    assert [str(p) for p in cache.iterdir()] == [stored.folder] and _mtimes(stored) == written
    # The epoch's length came from the store's counts, and the epoch used each stored example once.
    assert global_step == -(-stored.num_examples // 32)
    trained = [example_id for record in read_trace_records(trace) for example_id in record.get("example_ids", [])]
    assert sorted(trained) == sorted(example_id for example_id, _ in _examples(stored))


def test_parquet_and_compressed_json_lines_store_the_same_examples_as_the_text(ray_session, text, tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [line for line in open(text["path"], encoding="utf-8").read().splitlines() if line.strip()]
    pq.write_table(pa.table({"text": lines}), str(tmp_path / "c.parquet"), row_group_size=100)
    (tmp_path / "c.jsonl.gz").write_bytes(
        gzip.compress("\n".join(json.dumps({"text": line}) for line in lines).encode())
    )
    spec = _spec(text["tokenizer"])

    def stored(path):
        return [
            ids
            for _, ids in _examples(
                stored_examples([path], text["tokenizer"], spec, 4.0, str(tmp_path / "cache"), rebuild=False)
            )
        ]

    as_text = stored(text["path"])
    assert len(as_text) > 100
    assert stored(str(tmp_path / "c.parquet")) == as_text
    assert stored(str(tmp_path / "c.jsonl.gz")) == as_text


def test_a_weighted_mixture_trains_each_source_in_its_proportion_and_resumes_exactly(
    ray_session, text, tmp_path, capfd
):
    """{a: 0.7, b: 0.3}: the epoch ends when the first source is read through; every step's draws follow the
    weights, and the end-of-run table says what each source gave. A checkpoint mid-epoch resumed on 2 workers
    (Ray Train's worker group) takes every later step's examples from where each source stood."""
    from raylm.data.epoch_data import SOURCE_ID_SHIFT

    lines = [line for line in open(text["path"], encoding="utf-8").read().splitlines() if line.strip()]
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(lines[: len(lines) // 3]) + "\n", encoding="utf-8")
    second.write_text("\n".join(lines[len(lines) // 3 :]) + "\n", encoding="utf-8")
    args = tiny_args(
        tmp_path / "out",
        mlm=False,
        tokenizer_name=None,
        vocab_size=400,
        dataset_type="text",
        config=TINY_GPT2,
        block_size=64,
        train_batch_size=10,
        num_train_epochs=1,
        save_steps=5,
        shard_size_mb=SHARD_MB,
        storage_path=str(tmp_path / "runs"),
    )
    model = LanguageModelingModel("gpt2", None, args=args, train_files=text["path"])
    sizes = [model._stored_examples([str(path)], model.args, model.block_size).num_examples for path in (first, second)]
    trace = tmp_path / "trace"
    trace.mkdir()
    mixture = {str(first): 0.7, str(second): 0.3}
    capfd.readouterr()
    global_step, _ = model.train_model(mixture, _diagnostics={"trace_dir": str(trace)})
    summary = capfd.readouterr().err
    steps = [r for r in read_trace_records(trace) if "step" in r]
    assert len(steps) == global_step
    drawn = [0, 0]
    for number, step in enumerate(steps, start=1):
        for example_id in step["example_ids"]:
            drawn[example_id >> SOURCE_ID_SHIFT] += 1
        # Stride scheduling: after every step each source is within one example of its share.
        assert abs(drawn[0] - 0.7 * sum(drawn)) <= 1, (number, drawn)
    # The first source (a third of the text at 70% of the draws) runs out first: it is read exactly once.
    first_ids = [i for step in steps for i in step["example_ids"] if i >> SOURCE_ID_SHIFT == 0]
    assert drawn[0] == sizes[0] == len(set(first_ids)) and drawn[1] < sizes[1]
    assert global_step == -(-sum(drawn) // 10)
    # The end-of-run table: what each source gave, against its weight.
    [row] = [line for line in summary.splitlines() if line.startswith("raylm:   mixture ")]
    total = sum(drawn)
    assert row.split(None, 2)[2] == (
        f"{first} {drawn[0] / total:.1%} ({drawn[0]:,} examples; weight 70.0%), "
        f"{second} {drawn[1] / total:.1%} ({drawn[1]:,} examples; weight 30.0%)"
    ), row

    # Resumed from step 5 on 2 workers of 5 examples (the same global batch of 10): each later step takes the
    # examples the uninterrupted run took, so each source goes on from its own position.
    assert global_step > 6
    resumed_trace = tmp_path / "resumed-trace"
    resumed_trace.mkdir()
    resumed = LanguageModelingModel(
        "gpt2",
        str(tmp_path / "out" / "checkpoint-5"),
        args={"output_dir": str(tmp_path / "resumed"), "num_workers": 2, "train_batch_size": 5},
    )
    resumed_step, _ = resumed.train_model(mixture, _diagnostics={"trace_dir": str(resumed_trace)})
    assert resumed_step == global_step
    ranks = read_trace_steps(resumed_trace)
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(6, global_step + 1))
    for step in steps[5:]:
        both = ranks[0][step["step"]]["example_ids"] + ranks[1][step["step"]]["example_ids"]
        assert sorted(both) == sorted(step["example_ids"]), step["step"]


@pytest.mark.parametrize(
    "model_type, dataset_type", [("gpt2", "simple"), ("gpt2", "text"), ("bert", "text"), ("bert", "simple")]
)
def test_document_separator_puts_the_separator_after_each_document_or_leaves_the_text_alone(
    ray_session, text, tmp_path, model_type, dataset_type
):
    masked = model_type == "bert"
    args = tiny_args(
        tmp_path / "out",
        mlm=masked,
        vocab_size=400,
        dataset_type=dataset_type,
        config=TINY_BERT if masked else TINY_GPT2,
        cache_dir=str(tmp_path / "cache"),
    )
    model = LanguageModelingModel(model_type, None, args=args, train_files=text["path"])
    separator = model.tokenizer.sep_token_id if masked else model.tokenizer.eos_token_id
    lines = [line for line in open(text["path"], encoding="utf-8").read().splitlines() if line.strip()]
    line_ids = model.tokenizer(lines, add_special_tokens=False)["input_ids"]
    text_tokens = sum(map(len, line_ids))
    block_size = max(map(len, line_ids)) + 2  # no simple line truncated
    stores = {}
    for separated in (True, False):
        args.document_separator = separated
        stores[separated] = model._stored_examples([text["path"]], args, block_size)
    unchanged = (
        masked and dataset_type == "simple"
    )  # a masked model's line alone keeps its tokenizer's format ([CLS] line [SEP])
    assert (stores[True].folder == stores[False].folder) == unchanged  # the separator is part of the store's key
    counts = {}
    for separated, store in stores.items():
        ids = np.concatenate([np.asarray(example) for _, example in _examples(store)])
        counts[separated] = int((ids == separator).sum())
        # Nothing of the text is lost either way.
        assert int(np.isin(ids, model.tokenizer.all_special_ids, invert=True).sum()) == text_tokens
    assert counts[True] == len(lines)
    assert counts[False] == (len(lines) if unchanged else 0)
