"""The backing-store interface: what evscrypt needs from the place that keeps
its volume images, and nothing more.

Two implementations, one module each: :mod:`.local` (files in a directory,
today's store) and :mod:`.rbd` (images in a Ceph RBD pool).  Like
cryptsetup's crypto_backend.h, the interface is narrow, so that the rest of
evscrypt never knows which one is in use.  A held lock, and a refused
break of a live holder's lock, are both Busy (exit 6), with a message that
names the holder.  An image holds exactly the
evscrypt format (header copies at the start, data area after them) in
either store; the store only moves bytes.

Vendor errors (OSError, rados.Error, rbd.Error) are converted to the
evscrypt error tree inside the implementations.  docs/STORE.md describes the
interface and how each operation maps onto files and onto RBD.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, NamedTuple, TypeVar

from ..errors import Busy, EvscryptError
from ..names import check_name
from ..tempentry import Collected

#: A temporary image's name: hidden (a leading dot, so listings skip it)
#: and made from a valid name, so it can never collide with one.
_TEMP = re.compile(r"\.(?P<name>[^/]+)\.tmp-[0-9a-f]{8}")


#: A temporary image that no client has open and that was neither made nor
#: written for this long (seconds) is a killed build's: a build keeps its
#: image open while it fills it and renames it moments after its last write.
STALE_TEMP_AGE = 3600


def is_temp_name(name: str) -> bool:
    return bool(_TEMP.fullmatch(name))


def temp_name(name: str) -> str:
    """A hidden name to build image ``name`` under before :meth:`BackingStore.rename`."""
    return f".{check_name(name)}.tmp-{secrets.token_hex(4)}"


#: The image of a snapshot or an image (evscrypt's copies) in a store that
#: keeps them (a shared one): hidden, and with a "=" that no evscrypt name
#: has, so it can never collide with a volume or a temporary name.
_COPY = re.compile(r"\.(?:snapshot|image)=(?P<name>[^/]+)")


def copy_image_name(kind: str, name: str) -> str:
    """The store image that holds snapshot or image (``kind``) ``name``."""
    return f".{kind}={check_name(name, kind)}"


def check_image_name(name: str) -> str:
    """An evscrypt name (names.check_name), a :func:`temp_name` or a :func:`copy_image_name`."""
    m = (_TEMP.fullmatch(name) or _COPY.fullmatch(name)) if isinstance(name, str) else None
    check_name(m.group("name") if m else name)
    return name


@dataclass(frozen=True)
class Holder:
    """Who holds an image's attach lock.

    ``owner`` identifies the holder to the store (a pid locally, the RADOS
    client address on RBD) and is what :meth:`BackingStore.break_lock`
    takes, so a lock is only ever broken for the holder that was looked at.
    ``description`` is what the holder said about itself when it locked (host,
    pid, time); it is for messages only.
    """

    owner: str
    description: str

    def __str__(self) -> str:
        return f"{self.owner} ({self.description})" if self.description else self.owner


def holder_description() -> str:
    """What a holder says about itself in :meth:`Image.lock`: host, pid, since when."""
    return f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


class Pending(abc.ABC):
    """An I/O in flight (:meth:`Image.aio_read` / :meth:`Image.aio_write`)."""

    @abc.abstractmethod
    def wait(self):
        """Block until done; return the data of a read (bytes), None for a
        write; raise the evscrypt error of a failure."""


class Done(Pending):
    """A Pending that completed when it was made (the local store's I/O)."""

    def __init__(self, result=None):
        self._result = result

    def wait(self):
        return self._result


T = TypeVar("T")
#: What an asynchronous I/O calls when it has finished: (data, error).
Completion = Callable[[object, "EvscryptError | None"], None]


def _at_once(io: Callable[[], object], done: Completion | None) -> Pending:
    """An "asynchronous" I/O done at once: ``io()``'s result as a finished
    Pending, and to ``done`` if given (which then gets a failure too)."""
    try:
        result = io()
    except EvscryptError as e:
        if done is None:
            raise
        done(None, e)
        return Done()
    if done is not None:
        done(result, None)
    return Done(result)


class Image(abc.ABC):
    """One open backing image.  I/O methods may be called from many threads
    at once; open/close/lock from one."""

    name: str

    @property
    def handle(self):
        """What evscrypt.image.backing does I/O on: a file descriptor where
        the store has one (its fast path: plain system calls), else this
        image itself."""
        return self

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    # -- who owns it, what it holds ---------------------------------------------
    @abc.abstractmethod
    def owner(self) -> int:
        """The uid the image belongs to (a non-root user may attach only their own)."""

    @abc.abstractmethod
    def set_owner(self, uid: int) -> None: ...

    def allocated(self) -> int:
        """Bytes the store holds for the image (the rest are holes)."""
        return sum(n for _, n in self.data_extents(0, self.size()))

    # -- data ------------------------------------------------------------------
    @abc.abstractmethod
    def size(self) -> int:
        """The image's length in bytes (header area plus data area)."""

    @abc.abstractmethod
    def pread_into(self, buf, offset: int) -> None:
        """Fill ``buf`` from ``offset``; bytes past the end read as zeros."""

    @abc.abstractmethod
    def pwrite(self, data, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (within :meth:`size`)."""

    def aio_read(self, offset: int, length: int, done: Completion | None = None) -> Pending:
        """Start a read; the store may run it in the background.  ``done(data,
        error)``, if given, runs once it has finished, in whichever thread the
        store completes it (here: at once, in this one); ``error`` is the
        evscrypt error of a failure, else None."""
        def read() -> bytes:
            buf = bytearray(length)
            self.pread_into(buf, offset)
            return bytes(buf)
        return _at_once(read, done)

    def aio_write(self, data, offset: int, done: Completion | None = None) -> Pending:
        """Start a write; ``data`` must not change until it has finished.
        ``done(None, error)`` as for :meth:`aio_read`."""
        return _at_once(lambda: self.pwrite(data, offset), done)

    @abc.abstractmethod
    def data_extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of the regions of [start, end) that may hold data;
        the rest reads as zeros.  For copies and backups that skip holes."""

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it then reads as zeros."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable (fsync)."""

    @abc.abstractmethod
    def resize(self, size: int) -> None:
        """Set the image's length; new bytes read as zeros."""

    # -- the attach lock -------------------------------------------------------
    @abc.abstractmethod
    def lock(self, description: str) -> None:
        """Take the exclusive attach lock, or raise Busy naming the holder.
        The image must be open for writing; taking it again is a no-op.

        It conflicts with every other open of the image, in this process,
        another process or another host, and is released by :meth:`unlock`,
        :meth:`close`, or the holder's death (locally at once; on RBD only
        by :meth:`BackingStore.break_lock`, which fences the dead holder)."""

    @abc.abstractmethod
    def unlock(self) -> None:
        """Release the attach lock (nothing if not held)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the lock if held and close; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CatalogView(NamedTuple):
    """The catalog's entries as read, and the version that :meth:`Catalog.commit` checks."""

    entries: dict[str, bytes]
    version: int


class Catalog(abc.ABC):
    """A small key-value area shared by every host of the store (the volume
    catalog lives here).  Updates are compare-and-swap on the whole catalog,
    so two writers on two hosts can never lose each other's updates: the
    second commit of two that read the same version is refused, and
    :meth:`update` retries it on the new contents."""

    @abc.abstractmethod
    def read(self) -> CatalogView:
        """All entries and the current version (0: never written)."""

    @abc.abstractmethod
    def commit(self, version: int, put: dict[str, bytes] | None = None, delete: Iterable[str] = ()) -> int | None:
        """Apply ``put`` and ``delete`` if the catalog is still at ``version``
        and return the new version; None (nothing done) if it moved on.

        Not an exception: losing the race is the normal case that
        :meth:`update` retries, and never reaches a user."""

    #: A commit that keeps conflicting means the catalog is hot; that many
    #: retries cannot happen with the few writers of a catalog.
    UPDATE_ATTEMPTS = 100

    def update(self, change: Callable[[dict[str, bytes]], tuple[dict[str, bytes], Iterable[str]]]) -> int:
        """Read, let ``change(entries)`` return (put, delete), commit; again
        on a conflict.  ``change`` must be a pure function of the entries."""
        for attempt in range(self.UPDATE_ATTEMPTS):
            view = self.read()
            put, delete = change(dict(view.entries))
            new = self.commit(view.version, put, delete)
            if new is not None:
                return new
            time.sleep(min(0.001 * 2 ** attempt, 0.05))  # let the winner finish
        raise Busy("the catalog keeps changing under this update; try again")


class BackingStore(abc.ABC):
    """Named images, their snapshots and copy-on-write clones, and a catalog.

    Image names are evscrypt names (names.check_name) or temporary names
    (:func:`temp_name`), which listings skip; the store maps them to file or
    RBD image names.  Snapshot names are evscrypt names.
    """

    #: Do other hosts see this store's images?  Then the volume catalog
    #: lives in :meth:`catalog` (shared), not in the state directory.
    shared = False
    #: Do its images keep requests in flight (aio_read/aio_write with
    #: completions)?  Then a FUSE worker hands a request over and never waits
    #: for it (daemon/pools.fuse_threads).
    aio = False

    @abc.abstractmethod
    def location(self, name: str) -> str:
        """Where image ``name`` lives, for messages and `volume info`."""

    def collect_temporary(self, min_age: float = STALE_TEMP_AGE) -> Collected:
        """Remove the temporary images that killed builds left (hidden from
        listings, so nothing else would).  Here: none, a local store's live
        in the state directory, where evscrypt.tempentry collects them."""
        return Collected()

    def build(self, name: str, fill: Callable[[Image], T], guard: Callable[[T], ContextManager],
              start: tuple[str, str] | None = None) -> T:
        """Make image ``name`` whole or not at all.

        ``fill(image)`` writes a new, empty image under a :func:`temp_name`
        (with ``start`` = (image, snapshot): a :meth:`clone` of that
        snapshot instead of an empty image); then, inside ``guard(result)``
        (where the caller records it), the image takes its name
        (AlreadyExists if one was made meanwhile).  Anything that stops it
        (an error, Ctrl-C) removes the temporary image; a crash leaves it
        hidden from listings."""
        tmp = temp_name(name)
        if start is None:
            img = self.create(tmp, 0)
        else:
            self.clone(*start, tmp)
            try:
                img = self.open(tmp, write=True)
            except BaseException:
                with contextlib.suppress(EvscryptError):
                    self.delete(tmp)
                raise
        try:
            result = fill(img)
            img.flush()
            img.close()
            with guard(result):
                self.rename(tmp, name)
        except BaseException:
            img.close()
            with contextlib.suppress(EvscryptError):
                self.delete(tmp)
            raise
        return result

    # -- images ------------------------------------------------------------------
    @abc.abstractmethod
    def names(self) -> list[str]:
        """The images, sorted."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def open(self, name: str, *, write: bool = False, snapshot: str | None = None) -> Image:
        """Open an image (NotFound); a snapshot opens read-only."""

    @abc.abstractmethod
    def create(self, name: str, size: int) -> Image:
        """A new image of ``size`` bytes that reads as zeros, opened for
        writing (AlreadyExists).  Build it under a :func:`temp_name` and
        :meth:`rename` it into place, so an interrupted build leaves nothing
        a listing shows."""

    @abc.abstractmethod
    def rename(self, old: str, new: str) -> None:
        """Rename an image; never replaces one (AlreadyExists)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Delete an image and its snapshots (Busy while it is locked)."""

    # -- the attach lock, from outside -----------------------------------------
    @abc.abstractmethod
    def holder(self, name: str) -> Holder | None:
        """Who holds the image's attach lock, or None."""

    @abc.abstractmethod
    def break_lock(self, name: str, holder: Holder) -> None:
        """Take a dead holder's lock away and fence it, so it can never write
        to the image again.  Busy (nothing done) if it still answers; nothing
        done either if ``holder`` no longer holds the lock."""

    # -- snapshots and clones ----------------------------------------------------
    @abc.abstractmethod
    def snapshot(self, name: str, snap: str) -> None:
        """A read-only point-in-time copy of the image (crash-consistent:
        the caller stops writes around it)."""

    @abc.abstractmethod
    def snapshots(self, name: str) -> list[str]: ...

    @abc.abstractmethod
    def delete_snapshot(self, name: str, snap: str) -> None: ...

    @abc.abstractmethod
    def clone(self, name: str, snap: str, new: str) -> None:
        """A new image that starts as snapshot ``snap`` of ``name`` and shares
        its unchanged data (copy-on-write where the store can).  The clone is
        independent: writing it never changes the snapshot, and it survives
        the deletion of ``name`` and ``snap``."""

    @abc.abstractmethod
    def export(self, name: str, dest: Path, *, snapshot: str | None = None) -> None:
        """Write the image (or one of its snapshots) into the new local file
        ``dest``, sparse: the same bytes a local store keeps."""

    # -- the shared catalog --------------------------------------------------------
    @abc.abstractmethod
    def catalog(self) -> Catalog: ...

    def close(self) -> None:
        """Drop connections; images opened from the store must be closed first."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
