"""Sparse copies of image files: reflink where the filesystem can, else a
kernel-side copy of the data extents only, so holes stay holes.

Snapshots, images, clones and exports all copy a (possibly huge, mostly
sparse) backing image.  A reflink (``FICLONERANGE``, btrfs/XFS) shares the
blocks and costs nothing.  Elsewhere (ext4) the data extents are found with
``SEEK_DATA``/``SEEK_HOLE`` and each one is copied with ``copy_file_range``,
which stays inside the kernel; the holes between them are never touched, so
a 10 GiB volume with 100 MiB written copies 100 MiB.  Plain read/write is the
last resort (another filesystem, an old kernel), and the way to or from an
image of a store without file descriptors (an RBD image: its handle, see
evscrypt.image.backing, lists its data extents from the object map).

The copy runs in steps of at most COPY_STEP bytes and calls ``progress``
after each step; a ``progress`` that raises aborts the copy (the daemon uses
that to stop when its destination has been removed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Callable, Iterator

from ..format import nonzero_runs
from .backing import pread_into, pwrite_all, size_of, truncate

#: One copy_file_range call (and one progress tick) at most: large enough to
#: keep the syscall count low, small enough that Ctrl-C is seen quickly.
COPY_STEP = 64 << 20
#: Read/write fallback buffer.
RW_STEP = 8 << 20

# linux/fs.h: _IOW(0x94, 13, struct file_clone_range)
FICLONERANGE = 0x4020940D
_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
#: copy_file_range and reflink errors that mean "not here", not "failed".
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ETXTBSY, errno.EBADF,
                errno.EPERM, errno.ENOTTY}

Progress = Callable[[int], None]


def data_extents(fd, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data region of ``fd`` within [start, end).

    Filesystems without SEEK_DATA report the whole file as data, which is
    still correct, only slower.
    """
    if type(fd) is not int:
        yield from fd.data_extents(start, end)
        return
    off = start
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past ``off``
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        off = hole


def has_data(fd, start: int, length: int) -> bool:
    return next(data_extents(fd, start, start + length), None) is not None


def _reflink(src: int, dst: int, src_off: int, dst_off: int, length: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONERANGE, _CLONE_RANGE.pack(src, src_off, length, dst_off))
        return True
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, length: int, use_cfr: list) -> None:
    """Copy one data extent; ``use_cfr[0]`` turns False once copy_file_range
    proves unsupported, and the rest of the copy reads and writes."""
    while length > 0:
        if use_cfr[0]:
            try:
                n = os.copy_file_range(src, dst, length, src_off, dst_off)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                use_cfr[0] = False
                continue
            if n == 0:  # source shorter than expected: the rest reads as zeros
                return
        else:
            buf = bytearray(min(length, RW_STEP))
            pread_into(src, buf, src_off)  # past the end: zeros
            pwrite_all(dst, buf, dst_off)
            n = len(buf)
        src_off += n
        dst_off += n
        length -= n


def sparse_copy(src, dst, *, src_offset: int = 0, dst_offset: int = 0, length: int | None = None,
                progress: Progress | None = None, reflink: bool = True) -> str:
    """Copy ``length`` bytes (default: to the end of ``src``) keeping holes.

    ``dst`` is extended to ``dst_offset + length``; the range in ``dst`` must
    read as zeros beforehand (a new file).  Either may be a store image's
    handle (evscrypt.image.backing).  Returns the method that was used:
    ``reflink``, ``copy_file_range`` or ``read-write``.
    """
    if length is None:
        length = size_of(src) - src_offset
    end = src_offset + length
    if size_of(dst) < dst_offset + length:
        truncate(dst, dst_offset + length)
    if length <= 0:
        return "none"
    if type(src) is not int or type(dst) is not int:
        reflink = False
    if reflink and _reflink(src, dst, src_offset, dst_offset, length):
        if progress:
            progress(length)
        return "reflink"
    use_cfr = [type(src) is int and type(dst) is int]
    done = src_offset  # progress is reported in logical bytes, holes included
    for off, n in data_extents(src, src_offset, end):
        while n > 0:
            step = min(n, COPY_STEP)
            _copy_range(src, dst, off, dst_offset + off - src_offset, step, use_cfr)
            off += step
            n -= step
            if progress:
                progress(off - done)
            done = off
    if progress and end > done:
        progress(end - done)
    return "copy_file_range" if use_cfr[0] else "read-write"


def read_chunks(fd, start: int, end: int, chunk: int) -> Iterator[tuple[int, bytearray | None]]:
    """(offset, data) of each ``chunk``-sized piece of [start, end); data is
    None for a piece that is entirely a hole, so sparse files read fast."""
    off = start
    while off < end:
        n = min(chunk, end - off)
        if not has_data(fd, off, n):
            yield off, None
        else:
            buf = bytearray(n)
            pread_into(fd, buf, off)  # past the end of the file: zeros
            yield off, buf
        off += n


def pwrite_sparse(fd, offset: int, data, block: int = 4096) -> None:
    """Write ``data`` at ``offset`` skipping all-zero blocks, so a new file
    keeps holes where the source had them.  Offset and length are block aligned."""
    mv = memoryview(data)
    for i, j in nonzero_runs(mv, block):
        pwrite_all(fd, mv[i * block:j * block], offset + i * block)
