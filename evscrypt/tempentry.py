"""Temporary entries in the state directory: made locked, collected when dead.

A volume, snapshot, image or restore is built under a hidden temporary name
and put in place only when complete.  Ctrl-C and SIGTERM remove the entry on
the way out; a ``kill -9`` (or a crash, or a power cut) cannot, and leaves it
behind.  So the builder holds an exclusive ``flock`` on its entry for as long
as it works on it, and the kernel drops that lock when the builder dies,
however it dies.  An entry whose lock can be taken therefore belongs to
nobody: :func:`collect` (``evscrypt gc``, and the daemon when it starts)
removes it, and leaves alone every entry whose lock is held.

Creating an entry and locking it are two steps; a collector may come in
between, find the lock free and remove the entry.  The builder notices (its
path no longer names the inode it locked) and starts over under a new name,
so builders never wait for a collector, nor a collector for a builder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import StorageError
from .fsutil import temp_name
from .paths import TEMP_AREAS

#: What :func:`evscrypt.fsutil.temp_name` makes: ``.NAME.TAG-XXXXXXXX``; the
#: tags used in the state directory are "tmp" (being built) and "deleting"
#: (renamed out of sight, being removed).
TEMP = re.compile(r"\..+\.(?:tmp|deleting)-[0-9a-f]{8}")
#: Volumes were once built as ``.NAME.img.XXXXXXXX.tmp``, unlocked.
LEGACY = re.compile(r"\..+\.img\.[0-9a-f]{8}\.tmp")
#: A collector that wins every race this many times in a row is not a race.
_ATTEMPTS = 16


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _still_ours(path: Path, fd: int) -> bool:
    """Does ``path`` still name the inode open on ``fd``?"""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def create(final: Path, tag: str = "tmp", directory: bool = False, mode: int = 0o600) -> tuple[Path, int]:
    """A new hidden sibling of ``final``, and an fd that holds its lock until
    it is closed: for a file, open read-write on it (build through it); for
    a directory, open on the directory.  Close it only after the entry has
    been renamed into place or removed."""
    final = Path(final)
    for _ in range(_ATTEMPTS):
        tmp = temp_name(final, tag)
        if directory:
            os.mkdir(tmp, mode)
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # collected before we could lock it
        else:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        if _lock(fd) and _still_ours(tmp, fd):
            return tmp, fd
        os.close(fd)  # a collector has it, or had it: the entry is its to remove
    raise StorageError(f"cannot create a temporary entry next to {final}: it keeps being removed")


def release(fd: int) -> None:
    """Give up the lock before closing ``fd``: for a file that has just been
    linked into place, whose name the temporary one is now only a spare of."""
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def held(final: Path, tag: str = "tmp", directory: bool = False, mode: int = 0o600) -> Iterator[tuple[Path, int]]:
    """:func:`create` for a block: the entry stays locked until it ends, so
    the block renames it into place or removes it before any collector may."""
    tmp, fd = create(final, tag, directory, mode)
    try:
        yield tmp, fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_for_removal(path: Path) -> Iterator[int]:
    """Lock the existing entry ``path`` (a directory about to be renamed to
    a "deleting" name and removed), so no collector takes it while we do."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


@dataclass
class Collected:
    removed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # held by a running operation: left alone
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"removed": self.removed, "busy": self.busy, "errors": self.errors}

    def merge(self, other: "Collected") -> "Collected":
        self.removed += other.removed
        self.busy += other.busy
        self.errors += other.errors
        return self


def is_temporary(name: str) -> bool:
    return bool(TEMP.fullmatch(name) or LEGACY.fullmatch(name))


def collect(home: Path) -> Collected:
    """Remove the temporary entries under ``home`` that no running operation
    holds.  Never follows a symlink; reports what it could not remove."""
    out = Collected()
    for area in TEMP_AREAS:
        d = Path(home) / area
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        except OSError as e:
            out.errors.append(f"{d}: {e.strerror}")
            continue
        for name in names:
            if is_temporary(name):
                _collect_one(d / name, out)
    return out


def _collect_one(path: Path, out: Collected) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return  # finished (renamed into place or removed) since the listing
    except OSError as e:
        if e.errno != errno.ELOOP:  # a symlink: we never make those, and never follow one
            out.errors.append(f"{path}: {e.strerror}")
        return
    try:
        if not _lock(fd):
            out.busy.append(str(path))
            return
        if not _still_ours(path, fd):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            out.errors.append(f"{path}: {e.strerror}")
            return
        out.removed.append(str(path))
    finally:
        os.close(fd)
