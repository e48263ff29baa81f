"""XTS-AES-256 by sector number, bit-compatible with dm-crypt aes-xts-plain64.

The sector size, the tweak of a sector (plain64) and the zero-unwritten rule
are the format's (evscrypt/format.py); this module runs them on one of the
three implementations backend.py chooses, and hands the sector size and the
IV units per sector to the fast ones as parameters.  The 64-byte data key is
split as XTS specifies: the first 32 bytes key the data cipher, the last 32
bytes key the tweak cipher.  It knows nothing of files.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..format import IV_PER_SECTOR, KEY_SIZE, SECTOR_SIZE, tweak
from ..parallel import MIN_SPLIT_BYTES, MIN_SPLIT_SECTORS, split_run
from ..secret import Secret
from . import backend, evp, vaes
from .sectors import to_crypt


def _check(data_len: int) -> int:
    if data_len % SECTOR_SIZE:
        raise ValueError("XTS sector data must be a multiple of 4096 bytes")
    return data_len // SECTOR_SIZE


def reference_crypt(key, first_sector: int, data, encrypt: bool) -> bytes:
    """The reference path: one ``cryptography`` XTS call per 4 KiB sector.

    Slow (a new cipher context per sector) and obviously right; every faster
    path is tested against it.
    """
    n = _check(len(data))
    out = bytearray(len(data))
    mv = memoryview(data)
    aes = algorithms.AES(key)
    for i in range(n):
        c = Cipher(aes, modes.XTS(tweak(first_sector + i)))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = ctx.update(mv[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]) + ctx.finalize()
    return bytes(out)


class SectorCipher:
    """Encrypts and decrypts whole sectors of one volume.

    It keeps its own locked copy of the key, so the caller may wipe theirs;
    :meth:`close` wipes that copy.  Thread-safe: no state is shared between
    calls except the read-only key.
    """

    def __init__(self, key: Secret):
        if len(key) != KEY_SIZE:
            raise ValueError("XTS-AES-256 needs a 64-byte key")
        half = KEY_SIZE // 2
        if key.view(0, half) == key.view(half):
            # IEEE 1619 / FIPS: equal halves make XTS degenerate; refuse early
            raise ValueError("XTS key halves must differ")
        self._key = key.copy()
        self._aes = algorithms.AES(self._key.view())
        self._fast = None
        self._path = backend.choose()
        if self._path == "vaes":
            self._fast = vaes.VaesXts(self._key.view(), SECTOR_SIZE, IV_PER_SECTOR)
        elif self._path == "evp":
            self._fast = evp.EvpXts(self._key.view(), SECTOR_SIZE, IV_PER_SECTOR)
        self._whole = self._path != "evp"  # requests run whole, never split (see splits)

    @property
    def splits(self) -> bool:
        """Whether large reads (and this cipher's own large calls) should be
        split across the cores.

        Measured with fio on two cores: on the EVP path (~4.6 GB/s per core)
        splitting a 1 MiB read pays at queue depth 1 (+10%); on the VAES
        path one part's AES is so short that the hand-over to the other
        core costs as much as it saves.  (Large writes split on every path:
        see Engine._write_sectors.)"""
        return not self._whole

    @property
    def path(self) -> str:
        """Which implementation runs: 'vaes' (VAES/AVX-512 in C), 'evp'
        (OpenSSL) or 'reference' (``cryptography``); backend.py chooses,
        and ``EVSCRYPT_XTS`` forces one."""
        return self._path

    def _crypt_into(self, first_sector: int, src, dst, encrypt: bool, skip_zero: bool = False) -> None:
        n = _check(len(src))
        if self._aes is None:
            raise ValueError("cipher is closed")
        if self._fast is not None:
            fast = self._fast
            if n < MIN_SPLIT_SECTORS or self._whole:  # no split, no closure
                fast.crypt_into(first_sector, src, dst, encrypt, skip_zero)
                return
            src, dst = memoryview(src), memoryview(dst)
            split_run(n, lambda lo, hi: fast.crypt_into(first_sector + lo, src[lo * SECTOR_SIZE:hi * SECTOR_SIZE],
                                                        dst[lo * SECTOR_SIZE:hi * SECTOR_SIZE], encrypt, skip_zero))
            return
        self._reference_into(first_sector, src, dst, encrypt, skip_zero)

    def _reference_into(self, first_sector: int, src, dst, encrypt: bool, skip_zero: bool) -> None:
        """The reference path: one ``cryptography`` context per sector."""
        src, dst = memoryview(src), memoryview(dst)
        aes = self._aes
        buf = bytearray(SECTOR_SIZE + 15)
        for i, tweak16 in to_crypt(first_sector, src, dst, SECTOR_SIZE, IV_PER_SECTOR, skip_zero):
            lo = i * SECTOR_SIZE
            c = Cipher(aes, modes.XTS(tweak16))
            ctx = c.encryptor() if encrypt else c.decryptor()
            k = ctx.update_into(src[lo:lo + SECTOR_SIZE], buf)
            dst[lo:lo + k] = buf[:k]
            ctx.finalize()

    def schedule(self) -> bytearray:
        """The VAES key schedule in place (locked, wiped by :meth:`close`),
        for the daemon's C data path; ValueError on any other implementation."""
        if self._path != "vaes" or self._fast is None:
            raise ValueError("no VAES key schedule")
        return self._fast.schedule()

    def encrypt_into(self, first_sector: int, src, dst) -> None:
        fast = self._fast
        if fast is not None and (self._whole or len(src) < MIN_SPLIT_BYTES):
            fast.crypt_into(first_sector, src, dst, True)  # the common case, straight to C
            return
        self._crypt_into(first_sector, src, dst, True)

    def decrypt_into(self, first_sector: int, src, dst, skip_zero: bool = False) -> None:
        """Decrypt whole sectors.  With ``skip_zero``, sectors of ``src`` that
        are all zeros are not decrypted and come out as zeros: the engine
        stores an unwritten sector as zeros, and this way one call (one pass,
        in C on the fast path) handles a run that mixes both."""
        fast = self._fast
        if fast is not None and (self._whole or len(src) < MIN_SPLIT_BYTES):
            fast.crypt_into(first_sector, src, dst, False, skip_zero)  # the common case, straight to C
            return
        self._crypt_into(first_sector, src, dst, False, skip_zero)

    def encrypt(self, first_sector: int, data) -> bytearray:
        out = bytearray(len(data))
        self.encrypt_into(first_sector, data, out)
        return out

    def decrypt(self, first_sector: int, data) -> bytearray:
        out = bytearray(len(data))
        self.decrypt_into(first_sector, data, out)
        return out

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        self._aes = None
        self._key.wipe()

    def __repr__(self) -> str:
        return "<SectorCipher aes-xts-plain64>"
