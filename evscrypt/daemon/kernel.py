"""What the daemon tells the kernel's FUSE caches, and what it asks pyfuse3.

The volume manager changes what the mount shows (attach, detach, resize)
but does not speak FUSE: main.py hands it a :class:`FuseKernel`, whose
methods are the only calls into pyfuse3's notification API.  Each may
block on page locks: call it from a worker thread, except
:meth:`FuseKernel.forget_entry`, which only queues the notice.
"""

from __future__ import annotations

import logging

import pyfuse3

from .fuse_opcodes import named

log = logging.getLogger("evscrypt.fuse")


class FuseKernel:
    @staticmethod
    def forget_entry(inode: int, name: str) -> None:
        """The directory entry of a detached volume is gone."""
        try:
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name.encode(), deleted=inode, ignore_enoent=True)
        except Exception as e:  # the kernel may have forgotten the entry already
            log.debug("invalidate %s: %s", name, e)

    @staticmethod
    def drop_data(inode: int) -> None:
        """Drop the kernel's cached pages of a detached volume, so an fd kept
        open across a forced detach cannot read plaintext from the cache."""
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except OSError as e:  # ENOENT: the kernel has no such inode cached
            log.debug("invalidate inode %d: %s", inode, e)

    @staticmethod
    def drop_attr(inode: int) -> None:
        """Forget a file's cached attributes, so a resize shows at once."""
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError as e:  # ENOENT: the kernel has no such inode cached
            log.debug("invalidate attributes of inode %d: %s", inode, e)

    @staticmethod
    def request_counts() -> dict | None:
        """The requests the FUSE workers received, by opcode name; None on
        stock pyfuse3, which does not count them."""
        counts = getattr(pyfuse3, "request_counts", None)  # the threads patch
        return named(counts()) if counts else None
