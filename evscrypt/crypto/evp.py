"""The fast XTS path: OpenSSL's EVP interface through ctypes.

``cryptography`` builds a new cipher context (and key schedule) for every
sector, which costs ~12 us of overhead per 4 KiB.  Here one EVP context per
thread is keyed once; each sector then only resets the IV (the tweak) and
runs one EVP_CipherUpdate.  ctypes releases the GIL during each call, so
worker threads encrypt in parallel.

The key is passed by pointer from the locked Secret buffer; OpenSSL copies
it into its key schedule, which EVP_CIPHER_CTX_free cleanses.  That schedule
lives in memory OpenSSL allocates: it is locked only where the whole process
is (the daemon's mlockall; see evscrypt.secret).  If libcrypto
cannot be loaded, ``available()`` is False and the reference path is used.
The tests prove this path identical to the per-sector reference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from .sectors import to_crypt

try:  # the C sector loop (setup.py builds it); the ctypes loop otherwise
    from . import _xtsloop
except ImportError:  # pragma: no cover - no compiler at install time
    _xtsloop = None

_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib or None
    name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
    try:
        lib = ctypes.CDLL(name)
        lib.EVP_aes_256_xts.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_free.argtypes = (ctypes.c_void_p,)
        lib.EVP_CipherInit_ex.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
        lib.EVP_CipherUpdate.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                         ctypes.c_void_p, ctypes.c_int)
        if not lib.EVP_aes_256_xts():
            raise OSError("no XTS in libcrypto")
        _lib = lib
        global _INIT, _UPDATE
        _INIT = ctypes.cast(lib.EVP_CipherInit_ex, ctypes.c_void_p).value
        _UPDATE = ctypes.cast(lib.EVP_CipherUpdate, ctypes.c_void_p).value
    except (OSError, AttributeError):
        _lib = False
    return _lib or None


_INIT = _UPDATE = 0  # addresses of EVP_CipherInit_ex / EVP_CipherUpdate


def available() -> bool:
    return _load() is not None


def version_num() -> int:
    """OpenSSL_version_num() of the loaded libcrypto (0x30000130 for 3.0.19), 0 without one."""
    lib = _load()
    if lib is None:
        return 0
    try:
        fn = lib.OpenSSL_version_num
    except AttributeError:  # OpenSSL < 1.1 names it SSLeay; too old to matter
        return 0
    fn.restype = ctypes.c_ulong
    return int(fn())


def version() -> str | None:
    """The loaded libcrypto's version, e.g. '3.0.19' (None without one)."""
    lib = _load()
    if lib is None:
        return None
    try:
        fn = lib.OpenSSL_version
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    fn.argtypes = (ctypes.c_int,)
    text = (fn(0) or b"").decode(errors="replace")  # OPENSSL_VERSION: "OpenSSL 3.0.19 27 Jan 2026"
    parts = text.split()
    return parts[1] if len(parts) > 1 else text or None


def loop_impl() -> str:
    """Which sector loop runs: 'c' (the _xtsloop extension) or 'ctypes'."""
    return "c" if _xtsloop is not None else "ctypes"


def _addr(buf, writable: bool = False) -> tuple[int, object]:
    """Address of a buffer, and an object that keeps it alive."""
    if isinstance(buf, bytes) and not writable:
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value, buf
    mv = memoryview(buf)
    if mv.readonly:
        tmp = bytearray(mv)  # rare: read-only non-bytes input
        c = (ctypes.c_char * len(tmp)).from_buffer(tmp)
        return ctypes.addressof(c), (tmp, c)
    c = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return ctypes.addressof(c), c


class EvpXts:
    """Per-thread EVP contexts for one 64-byte XTS key."""

    def __init__(self, key_view: memoryview, sector_size: int, iv_per_sector: int):
        self._lib = _load()
        if self._lib is None:
            raise OSError("libcrypto is not available")
        if len(key_view) != 64:
            raise ValueError("XTS-AES-256 needs a 64-byte key")
        if key_view[:32] == key_view[32:]:
            # OpenSSL 3.0 refuses equal halves when encrypting but not when
            # decrypting; refuse both here, as SectorCipher does
            raise ValueError("XTS key halves must differ")
        self._key = key_view
        self._sector = sector_size
        self._ivmul = iv_per_sector
        self._local = threading.local()
        self._ctxs: list[int] = []
        self._ctxs_lock = threading.Lock()  # guards _ctxs: contexts made by any thread
        self._closed = False

    def _ctx(self, enc: int) -> int:
        ctxs = getattr(self._local, "ctx", None)
        if ctxs is None:
            ctxs = self._local.ctx = [None, None]
        c = ctxs[enc]
        if c is None:
            if self._closed:
                raise ValueError("cipher is closed")
            lib = self._lib
            c = lib.EVP_CIPHER_CTX_new()
            key_addr, _keep = _addr(self._key, writable=True)
            if not c or lib.EVP_CipherInit_ex(c, lib.EVP_aes_256_xts(), None, key_addr, None, enc) != 1:
                raise OSError("EVP_CipherInit_ex failed")
            ctxs[enc] = c
            with self._ctxs_lock:
                self._ctxs.append(c)
        return c

    def crypt_into(self, first_sector: int, src, dst, encrypt: bool, skip_zero: bool = False) -> None:
        """Run the sectors of src through the cipher into dst.  With
        skip_zero, all-zero sectors are not: they come out as zeros."""
        enc = 1 if encrypt else 0
        ctx = self._ctx(enc)
        if _xtsloop is not None and first_sector + len(src) // self._sector < 1 << 64:
            _xtsloop.crypt_sectors(ctx, _INIT, _UPDATE, first_sector, self._ivmul, src, dst, self._sector, enc,
                                   skip_zero)
            return
        self._crypt_ctypes(ctx, enc, first_sector, src, dst, skip_zero)

    def _crypt_ctypes(self, ctx: int, enc: int, first_sector: int, src, dst, skip_zero: bool) -> None:
        """crypt_into without the C loop (no compiler at install time, or
        sector numbers past 2**64): the same calls, through ctypes."""
        if len(src) % self._sector or len(dst) < len(src):
            raise ValueError("buffers must hold whole sectors")
        src_addr, keep_s = _addr(src)
        dst_addr, keep_d = _addr(dst, writable=True)
        iv = ctypes.create_string_buffer(16)
        outl = ctypes.c_int()
        init, update, ss = self._lib.EVP_CipherInit_ex, self._lib.EVP_CipherUpdate, self._sector
        for i, tweak16 in to_crypt(first_sector, memoryview(src), memoryview(dst), ss, self._ivmul, skip_zero):
            ctypes.memmove(iv, tweak16, 16)
            if init(ctx, None, None, None, iv, enc) != 1 or update(ctx, dst_addr + i * ss, ctypes.byref(outl),
                                                                    src_addr + i * ss, ss) != 1:
                raise OSError("EVP XTS operation failed")
        del keep_s, keep_d

    def close(self) -> None:
        """Free (and so cleanse) every context, from whichever thread made it."""
        self._closed = True
        with self._ctxs_lock:
            for c in self._ctxs:
                self._lib.EVP_CIPHER_CTX_free(c)
            self._ctxs.clear()
        self._local = threading.local()
