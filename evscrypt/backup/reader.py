"""Read a backup back: its manifest, then each chunk, verified against its
SHA-256 before anyone uses it.  A missing or damaged chunk stops the read
with an error that names the backup, the chunk's index and its hash."""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator

from ..errors import BackupCorrupt, NotFound
from ..image import header as hdr
from .manifest import Manifest
from .store import BackupStore

Progress = Callable[[int], None]


def load_manifest(store: BackupStore, backup_id: str) -> Manifest:
    try:
        data = store.get_manifest(backup_id)
    except NotFound:
        raise NotFound(f"backup {backup_id} not found in {store.url}")
    return Manifest.from_json(data, f"backup {backup_id}")


def chunks(store: BackupStore, m: Manifest, progress: Progress | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(offset in the image, verified bytes or None for zeros) of each chunk, in order."""
    for i, digest in enumerate(m.chunks):
        off, n = m.chunk_range(i)
        if digest is None:
            yield off, None
        else:
            try:
                data = store.get_chunk(digest)
            except NotFound:
                raise BackupCorrupt(f"backup {m.id} is damaged: chunk {i} (sha256 {digest}) is missing")
            if len(data) != n or hashlib.sha256(data).hexdigest() != digest:
                raise BackupCorrupt(f"backup {m.id} is corrupt: chunk {i} (sha256 {digest}) "
                                    "does not match its checksum")
            yield off, data
        if progress:
            progress(n)


def header_of(m: Manifest, first: bytes | None) -> hdr.Header:
    """The volume header in the backup's first chunk, checked against the manifest."""
    if first is None:
        raise BackupCorrupt(f"backup {m.id} is damaged: its first chunk holds no header")
    h = hdr.load_bytes(first, f"backup {m.id}").header
    if (h.uuid, h.size, h.data_offset, h.encrypted) != (m.uuid, m.size, m.data_offset, m.encrypted):
        raise BackupCorrupt(f"backup {m.id} is damaged: its manifest and its volume header disagree")
    return h


def verify(store: BackupStore, m: Manifest, progress: Progress | None = None) -> None:
    it = chunks(store, m, progress)
    first = next(it, (0, None))[1]
    header_of(m, first)
    for _ in it:
        pass
