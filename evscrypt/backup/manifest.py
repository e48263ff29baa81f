"""The backup manifest: which chunks, in which order, make up one backup.

``backups/<id>.json`` in the store (docs/FORMAT.md has the full layout).  It
is written last, after every chunk it names, so a backup that was
interrupted has no manifest and does not exist; its orphan chunks are
harmless and a later backup reuses them.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ..errors import BackupCorrupt
from ..image.header import now_iso

VERSION = 1
#: 8 MiB: big enough that an S3 upload of one chunk is multipart (5 MiB parts)
#: and that a 1 TiB volume has a manageable 131072 entries; small enough that a
#: changed 4 KiB sector re-sends little.
CHUNK_SIZE = 8 << 20
_HASH = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@-]{0,200}")


def new_id(volume: str) -> str:
    """``VOLUME-YYYYmmddTHHMMSSZ-xxxxxx``: sorts by time per volume, unique.
    A ``:`` of the volume name becomes ``_``, so ``DEST::ID`` stays unambiguous."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{volume.replace(':', '_')}-{stamp}-{secrets.token_hex(3)}"


def check_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not _ID.fullmatch(backup_id):
        raise BackupCorrupt(f"invalid backup id {backup_id!r}")
    return backup_id


@dataclass
class Manifest:
    id: str
    volume: str
    uuid: str
    encrypted: bool
    kms: str | None
    key_id: str | None
    size: int  # the volume's logical size
    data_offset: int
    image_size: int  # bytes of image the chunks cover: data_offset + size
    chunk_size: int = CHUNK_SIZE
    #: SHA-256 (hex) of each chunk in order; None for an all-zero chunk,
    #: which is recorded but never stored
    chunks: list = field(default_factory=list)
    created: str = field(default_factory=now_iso)
    version: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BackupCorrupt(f"{where}: the manifest is not valid JSON")
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise BackupCorrupt(f"{where}: the manifest has an unknown format or version")
        try:
            m = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            raise BackupCorrupt(f"{where}: the manifest lacks fields")
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        ints = (self.size, self.data_offset, self.image_size, self.chunk_size)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ints):
            raise BackupCorrupt(f"{where}: the manifest has bad sizes")
        if self.image_size != self.data_offset + self.size:
            raise BackupCorrupt(f"{where}: the manifest's image size does not add up")
        if not isinstance(self.chunks, list) or len(self.chunks) != self.chunk_count:
            raise BackupCorrupt(f"{where}: the manifest lists {len(self.chunks) if isinstance(self.chunks, list) else '?'}"
                                f" chunks, not {self.chunk_count}")
        for c in self.chunks:
            if c is not None and not (isinstance(c, str) and _HASH.fullmatch(c)):
                raise BackupCorrupt(f"{where}: the manifest holds a malformed chunk hash")
        check_id(self.id)

    @property
    def chunk_count(self) -> int:
        return -(-self.image_size // self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset in the image, length) of chunk ``index``."""
        off = index * self.chunk_size
        return off, min(self.chunk_size, self.image_size - off)

    @property
    def stored_chunks(self) -> set[str]:
        return {c for c in self.chunks if c}
