"""Parquet row groups read whole: a file's footer -> each row group's byte range -> its table, decoded from those bytes.

A row group's column chunks lie next to each other in the file, so one ranged read of
[first chunk's start, last chunk's end) brings the whole group: one request to object storage per
block, whatever the number of columns, and bytes that a node-local cache can keep as they are.
A footer is kept as bytes too (the file's tail), and parsed by `footer_metadata`.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

MAGIC = b"PAR1"
# One read gets the footer of a file of 64-row groups (a few hundred bytes per group); pyarrow reads as much.
FOOTER_READ_BYTES = 64 * 1024


def read_footer(file: pa.NativeFile) -> bytes:
    """The file's footer and its 8-byte trailer (length, magic): one ranged read, two for a footer over 64 KiB."""
    size = file.size()
    tail = file.read_at(min(size, FOOTER_READ_BYTES), max(0, size - FOOTER_READ_BYTES))
    if len(tail) < 12 or tail[-4:] != MAGIC:
        raise ValueError(f"not a Parquet file: its last bytes are {tail[-4:]!r}, not {MAGIC!r}")
    length = int.from_bytes(tail[-8:-4], "little") + 8
    if length > len(tail):
        tail = file.read_at(length, size - length)
    return tail[-length:]


def footer_metadata(footer: bytes) -> pq.FileMetaData:
    """The metadata in a footer from `read_footer`: its offsets are those of the whole file."""
    # A file of nothing but its magic and its footer is what the Parquet reader parses a footer from.
    return pq.read_metadata(pa.BufferReader(MAGIC + footer))


def row_group_range(metadata: pq.FileMetaData, group: int) -> tuple[int, int]:
    """[start, stop): the bytes of the file that hold row group `group`, all its column chunks."""
    row_group = metadata.row_group(group)
    starts, stops = [], []
    for index in range(row_group.num_columns):
        chunk = row_group.column(index)
        start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        starts.append(start)
        stops.append(start + chunk.total_compressed_size)
    return min(starts), max(stops)


def decode_row_group(metadata: pq.FileMetaData, group: int, start: int, data: bytes) -> pa.Table:
    """Row group `group` as a table, from `data`: the file's bytes from offset `start` on (its row_group_range)."""
    return pq.ParquetFile(_FileWindow(start, data), metadata=metadata).read_row_group(group)


class _FileWindow(io.RawIOBase):
    """A file of which only [start, start + len(data)) is known: what the Parquet reader reads a row group from.

    A read outside the window fails rather than returning zeros: it would mean the range was wrong.
    """

    def __init__(self, start: int, data: bytes):
        self._start, self._data = start, memoryview(data)
        self._size, self._position = start + len(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence] + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        stop = self._size if size < 0 else min(self._size, self._position + size)
        if self._position < self._start:
            raise ValueError(f"a read at byte {self._position}, before this row group's bytes (from {self._start})")
        data = self._data[self._position - self._start : stop - self._start].tobytes()
        self._position += len(data)
        return data
