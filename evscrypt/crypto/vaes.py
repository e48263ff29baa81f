"""The fastest XTS path: VAES and AVX-512 in C (``_xtsvaes``).

Used where the CPU has VAES, VPCLMULQDQ and AVX-512 and the kernel saves
their state (checked once, at import, by the extension), unless the system
libcrypto has its own VAES XTS (backend.py decides); ``available()`` is
False elsewhere, and where the compiler lacked the intrinsics the extension
is a stub (``BUILT`` False).  It runs about
twice as fast as OpenSSL 3.0's XTS on such CPUs, which is what decides how
close encrypted I/O comes to unencrypted I/O on a small machine.

The expanded round keys are key material: they live in a locked ``Secret``
that :meth:`VaesXts.close` wipes.  Unlike OpenSSL's contexts they are shared
by every thread (the C code only reads them).  The tests prove this path
identical to the per-sector reference and to the NIST and IEEE vectors.
"""

from __future__ import annotations

from ..secret import Secret

try:
    from . import _xtsvaes
except ImportError:  # pragma: no cover - not x86-64, or no compiler at install time
    _xtsvaes = None

_MASK64 = (1 << 64) - 1
_crypt_sectors = _xtsvaes.crypt_sectors if _xtsvaes is not None else None


def available() -> bool:
    return _xtsvaes is not None and bool(_xtsvaes.SUPPORTED)


def crypt_run_capsule():
    """The C loop for C callers that run without the GIL (``xts_run_fn`` in
    _xtssector.h; the daemon's C data path), or None where it cannot run."""
    return getattr(_xtsvaes, "CRYPT_RUN", None) if available() else None


def unavailable_reason() -> str:
    """Why :func:`available` is False, in one line (for a forced choice)."""
    if _xtsvaes is None:
        return "evscrypt was installed without its _xtsvaes extension (not x86-64, or no C compiler)"
    if not getattr(_xtsvaes, "BUILT", True):
        return "the compiler that built evscrypt lacks the VAES/AVX-512 intrinsics (_xtsvaes is a stub)"
    if not _xtsvaes.SUPPORTED:
        return "this CPU (or kernel) has no VAES/VPCLMULQDQ/AVX-512"
    return "available"


class VaesXts:
    """One 64-byte XTS key, expanded once for all threads."""

    def __init__(self, key_view: memoryview, sector_size: int, iv_per_sector: int):
        if not available():
            raise OSError("this CPU has no VAES/AVX-512")
        self._sched = Secret(_xtsvaes.SCHED_SIZE)
        _xtsvaes.expand(key_view, self._sched.buffer)
        self._buf: bytearray | None = self._sched.buffer  # None once closed
        self._sector = sector_size
        self._ivmul = iv_per_sector

    def crypt_into(self, first_sector: int, src, dst, encrypt: bool, skip_zero: bool = False) -> None:
        """Run the sectors of src through the cipher into dst.  With
        skip_zero, all-zero sectors are not: they come out as zeros."""
        sched = self._buf
        if sched is None:
            raise ValueError("cipher is closed")
        if first_sector >> 60 and (first_sector + len(src) // self._sector) * self._ivmul >> 128:
            raise OverflowError("sector number out of the tweak's range")
        _crypt_sectors(sched, first_sector & _MASK64, first_sector >> 64, self._ivmul, src, dst, self._sector,
                       encrypt, skip_zero)

    def schedule(self) -> bytearray:
        """The expanded keys in place (the locked buffer :meth:`close`
        wipes), for the C data path, which reads them under its own
        registration (daemon/cpath.py) and must be unregistered first."""
        if self._buf is None:
            raise ValueError("cipher is closed")
        return self._buf

    def close(self) -> None:
        self._buf = None
        self._sched.wipe()

    def __repr__(self) -> str:
        return "<VaesXts>"
