"""The C data path (``_cpath.c``): which volumes run in it, and their registration.

With it, the FUSE worker threads answer aligned reads and writes of up to
128 KiB of an encrypted disk in C, without the GIL (pread + XTS + reply),
so the worker threads (two per core) serve them in parallel; Python sees only
what is left (metadata, unaligned and large requests, anything the C side
declines) and handles it as before.  docs/CONCURRENCY.md has the locks,
docs/PERFORMANCE.md why.

A volume runs in C only where nothing but the C side's rules are needed
(:func:`image_of`): encrypted (an unencrypted one has nothing to gain),
on the VAES implementation (the one whose schedule C can read in place;
see docs/SECURITY.md), and backed by a local regular file (pread/pwrite on
the image fd) or an RBD image whose librbd handle C can use
(``_cpath_rbd.c``: librbd's aio, with its completion thread decrypting and
replying).  ``EVSCRYPT_CPATH=0`` turns the C path off: every request goes
to Python, with one worker thread.

The attachment (attachment.py) owns the calls here: register at attach,
hold writes while a snapshot copies, set the size on resize, disable when
the volume fails, unregister (which waits for the requests running in C)
before the key is wiped.
"""

from __future__ import annotations

import os
import stat

from ..format import IV_PER_SECTOR, SECTOR_SIZE
from ..crypto import vaes
from ..image.engine import AIO_LOCK_STRIPES, LOCK_STRIPES

try:
    from . import _cpath
except ImportError:  # pragma: no cover - built without linux/fuse.h or a compiler
    _cpath = None

ENV = "EVSCRYPT_CPATH"
#: How long a worker spins on an empty FUSE device before it sleeps, while
#: spinning keeps finding requests (the adaptive spin of the cfilter patch):
#: a sleep and a wake-up cost a few microseconds of two cores' time.
SPIN_US = int(os.environ.get("EVSCRYPT_SPIN_US", "20"))


def unavailable_reason(pyfuse3=None) -> str | None:
    """Why the C path cannot run here, or None if it can."""
    if os.environ.get(ENV, "").strip() == "0":
        return f"{ENV}=0"
    if _cpath is None:
        return "evscrypt was installed without its _cpath extension"
    if vaes.crypt_run_capsule() is None:
        return vaes.unavailable_reason()
    if pyfuse3 is None:
        import pyfuse3
    if not callable(getattr(pyfuse3, "set_request_filter", None)):
        return "pyfuse3 lacks set_request_filter (patches/pyfuse3-3.5.0-cfilter.patch)"
    return None


def enabled(pyfuse3=None) -> bool:
    return unavailable_reason(pyfuse3) is None


def install(pyfuse3) -> None:
    """Give the C side its cipher and pyfuse3's workers the filter; call
    once, after :func:`enabled`, before the workers start."""
    _cpath.install(vaes.crypt_run_capsule())
    pyfuse3.set_request_filter(_cpath.FILTER, SPIN_US)


def uninstall(pyfuse3) -> None:
    pyfuse3.set_request_filter(None)


def image_of(a) -> tuple[int, int] | None:
    """How the C path would reach attachment ``a``'s image: ``(fd, 0)`` for
    a local file, ``(-1, handle)`` for an RBD image (librbd's handle); None
    if ``a`` cannot be served in C."""
    cipher = a.engine.cipher
    if _cpath is None or not a.header.encrypted or cipher is None or cipher.path != "vaes":
        return None
    fd = a.fd
    if not isinstance(fd, int):
        objects = getattr(fd, "librbd_objects", lambda: None)()
        if objects is None:
            return None
        got = _cpath.rbd_handle(*objects)
        # librbd's answer for the handle must be the image's own size
        return (-1, got[0]) if got is not None and got[1] == fd.size() else None
    try:
        return (fd, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None


class SharedLocks:
    """The engine's striped sector locks (engine._SectorLocks's interface)
    on the C side's mutexes, so Python's read-modify-write and C's
    whole-sector writes exclude each other."""

    def __init__(self, stripes: int = LOCK_STRIPES):
        self.c = _cpath.SectorLocks(stripes=stripes)

    def one(self, sector: int) -> _Held:
        return _Held(self.c, sector)

    def acquire(self, first: int, count: int) -> tuple[int, int]:
        self.c.take(first, count, True)
        return first, count

    def release(self, held: tuple[int, int]) -> None:
        self.c.take(*held, False)


class _Held:
    __slots__ = ("c", "sector")

    def __init__(self, c, sector: int):
        self.c, self.sector = c, sector

    def acquire(self) -> None:
        self.c.take(self.sector, 1, True)

    def release(self) -> None:
        self.c.take(self.sector, 1, False)

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


def register(a) -> bool:
    """Serve ``a``'s aligned I/O in C from now on; False if it cannot be
    (it then stays in Python).  The engine's locks become the shared ones
    first: call before the volume is visible."""
    image = image_of(a)
    if image is None:
        return False
    fd, rbd = image
    # an RBD write holds its sectors while in flight in the cluster: as many stripes as Python's aio path has
    locks = SharedLocks(AIO_LOCK_STRIPES if rbd else LOCK_STRIPES)
    a.engine.set_locks(locks)
    h = a.header
    return _cpath.register(a.inode, fd, rbd, h.data_offset, a.size, SECTOR_SIZE, IV_PER_SECTOR,
                           a.engine.zero_unwritten, a.engine.cipher.schedule(), locks.c, a.c_failed)


def unregister(inode: int) -> tuple[int, int, int, int] | None:
    """Stop serving ``inode`` in C and wait for its requests running there;
    the counts C served (reads, writes, bytes read, bytes written)."""
    return _cpath.unregister(inode)


def counters(inode: int) -> tuple[int, int, int, int]:
    return _cpath.control(inode, "counters")


def disable(inode: int) -> None:
    _cpath.control(inode, "disable")


def set_size(inode: int, size: int) -> None:
    _cpath.control(inode, "size", size)


def hold_writes(inode: int, hold: bool) -> None:
    """With ``hold``, C sends ``inode``'s writes to Python (where the write
    gate holds them) and this waits for those running in C."""
    _cpath.control(inode, "hold", int(hold))
