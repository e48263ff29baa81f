"""Make a backup: cut a volume's image into chunks, store the new ones, then
write the manifest.

The chunks are the image as stored: the header (with the DK wrapped by the
CMK) and the data area (ciphertext of an encrypted volume), so the store
never sees plaintext or a plaintext DK.  A chunk whose SHA-256 is already in
the store is not sent again: a second backup of a volume sends only the
chunks that changed since.  All-zero chunks (holes) are recorded, not stored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from .. import tempentry
from ..image import header as hdr
from ..image.copy import read_chunks
from ..offline import offline_or_daemon
from ..paths import COPY_IMAGE, backup_scratch
from ..snapshots import Online, copy_by_daemon
from ..volumes import VolumeStore
from .manifest import CHUNK_SIZE, Manifest, new_id
from .store import BackupStore

Progress = Callable[[int], None]
_ZERO = bytes(CHUNK_SIZE)


@dataclass
class Result:
    manifest: Manifest
    source: str  # SRC, for volume create --from-backup
    chunks_written: int = 0
    bytes_written: int = 0


def write_backup(store: BackupStore, fd: int, header: hdr.Header, volume: str,
                 progress: Progress | None = None, known: set[str] | None = None) -> Result:
    """Back up the image open on ``fd`` (whose header is ``header``);
    ``known`` is what store.known_chunks() said, if the caller asked already."""
    m = Manifest(id=new_id(volume), volume=volume, uuid=header.uuid, encrypted=header.encrypted,
                 kms=header.kms_backend, key_id=header.key_id, size=header.size,
                 data_offset=header.data_offset, image_size=header.data_offset + header.size)
    r = Result(m, store.source(m.id))
    known = store.known_chunks() if known is None else known
    for off, data in read_chunks(fd, 0, m.image_size, m.chunk_size):
        n = min(m.chunk_size, m.image_size - off)
        if data is None or data == (_ZERO if n == CHUNK_SIZE else bytes(n)):
            m.chunks.append(None)
        else:
            digest = hashlib.sha256(data).hexdigest()
            if digest not in known:
                store.put_chunk(digest, data)
                known.add(digest)
                r.chunks_written += 1
                r.bytes_written += n
            m.chunks.append(digest)
        if progress:
            progress(n)
    store.put_manifest(m.id, m.to_json())  # last: without it the backup does not exist
    return r


def backup_volume(volumes: VolumeStore, name: str, store: BackupStore, online: Online | None,
                  progress: Progress | None = None) -> Result:
    """Back up volume ``name``, attached or not, at one point in time.

    A detached volume is read in place under its exclusive attach lock.  An
    attached one is first copied by the daemon, with writes quiesced, into a
    temporary file in the state directory; that copy is backed up and removed.
    In a store that many hosts share, the volume is read from a snapshot of
    the store instead (VolumeStore.frozen), whichever host has it attached.
    """
    known = store.known_chunks()  # first: a bad DEST fails before any copy is made
    if volumes.images.shared:
        with volumes.frozen(name) as (op, _):
            return write_backup(store, op.fd, op.header, name, progress, known)

    def offline() -> Result:
        with volumes.locked(name) as op:
            return write_backup(store, op.fd, op.header, name, progress, known)

    def by_daemon() -> Result:
        scratch = backup_scratch(volumes.home, name)
        scratch.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempentry.held(scratch, directory=True, mode=0o700) as (tmp, _):
            try:
                image = tmp / COPY_IMAGE
                h, _ = copy_by_daemon(volumes, name, image, online)
                fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    return write_backup(store, fd, h, name, progress, known)
                finally:
                    os.close(fd)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    return offline_or_daemon(name, offline, None if online is None else by_daemon)
