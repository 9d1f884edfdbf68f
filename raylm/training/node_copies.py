"""Node copies: a checkpoint in object storage -> one local copy on each node, shared by the ranks that resume from it.

Each rank downloading its own copy costs a node as many downloads as it has ranks (an 8-GPU node resuming a 7B
model: 8 x ~84 GB into /tmp). The copy is `<temp dir>/raylm-resumed-checkpoints-<uid>/<key>`, the key a hash of
the checkpoint's location and of its files' names, sizes and modification times (to the second on S3), so a
checkpoint republished under the same name is another copy, never a stale one.

- Filled once. A rank that finds no copy takes the key's lock exclusively (fcntl.flock on `<key>.lock`),
  downloads into `<key>.partial-<pid>` and renames that to `<key>` when it is complete; the ranks waiting on the
  lock then find the copy. A rank killed mid-download (its worker group restarting) leaves its partial folder,
  which the next filler deletes, and the kernel frees its lock. Nothing is ever written into a published copy:
  Ray's `Checkpoint.as_directory` downloads again over files that another process still reads, and a
  restarted worker group read a truncated model.safetensors that way.
- Read under a shared lock on the key, which keeps it from being deleted meanwhile.
- Kept after use, for the ranks of the node that come to it later, until a reader of another checkpoint on the
  node finds it unused (its exclusive lock granted at once) and deletes it: a node keeps about one unused copy,
  the one resumed last.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import stat
import tempfile
from typing import Iterator, Optional

COPIES_FOLDER = "raylm-resumed-checkpoints"
LOCK_SUFFIX = ".lock"
PARTIAL_INFIX = ".partial-"


@contextlib.contextmanager
def shared_copy(checkpoint) -> Iterator[str]:
    """The folder of this node's copy of a Ray checkpoint in object storage, downloaded by the first rank to need it."""
    root = copies_root()
    if root is None:
        with tempfile.TemporaryDirectory(prefix="raylm-checkpoint-") as folder:
            yield checkpoint.to_directory(folder)
        return
    key = copy_key(checkpoint)
    copy, lock_path = os.path.join(root, key), os.path.join(root, key + LOCK_SUFFIX)
    while True:
        reading = _lock(lock_path, fcntl.LOCK_SH)
        try:
            if os.path.isdir(copy):
                yield copy
                _delete_unused(root, keep=key)
                return
        finally:
            os.close(reading)
        filling = _lock(lock_path, fcntl.LOCK_EX)
        try:
            if not os.path.isdir(copy):
                _fill(checkpoint, root, key)
        finally:
            os.close(filling)


def copies_root() -> Optional[str]:
    """This user's folder of node copies; None when the name is taken by something else (another user's folder or a
    link), where a private download is the safe way."""
    root = os.path.join(tempfile.gettempdir(), f"{COPIES_FOLDER}-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    found = os.lstat(root)
    return root if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid() else None


def copy_key(checkpoint) -> str:
    """What names a checkpoint's copy: its filesystem, its path, and each file's path, size and modification time."""
    import pyarrow.fs

    files = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(checkpoint.path, recursive=True))
    listing = sorted((f.path, f.size, f.mtime_ns) for f in files if f.type == pyarrow.fs.FileType.File)
    identity = json.dumps([checkpoint.filesystem.type_name, checkpoint.path, listing])
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def _lock(path: str, operation: int) -> int:
    """A descriptor of the lock file `path` holding `operation` (flock's), on the file that has that name now.

    A file deleted (by _delete_unused) while this process waited for it is locked in vain: open it again.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(descriptor, operation)
        if _is_named(descriptor, path):
            return descriptor
        os.close(descriptor)


def _is_named(descriptor: int, path: str) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _fill(checkpoint, root: str, key: str) -> None:
    """Download the checkpoint into a folder of this process's, then give it the copy's name (under the key's
    exclusive lock)."""
    for leftover in glob.glob(os.path.join(root, key + PARTIAL_INFIX + "*")):
        shutil.rmtree(leftover, ignore_errors=True)  # a filler that died mid-download
    partial = os.path.join(root, f"{key}{PARTIAL_INFIX}{os.getpid()}")
    try:
        checkpoint.to_directory(partial)
        os.rename(partial, os.path.join(root, key))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _delete_unused(root: str, keep: str) -> None:
    """Delete the copies of other checkpoints that no process reads or fills (their lock is free right now)."""
    for name in os.listdir(root):
        key = name[: -len(LOCK_SUFFIX)]
        if not name.endswith(LOCK_SUFFIX) or key == keep:
            continue
        path = os.path.join(root, name)
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_named(descriptor, path):
                for folder in [os.path.join(root, key), *glob.glob(os.path.join(root, key + PARTIAL_INFIX + "*"))]:
                    shutil.rmtree(folder, ignore_errors=True)
                os.unlink(path)
        except BlockingIOError:
            pass  # in use
        finally:
            os.close(descriptor)
