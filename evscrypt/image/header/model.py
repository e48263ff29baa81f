"""The volume header's model: its fields, their JSON form, and the rules a
valid header obeys (the schema).

docs/FORMAT.md ("Payload fields") is the specification.  As LUKS2 keeps its
JSON metadata (``luks2_json_metadata.c``) apart from its disk I/O, nothing
here reads or writes the image (slots.py does) or touches a key (mac.py
does); the model only says which bytes the MAC covers (:meth:`Header.mac_input`).
"""

from __future__ import annotations

import base64
import json
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ...errors import FormatError, UnsupportedFeature
from ...format import CIPHER_NAME, HEADER_AREA, SECTOR_SIZE, ZERO_UNWRITTEN
from ...jsondoc import load_object

#: Feature flags this version understands.  Every flag is "incompatible": an
#: image naming a flag not listed here is refused rather than misread.
#: ZERO_UNWRITTEN is the format's (evscrypt/format.py says what it means).
KNOWN_FEATURES = frozenset({ZERO_UNWRITTEN})
DEFAULT_FEATURES = (ZERO_UNWRITTEN,)

ORIGINS = ("empty", "snapshot", "backup", "image")
#: The longest wrapped DK a header may carry (a KMS blob is far shorter).
MAX_WRAPPED_DK = 4096


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _canonical(d: dict) -> bytes:
    """JSON with sorted keys and no spaces: the payload, and the MAC's input."""
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


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
        """What the header MAC covers: the payload without its ``mac`` field."""
        d = self._fields()
        d.pop("mac")
        return _canonical(d)

    def to_json(self) -> bytes:
        return _canonical(self._fields())

    @classmethod
    def from_json(cls, payload: bytes) -> "Header":
        return cls._validated(load_object(payload, FormatError, "header payload"))

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
            raise FormatError(f"volume size is not a positive multiple of {SECTOR_SIZE}")
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
            if len(self.wrapped_dk) > MAX_WRAPPED_DK:
                raise FormatError("wrapped data key is too long")

    def summary(self) -> dict:
        """The header as shown to users: never the wrapped key bytes."""
        d = asdict(self)
        d.pop("wrapped_dk")
        d.pop("mac")
        return d
