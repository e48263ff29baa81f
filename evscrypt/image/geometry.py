"""Pure offset arithmetic between the plaintext disk and the backing image.

Nothing here does I/O.  A plaintext byte range maps to a run of whole sectors
(the span); sector ``n`` is stored at ``data_offset + n * SECTOR_SIZE``.
"""

from __future__ import annotations

from typing import NamedTuple

from ..crypto.xts import SECTOR_SIZE

#: Where the data area starts in a new image.  1 MiB keeps the data aligned
#: for every block layer and leaves room for the two header copies.
DEFAULT_DATA_OFFSET = 1 << 20


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


def sector_to_backing(data_offset: int, sector: int) -> int:
    return data_offset + sector * SECTOR_SIZE


def sectors(size: int) -> int:
    return size // SECTOR_SIZE


def is_sector_multiple(n: int) -> bool:
    return n % SECTOR_SIZE == 0
