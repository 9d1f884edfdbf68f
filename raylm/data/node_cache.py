"""A node-local cache of what the ranks of a node read from object storage: name -> bytes, fetched once per node.

The ranks of a node read many of the same blocks (the same Parquet row groups of a remote store) at
about the same time. A rank that misses a block takes the block's lock (`flock` on `<name>.lock`),
looks again, and only then fetches it, writes it beside its final name and renames it there, so
- the other ranks wait on the lock and then read the file the first one wrote: one GET per node;
- a reader never sees part of a file: a name appears whole (a rename), and a file removed while it
  is being read stays readable to whoever opened it.
A rank that dies holding a lock drops it with its process (the kernel releases it).

Bounded: the published files of all the caches under one root total at most `max_bytes`. A ledger
(`<root>/.bytes`, changed under `<root>/.lock`) counts what is published; past the bound the least
recently used files (by modification time, refreshed on each read) go until a quarter of the bound
is free, so the scan of the folder is seldom. Files being written are not counted: at most one block
per fetch in flight. The cache is a help, not a need: a block it cannot write (a full disk) is read
on without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from typing import Callable, Iterator

NODE_CACHE_BYTES = 4 * 2**30
LEDGER, ROOT_LOCK = ".bytes", ".lock"
LOCK_SUFFIX, PARTIAL_SUFFIX = ".lock", ".partial"
# A partial file this old was left by a process that died writing it.
STALE_PARTIAL_SECONDS = 600


def default_node_cache_root() -> str:
    """This user's cache root in the machine's temp dir (node-local, unlike a shared mount)."""
    return os.path.join(tempfile.gettempdir(), f"raylm-node-cache-{os.getuid()}")


class NodeCache:
    """Files named by the caller under `root`, shared by the processes of this node, `max_bytes` at most in all."""

    def __init__(self, root: str, max_bytes: int = NODE_CACHE_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes is {max_bytes}: a node cache holds at least one byte; use no cache instead")
        self.root, self.max_bytes = root, max_bytes
        os.makedirs(root, exist_ok=True)

    def read(self, name: str, fetch: Callable[[], bytes]) -> bytes:
        """The bytes cached as `name` (a relative path, "/"-separated), fetched and cached by one process of the
        node when missing."""
        path = os.path.join(self.root, *name.split("/"))
        found = self._read_file(path)
        if found is not None:
            return found
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _locked(path + LOCK_SUFFIX, remove=True):
            found = self._read_file(path)  # another process may have fetched it while this one waited
            if found is not None:
                return found
            data = fetch()
            self._publish(path, data)
        return data

    @staticmethod
    def _read_file(path: str):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # recently used: evicted last
        return data

    def _publish(self, path: str, data: bytes) -> None:
        partial = None
        try:
            descriptor, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=PARTIAL_SUFFIX)
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
            os.replace(partial, path)
        except OSError:  # a full or read-only disk: the block is read on without the cache
            if partial is not None:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
            return
        self._count(len(data))

    def _count(self, added: int) -> None:
        with _locked(os.path.join(self.root, ROOT_LOCK)):
            ledger = os.path.join(self.root, LEDGER)
            try:
                with open(ledger, encoding="utf-8") as f:
                    total = int(f.read()) + added
            except (FileNotFoundError, ValueError):
                total = self.max_bytes + 1  # no ledger yet, or a torn one: count the folder
            if total > self.max_bytes:
                total = self._evict(self.max_bytes * 3 // 4)
            with open(ledger, "w", encoding="utf-8") as f:
                f.write(str(total))

    def _evict(self, target_bytes: int) -> int:
        """Remove the least recently used files until the rest hold at most `target_bytes`; returns what is left."""
        files = []
        now = time.time()
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    info = os.stat(path)
                    if name.endswith(PARTIAL_SUFFIX):
                        if now - info.st_mtime > STALE_PARTIAL_SECONDS:
                            os.unlink(path)
                    elif not name.endswith(LOCK_SUFFIX) and folder != self.root:
                        files.append((info.st_mtime, info.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= target_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
        return total

    def bytes_held(self) -> int:
        """What the published files under the root weigh now."""
        return sum(
            os.path.getsize(os.path.join(folder, name))
            for folder, _, names in os.walk(self.root)
            if folder != self.root
            for name in names
            if not name.endswith((LOCK_SUFFIX, PARTIAL_SUFFIX))
        )


@contextlib.contextmanager
def _locked(path: str, remove: bool = False) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing); remove=True deletes the lock file before letting go.

    A process that opened the file before it was removed still gets the lock; it then finds the
    published file, which is why `read` looks again after taking the lock.
    """
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(descriptor)
