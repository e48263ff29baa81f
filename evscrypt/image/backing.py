"""I/O on a backing image: exact reads and writes, holes, durability, locks.

An image is reached through a *handle*: a file descriptor for a local image
file (the fast path: system calls, no method lookups), or an open
:class:`evscrypt.store.base.Image` of a store that has no file descriptor (an
RBD image through librbd).  Every function here takes either, so the header
code and the engine do not know which store holds the image.

This is the one place that turns OSError from the backing file into the
evscrypt error tree, so the FUSE layer sees NoSpace or StorageError and maps
them to errno in its own single place (a store Image converts its own
vendor errors).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os

from ..errors import Busy, NoSpace, StorageError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def storage_error(e: OSError, what: str):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: no space left on the backing filesystem")
    return StorageError(f"{what}: {os.strerror(e.errno) if e.errno else e}")


_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytearray.restype = ctypes.py_object
#: Below this, ``bytearray(n)`` (which zero-fills) is as quick as the ctypes call.
UNFILLED_MIN = 64 * 1024


def read_buffer(n: int) -> bytearray:
    """A bytearray for :func:`pread_into` to fill, without the zero fill.

    ``bytearray(n)`` clears the memory first, about 5% of the CPU time of
    1 MiB reads.  pread_into writes every byte of the buffer (file data,
    or zeros past the end of the file) or raises, in which case the buffer
    is dropped, so nothing stale is ever returned."""
    return _new_bytearray(None, n) if n >= UNFILLED_MIN else bytearray(n)


def pread_into(fd, buf, offset: int) -> None:
    """Fill ``buf`` from ``offset``; bytes past the end of the file read as zero."""
    if type(fd) is not int:
        fd.pread_into(buf, offset)
        return
    n = os.preadv(fd, [buf], offset)
    if n == len(buf):
        return  # the usual case: one call filled it
    mv = memoryview(buf)[n:]
    offset += n
    while mv:
        n = os.preadv(fd, [mv], offset)
        if n == 0:
            mv[:] = bytes(len(mv))
            return
        mv = mv[n:]
        offset += n


#: The largest single pwrite.  On ext4 the page cache keeps what one write
#: brings in as one folio, up to the write's size; every later write into
#: that folio walks all of its buffer heads (ext4_block_write_begin), one
#: per 4 KiB block.  With 1 MiB folios (left by 1 MiB writes) a 4 KiB
#: write cost about twice as much (fio 4k randwrite QD16: 38k -> 61k IOPS
#: with 128 KiB pieces); smaller pieces slowed 1 MiB writes down (64 KiB:
#: -15%, 16 KiB: -45% at QD32).  128 KiB is also the kernel's default FUSE
#: max_write, so the other FUSE disks here write no larger pieces.
WRITE_CHUNK = 128 * 1024


def pwrite_all(fd, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``, in pieces of at most WRITE_CHUNK."""
    if type(fd) is not int:
        fd.pwrite(data, offset)
        return
    if len(data) <= WRITE_CHUNK:
        n = os.pwrite(fd, data, offset)
        if n == len(data):
            return  # the usual case: one call wrote it all
        mv = memoryview(data)[n:]
        offset += n
    else:
        mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv[:WRITE_CHUNK], offset)
        mv = mv[n:]
        offset += n


def punch_hole(fd, offset: int, length: int) -> None:
    """Deallocate a range, keeping the file size; it then reads as zeros."""
    if length <= 0:
        return
    if type(fd) is not int:
        fd.discard(offset, length)
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err == errno.EOPNOTSUPP:
            pwrite_all(fd, bytes(length), offset)  # a filesystem without holes
            return
        raise OSError(err, os.strerror(err))


def pread(fd, length: int, offset: int) -> bytes:
    """``length`` bytes from ``offset`` (zeros past the end)."""
    buf = bytearray(length)
    pread_into(fd, buf, offset)
    return bytes(buf)


def size_of(fd) -> int:
    """The image's length in bytes."""
    return fd.size() if type(fd) is not int else os.fstat(fd).st_size


def close(fd) -> None:
    """Close a handle that was opened for one use."""
    if type(fd) is not int:
        fd.close()
    else:
        os.close(fd)


def sync(fd, datasync: bool = False) -> None:
    """Make every completed write durable: fsync (fdatasync), or the store's flush."""
    if type(fd) is not int:
        fd.flush()
    else:
        (os.fdatasync if datasync else os.fsync)(fd)


def truncate(fd, size: int) -> None:
    """Set the image's length; new bytes read as zeros."""
    if type(fd) is not int:
        fd.resize(size)
    else:
        os.ftruncate(fd, size)


def lock_exclusive(fd: int, name: str) -> None:
    """Take the image's attach lock: a flock, so it is released by the kernel
    if the holder dies, and conflicts across processes and open files."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Busy(f"volume {name!r} is attached (its image is locked by another user)")


def is_locked(path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
