"""The C data path (``_cpath.c``): which volumes run in it, and their registration.

With it, the FUSE worker threads answer aligned reads and writes of up to
128 KiB of an encrypted disk in C, without the GIL (pread + XTS + reply),
so the worker threads (two per core) serve them in parallel; Python sees only
what is left (metadata, unaligned and large requests, anything the C side
declines) and handles it as before.  docs/CONCURRENCY.md has the locks,
docs/PERFORMANCE.md why.

A volume runs in C only where nothing but the C side's rules are needed
(:func:`runs_in_c`): encrypted (an unencrypted one has nothing to gain),
on the VAES implementation (the one whose schedule C can read in place;
see docs/SECURITY.md), and backed by a local regular file (pread/pwrite on
the image fd).  ``EVSCRYPT_CPATH=0`` turns the C path off: every request
goes to Python, with one worker thread.

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


def runs_in_c(a) -> bool:
    """Whether attachment ``a`` can be served by the C path."""
    cipher = a.engine.cipher
    if _cpath is None or not a.header.encrypted or cipher is None or cipher.path != "vaes":
        return False
    fd = a.fd
    if not isinstance(fd, int):
        return False  # a store image (RBD): its I/O goes through librbd, in Python
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class SharedLocks:
    """The engine's striped sector locks (engine._SectorLocks's interface)
    on the C side's mutexes, so Python's read-modify-write and C's
    whole-sector writes exclude each other."""

    def __init__(self):
        self.c = _cpath.SectorLocks()

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

    def __enter__(self) -> None:
        self.c.take(self.sector, 1, True)

    def __exit__(self, *exc) -> None:
        self.c.take(self.sector, 1, False)


def register(a) -> bool:
    """Serve ``a``'s aligned I/O in C from now on; False if it cannot be
    (it then stays in Python).  The engine's locks become the shared ones
    first: call before the volume is visible."""
    if not runs_in_c(a):
        return False
    locks = SharedLocks()
    a.engine.set_locks(locks)
    h = a.header
    return _cpath.register(a.inode, a.fd, h.data_offset, a.size, SECTOR_SIZE, IV_PER_SECTOR, a.engine.zero_unwritten,
                           a.engine.cipher.schedule(), locks.c)


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
