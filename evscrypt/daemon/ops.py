"""FUSE operations: translate kernel requests into engine calls.

A flat directory holds one regular file per attached volume.  This layer
never touches a cipher; it finds the attachment, clamps the range, runs the
engine and turns errors into errno through errno_map, the only place that
knows that mapping.  On the threads data path (patched pyfuse3, see
datapath.py) the requests of the data path run synchronously in pyfuse3's
worker threads (read_sync, write_sync, getattr_sync, fsync_sync,
flush_sync), without the trio thread; on the trio path (stock pyfuse3) they
come to the async handlers.  Everything else is an async handler in the
trio thread, with its engine calls (reads and writes there too, fsync,
discard) in a thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pyfuse3
import trio

from ..errors import EvscryptError, StorageError
from ..format import SECTOR_SIZE
from .errno_map import errno_for
from .fuse_opcodes import named
from .manager import Attachment, VolumeManager

log = logging.getLogger("evscrypt.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: Reads and writes at least this large leave the FUSE worker thread for
#: the I/O pool: they take long enough that running several at once pays
#: for the hop; smaller ones are cheaper inline.
OFFLOAD_MIN = 128 * 1024
#: I/O pool threads: large requests in flight at once.
IO_POOL_THREADS = 4
#: fsyncs in flight at once.  They have a pool of their own: an fsync waits
#: for the disk (milliseconds), and must not hold a thread that large reads
#: and writes need.
FSYNC_THREADS = 4
#: Attribute and entry cache time: short, because attach, detach and resize
#: change what the directory holds.
ATTR_TIMEOUT = 1.0


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    # libfuse's default, auto_inval_data, makes the kernel revalidate a
    # file's attributes before every read once a write has marked them stale
    # (and every write does): with reads and writes mixed, a GETATTR for
    # most reads.  It exists for filesystems whose files change behind the
    # kernel's back.  Ours do not: only this mount writes a disk's data (the
    # image is locked), and its size changes only by resize, which tells
    # the kernel itself (invalidate_attr).
    enable_auto_inval_data = False

    def __init__(self, manager: VolumeManager):
        super().__init__()
        self.m = manager
        self._handles: dict[int, Attachment] = {}
        self._next_fh = 1
        self._mount_time_ns = time.time_ns()
        self._io_pool = ThreadPoolExecutor(IO_POOL_THREADS, thread_name_prefix="io")
        self._fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
        manager.invalidate = self._invalidate
        manager.invalidate_data = self._invalidate_data
        manager.invalidate_attr = self._invalidate_attr
        counts = getattr(pyfuse3, "request_counts", None)  # the threads patch counts; stock pyfuse3 does not
        manager.request_counts = (lambda: named(counts())) if counts else (lambda: None)

    def _invalidate(self, inode: int, name: str) -> None:
        try:
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), deleted=inode, ignore_enoent=True)
        except Exception as e:  # the kernel may have forgotten the entry already
            log.debug("invalidate %s: %s", name, e)

    @staticmethod
    def _invalidate_attr(inode: int) -> None:
        """Forget a file's cached attributes, so a resize shows at once.
        Call it from a worker thread, like _invalidate_data."""
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError as e:  # ENOENT: the kernel has no such inode cached
            log.debug("invalidate attributes of inode %d: %s", inode, e)

    @staticmethod
    def _invalidate_data(inode: int) -> None:
        """Drop the kernel's cached pages of a detached volume, so an fd kept
        open across a forced detach cannot read plaintext from the cache.
        Blocks on page locks: call it from a worker thread, never the loop."""
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except OSError as e:  # ENOENT: the kernel has no such inode cached
            log.debug("invalidate inode %d: %s", inode, e)

    # -- attributes ------------------------------------------------------------
    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.ROOT_INODE
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_uid = a.st_gid = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mount_time_ns
        a.entry_timeout = a.attr_timeout = ATTR_TIMEOUT
        return a

    def _file_attr(self, v: Attachment) -> pyfuse3.EntryAttributes:
        """Any thread: a resize replaces v.header whole, so one read of the
        size gives the old or the new one, never half of each."""
        size = v.size
        a = pyfuse3.EntryAttributes()
        a.st_ino = v.inode
        a.st_mode = stat.S_IFREG | 0o600
        a.st_nlink = 1
        a.st_uid = v.owner
        a.st_gid = 0
        a.st_size = size
        a.st_blksize = SECTOR_SIZE
        a.st_blocks = size // 512
        ns = int(v.attached_at * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.entry_timeout = a.attr_timeout = ATTR_TIMEOUT
        return a

    def _by_inode(self, inode: int) -> Attachment:
        v = self.m.by_inode.get(inode)
        if v is None:
            # a force-detached file still open somewhere: I/O error, not "gone"
            raise pyfuse3.FUSEError(errno.EIO if inode in self.m.zombies else errno.ENOENT)
        return v

    def getattr_sync(self, inode):
        """getattr in pyfuse3's worker thread, without the trio thread.

        Only the root and attached volumes are answered here; for any other
        inode (unknown, or force-detached and still open) this returns None
        and the async getattr answers in the trio thread, where the tables
        change, so the answer (ENOENT or EIO) cannot catch a detach half
        done.  Reading by_inode from this thread is safe: see
        docs/CONCURRENCY.md."""
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attr()
        v = self.m.by_inode.get(inode)
        return None if v is None else self._file_attr(v)

    async def getattr(self, inode, ctx=None):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attr()
        return self._file_attr(self._by_inode(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._root_attr()
        v = self.m.by_name.get(os.fsdecode(name))
        if v is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attr(v)

    async def setattr(self, inode, attr, fields, fh, ctx):
        v = self._by_inode(inode) if inode != pyfuse3.ROOT_INODE else None
        if v is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and attr.st_size != v.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size changes only by resize
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._file_attr(v)  # time updates are accepted and ignored

    # -- directory ---------------------------------------------------------------
    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        for v in sorted(self.m.by_name.values(), key=lambda a: a.inode):
            if v.inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, v.name.encode(), self._file_attr(v), v.inode):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        total = sum(v.size for v in self.m.by_name.values())
        s.f_bsize = s.f_frsize = SECTOR_SIZE
        s.f_blocks = total // SECTOR_SIZE
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.m.by_name) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # The namespace is managed by attach and detach only.
    async def _refuse(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EPERM)

    mknod = mkdir = unlink = rmdir = symlink = rename = link = create = _refuse

    # No xattr handlers: pyfuse3 answers ENOSYS, and the kernel then stops
    # asking.  Answering ENODATA instead would make the kernel look up
    # security.capability before every single write (file_remove_privs).

    # -- files -----------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        v = self._by_inode(inode)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = v
        v.opened += 1
        # keep_cache: only this mount writes the data, so cached pages stay true
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def release(self, fh):
        v = self._handles.pop(fh, None)
        if v is not None:
            v.opened -= 1
            if v.detached and v.opened == 0:
                self.m.zombies.pop(v.inode, None)

    def _live(self, fh: int) -> Attachment:
        v = self._handles.get(fh)
        if v is None or v.detached:
            raise pyfuse3.FUSEError(errno.EIO)  # force-detached under an open handle
        if v.failed:
            raise pyfuse3.FUSEError(errno.EIO)
        return v

    def _begin(self, fh: int) -> Attachment:
        """Count a request in on fh's volume (any thread), or answer EIO."""
        v = self._handles.get(fh)
        if v is None or not v.io_begin():
            raise pyfuse3.FUSEError(errno.EIO)  # force-detached, or the image failed
        return v

    @staticmethod
    def _error(v: Attachment, e: Exception) -> pyfuse3.FUSEError:
        """The FUSE error for an engine failure; a storage failure fails the volume."""
        if isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno == errno.EIO):
            v.failed = getattr(e, "message", None) or str(e)
            log.error("volume %s failed: %s", v.name, v.failed)
        return pyfuse3.FUSEError(errno_for(e))

    # Reads and writes are served from pyfuse3's worker thread
    # (main_threads), never through the trio thread.  Small ones are done
    # right there; large ones go to the I/O pool, which sends the reply when
    # it is done, so several run at once while the worker goes on receiving.
    # The engine is thread-safe.
    def read_sync(self, fh, off, size):
        if size >= OFFLOAD_MIN:
            return self._io_pool.submit(self._read, fh, off, size)
        return self._read(fh, off, size)

    def _read(self, fh, off, size):
        v = self._begin(fh)
        try:
            data = v.engine.read(off, min(size, v.size - off), v.inflight == 1) if 0 <= off < v.size and size > 0 \
                else b""
        except (EvscryptError, OSError) as e:
            v.io_done(errors=1)
            raise self._error(v, e) from None
        except BaseException:
            v.io_done()
            raise
        v.read_done(len(data))
        return data

    def write_sync(self, fh, off, buf):
        v = self._begin(fh)
        try:
            if off >= v.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)  # the disk never grows
            if off + len(buf) > v.size:
                buf = memoryview(buf)[:v.size - off]
            if not v.gate.try_enter():
                v.io_done()
                return None  # a snapshot is taking its copy point: wait in write()
        except BaseException:
            v.io_done()
            raise
        if len(buf) >= OFFLOAD_MIN:
            return self._io_pool.submit(self._write, v, off, buf)
        return self._write(v, off, buf)

    def _write(self, v: Attachment, off: int, buf) -> int:
        """Write with the request counted in and the gate entered; leave both.

        A large request is split across the cores only when it is the
        volume's only request in flight (queue depth 1): with more in
        flight, the worker thread that receives them needs a core, and
        splitting slowed 1M writes at QD32 by 15-20%."""
        try:
            n = v.engine.write(off, buf, v.inflight == 1)
        except (EvscryptError, OSError) as e:
            v.gate.leave()
            v.io_done(errors=1)
            raise self._error(v, e) from None
        except BaseException:
            v.gate.leave()
            v.io_done()
            raise
        v.gate.leave()
        v.write_done(n)
        return n

    async def read(self, fh, off, size):
        """Every read on the trio data path (stock pyfuse3): the engine
        call in an I/O thread (never block the trio thread)."""
        v = self._live(fh)
        if not 0 <= off < v.size or size <= 0:
            return b""
        size = min(size, v.size - off)
        # split across the cores only when it is the volume's only request (see _write)
        return await self._run(v, lambda: v.engine.read(off, size, v.inflight == 1), kind="reads")

    async def write(self, fh, off, buf):
        """Every write on the trio data path, and on the threads path a
        write that found the gate closed: wait for the gate here, then write
        in an I/O thread (never block the trio thread)."""
        v = self._live(fh)
        if off >= v.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + len(buf) > v.size:
            buf = memoryview(buf)[:v.size - off]
        async with v.gate:  # held while a snapshot takes its copy point
            v = self._live(fh)
            return await self._run(v, lambda: v.engine.write(off, buf, v.inflight == 1), kind="writes",
                                   nbytes=len(buf))

    async def _run(self, v: Attachment, fn, *args, kind: str | None = None, nbytes: int = 0):
        """Run an engine call in a worker thread from the trio thread."""
        if not v.io_begin():
            raise pyfuse3.FUSEError(errno.EIO)
        counts = {}
        try:
            result = await trio.to_thread.run_sync(fn, *args, limiter=self.m.io_limiter)
            if kind == "writes":
                counts = {"writes": 1, "bytes_written": nbytes}
            elif kind == "reads":
                counts = {"reads": 1, "bytes_read": len(result)}
            elif kind:
                counts = {kind: 1}
            return result
        except (EvscryptError, OSError) as e:
            counts = {"errors": 1}
            raise self._error(v, e) from None
        finally:
            v.io_done(**counts)

    # fsync and flush are answered from the worker thread too: through trio
    # (a wake-up of the trio thread, a task, for fsync a thread hop) the
    # fsync of a 4 KiB write took 270-340 us here, and takes 140-200 us
    # now; a close() (FLUSH) took 51 us, and takes 8.
    def fsync_sync(self, fh, datasync):
        """Submit the fsync to the fsync pool, which replies when it is done;
        None if a snapshot holds the gate (fsync() then waits for it)."""
        v = self._begin(fh)
        if not v.gate.try_enter():
            v.io_done()
            return None
        return self._fsync_pool.submit(self._fsync, v, datasync)

    def _fsync(self, v: Attachment, datasync: bool) -> bool:
        """fsync with the request counted in and the gate entered; leave both."""
        try:
            v.engine.fsync(datasync)
        except (EvscryptError, OSError) as e:
            v.gate.leave()
            v.io_done(errors=1)
            raise self._error(v, e) from None
        except BaseException:
            v.gate.leave()
            v.io_done()
            raise
        v.gate.leave()
        v.io_done(fsyncs=1)
        return True

    def flush_sync(self, fh):
        """Every close(): the data is already in the image (fsync makes it
        durable); EIO if the volume was force-detached or has failed."""
        self._live(fh)
        return True

    async def fsync(self, fh, datasync):
        """An fsync that found the gate closed: wait for it here."""
        v = self._live(fh)
        async with v.gate:
            v = self._live(fh)
            await self._run(v, v.engine.fsync, bool(datasync), kind="fsyncs")

    async def fallocate(self, fh, mode, off, length):
        v = self._live(fh)
        if mode & FALLOC_FL_PUNCH_HOLE or mode & FALLOC_FL_ZERO_RANGE:
            if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            if off >= v.size:
                return
            length = min(length, v.size - off)
            async with v.gate:
                v = self._live(fh)
                await self._run(v, v.engine.discard, off, length, kind="discards")
            return
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if off + length > v.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # would grow the disk
        # plain allocation inside the disk: every sector already exists
