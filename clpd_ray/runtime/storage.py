"""One storage layer for everything a run reads or writes: local paths, shared filesystems, S3.

Locations are plain strings: an absolute local path (``/mnt/shared/runs/a``) or an ``s3://bucket/
prefix`` URI. Both go through ``pyarrow.fs`` (as Ray Train's storage does), so the run directory,
checkpoints and uploaded models work the same on a laptop, an NFS mount or any S3-compatible store.

S3 settings come from the standard AWS environment variables, read when a filesystem is first
needed in a process (the driver and every actor):

    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN)   credentials (AWS SDK chain)
    AWS_DEFAULT_REGION (or AWS_REGION)                                 region
    AWS_ENDPOINT_URL                                                   any S3-compatible server,
                                                                       http:// allowed (MinIO, moto)

Writes are atomic per file: a local file is written to a temporary name, flushed and renamed;
an S3 object appears whole when its upload completes. There is no append on S3, so callers that
grow a file (``RunDir``'s jsonl rows) rewrite it whole.

Every failure is a :class:`StorageError` naming the location, the cause and the fix (a full disk,
a read-only filesystem, a denied permission, an unreachable bucket), and a failed write leaves
nothing half-written: the temporary file is removed, a failed append is cut back to where it
started, a partly uploaded file is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import shutil
import tempfile
import threading
from pathlib import Path

import pyarrow.fs as pafs

from clpd_ray.errors import StorageError

__all__ = [
    "append_text",
    "delete_tree",
    "download_dir",
    "exists",
    "file_sizes",
    "is_s3",
    "join",
    "list_dir",
    "make_dir",
    "read_bytes",
    "read_text",
    "resolve",
    "storage_error",
    "upload_dir",
    "write_bytes",
    "write_text",
]

_S3 = "s3://"


def is_s3(location: str | Path) -> bool:
    return str(location).startswith(_S3)


def resolve(location: str | Path) -> str:
    """The canonical form of a location given by a user: ``s3://bucket/prefix`` without a
    trailing slash, or an absolute local path (relative ones are made absolute on the caller's
    machine, the driver, so that actors on other nodes never see a relative path)."""
    text = str(location).strip()
    if is_s3(text):
        bucket, _, key = text[len(_S3) :].partition("/")
        if not bucket or "?" in text:
            raise StorageError(
                f"{location!r} is not a usable S3 URI; write s3://BUCKET/PREFIX (endpoint and "
                "credentials come from the AWS_* environment variables)"
            )
        return _S3 + posixpath.normpath(f"{bucket}/{key}").strip("/")
    if "://" in text:
        raise StorageError(
            f"{location!r}: unsupported storage scheme {text.split('://')[0]!r}; use a local "
            "path (shared by all nodes on a multi-node cluster) or an s3://bucket/prefix URI"
        )
    return str(Path(text).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or an S3 URI."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


@functools.lru_cache(maxsize=8)
def _s3_fs(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint,  # with its scheme: http:// works for local servers
        connect_timeout=5,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path within it."""
    if is_s3(location):
        env = os.environ
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        return _s3_fs(env.get("AWS_ENDPOINT_URL") or None, region), location[len(_S3) :]
    return pafs.LocalFileSystem(), location


# What to do about a local OSError, by errno (anything else: check the path and permissions).
_LOCAL_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or choose a location on another disk",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another location",
    errno.EROFS: "the filesystem is read-only: choose a writable location (or remount it rw)",
    errno.EACCES: "permission denied: make it writable for this user or choose another location",
    errno.EPERM: "permission denied: make it writable for this user or choose another location",
}


def storage_error(what: str, location: str, err: Exception) -> StorageError:
    """The :class:`StorageError` for ``err`` raised while trying to ``what`` ``location``."""
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if is_s3(location):
        fix = "check the bucket name, AWS_ENDPOINT_URL and the AWS credentials"
    else:
        code = getattr(err, "errno", None)
        fix = _LOCAL_FIXES.get(code, "check the path and its permissions")  # type: ignore[arg-type]
    return StorageError(f"cannot {what} {location}: {why}; {fix}")


def _remove_quietly(path: Path) -> None:
    """Remove a local file a failed write left (nothing to do if it is absent or cannot go)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _info(location: str) -> pafs.FileInfo:
    fs, path = _fs(location)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise storage_error("reach", location, err) from None


def exists(location: str) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return _info(location).type == pafs.FileType.File


def check_bucket(location: str) -> None:
    """Raise :class:`StorageError` unless the bucket of an S3 location exists and answers
    (a local location needs nothing: its parents are created on first write)."""
    if not is_s3(location):
        return
    bucket = location[len(_S3) :].split("/")[0]
    if _info(_S3 + bucket).type == pafs.FileType.NotFound:
        raise StorageError(
            f"{location}: bucket {bucket!r} does not exist at "
            f"{os.environ.get('AWS_ENDPOINT_URL') or 'AWS S3'}; create it, or fix the URI / "
            "AWS_ENDPOINT_URL"
        )


def read_bytes(location: str) -> bytes:
    fs, path = _fs(location)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except (OSError, FileNotFoundError) as err:
        raise storage_error("read", location, err) from None


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` as a whole: readers see the old content or the new, never a part.

    Concurrent writers of one location (two runs of an ablation writing the same target-store
    part) each write a temporary file of their own; the last rename wins, whole."""
    if not is_s3(location):
        path = Path(location)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            _remove_quietly(tmp)
            raise storage_error("write", location, err) from None
        return
    fs, path_in = _fs(location)
    try:
        with fs.open_output_stream(path_in) as f:
            f.write(data)
    except OSError as err:
        raise storage_error("write", location, err) from None


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def append_text(location: str, text: str) -> None:
    """Append ``text`` to the local file ``location`` (created if absent); a failed append is cut
    back to the file's previous length, so no partial line is left. S3 has no append: callers
    rewrite the object whole with :func:`write_text`."""
    assert not is_s3(location), "append_text is for local files"
    path = Path(location)
    start = path.stat().st_size if path.is_file() else 0
    try:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
    except OSError as err:
        with contextlib.suppress(OSError):
            os.truncate(path, start)
        raise storage_error("append to", location, err) from None


def make_dir(location: str) -> None:
    """Create a local directory and its parents (nothing to do on S3, where prefixes are
    implicit)."""
    if is_s3(location):
        return
    try:
        Path(location).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error("create", location, err) from None


def list_dir(location: str) -> list[str]:
    """Names of the direct children of a directory (empty if it does not exist), sorted."""
    fs, path = _fs(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise storage_error("list", location, err) from None
    return sorted(i.base_name for i in infos)


def file_sizes(location: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under a directory (empty if it does not exist)."""
    fs, path = _fs(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise storage_error("list", location, err) from None
    base = path.rstrip("/") + "/"
    return {
        i.path[len(base) :]: int(i.size)
        for i in infos
        if i.type == pafs.FileType.File and i.path.startswith(base)
    }


def delete_tree(location: str) -> None:
    """Remove a directory and everything under it (nothing to do if it is absent)."""
    if not is_s3(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _fs(location)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError as err:
        raise storage_error("delete", location, err) from None


def delete_file(location: str) -> None:
    fs, path = _fs(location)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as err:
        raise storage_error("delete", location, err) from None


def upload_dir(local_dir: str | Path, location: str, *, last: tuple[str, ...] = ()) -> None:
    """Copy every file under ``local_dir`` to ``location``; the files named in ``last`` are
    copied after all the others (a marker written last says the rest is complete)."""
    files = sorted(
        p.relative_to(local_dir).as_posix() for p in Path(local_dir).rglob("*") if p.is_file()
    )
    fs, path = _fs(location)
    for name in sorted(files, key=lambda n: n in last):
        dest = join(location, name)
        try:
            if not is_s3(location):  # a local filesystem needs the parent directories
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                str(Path(local_dir, name)),
                f"{path}/{name}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
        except OSError as err:
            if not is_s3(location):
                _remove_quietly(Path(dest))  # a partly copied file (S3: the upload never lands)
            raise storage_error("upload to", dest, err) from None


def download_dir(location: str, local_dir: str | Path) -> Path:
    """Copy every file under ``location`` into ``local_dir`` (created); returns ``local_dir``."""
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    sizes = file_sizes(location)
    if not sizes:
        raise StorageError(f"{location} is empty or missing; nothing to download")
    fs, path = _fs(location)
    for name in sizes:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            pafs.copy_files(
                f"{path}/{name}",
                str(local / name),
                source_filesystem=fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except OSError as err:
            raise storage_error("download", join(location, name), err) from None
    return local


def local_temp_dir(prefix: str) -> Path:
    """A fresh node-local temporary directory (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
