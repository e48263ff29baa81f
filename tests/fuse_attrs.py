"""Attributes for the small pyfuse3 filesystems the patch tests mount."""

from __future__ import annotations

import stat
import time

import pyfuse3


def entry_attrs(ino: int, size: int = 0) -> pyfuse3.EntryAttributes:
    """The root directory, or a regular file of ``size`` bytes; never cached
    by the kernel (timeouts 0), so every test sees its own answers."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    if ino == pyfuse3.ROOT_INODE:
        a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
    else:
        a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, size
    a.st_blksize = 4096
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
    a.attr_timeout = a.entry_timeout = 0
    return a
