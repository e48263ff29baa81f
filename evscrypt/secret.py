"""The one owner type for key bytes.

Key material lives in a ``bytearray`` that is locked into RAM (``mlock``) so
it is never swapped, and is overwritten in place when the key is no longer
needed.  ``repr`` and ``str`` never show the bytes.  Python may still have
made copies we cannot reach (see docs/SECURITY.md): this is best effort, and
the code avoids ``bytes`` copies of keys wherever an API lets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a writable buffer with zeros, in place."""
    if len(buf):
        ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))


class Secret:
    """Key bytes in locked memory, wiped by :meth:`wipe`.

    The buffer is allocated once at its final size and never resized, so no
    stale copy is left behind by a reallocation.
    """

    __slots__ = ("_buf", "_locked", "__weakref__")

    def __init__(self, size: int):
        self._buf = bytearray(size)
        self._locked = False
        if size:
            self._locked = _libc.mlock(_address(self._buf), size) == 0

    @classmethod
    def random(cls, size: int) -> "Secret":
        s = cls(size)
        s._buf[:] = os.urandom(size)  # the temporary bytes object is freed at once
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

    def wipe(self) -> None:
        buf = self._buf
        if buf is None:
            return
        wipe(buf)
        if self._locked:
            _libc.munlock(_address(buf), len(buf))
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


def set_nondumpable() -> None:
    """PR_SET_DUMPABLE 0: no core dumps, no ptrace by non-root, /proc/PID/mem
    readable only with CAP_SYS_PTRACE."""
    PR_SET_DUMPABLE = 4
    _libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def wipe_bytes(b: bytes) -> None:
    """Best effort: overwrite the buffer of an immutable ``bytes`` object that
    a library handed us (botocore's Plaintext).  CPython only; the object must
    not be used afterwards.  Copies the library made before are out of reach."""
    if type(b) is bytes and len(b) > 1:
        import sys

        offset = sys.getsizeof(b"") - 1  # the start of ob_sval in PyBytesObject
        ctypes.memset(id(b) + offset, 0, len(b))
