"""The sector loop of the Python XTS paths: the reference path (xts.py) and
the ctypes fallback of the EVP path (evp.py).

It is the Python twin of ``run_sectors`` in ``_xtssector.h``: the one Python
place where a run of sectors meets the format's tweak and zero-unwritten
rules (evscrypt/format.py), so each path supplies only its cipher for one
sector.  The sector size and the IV units per sector are parameters, as
they are for the C loops.
"""

from __future__ import annotations

from typing import Callable

from ..format import tweak

#: ``unit(i, tweak16)`` runs sector ``i`` of the request through the cipher.
Unit = Callable[[int, bytes], None]


def run_sectors(unit: Unit, first: int, src, dst, sector_size: int, iv_per_sector: int,
                skip_unwritten: bool = False) -> None:
    """Call ``unit`` for each sector of ``src`` (sector numbers from
    ``first``).  With ``skip_unwritten``, an all-zero sector is not: it comes
    out as zeros in ``dst``."""
    src, dst = memoryview(src), memoryview(dst)
    zero = bytes(sector_size) if skip_unwritten else None
    for i in range(len(src) // sector_size):
        if zero is not None:
            lo = i * sector_size
            if src[lo:lo + sector_size] == zero:
                dst[lo:lo + sector_size] = zero
                continue
        unit(i, tweak(first + i, iv_per_sector))
