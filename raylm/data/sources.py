"""Text sources: a file, a list, a folder, a glob or a remote URI (or a weighted mixture of them) -> checked files ->
shards -> the documents of all of them, or a sample spread over the corpus (for tokenizer training).

A shard is a byte range of one plain text file, or a whole file of the other formats (documents.py reads each
format). Shards are deterministic (they depend only on the files and `shard_size_mb`), so the example ids derived
from them are stable across runs, clusters and restarts. Where a file lives (a local path, or an s3://, gs://,
file:// URI, endpoint query included) is storage.py's business; the file names planned here keep a URI's scheme and
query, so readers on any node reach the same endpoint.
"""

from __future__ import annotations

import codecs
import glob
import math
import numbers
import os
import re
from typing import Iterable, Iterator, Optional, Union

import pyarrow.fs as pafs

from raylm.data import storage
from raylm.data.documents import (
    READ_CHUNK_BYTES,
    TextShard,
    file_format,
    not_utf8,
    read_documents,
    read_shard_lines,
    stream_documents,
)
from raylm.errors import DataError

# Local files up to this total are fully checked for UTF-8 on the driver (about 1 s per GB);
# larger corpora are checked by their head here and fully by the readers on the cluster.
_FULL_CHECK_BUDGET_BYTES = 256 * 2**20
_HEAD_BYTES = 1 * 2**20


# A mixture's example ids carry their source in the top bits of an int64 (epoch_data.SOURCE_ID_SHIFT).
MAX_MIXTURE_SOURCES = 127


def text_sources(spec, role: str = "train_file") -> tuple[list, Optional[list[float]]]:
    """([each source's spec], its weight, or None): a mapping {source: weight} is a weighted mixture.

    Without weights the whole spec is one source.
    """
    if not isinstance(spec, dict):
        return [spec], None
    if len(spec) < 2:
        raise DataError(
            f"The {role} mixture {spec!r} names {len(spec)} source(s); a mixture needs two or more",
            f"Give {role} as a path, folder or glob for one source, or map two or more to weights",
        )
    if len(spec) > MAX_MIXTURE_SOURCES:
        raise DataError(
            f"The {role} mixture names {len(spec)} sources; a mixture takes at most {MAX_MIXTURE_SOURCES}",
            "Merge sources that share a weight into one (a folder, a glob or a list of files is one source)",
        )
    for source, weight in spec.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not (weight > 0 and math.isfinite(weight))
        ):
            raise DataError(
                f"The {role} mixture gives {source!r} the weight {weight!r}; weights must be positive numbers",
                "Map each source to its share, e.g. {'web/*.parquet': 0.7, 'code.jsonl.gz': 0.3}",
            )
    weights = [float(w) for w in spec.values()]
    if min(weights) / sum(weights) < 1e-4:
        raise DataError(
            f"The {role} mixture gives a source less than 1/10,000 of the draws ({spec!r})",
            "Raise that source's weight or leave it out",
        )
    return list(spec), weights


def resolve_text_files(
    spec: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], role: str = "train_file"
) -> list[str]:
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
            matches = sorted(
                storage.uri_for(spec, i.path)
                for i in infos
                if i.type == pafs.FileType.File and pattern.fullmatch(i.path)
            )
        if not matches:
            raise DataError(
                f"The {role} pattern {spec!r} matches no files", "Check the pattern and the folder it points to"
            )
        return matches
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(
            f"The {role} {spec!r} does not exist",
            "Check the path (relative paths are resolved from the current folder: " + os.getcwd() + ")",
        )
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(
            storage.uri_for(spec, i.path)
            for i in infos
            if i.type == pafs.FileType.File and not any(part.startswith(".") for part in i.path[len(path) :].split("/"))
        )
        if not found:
            raise DataError(
                f"The {role} folder {spec!r} holds no files", "Put .txt files in it or point to the files themselves"
            )
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
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 2) if pattern[i + 1] == "]" else pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


MAX_LINE_BYTES = 2**20


def check_text_files(files: list[str], role: str = "train_file", text_column: str = "text") -> None:
    """Fail early on files that are empty, binary, not UTF-8, or hold only whitespace, and on records without
    text_column."""
    budget = _FULL_CHECK_BUDGET_BYTES
    has_text = False
    for path in files:
        fs, fs_path = storage.filesystem(path)
        size = fs.get_file_info(fs_path).size
        if size == 0:
            raise DataError(
                f"The {role} {path!r} is empty", "Point to a file with text in it, one document or sentence per line"
            )
        form = file_format(path)
        if not form.splittable:
            # The head of the documents (a Parquet file's first row group): the readers find the rest.
            has_text |= bool(read_documents(path, form, text_column, head_bytes=_HEAD_BYTES))
            continue
        limit = size if (not storage.is_remote(path) and size <= budget) else min(size, _HEAD_BYTES)
        budget -= limit if limit == size else 0
        has_text |= _check_head(fs, fs_path, path, limit, role)
    if not has_text:
        named = (
            f"{files[0]!r} holds"
            if len(files) == 1
            else f"files {', '.join(map(repr, files[:3]))}{' and more' if len(files) > 3 else ''} hold"
        )
        raise DataError(f"The {role} {named} only whitespace", "Point to files with text in them")


def _check_head(fs: pafs.FileSystem, fs_path: str, path: str, limit: int, role: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    has_text = False
    open_line = 0  # bytes of the line still open at the end of the previous chunk
    with fs.open_input_file(fs_path) as f:
        while offset < limit:
            chunk = f.read(min(READ_CHUNK_BYTES, limit - offset))
            if not chunk:
                break
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(
                    f"The {role} {path!r} looks binary (it contains a NUL byte at offset {offset + nul})",
                    "Use plain UTF-8 text files",
                )
            try:
                text = decoder.decode(chunk, final=False)
            except UnicodeDecodeError as err:
                raise not_utf8(path, offset + err.start, role) from None
            has_text |= bool(text.strip())
            pieces = chunk.split(b"\n")
            longest = max([open_line + len(pieces[0])] + [len(p) for p in pieces[1:]])
            if longest > MAX_LINE_BYTES:
                raise DataError(
                    f"The {role} {path!r} has a line of more than {MAX_LINE_BYTES // 2**20} MB (near byte offset "
                    f"{offset}); raylm reads text line by line, so one line must fit in memory many times over",
                    "Break the text into lines (one document, paragraph or sentence per line)",
                )
            open_line = open_line + len(chunk) if len(pieces) == 1 else len(pieces[-1])
            offset += len(chunk)
    return has_text


def plan_shards(files: list[str], shard_size_mb: float, text_column: str = "text") -> list[TextShard]:
    """Cut each plain text file into byte ranges of about shard_size_mb (readers move the cuts to line ends); other
    formats are one shard a file."""
    shard_bytes = max(1, int(shard_size_mb * 2**20))
    shards: list[TextShard] = []
    for path in files:
        fs, fs_path = storage.filesystem(path)
        size = fs.get_file_info(fs_path).size
        step = shard_bytes if file_format(path).splittable else max(1, size)
        for start in range(0, size, step):
            shards.append(TextShard(len(shards), path, start, min(size, start + step), text_column))
    return shards


def iter_lines(files: list[str], text_column: str = "text") -> Iterator[str]:
    """Every document of the files, for tokenizer training (streams shard by shard)."""
    for shard in plan_shards(files, 16.0, text_column):
        yield from read_shard_lines(shard)


def spread_order(count: int) -> list[int]:
    """0 .. count-1 ordered so that every prefix is spread evenly over the range: the first, the middle, the
    quarters, the eighths, ... (the van der Corput sequence, scaled to `count`)."""
    if count == 0:
        return []
    bits = max(1, (count - 1).bit_length())
    order, seen = [], set()
    for j in range(2**bits):
        index = (int(f"{j:0{bits}b}"[::-1], 2) * count) >> bits
        if index not in seen:
            seen.add(index)
            order.append(index)
    return order


def sample_shards(shards: list[TextShard], budget_mb: float, shard_size_mb: float) -> list[tuple[TextShard, int]]:
    """About budget_mb of text spread over the whole corpus: (shard, most bytes of text to read from it), in reading
    order.

    Shards are taken in spread_order until their bytes reach the budget, so a corpus sorted by topic or
    date is sampled from its start, middle and end alike. A whole file (compressed, JSON Lines, Parquet)
    may be far larger than a shard; each gives at most max(shard_size_mb, budget_mb / len(shards)), so the
    budget is spread over the files instead of going to the first one. A compressed file's size
    undercounts its text, so the list may hold more than the budget: `read_sample` stops at it.
    """
    budget = math.ceil(budget_mb * 2**20)
    piece = max(math.ceil(shard_size_mb * 2**20), -(-budget // max(1, len(shards))))
    sample, planned = [], 0
    for index in spread_order(len(shards)):
        if planned >= budget:
            break
        shard = shards[index]
        limit = min(piece, budget - planned)
        sample.append((shard, limit))
        planned += min(shard.end - shard.start, limit)
    return sample


def read_sample(sample: list[tuple[TextShard, int]], budget_mb: float) -> Iterator[str]:
    """The documents of `sample_shards`' sample, each shard's up to its limit, all up to budget_mb of text.

    Whole files are streamed and left as soon as their piece is read, so the bytes read stay within the
    budget plus one shard (plus one Parquet row group or read chunk), however large the corpus.
    """
    remaining = math.ceil(budget_mb * 2**20)
    for shard, limit in sample:
        if remaining <= 0:
            return
        form = file_format(shard.path)
        documents = (
            read_shard_lines(shard) if form.splittable else stream_documents(shard.path, form, shard.text_column)
        )
        wanted, taken = min(limit, remaining), 0
        for document in documents:
            yield document
            taken += len(document.encode("utf-8")) + 1  # +1: the line end, as in the file
            if taken >= wanted:
                break
        remaining -= taken


def sample_lines(files: list[str], budget_mb: float, shard_size_mb: float, text_column: str = "text") -> Iterator[str]:
    """About budget_mb of the files' documents, spread over the whole corpus, for tokenizer training."""
    shards = plan_shards(files, shard_size_mb, text_column)
    return read_sample(sample_shards(shards, budget_mb, shard_size_mb), budget_mb)
