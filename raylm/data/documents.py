"""Documents: a file (or a shard of one) -> its non-blank documents, by the format its name says.

Formats: plain text (one document per non-blank line); JSON Lines (`.jsonl`, `.json`, `.ndjson`: one document per
record, its `text_column`); Parquet (`.parquet`: one document per row of `text_column`); plain text and JSON Lines
may be compressed (`.gz`, `.zst`). Text is strict UTF-8; a file that cannot be read as its name says raises a
DataError that names it.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylm.data import storage
from raylm.errors import DataError

READ_CHUNK_BYTES = 1 * 2**20


@dataclass(frozen=True)
class TextShard:
    """Lines whose first byte lies in [start, end) of `path` (a whole file for formats other than plain text).

    `index` is its place among all shards; `text_column` names the documents' field in JSON Lines and Parquet.
    """

    index: int
    path: str
    start: int
    end: int
    text_column: str = "text"


@dataclass(frozen=True)
class FileFormat:
    kind: str  # text | jsonl | parquet
    compression: Optional[str] = None  # gzip | zstd (pyarrow's names)

    @property
    def splittable(self) -> bool:
        """Whether shards may be byte ranges of the file (plain text only)."""
        return self.kind == "text" and self.compression is None


_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_JSON_LINES = (".jsonl", ".json", ".ndjson")


def file_format(path: str) -> FileFormat:
    """The format a file's name says (a URI's query part aside)."""
    name = os.fspath(path).partition("?")[0].lower()
    if name.endswith(".parquet"):
        return FileFormat("parquet")
    stem, ext = os.path.splitext(name)
    compression = _COMPRESSIONS.get(ext)
    if compression:
        name = stem
    return FileFormat("jsonl" if name.endswith(_JSON_LINES) else "text", compression)


def not_utf8(path: str, byte_offset: int, role: str) -> DataError:
    return DataError(
        f"The {role} {path!r} is not valid UTF-8 (first bad byte at offset {byte_offset})",
        "Convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`",
    )


def read_shard_lines(shard: TextShard) -> list[str]:
    """The shard's documents: non-blank lines of plain text (without line endings, strict UTF-8), or records' texts.

    A line belongs to the shard in which its first byte lies, so consecutive shards of a file cover
    every line exactly once.
    """
    form = file_format(shard.path)
    if not form.splittable:
        return read_documents(shard.path, form, shard.text_column)
    fs, fs_path = storage.filesystem(shard.path)
    with fs.open_input_file(fs_path) as f:
        begin = shard.start
        if begin > 0:
            # A line starting exactly at `start` belongs here only if the byte before ends a line.
            begin = _next_line_start(f, shard.start - 1)
        if begin >= shard.end:
            return []
        end = _next_line_start(f, shard.end - 1) if shard.end < f.size() else f.size()
        data = f.read_at(end - begin, begin)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(shard.path, begin + err.start, "text file") from None
    return [line for line in text.splitlines() if line.strip()]


def _next_line_start(f, position: int) -> int:
    """Offset just after the first newline at or after `position` (or the file size)."""
    size = f.size()
    while position < size:
        chunk = f.read_at(min(READ_CHUNK_BYTES, size - position), position)
        newline = chunk.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(chunk)
    return size


def read_documents(path: str, form: FileFormat, text_column: str, head_bytes: Optional[int] = None) -> list[str]:
    """The non-blank documents of a whole compressed, JSON Lines or Parquet file (of its first `head_bytes` of text,
    when given)."""
    fs, fs_path = storage.filesystem(path)
    if form.kind == "parquet":
        return [
            text for text in _parquet_texts(fs, fs_path, path, text_column, head=head_bytes is not None) if text.strip()
        ]
    try:
        with fs.open_input_stream(fs_path, compression=form.compression) as f:
            data = f.read(head_bytes) if head_bytes else f.read()
    except (OSError, pa.ArrowInvalid) as err:
        raise _unreadable_text(path, form, err) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if head_bytes is None or err.start < len(data) - 4:  # a head may end inside a character
            raise not_utf8(path, err.start, "text file") from None
        text = data[: err.start].decode("utf-8")
    lines = text.splitlines()
    if head_bytes and len(data) == head_bytes:
        lines = lines[:-1]  # the head's last line may be cut
    if form.kind == "text":
        return [line for line in lines if line.strip()]
    records = (_record_text(line, number, path, text_column) for number, line in enumerate(lines, 1) if line.strip())
    return [text for text in records if text.strip()]


def _unreadable_text(path: str, form: FileFormat, err: Exception) -> DataError:
    return DataError(
        f"The text file {path!r} could not be read as {form.compression or 'plain'} data ({err})",
        "Check that the file is whole and that its name's extension (.gz, .zst) says how it is compressed",
    )


def _record_text(line: str, number: int, path: str, text_column: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"Line {number} of the JSON Lines file {path!r} is not JSON ({err.msg})", "Write one JSON object per line"
        ) from None
    if not isinstance(record, dict) or text_column not in record:
        found = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"Record {number} of {path!r} has no text_column {text_column!r} (it has: {found or 'nothing'})",
            "Set text_column to the field that holds the text",
        )
    value = record[text_column]
    if not isinstance(value, str):
        raise DataError(
            f"The text_column {text_column!r} of record {number} of {path!r} is a {type(value).__name__}, not a string",
            "Set text_column to a field of strings",
        )
    return value


def _parquet_texts(fs: pafs.FileSystem, fs_path: str, path: str, text_column: str, head: bool = False) -> list[str]:
    """The text column of a Parquet file (of its first row group only, with `head`)."""
    parquet = _open_parquet(fs, fs_path, path, text_column)
    try:
        table = (
            parquet.read_row_group(0, columns=[text_column])
            if head and parquet.num_row_groups
            else parquet.read(columns=[text_column])
        )
    except (OSError, pa.ArrowException) as err:
        raise _unreadable_parquet(path, err) from None
    return [text for text in table.column(text_column).to_pylist() if text is not None]


def _open_parquet(fs: pafs.FileSystem, fs_path: str, path: str, text_column: str) -> pq.ParquetFile:
    """A Parquet file whose text_column holds strings."""
    try:
        parquet = pq.ParquetFile(fs.open_input_file(fs_path))
        schema = parquet.schema_arrow
    except (OSError, pa.ArrowException) as err:
        raise _unreadable_parquet(path, err) from None
    if text_column not in schema.names:
        raise DataError(
            f"The Parquet file {path!r} has no text_column {text_column!r} (its columns: {', '.join(schema.names)})",
            "Set text_column to the column that holds the text",
        )
    column_type = schema.field(text_column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(
            f"The text_column {text_column!r} of {path!r} holds {column_type}, not strings",
            "Set text_column to a column of strings",
        )
    return parquet


def _unreadable_parquet(path: str, err: Exception) -> DataError:
    return DataError(f"The Parquet file {path!r} could not be read ({err})", "Check that the file is whole Parquet")


def stream_documents(path: str, form: FileFormat, text_column: str) -> Iterator[str]:
    """The non-blank documents of a whole compressed, JSON Lines or Parquet file, read only as far as they are
    consumed."""
    fs, fs_path = storage.filesystem(path)
    if form.kind == "parquet":
        parquet = _open_parquet(fs, fs_path, path, text_column)
        # Small batches: a row group can hold hundreds of MB, far more than a sample's piece.
        try:
            for batch in parquet.iter_batches(batch_size=256, columns=[text_column]):
                yield from (text for text in batch.column(0).to_pylist() if text is not None and text.strip())
        except (OSError, pa.ArrowException) as err:
            raise _unreadable_parquet(path, err) from None
        return
    for number, line in enumerate(_stream_lines(fs, fs_path, path, form), 1):
        if not line.strip():
            continue
        text = line if form.kind == "text" else _record_text(line, number, path, text_column)
        if text.strip():
            yield text


def _stream_lines(fs: pafs.FileSystem, fs_path: str, path: str, form: FileFormat) -> Iterator[str]:
    """The lines of a (decompressed) file, strict UTF-8, one read chunk at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, pending = 0, ""
    try:
        with fs.open_input_stream(fs_path, compression=form.compression) as f:
            while True:
                chunk = f.read(READ_CHUNK_BYTES)
                try:
                    text = pending + decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    raise not_utf8(path, offset + err.start, "text file") from None
                offset += len(chunk)
                lines = text.splitlines(keepends=True)
                # The last line may go on in the next chunk (a "\r" may be the first half of "\r\n").
                pending = lines.pop() if chunk and lines and not lines[-1].endswith("\n") else ""
                yield from ((line.splitlines() or [""])[0] for line in lines)
                if not chunk:
                    return
    except (OSError, pa.ArrowInvalid) as err:
        raise _unreadable_text(path, form, err) from None
