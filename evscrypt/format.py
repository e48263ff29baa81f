"""The image format's facts, each stated once: the sector, its IV, where it is
stored, and when a stored sector counts as unwritten.

docs/FORMAT.md is the specification; this module is its numbers and rules in
code, as gocryptfs keeps its offset arithmetic in ``contentenc/offsets.go``
and cryptsetup makes every IV in ``crypt_sector_iv_generate``.  The layers
above take them from here and restate none of them: the crypto layer hands
SECTOR_SIZE and IV_PER_SECTOR to its loops as parameters (their C side,
``crypto/_xtssector.h``, is the one C form of :func:`tweak` and of the
zero-unwritten skip), the header validates against them, the engine maps
sectors to the image with :func:`sector_to_backing`.  Nothing here does I/O
or cryptography.
"""

from __future__ import annotations

from typing import Iterable, Iterator

# -- the image ----------------------------------------------------------------

#: The header area holds two copies of the header, each in a fixed 64 KiB
#: slot, as LUKS2 does (image/header/slots.py writes them).
SLOT_SIZE = 64 * 1024
COPIES = 2
HEADER_AREA = SLOT_SIZE * COPIES
#: Where the data area starts in a new image.  1 MiB keeps the data aligned
#: for every block layer and leaves room past the header area.
DEFAULT_DATA_OFFSET = 1 << 20

# -- the sector and its IV ----------------------------------------------------

#: A volume sector: the unit of encryption (one XTS data unit), of the tweak,
#: and of every read and write of the image.
SECTOR_SIZE = 4096
#: dm-crypt's plain64 IV counts 512-byte units, even with 4096-byte sectors,
#: unless ``iv_large_sectors`` is set; LUKS2 does not set it, nor do we.
IV_UNIT = 512
#: IV units per sector (cryptsetup's ``iv_shift``, as a factor).
IV_PER_SECTOR = SECTOR_SIZE // IV_UNIT
#: The header's ``cipher``: AES-XTS with the plain64 IV, in dm-crypt's words.
CIPHER_NAME = "aes-xts-plain64"
#: The data key: 64 bytes, the first 32 keying the data cipher and the last
#: 32 the tweak cipher (XTS-AES-256).
KEY_SIZE = 64


def tweak(sector: int, iv_per_sector: int = IV_PER_SECTOR) -> bytes:
    """The XTS tweak of sector ``sector``: the plain64 IV, ``sector * 8`` as a
    16-byte little-endian integer (OverflowError past 2**128)."""
    return (sector * iv_per_sector).to_bytes(16, "little")


def sector_to_backing(data_offset: int, sector: int) -> int:
    """Where sector ``sector`` is stored: ``data_offset + sector * SECTOR_SIZE``."""
    return data_offset + sector * SECTOR_SIZE


# -- unwritten sectors ----------------------------------------------------------

#: The header feature under which a stored sector of zero bytes is unwritten
#: and reads as zeros (and discard punches holes).  Every image has it except
#: a preallocated one, which, like dm-crypt, decrypts every sector (a zeroed
#: sector reads as garbage).  A written sector, even of plaintext zeros, is
#: stored encrypted, so it is not all zero.
ZERO_UNWRITTEN = "zero-unwritten"
#: An unwritten sector as stored, and as it reads.
ZERO_SECTOR = bytes(SECTOR_SIZE)


def holes_read_as_zeros(encrypted: bool, zero_unwritten: bool) -> bool:
    """Whether a sector stored as zeros (a hole) reads as zeros: on a
    plaintext volume always, on an encrypted one only with zero-unwritten."""
    return not encrypted or zero_unwritten


def nonzero_runs(buf, block: int = SECTOR_SIZE) -> Iterator[tuple[int, int]]:
    """(first, end) block indexes of each run of blocks of ``buf`` that are
    not all zero."""
    mv = memoryview(buf)
    count = len(mv) // block
    zero = ZERO_SECTOR if block == SECTOR_SIZE else bytes(block)
    i = 0
    while i < count:
        while i < count and mv[i * block:(i + 1) * block] == zero:
            i += 1
        j = i
        while j < count and mv[j * block:(j + 1) * block] != zero:
            j += 1
        if j > i:
            yield i, j
        i = j


def written_runs(stored, zero_unwritten: bool) -> Iterable[tuple[int, int]]:
    """(first, end) sector indexes of the runs of whole stored sectors that
    hold data: with zero-unwritten those not all zero, without it all."""
    return nonzero_runs(stored) if zero_unwritten else [(0, len(stored) // SECTOR_SIZE)]
