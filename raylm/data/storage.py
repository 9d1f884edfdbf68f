"""Storage: a path or URI -> where it lives (this machine, or object storage) and one way to list, read, write and
publish it.

Every stage asks this module rather than looking at a path itself. A location is
- a local path, or a `file://` URI (a shared mount is a local path on every node);
- a remote URI: `s3://bucket/key`, `gs://bucket/key`, or any scheme pyarrow knows. The filesystem comes
  from `pyarrow.fs.FileSystem.from_uri`, which reads the standard settings (`AWS_ENDPOINT_URL`,
  `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, ...); a bare `S3FileSystem()`
  would ignore `AWS_ENDPOINT_URL`. A URI may also carry its endpoint in its query part,
  `s3://bucket/key?endpoint_override=127.0.0.1:9000&scheme=http`; `join` and `uri_for` keep that query
  on every path derived from it, so workers on other nodes reach the same endpoint.

Publishing a folder (a model, a checkpoint copy) under its final name: a reader never takes a
half-written folder for a complete one.
- Local: the folder is written in a hidden staging folder beside the destination, then renamed.
- Remote (object storage has no rename): `config.json` is the completion marker and goes last. The old
  `config.json` at the destination is deleted first, then every other file is uploaded, then
  `config.json`. A folder without `config.json` is incomplete, and `download_model` refuses it; a folder
  whose `config.json` changed while it was being downloaded is refused too (a publish overlapped the read).
  A checkpoint is a complete folder that also holds `trainer_state.json`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Optional

import pyarrow.fs as pafs

from raylm.errors import ModelError

COMPLETION_MARKER = "config.json"


def is_uri(path: str) -> bool:
    return "://" in os.fspath(path)


def is_remote(path: str) -> bool:
    """Whether `path` lives off this machine (object storage), so local file functions cannot reach it."""
    return is_uri(path) and not os.fspath(path).startswith("file://")


def local_path(path: str) -> Optional[str]:
    """The path on this machine for a local path or file:// URI; None for a remote URI."""
    path = os.fspath(path)
    if is_remote(path):
        return None
    return filesystem(path)[1] if is_uri(path) else path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or any URI pyarrow knows."""
    path = os.fspath(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *names: str) -> str:
    """`base`/name/..., keeping a URI's query part (its endpoint) at the end."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *names)
    location, _, query = base.partition("?")
    joined = "/".join([location.rstrip("/"), *(name.strip("/") for name in names)])
    return f"{joined}?{query}" if query else joined


def uri_for(spec: str, fs_path: str) -> str:
    """The location of `fs_path` (a path on the filesystem of `spec`) written as `spec` is: scheme and query kept."""
    if not is_uri(spec):
        return fs_path
    scheme = spec[: spec.index("://")]
    query = spec.partition("?")[2]
    return f"{scheme}://{fs_path}" + (f"?{query}" if query else "")


def display(path: str) -> str:
    """How to show a location to the user: an absolute local path, or the URI as given."""
    return path if is_uri(path) else os.path.abspath(path)


def _type(path: str) -> pafs.FileType:
    fs, fs_path = filesystem(path)
    return fs.get_file_info(fs_path).type


def exists(path: str) -> bool:
    return _type(path) != pafs.FileType.NotFound


def isdir(path: str) -> bool:
    return _type(path) == pafs.FileType.Directory


def isfile(path: str) -> bool:
    return _type(path) == pafs.FileType.File


def listdir(path: str) -> list[str]:
    """The names directly inside folder `path` (sorted; [] when it does not exist)."""
    fs, fs_path = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def read_text(path: str) -> str:
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Write a file whole: a reader sees the old file or the new one, never part of one.

    Locally it is written beside the target and renamed over it (its folder is created); on object
    storage one upload replaces an object whole.
    """
    fs, fs_path = filesystem(path)
    if is_remote(path):
        with fs.open_output_stream(fs_path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(fs_path), exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=os.path.dirname(fs_path), prefix=".", suffix=".tmp", delete=False) as f:
        f.write(data)
    os.replace(f.name, fs_path)


def delete(path: str) -> None:
    """Remove a file or a folder with everything in it; nothing happens when it does not exist."""
    fs, fs_path = filesystem(path)
    kind = fs.get_file_info(fs_path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(fs_path)
    elif kind == pafs.FileType.File:
        fs.delete_file(fs_path)


def download(path: str, local_dir: str) -> None:
    """Copy the folder `path` (local or remote) into the local folder `local_dir`."""
    fs, fs_path = filesystem(path)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(
        fs_path, os.path.abspath(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )


def upload(local: str, path: str) -> None:
    """Copy the local file or folder `local` to `path` (a folder is merged into what is there)."""
    fs, fs_path = filesystem(path)
    if os.path.isdir(local):
        for name in sorted(os.listdir(local)):
            upload(os.path.join(local, name), join(path, name))
        return
    if not is_remote(path):
        fs.create_dir(os.path.dirname(fs_path), recursive=True)
    pafs.copy_files(
        os.path.abspath(local), fs_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


@contextlib.contextmanager
def publishing(destination: str, merge: bool = False) -> Iterator[str]:
    """A local staging folder to fill; on leaving the block without an error it is published as `destination`.

    merge=False: `destination` becomes exactly the staged folder (a checkpoint copy, best_model/).
    merge=True: each staged entry replaces the one of its name and the rest of `destination` stays
    (the final model in an output_dir that also holds logs and checkpoints).
    """
    target = local_path(destination)
    if target is not None:
        parent = os.path.dirname(os.path.abspath(target))
        os.makedirs(target if merge else parent, exist_ok=True)
        # Beside the destination, so publishing is a rename on the same filesystem.
        staging = tempfile.mkdtemp(
            dir=target if merge else parent, prefix=f".{os.path.basename(os.path.normpath(target))}.partial-"
        )
    else:
        staging = tempfile.mkdtemp(prefix="raylm-publish-")
    try:
        yield staging
        if target is None:
            _publish_remote(staging, destination, merge)
        elif merge:
            for name in os.listdir(staging):
                source, final = os.path.join(staging, name), os.path.join(target, name)
                if os.path.isdir(source):
                    replace_directory(source, final)
                else:
                    os.replace(source, final)
        else:
            replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_remote(staging: str, destination: str, merge: bool) -> None:
    # The marker goes first and comes back last: in between, readers see an incomplete folder.
    delete(join(destination, COMPLETION_MARKER))
    names = sorted(os.listdir(staging))
    if not merge:
        delete(destination)
    for name in names:
        if name == COMPLETION_MARKER:
            continue
        if merge and os.path.isdir(os.path.join(staging, name)):
            delete(join(destination, name))  # no stale files of an older model in a subfolder
        upload(os.path.join(staging, name), join(destination, name))
    if COMPLETION_MARKER in names:
        upload(os.path.join(staging, COMPLETION_MARKER), join(destination, COMPLETION_MARKER))


def replace_directory(source: str, destination: str) -> None:
    """Move the local folder `source` to `destination`, replacing an older folder of that name only once the new one
    is in place."""
    if os.path.isdir(destination):
        retired = tempfile.mkdtemp(
            dir=os.path.dirname(os.path.abspath(destination)), prefix=f".{os.path.basename(destination)}.old-"
        )
        os.replace(destination, os.path.join(retired, "old"))
        os.replace(source, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(source, destination)


def is_complete(path: str) -> bool:
    """Whether the model folder `path` was published whole (it has its completion marker)."""
    return isfile(join(path, COMPLETION_MARKER))


def download_model(uri: str, local_dir: str, field_name: str) -> None:
    """Copy the model or checkpoint folder at a remote `uri` into `local_dir`; ModelError when it is incomplete."""
    fs, fs_path = filesystem(uri)
    marker = fs.get_file_info(f"{fs_path}/{COMPLETION_MARKER}")
    if marker.type != pafs.FileType.File:
        kind = (
            "does not exist"
            if fs.get_file_info(fs_path).type == pafs.FileType.NotFound
            else f"has no {COMPLETION_MARKER}, so it is not a complete model folder (it may still be being written)"
        )
        raise ModelError(
            f"The {field_name} {uri!r} {kind}",
            "Point it to a model or checkpoint folder that raylm or save_pretrained finished writing, "
            "or wait until the run that writes it has published it",
        )
    download(uri, local_dir)
    after = fs.get_file_info(f"{fs_path}/{COMPLETION_MARKER}")
    if (after.type, after.size, after.mtime) != (marker.type, marker.size, marker.mtime):
        raise ModelError(
            f"The {field_name} {uri!r} was rewritten while it was being downloaded",
            "Load it again once the run that writes it has published it",
        )


class OutputFolder:
    """A run's output_dir as the driver writes it.

    `local` is a folder on this machine that the stages write into as before: output_dir itself when it
    is local, otherwise a private working folder that `sync` copies to the remote output_dir.
    """

    def __init__(self, target: str):
        self.target = os.fspath(target)
        local = local_path(self.target)
        self.is_remote = local is None
        self.local = local if local is not None else tempfile.mkdtemp(prefix="raylm-output-")

    def fetch(self, *names: str) -> None:
        """Bring files that an earlier run left in a remote output_dir into the working folder (a resumed run
        continues its logs)."""
        if not self.is_remote:
            return
        for name in names:
            if isfile(join(self.target, name)):
                fs, fs_path = filesystem(join(self.target, name))
                pafs.copy_files(
                    fs_path,
                    os.path.join(self.local, name),
                    source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem(),
                )

    def sync(self) -> None:
        """Copy what the working folder holds (logs, TensorBoard events, pictures) to the remote output_dir."""
        if self.is_remote and os.path.isdir(self.local):
            upload(self.local, self.target)

    def close(self) -> None:
        if self.is_remote:
            shutil.rmtree(self.local, ignore_errors=True)
