"""Read and write any byte range of a volume.

The engine turns a plaintext range into whole sectors (geometry.span), reads
the ciphertext with one pread from where the format stores them
(format.sector_to_backing), decrypts only the sectors that were ever written
(with zero-unwritten, format.py's rule), and writes back with
read-modify-write for partial sectors.

Concurrency: FUSE may run requests in parallel threads.  A read-modify-write
of a partial sector must not lose a concurrent update to the same sector, so
every write holds the striped locks of all the sectors it touches, taken in
ascending order (no deadlock).  Reads take no lock: a 4 KiB aligned pwrite is
atomic with respect to pread on Linux filesystems.
"""

from __future__ import annotations

import threading

from ..crypto.xts import SectorCipher
from ..errors import OutOfRange
from ..format import SECTOR_SIZE, ZERO_SECTOR, holes_read_as_zeros, sector_to_backing
from ..parallel import MIN_SPLIT_BYTES, MIN_SPLIT_SECTORS, split_run
from . import geometry
from .backing import pread_into, punch_hole, pwrite_all, read_buffer, sync

LOCK_STRIPES = 64
#: On a store image (RBD) a write holds its sectors' lock for a network
#: round trip (write_aio), so unrelated sectors must rarely share a stripe:
#: with 64, a 4 KiB write at QD16 would find its stripe held about one time
#: in four, and the FUSE worker thread would wait for it.
AIO_LOCK_STRIPES = 4096


class _Plaintext:
    """The cipher of a volume the catalog says is unencrypted.  An Engine
    must be given this explicitly: None is refused, so no path can end up
    writing plaintext by losing its cipher."""

    def __repr__(self) -> str:
        return "PLAINTEXT"


PLAINTEXT = _Plaintext()


class _SectorLocks:
    """Striped locks by sector number; guard read-modify-write of sectors."""

    def __init__(self, stripes: int = LOCK_STRIPES):
        self._locks = [threading.Lock() for _ in range(stripes)]

    def one(self, sector: int) -> threading.Lock:
        """The lock of one sector (a context manager)."""
        return self._locks[sector % len(self._locks)]

    def acquire(self, first: int, count: int) -> list:
        n = len(self._locks)
        if count == 1:  # skip building the sorted set
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


#: Sectors of encrypted zeros a discard writes at a time (1 MiB).
_ZERO_RUN = 256

_tls = threading.local()


def _scratch(n: int) -> memoryview:
    """This thread's buffer for ciphertext on its way to the image.

    Reused from write to write: a fresh 1 MiB bytearray costs an allocation
    and a zero fill, a visible share of a large write.  It only ever holds
    ciphertext, and only until the pwrite returns.  One per thread, shared by
    all volumes, so memory does not grow with the number attached.
    """
    buf = getattr(_tls, "buf", None)
    if buf is None or len(buf) < n:
        buf = _tls.buf = bytearray(n)
    return memoryview(buf)[:n]


class Engine:
    """Plaintext view of one volume's data area."""

    def __init__(self, fd: int, size: int, data_offset: int, cipher: SectorCipher | _Plaintext,
                 zero_unwritten: bool = True):
        if cipher is None:
            raise TypeError("an Engine needs a cipher, or PLAINTEXT for an unencrypted volume")
        self.fd = fd
        self.size = size
        self.data_offset = data_offset
        self.cipher: SectorCipher | None = None if cipher is PLAINTEXT else cipher
        #: An all-zero stored sector is unwritten and reads as zeros, and
        #: discard punches holes (the header's zero-unwritten feature).
        #: Without it (a preallocated volume), every sector is decrypted and
        #: discard writes encrypted zeros, as dm-crypt does.
        self.zero_unwritten = zero_unwritten
        self._locks = _SectorLocks(AIO_LOCK_STRIPES if type(fd) is not int else LOCK_STRIPES)

    def set_locks(self, locks) -> None:
        """Share the sector locks with another writer of the same image (the
        daemon's C data path, daemon/cpath.py); before any I/O."""
        self._locks = locks

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"range {offset}+{length} lies outside the volume ({self.size} bytes)")

    # -- sector level --------------------------------------------------------
    def _read_sectors(self, first: int, count: int, split: bool = True) -> bytearray:
        buf = read_buffer(count * SECTOR_SIZE)  # _read_run fills every byte
        if count < MIN_SPLIT_SECTORS or not (split and self.cipher and self.cipher.splits):  # no split, no closure
            self._read_run(first, buf)
            return buf
        mv = memoryview(buf)
        split_run(count, lambda lo, hi: self._read_run(first + lo, mv[lo * SECTOR_SIZE:hi * SECTOR_SIZE]))
        return buf

    def _read_run(self, first: int, out) -> None:
        """Read and decrypt sectors from ``first`` into ``out``.  A large read
        runs as one such part per core (split_run): each part's pread and
        decryption overlap the other's."""
        pread_into(self.fd, out, sector_to_backing(self.data_offset, first))
        if self.cipher is not None:
            self.cipher.decrypt_into(first, out, out, skip_zero=self.zero_unwritten)  # unwritten sectors stay zeros

    def _write_sectors(self, first: int, plain, split: bool = True) -> None:
        if self.cipher is None:
            pwrite_all(self.fd, plain, sector_to_backing(self.data_offset, first))
            return
        data = _scratch(len(plain))
        # Large writes split on every path: while one part's ciphertext goes
        # to the image, the other part is encrypted (pwrites to one file take
        # its inode lock in turn).  Reads split only where SectorCipher.splits.
        if len(plain) < MIN_SPLIT_BYTES or not split:  # no split, no closure
            self.cipher.encrypt_into(first, plain, data)
            pwrite_all(self.fd, data, sector_to_backing(self.data_offset, first))
            return
        src, dst = memoryview(plain), memoryview(data)

        def part(lo: int, hi: int) -> None:  # encrypt, then write, one part per core
            a, b = lo * SECTOR_SIZE, hi * SECTOR_SIZE
            self.cipher.encrypt_into(first + lo, src[a:b], dst[a:b])
            pwrite_all(self.fd, dst[a:b], sector_to_backing(self.data_offset, first + lo))

        split_run(len(plain) // SECTOR_SIZE, part)

    # -- byte level ------------------------------------------------------------
    def read(self, offset: int, length: int, split: bool = True) -> bytes | bytearray:
        """The plaintext of a range.  Sector-aligned reads return the engine's
        own buffer (no copy: at 1 MiB a copy is a visible share of the cost).
        ``split=False`` keeps a large request on this thread (the daemon
        passes it when other requests keep the cores busy)."""
        cipher = self.cipher
        if length == SECTOR_SIZE and not offset % SECTOR_SIZE and cipher is not None \
                and 0 <= offset <= self.size - SECTOR_SIZE:
            # the most common request, one whole sector: no span, no split
            buf = bytearray(SECTOR_SIZE)
            pread_into(self.fd, buf, self.data_offset + offset)  # sector_to_backing, inlined
            cipher.decrypt_into(offset // SECTOR_SIZE, buf, buf, skip_zero=self.zero_unwritten)
            return buf
        self.check_range(offset, length)
        if length == 0:
            return b""
        if self.cipher is None:
            buf = read_buffer(length)
            pread_into(self.fd, buf, self.data_offset + offset)  # sector_to_backing, by the byte
            return buf
        sp = geometry.span(offset, length)
        buf = self._read_sectors(sp.first, sp.count, split)
        if sp.aligned:
            return buf
        return bytes(memoryview(buf)[sp.head:sp.head + length])

    def write(self, offset: int, data, split: bool = True) -> int:
        """Write a range; ``split`` as for :meth:`read`."""
        length = len(data)
        cipher = self.cipher
        if length == SECTOR_SIZE and not offset % SECTOR_SIZE and cipher is not None \
                and 0 <= offset <= self.size - SECTOR_SIZE:
            # the most common request, one whole sector: no span, no split
            # (a fresh 4 KiB buffer costs less than the thread's scratch one)
            out = bytearray(SECTOR_SIZE)
            with self._locks.one(offset // SECTOR_SIZE):
                cipher.encrypt_into(offset // SECTOR_SIZE, data, out)
                pwrite_all(self.fd, out, self.data_offset + offset)  # sector_to_backing, inlined
            return SECTOR_SIZE
        self.check_range(offset, length)
        if length == 0:
            return 0
        sp = geometry.span(offset, length)
        held = self._locks.acquire(sp.first, sp.count)
        try:
            if self.cipher is None:
                # plaintext needs no read-modify-write, but the lock still
                # orders it against a partial discard's read-modify-write
                pwrite_all(self.fd, data, self.data_offset + offset)  # sector_to_backing, by the byte
            elif sp.aligned:
                self._write_sectors(sp.first, data, split)
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
        """Make a range read as zeros, freeing whole sectors in the image
        (or, without zero-unwritten, writing encrypted zeros over them)."""
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
                    if sector == ZERO_SECTOR and self._holes:
                        punch_hole(self.fd, sector_to_backing(self.data_offset, s), SECTOR_SIZE)
                    else:
                        self._write_sectors(s, sector)
            if end_whole > first_whole:
                self._zero_sectors(first_whole, end_whole)
        finally:
            self._locks.release(held)

    @property
    def _holes(self) -> bool:
        """Whether a hole reads as zeros (the format's rule)."""
        return holes_read_as_zeros(self.cipher is not None, self.zero_unwritten)

    def _zero_sectors(self, first: int, end: int) -> None:
        """Sectors [first, end) read as zeros from now on."""
        if self._holes:
            punch_hole(self.fd, sector_to_backing(self.data_offset, first), (end - first) * SECTOR_SIZE)
            return
        zeros = bytes(min(end - first, _ZERO_RUN) * SECTOR_SIZE)
        while first < end:
            n = min(end - first, _ZERO_RUN)
            self._write_sectors(first, memoryview(zeros)[:n * SECTOR_SIZE])
            first += n

    # -- in the background, on a store image -------------------------------------
    @property
    def aio(self) -> bool:
        """Is the image a store's (RBD) rather than a file?  Then a request
        can stay in flight in the store while the calling thread goes on
        (:meth:`read_aio`, :meth:`write_aio`): a FUSE worker thread that
        waited out each network round trip would serve one at a time."""
        return type(self.fd) is not int

    def read_aio(self, offset: int, length: int, done) -> None:
        """Read a range in the background: ``done(plaintext, None)`` or
        ``done(None, error)`` runs in the store's completion thread, which
        also decrypts."""
        cipher, zero = self.cipher, self.zero_unwritten
        if length == SECTOR_SIZE and not offset % SECTOR_SIZE and cipher is not None \
                and 0 <= offset <= self.size - SECTOR_SIZE:
            # the most common request, one whole sector: no span
            sector = offset // SECTOR_SIZE

            def one(data, error) -> None:
                if error is None:
                    try:
                        out = bytearray(SECTOR_SIZE)
                        cipher.decrypt_into(sector, data, out, skip_zero=zero)
                        data = out
                    except Exception as e:  # a cipher closed by a forced detach
                        data, error = None, e
                done(data, error)

            self.fd.aio_read(self.data_offset + offset, SECTOR_SIZE, one)  # sector_to_backing, inlined
            return
        self.check_range(offset, length)
        if cipher is None:
            self.fd.aio_read(self.data_offset + offset, length, done)
            return
        sp = geometry.span(offset, length)

        def finished(data, error) -> None:
            if error is None:
                try:
                    out = bytearray(len(data))
                    cipher.decrypt_into(sp.first, data, out, skip_zero=zero)
                    data = out if sp.aligned else bytes(memoryview(out)[sp.head:sp.head + length])
                except Exception as e:  # a cipher closed by a forced detach: the request fails
                    data, error = None, e
            done(data, error)

        self.fd.aio_read(sector_to_backing(self.data_offset, sp.first), sp.byte_len, finished)

    def write_aio(self, offset: int, data, done) -> bool:
        """Write a range of whole sectors in the background: ``done(length,
        None)`` or ``done(None, error)`` as for :meth:`read_aio`; the sectors'
        locks are held until then.  False (nothing done) for a range that
        needs a read-modify-write: :meth:`write` it."""
        length = len(data)
        cipher = self.cipher
        if length == SECTOR_SIZE and not offset % SECTOR_SIZE and cipher is not None \
                and 0 <= offset <= self.size - SECTOR_SIZE:
            # the most common request, one whole sector: no span, one lock
            lock = self._locks.one(offset // SECTOR_SIZE)
            lock.acquire()
            try:
                out = bytearray(SECTOR_SIZE)
                cipher.encrypt_into(offset // SECTOR_SIZE, data, out)
                self.fd.aio_write(bytes(out), self.data_offset + offset,  # sector_to_backing, inlined
                                  lambda _, error: (lock.release(), done(None if error else SECTOR_SIZE, error)))
            except BaseException:
                lock.release()
                raise
            return True
        self.check_range(offset, length)
        if length == 0 or (cipher is not None and (offset % SECTOR_SIZE or length % SECTOR_SIZE)):
            return False
        sp = geometry.span(offset, length)
        held = self._locks.acquire(sp.first, sp.count)

        def finished(_, error) -> None:
            self._locks.release(held)
            done(None if error else length, error)

        try:
            if cipher is None:
                out = bytes(data)  # the caller's buffer is not ours once we return
            else:
                out = bytearray(length)
                cipher.encrypt_into(sp.first, data, out)
            self.fd.aio_write(out, self.data_offset + offset, finished)
        except BaseException:
            self._locks.release(held)
            raise
        return True

    def fsync(self, datasync: bool = False) -> None:
        sync(self.fd, datasync)
