"""Corpora as they ship: JSON Lines and Parquet with a text column, gzip / zstd compressed text, from disk or a
bucket."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.documents import file_format, read_documents, read_shard_lines, stream_documents
from raylm.data.sources import check_text_files, plan_shards
from raylm.errors import DataError

DOCUMENTS = [f"document {i}: " + "word " * (i % 13) + "end" for i in range(300)]


def _write_compressed(path, data: bytes, codec: str) -> None:
    with pa.CompressedOutputStream(pa.OSFile(str(path), "wb"), codec) as out:
        out.write(data)


@pytest.fixture
def corpora(tmp_path):
    """The same documents in every format raylm reads, records carrying other fields beside the text."""
    lines = "\n".join(DOCUMENTS) + "\n"
    records = (
        "\n".join(json.dumps({"id": i, "text": text, "url": f"https://x/{i}"}) for i, text in enumerate(DOCUMENTS))
        + "\n"
    )
    paths = {
        "txt": tmp_path / "c.txt",
        "txt.gz": tmp_path / "c.txt.gz",
        "txt.zst": tmp_path / "c.txt.zst",
        "jsonl": tmp_path / "c.jsonl",
        "jsonl.gz": tmp_path / "c.jsonl.gz",
        "json.zst": tmp_path / "c.json.zst",
        "parquet": tmp_path / "c.parquet",
    }
    paths["txt"].write_text(lines, encoding="utf-8")
    paths["txt.gz"].write_bytes(gzip.compress(lines.encode()))
    _write_compressed(paths["txt.zst"], lines.encode(), "zstd")
    paths["jsonl"].write_text(records, encoding="utf-8")
    paths["jsonl.gz"].write_bytes(gzip.compress(records.encode()))
    _write_compressed(paths["json.zst"], records.encode(), "zstd")
    pq.write_table(
        pa.table({"id": list(range(len(DOCUMENTS))), "text": DOCUMENTS}), str(paths["parquet"]), row_group_size=64
    )
    return {name: str(path) for name, path in paths.items()}


def test_every_format_reads_as_the_same_documents(corpora):
    assert file_format(corpora["txt"]).splittable and not file_format(corpora["txt.gz"]).splittable
    for name, path in corpora.items():
        check_text_files([path])
        shards = plan_shards([path], shard_size_mb=1 / 1024)  # 1 KB: plain text splits, the others stay whole
        assert (len(shards) > 1) == (name == "txt"), name
        assert [doc for shard in shards for doc in read_shard_lines(shard)] == DOCUMENTS, name


def test_a_text_column_other_than_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": text}) for text in DOCUMENTS[:5]), encoding="utf-8")
    (shard,) = plan_shards([str(path)], 4.0, text_column="body")
    assert read_shard_lines(shard) == DOCUMENTS[:5]


def test_a_missing_column_names_the_columns_found(corpora):
    with pytest.raises(DataError, match=r"no text_column 'content' \(it has: 'id', 'text', 'url'\).*Set text_column"):
        check_text_files([corpora["jsonl.gz"]], text_column="content")
    with pytest.raises(DataError, match=r"no text_column 'content' \(its columns: id, text\).*Set text_column"):
        check_text_files([corpora["parquet"]], text_column="content")


def test_a_column_that_is_not_text_says_so(corpora, tmp_path):
    with pytest.raises(DataError, match=r"text_column 'id' .* holds int64, not strings"):
        check_text_files([corpora["parquet"]], text_column="id")
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 7}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"record 2 of .*numbers.jsonl.* is a int, not a string"):
        check_text_files([str(path)])


def test_a_corrupt_compressed_file_is_named(corpora, tmp_path):
    whole = open(corpora["txt.gz"], "rb").read()
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(whole[:20] + b"\xff" * 50 + whole[70:])
    with pytest.raises(DataError, match=r"broken\.txt\.gz.*could not be read as gzip.*Check that the file is whole"):
        read_shard_lines(plan_shards([str(broken)], 4.0)[0])
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"fake\.parquet.*could not be read"):
        check_text_files([str(not_parquet)])


def test_a_bad_json_line_is_named_by_its_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"Line 2 of the JSON Lines file .*c\.jsonl.* is not JSON"):
        check_text_files([str(path)])


def test_compressed_json_lines_and_parquet_from_a_bucket(s3_server, corpora):
    import boto3

    from raylm.data.sources import resolve_text_files

    bucket = s3_server.bucket()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for name in ("jsonl.gz", "parquet"):
        client.put_object(Bucket=bucket, Key=f"corpus/c.{name}", Body=open(corpora[name], "rb").read())
    files = resolve_text_files(f"s3://{bucket}/corpus/")
    check_text_files(files)
    assert [file.rsplit("/", 1)[1] for file in files] == ["c.jsonl.gz", "c.parquet"]
    assert [doc for shard in plan_shards(files, 4.0) for doc in read_shard_lines(shard)] == DOCUMENTS * 2


def test_streamed_documents_match_the_whole_file_read_across_read_chunks(tmp_path):
    # Over 1 MB (one read chunk) of CRLF lines with two-byte characters: chunks end inside a character and
    # between "\r" and "\n"; the sampler's stream must read the same documents as the whole-file reader.
    records = "".join(
        json.dumps({"text": f"dé {i} " + "é" * (i % 50)}, ensure_ascii=False) + "\r\n" for i in range(40_000)
    )
    for name, data in (
        ("c.jsonl.gz", gzip.compress(records.encode())),
        ("c.txt", records.replace('{"text": "', "").encode()),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        assert len(records.encode()) > 2**20
        assert list(stream_documents(str(path), file_format(str(path)), "text")) == read_documents(
            str(path), file_format(str(path)), "text"
        ), name


def test_checking_a_parquet_file_reads_its_head_not_the_whole_file(tmp_path):
    # The second row group is corrupt: a check that read the whole text column would fail on it. The
    # driver checks heads only (a 100 GB corpus is not read before anything starts); readers find the rest.
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"row {i} text" for i in range(2000)]}), str(path), row_group_size=1000)
    column = pq.ParquetFile(str(path)).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for offset in range(start + 40, start + column.total_compressed_size - 10):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    check_text_files([str(path)])
    with pytest.raises(DataError, match=r"c\.parquet"):
        read_shard_lines(plan_shards([str(path)], 4.0)[0])
