"""An attached volume as the data path sees it: read, write, fsync, discard.

The FUSE layer (ops.py) only translates: it finds the attachment of a file
handle, calls one of the methods here, and maps what they raise to errno
(errno_map).  Everything between belongs to the attachment, in one place:

* the in-flight count that detach waits for, and the detached and failed
  flags that stop new requests (:meth:`Attachment._begin`);
* the write gate that a snapshot closes (gate.py): every change passes it;
* the range rules of a disk: a read past the end is short, a write past it
  is cut, a write that starts beyond it is "no space" (a disk never grows);
* the counters ``status`` reports, and the rule that a storage error fails
  the volume (later requests answer EIO until it is detached).

Two calling conventions, one per kind of thread.  FUSE worker threads (the
threads data path) call the plain methods, which never wait for the gate:
:meth:`enter_write` and :meth:`enter_fsync` say None when a snapshot holds
it, and the request goes the async way.  The trio thread calls the ``_async``
methods, which wait for the gate and run the engine in a thread under the
limiter they are given.  ``lock`` guards the count, the flags and the
counters between worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import trio

from ..errors import EvscryptError, NoSpace, StorageError
from ..image import header as hdr
from ..image.engine import Engine
from ..reattach import Verdict
from ..volumes import OpenVolume
from . import cpath, loopmount
from .gate import WriteGate

log = logging.getLogger("evscrypt.attachment")


@dataclass
class Counters:
    """What ``status`` reports per volume, in its ``io`` object."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    fsyncs: int = 0
    discards: int = 0
    errors: int = 0


def _fails_volume(e: BaseException) -> bool:
    """A storage error (the image cannot be read or written) fails the
    volume; a range or argument error is the request's alone."""
    return isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno == errno.EIO)


@dataclass
class Attachment:
    name: str
    vol: OpenVolume  # the open, locked image with its keys (wiped by close)
    engine: Engine
    owner: int
    inode: int
    gate: WriteGate = field(default_factory=WriteGate)
    attached_at: float = field(default_factory=time.time)
    opened: int = 0  # open FUSE file handles
    inflight: int = 0  # I/O requests running now
    failed: str | None = None  # why the backing image stopped working
    detached: bool = False
    mount: loopmount.MountInfo | None = None
    counters: Counters = field(default_factory=Counters)
    key_state: str | None = None
    reattach: Verdict | None = None  # the last answer to "could it attach again?"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    in_c: bool = False  # aligned I/O is served by the C data path (cpath.py)

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def header(self) -> hdr.Header:
        return self.vol.header

    @property
    def fd(self) -> int:
        return self.vol.fd

    @property
    def usable(self) -> bool:
        """Neither detached nor failed: what a FLUSH (close) checks."""
        return not (self.detached or self.failed)

    # -- the in-flight count ------------------------------------------------------
    def _begin(self) -> None:
        """Count a request in, or raise (EIO) if the volume is detached or failed.

        Detach sets ``detached`` under the same lock and then waits for the
        count to drain, so no request can start after detach has looked and
        still be using the key when it is wiped.
        """
        with self.lock:
            if not (self.detached or self.failed):
                self.inflight += 1
                return
        raise StorageError(f"volume {self.name!r} is detached or has failed")

    def _end(self, reads: int = 0, writes: int = 0, bytes_read: int = 0, bytes_written: int = 0,
             fsyncs: int = 0, discards: int = 0, errors: int = 0) -> None:
        """Count a request out and add to the counters (every read and write
        passes here: plain arguments, not a loop over names)."""
        with self.lock:
            self.inflight -= 1
            c = self.counters
            c.reads += reads
            c.writes += writes
            c.bytes_read += bytes_read
            c.bytes_written += bytes_written
            c.fsyncs += fsyncs
            c.discards += discards
            c.errors += errors

    def _end_failed(self, e: BaseException) -> None:
        """Count out a request whose engine call raised ``e``; a storage
        error fails the volume."""
        if isinstance(e, (EvscryptError, OSError)):
            if _fails_volume(e):
                self._fail(e)
            self._end(errors=1)
        else:
            self._end()

    def _fail(self, e: BaseException) -> None:
        self.failed = getattr(e, "message", None) or str(e)
        if self.in_c:
            cpath.disable(self.inode)  # its requests come here, and answer EIO
        log.error("volume %s failed: %s", self.name, self.failed)

    def c_failed(self, err: int, verb: str) -> None:
        """The store failed a request of the C data path (cpath.py; called
        in the store's completion thread, after C answered EIO): the volume
        fails, as it does for a storage error in Python."""
        with self.lock:
            self.counters.errors += 1
        self._fail(StorageError(f"cannot {verb} volume {self.name!r}: {os.strerror(err)}"))

    def mark_detached(self) -> None:
        with self.lock:
            self.detached = True

    # -- requests from FUSE worker threads -----------------------------------------
    def read(self, off: int, size: int) -> bytes | bytearray:
        """Read, cut at the end of the volume (empty past it).  A large read
        is split across the cores only when it is the volume's only request
        in flight (see :meth:`finish_write`)."""
        self._begin()
        try:
            end = self.vol.header.size
            data = self.engine.read(off, min(size, end - off), self.inflight == 1) \
                if 0 <= off < end and size > 0 else b""
        except BaseException as e:
            self._end_failed(e)
            raise
        with self.lock:  # _end(reads=1, bytes_read=...), inlined: the 4 KiB path
            self.inflight -= 1
            self.counters.reads += 1
            self.counters.bytes_read += len(data)
        return data

    def _cut(self, off: int, buf):
        if off >= self.size:
            raise NoSpace(f"write at {off} lies beyond the end of volume {self.name!r}")  # a disk never grows
        return buf if off + len(buf) <= self.size else memoryview(buf)[:self.size - off]

    def enter_write(self, off: int, buf):
        """Count a write in and pass the gate without waiting: the data to
        write (cut at the end of the volume), or None if a snapshot holds
        the gate (nothing is counted then: wait in :meth:`write_async`).
        Follow with :meth:`finish_write`."""
        self._begin()
        try:
            size = self.vol.header.size
            if off + len(buf) > size or off >= size:
                buf = self._cut(off, buf)
            if self.gate.try_enter():
                return buf
        except BaseException:
            self._end()
            raise
        self._end()
        return None

    def finish_write(self, off: int, buf) -> int:
        """Write what :meth:`enter_write` let in; leave the gate and the count.

        A large request is split across the cores only when it is the
        volume's only request in flight (queue depth 1): with more in
        flight, the worker thread that receives them needs a core, and
        splitting slowed 1M writes at QD32 by 15-20%."""
        try:
            n = self.engine.write(off, buf, self.inflight == 1)
        except BaseException as e:
            self.gate.leave()
            self._end_failed(e)
            raise
        self.gate.leave()
        with self.lock:  # _end(writes=1, bytes_written=n), inlined: the 4 KiB path
            self.inflight -= 1
            if n:
                self.counters.writes += 1
                self.counters.bytes_written += n
        return n

    # -- in the background, on a store image (Engine.aio) --------------------------
    def __post_init__(self) -> None:
        self.aio = self.engine.aio  # asked on every request: a plain attribute

    def read_later(self, off: int, size: int, error):
        """:meth:`read` in the background: a Future of the data that the
        store's completion thread resolves, or the data itself for a read
        past the end.  A failure's Future holds ``error(e)`` (the FUSE
        layer's errno for ``e``)."""
        if not 0 <= off < self.size or size <= 0:
            return self.read(off, size)
        fut = Future()
        self._begin()

        def done(data, e) -> None:
            if e is None:
                with self.lock:  # _end(reads=1, bytes_read=...), inlined: the 4 KiB path
                    self.inflight -= 1
                    self.counters.reads += 1
                    self.counters.bytes_read += len(data)
                fut.set_result(data)
            else:
                self._end_failed(e)
                fut.set_exception(error(e))

        try:
            self.engine.read_aio(off, min(size, self.size - off), done)
        except BaseException as e:
            self._end_failed(e)
            raise
        return fut

    def write_later(self, off: int, buf, error):
        """:meth:`finish_write` in the background, after :meth:`enter_write`:
        a Future of the count, resolved (and the gate left, the request
        counted out) by the store's completion thread; ``error`` as for
        :meth:`read_later`.  None, with nothing done, for a write that needs a
        read-modify-write: :meth:`finish_write` it."""
        fut = Future()

        def done(n, e) -> None:
            self.gate.leave()
            if e is None:
                with self.lock:  # _end(writes=1, bytes_written=n), inlined: the 4 KiB path
                    self.inflight -= 1
                    self.counters.writes += 1
                    self.counters.bytes_written += n
                fut.set_result(n)
            else:
                self._end_failed(e)
                fut.set_exception(error(e))

        try:
            if not self.engine.write_aio(off, buf, done):
                return None
        except BaseException as e:
            self.gate.leave()
            self._end_failed(e)
            raise
        return fut

    def enter_fsync(self) -> bool:
        """Count an fsync in and pass the gate without waiting; False if a
        snapshot holds the gate (wait in :meth:`fsync_async`)."""
        self._begin()
        if self.gate.try_enter():
            return True
        self._end()
        return False

    def finish_fsync(self, datasync: bool) -> bool:
        """fsync what :meth:`enter_fsync` let in; leave the gate and the count."""
        try:
            self.engine.fsync(datasync)
        except BaseException as e:
            self.gate.leave()
            self._end_failed(e)
            raise
        self.gate.leave()
        self._end(fsyncs=1)
        return True

    # -- requests from the trio thread ---------------------------------------------
    async def _run(self, fn, limiter: trio.CapacityLimiter):
        """Count in, run ``fn`` in a worker thread, count out: ``fn``'s result."""
        self._begin()
        try:
            return await trio.to_thread.run_sync(fn, limiter=limiter)
        except BaseException as e:
            self._end_failed(e)
            raise

    async def read_async(self, off: int, size: int, limiter: trio.CapacityLimiter) -> bytes | bytearray:
        if not 0 <= off < self.size or size <= 0:
            self._begin()
            self._end(reads=1)
            return b""
        size = min(size, self.size - off)
        data = await self._run(lambda: self.engine.read(off, size, self.inflight == 1), limiter)
        self._end(reads=1, bytes_read=len(data))
        return data

    async def write_async(self, off: int, buf, limiter: trio.CapacityLimiter) -> int:
        """A write that waits for the gate (the trio data path, or one that
        found it closed)."""
        buf = self._cut(off, buf)
        async with self.gate:  # held while a snapshot takes its copy point
            n = await self._run(lambda: self.engine.write(off, buf, self.inflight == 1), limiter)
        self._end(writes=1 if n else 0, bytes_written=n)
        return n

    async def fsync_async(self, datasync: bool, limiter: trio.CapacityLimiter) -> None:
        async with self.gate:
            await self._run(lambda: self.engine.fsync(datasync), limiter)
        self._end(fsyncs=1)

    async def discard_async(self, off: int, length: int, limiter: trio.CapacityLimiter) -> None:
        """Discard a range, cut at the end of the volume (nothing past it)."""
        if off >= self.size:
            return
        length = min(length, self.size - off)
        async with self.gate:
            await self._run(lambda: self.engine.discard(off, length), limiter)
        self._end(discards=1)

    # -- the C data path --------------------------------------------------------------
    def serve_in_c(self) -> bool:
        """Hand aligned I/O to the C data path where it can run (cpath.py);
        before the volume is visible."""
        self.in_c = cpath.register(self)
        if self.in_c:
            self.gate.hold = lambda hold: cpath.hold_writes(self.inode, hold)
        return self.in_c

    def stop_c(self) -> None:
        """Take the volume out of the C data path, waiting for its requests
        there, and add what C served to the counters (before the key is wiped)."""
        if not self.in_c:
            return
        got = cpath.unregister(self.inode)
        self.in_c = False
        self.gate.hold = None
        if got:
            self._add_c(self.counters, got)

    @staticmethod
    def _add_c(c: Counters, got: tuple[int, int, int, int]) -> None:
        c.reads += got[0]
        c.writes += got[1]
        c.bytes_read += got[2]
        c.bytes_written += got[3]

    def counters_in_c(self) -> dict | None:
        """What the C data path has served so far (part of counters_now)."""
        if not self.in_c:
            return None
        return dict(zip(("reads", "writes", "bytes_read", "bytes_written"), cpath.counters(self.inode)))

    def counters_now(self) -> Counters:
        """The counters, with the requests the C data path served."""
        c = Counters(**vars(self.counters))
        if self.in_c:
            self._add_c(c, cpath.counters(self.inode))
        return c

    # -- the lifecycle --------------------------------------------------------------
    def set_size(self, size: int) -> None:
        """After a resize has grown the image and its header."""
        self.engine.size = size
        if self.in_c:
            cpath.set_size(self.inode, size)

    def close(self) -> None:
        """Wipe the keys and release the image (and with it the lock).  The
        engine keeps its cipher, now closed: any late use raises rather than
        falls back to plaintext, and its fd is no longer the image's."""
        self.engine.fd = -1
        self.vol.close()
