"""FUSE operations: translate kernel requests into calls on attachments.

A flat directory holds one regular file per attached volume.  This layer
only translates: it finds the attachment of an inode or file handle, calls
its read/write/fsync/discard (attachment.py, which owns ranges, counting,
the write gate and failure), and turns errors into errno through errno_map,
the only place that knows that mapping.  On the threads data path (patched
pyfuse3, see datapath.py) the requests of the data path run synchronously
in pyfuse3's worker threads (read_sync, write_sync, getattr_sync,
fsync_sync, flush_sync), without the trio thread; on the trio path (stock
pyfuse3) they come to the async handlers.  Everything else is an async
handler in the trio thread; the attachment runs its engine calls in a
worker thread (pools.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3

from ..errors import EvscryptError
from ..format import SECTOR_SIZE
from .attachment import Attachment
from .errno_map import errno_for
from .manager import VolumeManager

log = logging.getLogger("evscrypt.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: Reads and writes at least this large leave the FUSE worker thread for
#: the I/O pool: they take long enough that running several at once pays
#: for the hop; smaller ones are cheaper inline.
OFFLOAD_MIN = 128 * 1024
#: Attribute and entry cache time: short, because attach, detach and resize
#: change what the directory holds.
ATTR_TIMEOUT = 1.0


class _AsErrno:
    """``with AS_ERRNO:`` turns an evscrypt or OS error into the FUSE reply
    for it (errno_map).  A class, not a generator: it is on every request."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type, e, _tb) -> bool:
        if isinstance(e, (EvscryptError, OSError)):
            raise pyfuse3.FUSEError(errno_for(e)) from None
        return False


AS_ERRNO = _AsErrno()


def _fuse_error(e: BaseException) -> BaseException:
    """What a request's Future holds for ``e``: AS_ERRNO's FUSEError."""
    return pyfuse3.FUSEError(errno_for(e)) if isinstance(e, (EvscryptError, OSError)) else e


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
    # The kernel's default, 12, caps the asynchronous direct I/O requests in
    # flight over the whole mount: every disk together.  Eight disks at
    # queue depth 16 need 128.
    max_background = 256

    def __init__(self, manager: VolumeManager, c_path: bool = False):
        super().__init__()
        self.m = manager
        # libfuse splices requests larger than a page (a 4 KiB write among
        # them) into a pipe, where the C data path cannot see them
        self.enable_splice_read = not c_path
        self._handles: dict[int, Attachment] = {}
        self._next_fh = 1
        self._mount_time_ns = time.time_ns()

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

    def _handle(self, fh: int) -> Attachment:
        v = self._handles.get(fh)
        if v is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return v

    # Reads and writes are served from pyfuse3's worker thread
    # (main_threads), never through the trio thread.  Small ones are done
    # right there; large ones go to the I/O pool, which sends the reply when
    # it is done, so several run at once while the worker goes on receiving.
    # The attachment is thread-safe.
    # The 4 KiB path runs here for every request, so it spends no call it
    # can save: a try/except costs nothing until something is raised, where
    # ``with AS_ERRNO`` costs two calls, and a write that needs no pool is
    # done in the one frame.
    def read_sync(self, fh, off, size):
        v = self._handle(fh)
        if v.aio:  # a store image: in flight in the store, answered from its completion
            try:
                return v.read_later(off, size, _fuse_error)
            except (EvscryptError, OSError) as e:
                raise pyfuse3.FUSEError(errno_for(e)) from None
        if size >= OFFLOAD_MIN:
            return self.m.pools.io.submit(self._read, v, off, size)
        return self._read(v, off, size)

    @staticmethod
    def _read(v: Attachment, off, size):
        try:
            return v.read(off, size)
        except (EvscryptError, OSError) as e:
            raise pyfuse3.FUSEError(errno_for(e)) from None

    def write_sync(self, fh, off, buf):
        """The write, or None if a snapshot holds the gate (write() then waits)."""
        v = self._handle(fh)
        try:
            buf = v.enter_write(off, buf)
            if buf is None:
                return None
            if v.aio:
                fut = v.write_later(off, buf, _fuse_error)
                if fut is not None:
                    return fut
            if len(buf) >= OFFLOAD_MIN:
                return self.m.pools.io.submit(self._write, v, off, buf)
            return v.finish_write(off, buf)
        except (EvscryptError, OSError) as e:
            raise pyfuse3.FUSEError(errno_for(e)) from None

    @staticmethod
    def _write(v: Attachment, off: int, buf) -> int:
        with AS_ERRNO:
            return v.finish_write(off, buf)

    async def read(self, fh, off, size):
        """Every read on the trio data path (stock pyfuse3)."""
        with AS_ERRNO:
            return await self._handle(fh).read_async(off, size, self.m.pools.io_limiter)

    async def write(self, fh, off, buf):
        """Every write on the trio data path, and on the threads path a
        write that found the gate closed: it waits for the gate."""
        with AS_ERRNO:
            return await self._handle(fh).write_async(off, buf, self.m.pools.io_limiter)

    # fsync and flush are answered from the worker thread too: through trio
    # (a wake-up of the trio thread, a task, for fsync a thread hop) the
    # fsync of a 4 KiB write took 270-340 us here, and takes 140-200 us
    # now; a close() (FLUSH) took 51 us, and takes 8.
    def fsync_sync(self, fh, datasync):
        """Submit the fsync to the fsync pool, which replies when it is done;
        None if a snapshot holds the gate (fsync() then waits for it)."""
        v = self._handle(fh)
        with AS_ERRNO:
            if not v.enter_fsync():
                return None
        return self.m.pools.fsync.submit(self._fsync, v, bool(datasync))

    @staticmethod
    def _fsync(v: Attachment, datasync: bool) -> bool:
        with AS_ERRNO:
            return v.finish_fsync(datasync)

    def flush_sync(self, fh):
        """Every close(): the data is already in the image (fsync makes it
        durable); EIO if the volume was force-detached or has failed."""
        if not self._handle(fh).usable:
            raise pyfuse3.FUSEError(errno.EIO)
        return True

    async def fsync(self, fh, datasync):
        """An fsync that found the gate closed: wait for it here."""
        with AS_ERRNO:
            await self._handle(fh).fsync_async(bool(datasync), self.m.pools.io_limiter)

    async def fallocate(self, fh, mode, off, length):
        v = self._handle(fh)
        if not v.usable:
            raise pyfuse3.FUSEError(errno.EIO)  # force-detached under an open handle, or failed
        if mode & FALLOC_FL_PUNCH_HOLE or mode & FALLOC_FL_ZERO_RANGE:
            if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            with AS_ERRNO:
                await v.discard_async(off, length, self.m.pools.io_limiter)
            return
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if off + length > v.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # would grow the disk
        # plain allocation inside the disk: every sector already exists
