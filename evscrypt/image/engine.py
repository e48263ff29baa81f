"""Read and write any byte range of a volume.

The engine turns a plaintext range into whole sectors (geometry.span), reads
the ciphertext with one pread, decrypts only the sectors that were ever
written (an all-zero stored sector is unwritten and reads as zeros), and
writes back with read-modify-write for partial sectors.

Concurrency: FUSE may run requests in parallel threads.  A read-modify-write
of a partial sector must not lose a concurrent update to the same sector, so
every write holds the striped locks of all the sectors it touches, taken in
ascending order (no deadlock).  Reads take no lock: a 4 KiB aligned pwrite is
atomic with respect to pread on Linux filesystems.
"""

from __future__ import annotations

import os
import threading

from ..crypto.xts import SECTOR_SIZE, SectorCipher
from ..errors import OutOfRange
from . import geometry
from .backing import pread_into, punch_hole, pwrite_all

ZERO_SECTOR = bytes(SECTOR_SIZE)
LOCK_STRIPES = 64


class _SectorLocks:
    """Striped locks by sector number; guard read-modify-write of sectors."""

    def __init__(self, stripes: int = LOCK_STRIPES):
        self._locks = [threading.Lock() for _ in range(stripes)]

    def acquire(self, first: int, count: int) -> list:
        n = len(self._locks)
        if count == 1:  # most requests: skip building the sorted set
            lk = self._locks[first % n]
            lk.acquire()
            return [lk]
        idx = range(n) if count >= n else sorted({(first + i) % n for i in range(count)})
        held = [self._locks[i] for i in idx]
        for lk in held:
            lk.acquire()
        return held

    @staticmethod
    def release(held: list) -> None:
        for lk in reversed(held):
            lk.release()


class Engine:
    """Plaintext view of one volume's data area."""

    def __init__(self, fd: int, size: int, data_offset: int, cipher: SectorCipher | None):
        self.fd = fd
        self.size = size
        self.data_offset = data_offset
        self.cipher = cipher
        self._locks = _SectorLocks()

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"range {offset}+{length} lies outside the volume ({self.size} bytes)")

    # -- sector level --------------------------------------------------------
    def _read_sectors(self, first: int, count: int) -> bytearray:
        buf = bytearray(count * SECTOR_SIZE)
        pread_into(self.fd, buf, geometry.sector_to_backing(self.data_offset, first))
        if self.cipher is None:
            return buf
        if count == 1:  # most requests: one sector, written or not
            if buf != ZERO_SECTOR:
                self.cipher.decrypt_into(first, buf, buf)
            return buf
        mv = memoryview(buf)
        i = 0
        while i < count:
            # find a run of written (non-zero) sectors and decrypt it in one call
            while i < count and mv[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] == ZERO_SECTOR:
                i += 1
            j = i
            while j < count and mv[j * SECTOR_SIZE:(j + 1) * SECTOR_SIZE] != ZERO_SECTOR:
                j += 1
            if j > i:
                run = mv[i * SECTOR_SIZE:j * SECTOR_SIZE]
                self.cipher.decrypt_into(first + i, run, run)
            i = j
        return buf

    def _write_sectors(self, first: int, plain) -> None:
        if self.cipher is None:
            data = plain
        else:
            data = bytearray(len(plain))
            self.cipher.encrypt_into(first, plain, data)
        pwrite_all(self.fd, data, geometry.sector_to_backing(self.data_offset, first))

    # -- byte level ------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | bytearray:
        """The plaintext of a range.  Sector-aligned reads return the engine's
        own buffer (no copy: at 1 MiB a copy is a visible share of the cost)."""
        self.check_range(offset, length)
        if length == 0:
            return b""
        if self.cipher is None:
            buf = bytearray(length)
            pread_into(self.fd, buf, self.data_offset + offset)
            return buf
        sp = geometry.span(offset, length)
        buf = self._read_sectors(sp.first, sp.count)
        if sp.aligned:
            return buf
        return bytes(memoryview(buf)[sp.head:sp.head + length])

    def write(self, offset: int, data) -> int:
        length = len(data)
        self.check_range(offset, length)
        if length == 0:
            return 0
        sp = geometry.span(offset, length)
        held = self._locks.acquire(sp.first, sp.count)
        try:
            if self.cipher is None:
                # plaintext needs no read-modify-write, but the lock still
                # orders it against a partial discard's read-modify-write
                pwrite_all(self.fd, data, self.data_offset + offset)
            elif sp.aligned:
                self._write_sectors(sp.first, data)
            else:
                self._rmw(sp, data)
        finally:
            self._locks.release(held)
        return length

    def _rmw(self, sp: geometry.Span, data) -> None:
        buf = bytearray(sp.byte_len)
        mv = memoryview(buf)
        last = sp.first + sp.count - 1
        # only the edge sectors need their old contents
        if sp.head:
            mv[:SECTOR_SIZE] = self._read_sectors(sp.first, 1)
        if sp.tail and (last != sp.first or not sp.head):
            mv[-SECTOR_SIZE:] = self._read_sectors(last, 1)
        mv[sp.head:sp.head + sp.length] = data
        self._write_sectors(sp.first, buf)

    def discard(self, offset: int, length: int) -> None:
        """Make a range read as zeros, freeing whole sectors in the image."""
        self.check_range(offset, length)
        if length == 0:
            return
        sp = geometry.span(offset, length)
        held = self._locks.acquire(sp.first, sp.count)
        try:
            first_whole = sp.first + (1 if sp.head else 0)
            end_whole = sp.first + sp.count - (1 if sp.tail else 0)
            if sp.count == 1 and (sp.head or sp.tail):
                end_whole = first_whole  # one partial sector: nothing whole
            for s in {sp.first, sp.first + sp.count - 1}:
                if s < first_whole or s >= end_whole:
                    lo = max(offset, s * SECTOR_SIZE)
                    hi = min(offset + length, (s + 1) * SECTOR_SIZE)
                    sector = self._read_sectors(s, 1)
                    sector[lo - s * SECTOR_SIZE:hi - s * SECTOR_SIZE] = bytes(hi - lo)
                    if sector == ZERO_SECTOR:
                        punch_hole(self.fd, geometry.sector_to_backing(self.data_offset, s), SECTOR_SIZE)
                    else:
                        self._write_sectors(s, sector)
            if end_whole > first_whole:
                punch_hole(self.fd, geometry.sector_to_backing(self.data_offset, first_whole),
                           (end_whole - first_whole) * SECTOR_SIZE)
        finally:
            self._locks.release(held)

    def fsync(self, datasync: bool = False) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd)
