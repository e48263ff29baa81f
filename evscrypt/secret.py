"""The one owner type for key bytes, and the memory it lives in.

Key material lives in a ``bytearray`` that is locked into RAM so it is never
swapped, and is overwritten in place when the key is no longer needed.
``repr`` and ``str`` never show the bytes.  Python may still have made
copies we cannot reach (see docs/SECURITY.md): this is best effort, and the
code avoids ``bytes`` copies of keys wherever an API lets it.

Locking.  ``mlock`` works on whole pages and does not nest: one ``munlock``
unlocks a page whatever else on it was locked, and small buffers share
pages.  Two regimes follow from that:

- The daemon calls :func:`lock_all_memory` (``mlockall``) at start: every
  page it has or will have is locked, including OpenSSL's cipher contexts
  and thread stacks, and a :class:`Secret` never unlocks anything.
- Elsewhere (CLI processes that may not lock everything, tests, library
  use) each secret locks its own pages and a per-page count keeps a page
  locked until the last secret on it is wiped.

A process that creates a secret is made non-dumpable first (no core dump,
no ptrace or ``/proc/PID/mem`` for other users).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import threading

from .errors import MemoryProtectionError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
for _name in ("mlock", "munlock"):
    getattr(_libc, _name).argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mlockall.argtypes = (ctypes.c_int,)
_libc.munlockall.argtypes = ()
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.getrandom.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
_libc.getrandom.restype = ctypes.c_ssize_t

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# <sys/mman.h>: MCL_ONFAULT (Linux 4.4) locks each page when it is first
# touched instead of faulting in every mapping at once; without it the
# daemon's RSS would grow by every thread's whole stack and every reserved
# malloc arena (docs/PERFORMANCE.md, "Locked memory", has the figures).
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
CAP_IPC_LOCK = 14
#: The one line every refusal to run with swappable keys ends with.
MEMLOCK_HINT = ("raise RLIMIT_MEMLOCK (LimitMEMLOCK=infinity in the systemd unit, `ulimit -l unlimited` "
                "in a shell) or grant CAP_IPC_LOCK")

_pins: dict[int, int] = {}  # page address -> number of live secrets on that page
_pins_lock = threading.Lock()  # guards _pins and the mlock state of the pages in it
_all_locked = False  # mlockall(MCL_FUTURE) is in force: never munlock
_nondumpable = False  # PR_SET_DUMPABLE 0 done (inherited by fork, reset by exec)


def _address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def _pages(addr: int, size: int) -> range:
    return range(addr - addr % PAGE_SIZE, addr + size, PAGE_SIZE)


def _pin(addr: int, size: int) -> bool:
    """Count a secret on its pages, locking a page when its first secret
    arrives.  True if every page is locked."""
    ok = True
    with _pins_lock:
        for page in _pages(addr, size):
            n = _pins.get(page, 0)
            if n == 0 and not _all_locked and _libc.mlock(page, PAGE_SIZE) != 0:
                ok = False
            _pins[page] = n + 1
        return ok or _all_locked


def _unpin(addr: int, size: int) -> None:
    """Uncount a wiped secret; unlock a page only when its last secret is
    gone, and never while mlockall is in force (that would unlock it for good)."""
    with _pins_lock:
        for page in _pages(addr, size):
            n = _pins.pop(page) - 1
            if n:
                _pins[page] = n
            elif not _all_locked:
                _libc.munlock(page, PAGE_SIZE)


def _relock_pins() -> None:
    """Lock again the page of every live secret (after something unlocked all)."""
    for page in _pins:
        _libc.mlock(page, PAGE_SIZE)


def _relock_after_fork() -> None:
    """Memory locks are not inherited by a forked child: lock again the pages
    of the secrets it inherited."""
    global _pins_lock, _all_locked
    _pins_lock = threading.Lock()
    _all_locked = False
    _relock_pins()


os.register_at_fork(after_in_child=_relock_after_fork)


def page_locked_count(addr: int) -> int:
    """How many live secrets this module counts on the page of ``addr`` (tests)."""
    with _pins_lock:
        return _pins.get(addr - addr % PAGE_SIZE, 0)


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a writable buffer with zeros, in place."""
    if len(buf):
        ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))


def random_into(buf: bytearray | memoryview) -> None:
    """Fill a writable buffer from the kernel's CSPRNG (getrandom), in place:
    no intermediate ``bytes`` object as ``os.urandom`` would make."""
    size = len(buf)
    addr = ctypes.addressof((ctypes.c_char * size).from_buffer(buf)) if size else 0
    done = 0
    while done < size:
        n = _libc.getrandom(addr + done, size - done, 0)
        if n < 0:
            err = ctypes.get_errno()
            if err == 4:  # EINTR
                continue
            raise OSError(err, f"getrandom: {os.strerror(err)}")
        done += n


class Secret:
    """Key bytes in locked memory, wiped by :meth:`wipe`.

    The buffer is allocated once at its final size and never resized, so no
    stale copy is left behind by a reallocation.
    """

    __slots__ = ("_buf", "_addr", "_locked", "__weakref__")

    def __init__(self, size: int):
        if not _nondumpable:
            set_nondumpable()
        self._buf = bytearray(size)
        self._addr = _address(self._buf) if size else 0
        self._locked = _pin(self._addr, size) if size else True

    @classmethod
    def random(cls, size: int) -> "Secret":
        """``size`` random bytes, read straight into the locked buffer."""
        s = cls(size)
        random_into(s._buf)
        return s

    @classmethod
    def from_buffer(cls, data, wipe_source: bool = False) -> "Secret":
        """Copy ``data`` into a new secret; optionally wipe a writable source."""
        s = cls(len(data))
        s._buf[:] = data
        if wipe_source and isinstance(data, (bytearray, memoryview)):
            wipe(data)
        return s

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def buffer(self) -> bytearray:
        """The live buffer.  Do not keep or copy it; slice views only."""
        if self._buf is None:
            raise ValueError("secret already wiped")
        return self._buf

    def view(self, start: int = 0, end: int | None = None) -> memoryview:
        return memoryview(self.buffer)[start:end]

    def copy(self) -> "Secret":
        return Secret.from_buffer(self.buffer)

    @property
    def wiped(self) -> bool:
        return self._buf is None

    @property
    def locked(self) -> bool:
        """Whether every page of the buffer was locked when it was made."""
        return self._locked

    def wipe(self) -> None:
        buf = self._buf
        if buf is None:
            return
        wipe(buf)
        if len(buf):
            _unpin(self._addr, len(buf))
        self._buf = None

    def __enter__(self) -> "Secret":
        return self

    def __exit__(self, *exc) -> None:
        self.wipe()

    def __del__(self):
        try:
            self.wipe()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "wiped" if self._buf is None else f"{len(self._buf)} bytes"
        return f"<Secret {state}>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("secrets cannot be pickled")

    def __eq__(self, other):  # pragma: no cover - guard against accidental use
        return NotImplemented

    __hash__ = None


# -- base64 without an immutable copy (the local root key file) ----------------
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_UNB64 = {c: i for i, c in enumerate(_B64)}


def b64_encode(key: Secret) -> Secret:
    """Standard base64 of a secret, as a new secret.  Byte by byte into the
    output buffer: every intermediate value is below 256, and CPython keeps
    those as shared small ints, so no new object holds key bits."""
    src = key.buffer
    n = len(src)
    out = Secret(4 * ((n + 2) // 3))
    dst = out.buffer
    j = 0
    for i in range(0, n, 3):
        b0 = src[i]
        b1 = src[i + 1] if i + 1 < n else 0
        b2 = src[i + 2] if i + 2 < n else 0
        dst[j] = _B64[b0 >> 2]
        dst[j + 1] = _B64[((b0 & 3) << 4) | (b1 >> 4)]
        dst[j + 2] = _B64[((b1 & 15) << 2) | (b2 >> 6)] if i + 1 < n else 61  # '='
        dst[j + 3] = _B64[b2 & 63] if i + 2 < n else 61
        j += 4
    return out


def b64_decode(text) -> Secret:
    """Decode standard base64 (``text``: a buffer of ASCII) into a new secret,
    the same way as :func:`b64_encode`.  ValueError if it is not base64."""
    n = len(text)
    if n % 4:
        raise ValueError("base64 text length is not a multiple of 4")
    pad = (text[n - 1] == 61) + (text[n - 2] == 61) if n else 0
    out = Secret(3 * (n // 4) - pad)
    dst = out.buffer
    j = 0
    try:
        for i in range(0, n, 4):
            last = i + 4 == n
            c0, c1 = _UNB64[text[i]], _UNB64[text[i + 1]]
            dst[j] = (c0 << 2) | (c1 >> 4)  # every term stays below 256
            if last and pad == 2:
                break
            c2 = _UNB64[text[i + 2]]
            dst[j + 1] = ((c1 & 15) << 4) | (c2 >> 2)
            if last and pad == 1:
                break
            dst[j + 2] = ((c2 & 3) << 6) | _UNB64[text[i + 3]]
            j += 3
    except KeyError:
        out.wipe()
        raise ValueError("not base64") from None
    return out


# -- the process ----------------------------------------------------------------
def set_nondumpable() -> None:
    """PR_SET_DUMPABLE 0: no core dumps, no ptrace by non-root, /proc/PID/mem
    readable only with CAP_SYS_PTRACE.  Checked: a process that cannot be
    made so must not go on to hold keys."""
    global _nondumpable
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise MemoryProtectionError(f"cannot make this process non-dumpable (prctl PR_SET_DUMPABLE: "
                                    f"{os.strerror(err) if err else 'no effect'}); refusing to hold keys")
    _nondumpable = True


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def _memlock_limit() -> str:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"


def lock_all_memory() -> None:
    """Lock every page this process has and will have (``mlockall`` with
    MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT); from then on no secret unlocks
    a page.  :class:`MemoryProtectionError` if that cannot be done.

    With ``MCL_FUTURE`` every later allocation counts against RLIMIT_MEMLOCK,
    so a finite limit without CAP_IPC_LOCK would make some allocation fail
    later, at any point: that is refused now too (and the lock undone)."""
    global _all_locked
    limit = _memlock_limit()
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        problem = f"mlockall: {os.strerror(ctypes.get_errno())}; RLIMIT_MEMLOCK is {limit}"
    elif limit != "unlimited" and not _has_cap_ipc_lock():
        with _pins_lock:
            _libc.munlockall()
            _relock_pins()  # the secrets made before keep their pages locked
        problem = f"RLIMIT_MEMLOCK is {limit} and the process lacks CAP_IPC_LOCK: later allocations would fail"
    else:
        with _pins_lock:
            _all_locked = True
        return
    raise MemoryProtectionError(f"cannot lock memory to keep keys out of swap ({problem}); {MEMLOCK_HINT}")


def all_memory_locked() -> bool:
    return _all_locked


def wipe_bytes(b: bytes) -> None:
    """Best effort: overwrite the buffer of an immutable ``bytes`` object that
    a library handed us (botocore's Plaintext).  CPython only; the object must
    not be used afterwards.  Copies the library made before are out of reach."""
    if type(b) is bytes and len(b) > 1:
        import sys

        offset = sys.getsizeof(b"") - 1  # the start of ob_sval in PyBytesObject
        ctypes.memset(id(b) + offset, 0, len(b))
