"""Crash-safe file-system steps shared by the stores: fsync a directory,
write a small file atomically or as a new private file, put a finished
directory or file in place without replacing anything that is already
there, hold a lock file."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

from .errors import AlreadyExists, StorageError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``final`` for building it; listings skip dot names."""
    return final.with_name(f".{final.name}.{tag}-{secrets.token_hex(4)}")


def _write_synced(fd: int, data) -> None:
    """Write all of ``data`` from the file offset, fsync, close ``fd``."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a whole file under a temporary name, fsync, rename over ``path``."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_synced(fd, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def rename_noreplace(src: Path, dst: Path, what: str) -> None:
    """rename(2) that fails with AlreadyExists instead of replacing ``dst``
    (renameat2 RENAME_NOREPLACE; a check-then-rename where that is missing)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise AlreadyExists(f"{what} already exists")
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise AlreadyExists(f"{what} already exists")
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise AlreadyExists(f"{what} already exists")
        raise


def write_private(path: Path, data) -> None:
    """Create ``path`` (mode 0600, never replacing anything) holding ``data``,
    fsynced: a file as sensitive as what it holds (a header backup, a dumped
    key).  ``data`` may be a view of a locked buffer; it is not copied."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} already exists; refusing to overwrite it")
    except OSError as e:
        raise StorageError(f"cannot create {path}: {e.strerror}")
    _write_synced(fd, data)


@contextlib.contextmanager
def locked_file(path: Path, unusable: Callable[[OSError], Exception]) -> Iterator[None]:
    """Hold an exclusive flock on the lock file ``path`` (created 0600) for
    the ``with`` body.  It orders read-modify-writes of the files beside it
    across processes, and the kernel drops it if its holder dies.
    ``unusable(e)`` is the caller's error for a lock file it cannot open."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise unusable(e)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
