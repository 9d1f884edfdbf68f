"""Text sources: a file, a list, a folder, a glob or a remote URI -> checked files -> line-aligned shards.

A shard is a byte range of one file. Shards are deterministic (they depend only on the files and
`shard_size_mb`), so the example ids derived from them are stable across runs, clusters and restarts.
Where a file lives (a local path, or an s3://, gs://, file:// URI, endpoint query included) is
storage.py's business; the file names planned here keep a URI's scheme and query, so readers on
any node reach the same endpoint.
"""

from __future__ import annotations

import codecs
import glob
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import pyarrow.fs as pafs

from raylm import storage
from raylm.errors import DataError

# Local files up to this total are fully checked for UTF-8 on the driver (about 1 s per GB);
# larger corpora are checked by their head here and fully by the readers on the cluster.
_FULL_CHECK_BUDGET_BYTES = 256 * 2**20
_HEAD_BYTES = 1 * 2**20
_READ_CHUNK_BYTES = 1 * 2**20


@dataclass(frozen=True)
class TextShard:
    """Lines whose first byte lies in [start, end) of `path`; `index` is its place among all shards."""

    index: int
    path: str
    start: int
    end: int


def resolve_text_files(spec: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], role: str = "train_file") -> list[str]:
    """Expand a file / folder / glob / URI (or a list of them) into sorted file paths, checking each exists."""
    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        raise DataError(f"No {role} was given", f"Pass {role} as a path, a list of paths, a folder or a glob")
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[str] = []
    for item in specs:
        files.extend(_expand_one(os.fspath(item), role))
    return files


def _expand_one(spec: str, role: str) -> list[str]:
    fs, path = storage.filesystem(spec)
    is_uri = storage.is_uri(spec)
    if any(ch in path for ch in "*?["):
        if not is_uri:
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            pattern = _glob_regex(path)
            matches = sorted(storage.uri_for(spec, i.path) for i in infos if i.type == pafs.FileType.File and pattern.fullmatch(i.path))
        if not matches:
            raise DataError(f"The {role} pattern {spec!r} matches no files", "Check the pattern and the folder it points to")
        return matches
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"The {role} {spec!r} does not exist", "Check the path (relative paths are resolved from the current folder: " + os.getcwd() + ")")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(
            storage.uri_for(spec, i.path)
            for i in infos
            if i.type == pafs.FileType.File and not any(part.startswith(".") for part in i.path[len(path):].split("/"))
        )
        if not found:
            raise DataError(f"The {role} folder {spec!r} holds no files", "Put .txt files in it or point to the files themselves")
        return found
    return [spec if is_uri else path]


def _glob_regex(pattern: str) -> "re.Pattern":
    """The local glob's rules for object keys: `*` and `?` stay within a folder, `**/` spans any number of them."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 2) if pattern[i + 1] == "]" else pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


MAX_LINE_BYTES = 2**20


def check_text_files(files: list[str], role: str = "train_file") -> None:
    """Fail early on files that are empty, binary, not UTF-8, or hold only whitespace."""
    budget = _FULL_CHECK_BUDGET_BYTES
    has_text = False
    for path in files:
        fs, fs_path = storage.filesystem(path)
        size = fs.get_file_info(fs_path).size
        if size == 0:
            raise DataError(f"The {role} {path!r} is empty", "Point to a file with text in it, one document or sentence per line")
        limit = size if (not storage.is_remote(path) and size <= budget) else min(size, _HEAD_BYTES)
        budget -= limit if limit == size else 0
        has_text |= _check_head(fs, fs_path, path, limit, role)
    if not has_text:
        named = f"{files[0]!r} holds" if len(files) == 1 else f"files {', '.join(map(repr, files[:3]))}{' and more' if len(files) > 3 else ''} hold"
        raise DataError(f"The {role} {named} only whitespace", "Point to files with text in them")


def _check_head(fs: pafs.FileSystem, fs_path: str, path: str, limit: int, role: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    has_text = False
    open_line = 0  # bytes of the line still open at the end of the previous chunk
    with fs.open_input_file(fs_path) as f:
        while offset < limit:
            chunk = f.read(min(_READ_CHUNK_BYTES, limit - offset))
            if not chunk:
                break
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(f"The {role} {path!r} looks binary (it contains a NUL byte at offset {offset + nul})", "Use plain UTF-8 text files")
            try:
                text = decoder.decode(chunk, final=False)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start, role) from None
            has_text |= bool(text.strip())
            pieces = chunk.split(b"\n")
            longest = max([open_line + len(pieces[0])] + [len(p) for p in pieces[1:]])
            if longest > MAX_LINE_BYTES:
                raise DataError(
                    f"The {role} {path!r} has a line of more than {MAX_LINE_BYTES // 2**20} MB (near byte offset {offset}); raylm reads text line by line, so one line must fit in memory many times over",
                    "Break the text into lines (one document, paragraph or sentence per line)",
                )
            open_line = open_line + len(chunk) if len(pieces) == 1 else len(pieces[-1])
            offset += len(chunk)
    return has_text


def _not_utf8(path: str, byte_offset: int, role: str) -> DataError:
    return DataError(
        f"The {role} {path!r} is not valid UTF-8 (first bad byte at offset {byte_offset})",
        "Convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`",
    )


def plan_shards(files: list[str], shard_size_mb: float) -> list[TextShard]:
    """Cut each file into byte ranges of about shard_size_mb; readers move the cuts to line ends."""
    shard_bytes = max(1, int(shard_size_mb * 2**20))
    shards: list[TextShard] = []
    for path in files:
        fs, fs_path = storage.filesystem(path)
        size = fs.get_file_info(fs_path).size
        for start in range(0, size, shard_bytes):
            shards.append(TextShard(len(shards), path, start, min(size, start + shard_bytes)))
    return shards


def read_shard_lines(shard: TextShard) -> list[str]:
    """The shard's non-blank lines (without line endings), decoded as strict UTF-8.

    A line belongs to the shard in which its first byte lies, so consecutive shards of a file cover
    every line exactly once.
    """
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
        raise _not_utf8(shard.path, begin + err.start, "text file") from None
    return [line for line in text.splitlines() if line.strip()]


def _next_line_start(f, position: int) -> int:
    """Offset just after the first newline at or after `position` (or the file size)."""
    size = f.size()
    while position < size:
        chunk = f.read_at(min(_READ_CHUNK_BYTES, size - position), position)
        newline = chunk.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(chunk)
    return size


def iter_lines(files: list[str]) -> Iterator[str]:
    """Every non-blank line of the files, for tokenizer training (streams; nothing is held whole)."""
    for shard in plan_shards(files, 16.0):
        yield from read_shard_lines(shard)
