"""The on-disk volume header: pack, unpack, validate, two redundant copies.

Format (docs/FORMAT.md is the specification): the header area holds two copies
in fixed 64 KiB slots, like LUKS2.  Each copy is a 64-byte binary prefix
(magic, version, copy index, payload length, sequence number, SHA-256
checksum) followed by a UTF-8 JSON payload.  The valid copy with the higher
sequence number wins.  Writes go to the losing copy first, then the winner,
each followed by fsync, so a crash at any point leaves one valid copy.

The JSON payload carries a MAC keyed from the data key through HKDF, so a
wrong key or a tampered header is caught at attach, before any data is served.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
import uuid as uuidlib
from dataclasses import dataclass, field, asdict
from datetime import datetime, timezone

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import FormatError, IntegrityError, UnsupportedFeature
from ..format import CIPHER_NAME, COPIES, HEADER_AREA, SECTOR_SIZE, SLOT_SIZE, ZERO_UNWRITTEN
from ..secret import Secret

MAGIC = b"EVSCRYPT"
VERSION = 1
# magic, version, copy index, payload length, sequence number, reserved
_PREFIX = struct.Struct(">8sHHIQ8s")
PREFIX_SIZE = 64  # _PREFIX (32 bytes) + SHA-256 checksum (32 bytes)
MAX_PAYLOAD = SLOT_SIZE - PREFIX_SIZE

#: Feature flags this version understands.  Every flag is "incompatible": an
#: image naming a flag not listed here is refused rather than misread.
#: ZERO_UNWRITTEN is the format's (evscrypt/format.py says what it means).
KNOWN_FEATURES = frozenset({ZERO_UNWRITTEN})
DEFAULT_FEATURES = (ZERO_UNWRITTEN,)

ORIGINS = ("empty", "snapshot", "backup", "image")
_MAC_INFO = b"evscrypt/v1 header-mac"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Header:
    uuid: str
    name: str
    size: int
    encrypted: bool
    data_offset: int
    kms_backend: str | None = None
    key_id: str | None = None
    wrapped_dk: bytes | None = None
    encryption_context: dict = field(default_factory=dict)
    created: str = field(default_factory=now_iso)
    origin: dict = field(default_factory=lambda: {"type": "empty", "source": None})
    features: list = field(default_factory=lambda: list(DEFAULT_FEATURES))
    sector_size: int = SECTOR_SIZE
    cipher: str = CIPHER_NAME
    mac: str | None = None

    @property
    def zero_unwritten(self) -> bool:
        return ZERO_UNWRITTEN in self.features

    # -- serialisation ---------------------------------------------------
    def _fields(self) -> dict:
        d = asdict(self)
        d["wrapped_dk"] = base64.b64encode(self.wrapped_dk).decode() if self.wrapped_dk is not None else None
        return d

    def mac_input(self) -> bytes:
        d = self._fields()
        d.pop("mac")
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        return json.dumps(self._fields(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> "Header":
        try:
            d = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FormatError("header payload is not valid JSON")
        if not isinstance(d, dict):
            raise FormatError("header payload is not a JSON object")
        return cls._validated(d)

    @classmethod
    def _validated(cls, d: dict) -> "Header":
        def need(key, types):
            if key not in d:
                raise FormatError(f"header field {key!r} is missing")
            v = d[key]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
                raise FormatError(f"header field {key!r} has the wrong type")
            return v

        features = need("features", list)
        if not all(isinstance(f, str) for f in features):
            raise FormatError("header field 'features' has the wrong type")
        unknown = sorted(set(features) - KNOWN_FEATURES)
        if unknown:
            raise UnsupportedFeature(f"image uses unknown feature(s) {', '.join(unknown)}; upgrade evscrypt")
        h = cls(
            uuid=need("uuid", str),
            name=need("name", str),
            size=need("size", int),
            encrypted=need("encrypted", bool),
            data_offset=need("data_offset", int),
            kms_backend=need("kms_backend", (str, type(None))),
            key_id=need("key_id", (str, type(None))),
            wrapped_dk=None,
            encryption_context=need("encryption_context", dict),
            created=need("created", str),
            origin=need("origin", dict),
            features=features,
            sector_size=need("sector_size", int),
            cipher=need("cipher", str),
            mac=need("mac", (str, type(None))),
        )
        wrapped = need("wrapped_dk", (str, type(None)))
        if wrapped is not None:
            try:
                h.wrapped_dk = base64.b64decode(wrapped, validate=True)
            except ValueError:
                raise FormatError("header field 'wrapped_dk' is not base64")
        h.validate()
        return h

    def validate(self) -> None:
        try:
            uuidlib.UUID(self.uuid)
        except ValueError:
            raise FormatError("header uuid is malformed")
        if self.sector_size != SECTOR_SIZE:
            raise FormatError(f"unsupported sector size {self.sector_size}")
        if self.cipher != CIPHER_NAME:
            raise FormatError(f"unsupported cipher {self.cipher!r}")
        if self.size <= 0 or self.size % SECTOR_SIZE:
            raise FormatError("volume size is not a positive multiple of 4096")
        if self.data_offset < HEADER_AREA or self.data_offset % SECTOR_SIZE:
            raise FormatError("data offset is not 4 KiB aligned past the header area")
        if self.origin.get("type") not in ORIGINS:
            raise FormatError("header origin is malformed")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.encryption_context.items()):
            raise FormatError("encryption context must map strings to strings")
        if not self.encrypted and (self.wrapped_dk is not None or self.mac is not None or self.key_id is not None):
            # an unencrypted header has no key to authenticate it; one that
            # still carries key fields was an encrypted header, tampered with
            raise FormatError("unencrypted volume header carries key fields (tampered header?)")
        if self.encrypted:
            if not self.kms_backend or not self.key_id or not self.wrapped_dk or not self.mac:
                raise FormatError("encrypted volume header lacks its key fields")
            if len(self.wrapped_dk) > 4096:
                raise FormatError("wrapped data key is too long")

    # -- MAC -------------------------------------------------------------
    @staticmethod
    def mac_key(dk: Secret) -> Secret:
        """The header-MAC key, derived from the DK.  An attached volume keeps
        it so the daemon can reseal a changed header (resize) without the KMS.
        HKDF-SHA256 writes straight into the locked buffer (``derive_into``):
        no ``bytes`` copy of the key."""
        key = Secret(32)
        try:
            HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive_into(dk.view(), key.buffer)
        except BaseException:
            key.wipe()
            raise
        return key

    def mac_with(self, mac_key: Secret) -> str:
        return hmac.new(mac_key.buffer, self.mac_input(), hashlib.sha256).hexdigest()

    def compute_mac(self, dk: Secret) -> str:
        with self.mac_key(dk) as key:
            return self.mac_with(key)

    def seal(self, dk: Secret) -> None:
        self.mac = self.compute_mac(dk)

    def seal_with(self, mac_key: Secret) -> None:
        self.mac = self.mac_with(mac_key)

    def verify(self, dk: Secret) -> None:
        # compare_digest refuses non-ASCII str with TypeError: a forged mac
        # field must be an IntegrityError like any other wrong MAC
        if not self.mac or not self.mac.isascii() or not hmac.compare_digest(self.compute_mac(dk), self.mac):
            raise IntegrityError(f"header MAC of volume {self.name!r} does not verify: wrong key or tampered header")

    def summary(self) -> dict:
        """The header as shown to users: never the wrapped key bytes."""
        d = asdict(self)
        d.pop("wrapped_dk")
        d.pop("mac")
        return d


# -- the two copies ----------------------------------------------------------

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


def read_slots(fd: int) -> list[bytes]:
    return [os.pread(fd, SLOT_SIZE, i * SLOT_SIZE) for i in range(COPIES)]


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
        _pwrite_all(fd, pack_copy(header, seqno, copy), copy * SLOT_SIZE)
        os.fsync(fd)
    return Loaded(header, seqno, winner, (True, True), (None, None))


class SimulatedCrash(Exception):
    """Raised by store(crash_after=...) in tests only."""


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n
