"""Move a volume's contents into an image with other encryption.

A restore that changes the encryption (a new DK, a new CMK, or none) cannot
copy ciphertext: it decrypts each written sector of the source with the
source's cipher and writes the plaintext through the destination's engine,
which encrypts it under the new DK (or stores it as is).  Unwritten sectors
(stored as zeros, where the source has the zero-unwritten feature) stay
unwritten, so the destination stays sparse.

The source arrives as chunks of its stored image bytes, (offset, data or
None for an all-zero chunk), from a backup or from an image file.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..crypto.xts import SectorCipher
from ..format import SECTOR_SIZE, nonzero_runs, written_runs
from .engine import Engine
from .header import Header

Progress = Callable[[int], None]


def transcode(chunks: Iterable[tuple[int, object]], src: Header, src_cipher: SectorCipher | None,
              dst: Engine) -> None:
    """Write the plaintext of the source's data area into ``dst``."""
    start, end = src.data_offset, src.data_offset + src.size
    for off, data in chunks:
        if data is None:
            continue
        lo, hi = max(off, start), min(off + len(data), end)
        if hi <= lo:
            continue  # the header area
        stored = memoryview(data)[lo - off:hi - off]
        first = (lo - start) // SECTOR_SIZE
        for i, j in written_runs(stored, src.zero_unwritten):
            run = bytearray(stored[i * SECTOR_SIZE:j * SECTOR_SIZE])
            if src_cipher is not None:
                src_cipher.decrypt_into(first + i, run, run)
            if dst.cipher is None:
                # a plaintext destination: a sector of plaintext zeros reads the
                # same as a hole, so keep it a hole
                for a, b in nonzero_runs(run):
                    dst.write((first + i + a) * SECTOR_SIZE, memoryview(run)[a * SECTOR_SIZE:b * SECTOR_SIZE])
            else:
                dst.write((first + i) * SECTOR_SIZE, run)
