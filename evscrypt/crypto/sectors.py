"""The sector loop of the Python XTS paths: the reference path (xts.py) and
the ctypes fallback of the EVP path (evp.py).

It is the Python twin of ``run_sectors`` in ``_xtssector.h``: the one Python
place where a run of sectors meets the format's tweak and zero-unwritten
rules (evscrypt/format.py), so each path supplies only its cipher for one
sector.  The sector size and the IV units per sector are parameters, as
they are for the C loops.
"""

from __future__ import annotations

from typing import Iterator

from ..format import SECTOR_SIZE, ZERO_SECTOR, tweak


def to_crypt(first: int, src: memoryview, dst: memoryview, sector_size: int, iv_per_sector: int,
             skip_unwritten: bool = False) -> Iterator[tuple[int, bytes]]:
    """(i, tweak) for each sector ``i`` of ``src`` (sector numbers from
    ``first``) that must go through the cipher.  With ``skip_unwritten``, an
    all-zero sector does not: it is written out as zeros in ``dst`` here."""
    zero = None
    if skip_unwritten:
        zero = ZERO_SECTOR if sector_size == SECTOR_SIZE else bytes(sector_size)
    for i in range(len(src) // sector_size):
        if zero is not None:
            lo = i * sector_size
            if src[lo:lo + sector_size] == zero:
                dst[lo:lo + sector_size] = zero
                continue
        yield i, tweak(first + i, iv_per_sector)
