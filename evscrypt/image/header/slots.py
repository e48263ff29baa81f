"""The header on disk: two copies in fixed slots, their binary prefix and
checksum, sequence numbers, and the crash-safe write that also repairs a
damaged copy.

As LUKS2 keeps its disk I/O (``luks2_disk_metadata.c``) apart from its JSON
schema, this module knows the slots and nothing of the fields (model.py).
docs/FORMAT.md ("Header copies") is the specification: each copy is a
64-byte binary prefix (magic, version, copy index, payload length, sequence
number, SHA-256 checksum) followed by the JSON payload.  The valid copy with
the higher sequence number wins.  Writes go to the losing copy first, then
the winner, each followed by fsync, so a crash at any point leaves one valid
copy.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from ...errors import FormatError, UnsupportedFeature
from ...format import COPIES, HEADER_AREA, SLOT_SIZE
from ..backing import pread, pwrite_all, sync
from .model import Header

MAGIC = b"EVSCRYPT"
VERSION = 1
# magic, version, copy index, payload length, sequence number, reserved
_PREFIX = struct.Struct(">8sHHIQ8s")
PREFIX_SIZE = 64  # _PREFIX (32 bytes) + SHA-256 checksum (32 bytes)
MAX_PAYLOAD = SLOT_SIZE - PREFIX_SIZE


def pack_copy(header: Header, seqno: int, copy: int) -> bytes:
    payload = header.to_json()
    if len(payload) > MAX_PAYLOAD:
        raise FormatError("header does not fit its slot")
    prefix = _PREFIX.pack(MAGIC, VERSION, copy, len(payload), seqno, bytes(8))
    digest = hashlib.sha256(prefix + payload).digest()
    out = prefix + digest + payload
    return out + bytes(SLOT_SIZE - len(out))


def unpack_copy(raw: bytes, copy: int) -> tuple[Header, int]:
    """Parse one slot; raise FormatError naming what is wrong."""
    if len(raw) < PREFIX_SIZE:
        raise FormatError(f"header copy {copy} is truncated")
    magic, version, idx, length, seqno, _ = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError(f"header copy {copy} has no evscrypt magic")
    if version != VERSION:
        raise UnsupportedFeature(f"header copy {copy} has format version {version}; this evscrypt reads {VERSION}")
    if idx != copy:
        raise FormatError(f"header copy {copy} claims to be copy {idx}")
    if length > MAX_PAYLOAD or PREFIX_SIZE + length > len(raw):
        raise FormatError(f"header copy {copy} has an impossible length")
    payload = bytes(raw[PREFIX_SIZE:PREFIX_SIZE + length])
    digest = hashlib.sha256(bytes(raw[:_PREFIX.size]) + payload).digest()
    if not hmac.compare_digest(digest, bytes(raw[_PREFIX.size:PREFIX_SIZE])):
        raise FormatError(f"header copy {copy} fails its checksum")
    return Header.from_json(payload), seqno


@dataclass
class Loaded:
    """A header as read: the winning copy, its sequence number, and which
    copies were valid (a damaged copy is rewritten on the next store)."""

    header: Header
    seqno: int
    winner: int  # index of the copy that was read
    valid: tuple  # (bool, bool)
    errors: tuple  # (str|None, str|None)

    @property
    def damaged(self) -> bool:
        return not all(self.valid)


def read_slots(fd) -> list[bytes]:
    """Both copies' slots from an image handle (evscrypt.image.backing)."""
    return [pread(fd, SLOT_SIZE, i * SLOT_SIZE) for i in range(COPIES)]


def load(fd: int, path: str = "image") -> Loaded:
    return load_slots(read_slots(fd), path)


def load_bytes(raw, path: str = "image") -> Loaded:
    """The header of an image whose first bytes (at least HEADER_AREA) are ``raw``."""
    if len(raw) < HEADER_AREA:
        raise FormatError(f"{path}: too short to hold a header")
    return load_slots([bytes(raw[i * SLOT_SIZE:(i + 1) * SLOT_SIZE]) for i in range(COPIES)], path)


def load_slots(slots: list[bytes], path: str = "image") -> Loaded:
    found: list = [None] * COPIES
    errors: list = [None] * COPIES
    unsupported: list = []  # (seqno, error) of intact copies we cannot read
    for i, raw in enumerate(slots):
        try:
            found[i] = unpack_copy(raw, i)
        except UnsupportedFeature as e:
            unsupported.append((_PREFIX.unpack_from(raw)[4], e))
            errors[i] = e.message
        except FormatError as e:
            errors[i] = e.message
    good = [(f[1], i) for i, f in enumerate(found) if f]
    # A newer evscrypt wrote the newest copy: falling back to an older copy
    # would misread the image and the next store would erase the newer one.
    if unsupported and (not good or max(unsupported, key=lambda u: u[0])[0] >= max(good)[0]):
        raise max(unsupported, key=lambda u: u[0])[1]
    if not good:
        raise FormatError(f"{path}: no valid header copy ({errors[0]}; {errors[1]})")
    _, best = max(good)
    header, seqno = found[best]
    return Loaded(header, seqno, best, tuple(f is not None for f in found), tuple(errors))


def store(fd: int, header: Header, prev: Loaded | None = None, *, crash_after: int | None = None) -> Loaded:
    """Write both copies with the next sequence number, loser first.

    ``crash_after`` stops after that many write steps; tests use it to prove
    that a crash at any point leaves a valid header.
    """
    header.validate()
    seqno = (prev.seqno + 1) if prev else 1
    # The copy we read is written last, so it survives a crash mid-write.
    winner = prev.winner if prev else 0
    order = [1 - winner, winner]
    for step, copy in enumerate(order):
        if crash_after is not None and step >= crash_after:
            raise SimulatedCrash(step)
        pwrite_all(fd, pack_copy(header, seqno, copy), copy * SLOT_SIZE)
        sync(fd)
    return Loaded(header, seqno, winner, (True, True), (None, None))


class SimulatedCrash(Exception):
    """Raised by store(crash_after=...) in tests only."""
