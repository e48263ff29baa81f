"""Pure offset arithmetic of a request: a plaintext byte range -> whole sectors.

Nothing here does I/O.  A plaintext byte range maps to a run of whole sectors
(the span); where a sector is stored in the image is the format's
(``format.sector_to_backing``).
"""

from __future__ import annotations

from typing import NamedTuple

from ..format import SECTOR_SIZE


class Span(NamedTuple):
    """The whole sectors that cover a plaintext range.

    A NamedTuple, not a frozen dataclass: one is built for every I/O request,
    and a tuple builds several times faster.
    """

    first: int  # first sector
    count: int  # number of sectors
    head: int  # bytes of the first sector before the range
    length: int  # length of the range

    @property
    def byte_start(self) -> int:
        return self.first * SECTOR_SIZE

    @property
    def byte_len(self) -> int:
        return self.count * SECTOR_SIZE

    @property
    def aligned(self) -> bool:
        return self.head == 0 and self.length % SECTOR_SIZE == 0

    @property
    def tail(self) -> int:
        """Bytes of the last sector after the range."""
        return self.byte_len - self.head - self.length


def span(offset: int, length: int) -> Span:
    first = offset // SECTOR_SIZE
    last = (offset + length + SECTOR_SIZE - 1) // SECTOR_SIZE
    return Span(first, last - first, offset - first * SECTOR_SIZE, length)
