"""Volumes made from snapshots, images and backups, under the encryption rules.

The rules of the cloud model:

- a volume from a snapshot is encrypted exactly when the snapshot is, with
  the same DK and CMK;
- a volume from an encrypted image is encrypted with the image's DK and CMK
  (an unencrypted image may be encrypted on the way, under a new DK);
- a volume restored from a backup keeps the backup's encryption unless told
  otherwise: ``encrypt`` and ``key`` choose freely.

Two ways to build the volume.  *Copy*: the source's encryption and key are
kept, so its image bytes (header and ciphertext) are copied and the DK is
re-wrapped for the new volume (VolumeStore.create_copy).  *Transcode*:
anything else; the data is decrypted with the source's DK and written
through the new volume's engine (a new DK, or plaintext).  Either way the
volume is built under a temporary name, so an interrupt leaves nothing.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterable

from .backup import reader
from .backup.manifest import CHUNK_SIZE, Manifest
from .backup.store import BackupStore
from .catalog import Entry
from .crypto.xts import SectorCipher
from .errors import EncryptionRuleError, InvalidArgument
from .image import header as hdr
from .image.copy import pwrite_sparse, read_chunks
from .image.transcode import transcode
from .snapshots import CopyStore
from .volumes import VolumeStore, check_grow

Progress = Callable[[int], None]
COPY, TRANSCODE = "copy", "transcode"


@dataclass
class Want:
    """What the user asked of the new volume; None means "as the source"."""

    encrypt: bool | None = None
    kms: str | None = None
    key: str | None = None


@dataclass
class Source:
    kind: str  # snapshot, image, backup
    name: str
    encrypted: bool
    kms: str | None
    key_id: str | None


def _same_key(volumes: VolumeStore, src: Source, want: Want) -> bool:
    if want.kms and want.kms != src.kms:
        return False
    if want.key is None:
        return True
    info = volumes.backend(src.kms).describe(want.key)
    return src.key_id in (info.key_id, info.arn)


def plan(volumes: VolumeStore, src: Source, want: Want) -> tuple[str, bool]:
    """(COPY or TRANSCODE, whether the new volume is encrypted), or
    EncryptionRuleError when the rules forbid what was asked."""
    if want.encrypt is False and want.key:
        raise InvalidArgument("--key makes no sense with --no-encrypt")
    encrypt = want.encrypt if want.encrypt is not None else (True if want.key else src.encrypted)
    what = f"{src.kind} {src.name!r}"
    if not encrypt:
        if not src.encrypted:
            return COPY, False
        if src.kind != "backup":
            raise EncryptionRuleError(f"{what} is encrypted, so a volume made from it is encrypted too")
        return TRANSCODE, False
    if not src.encrypted:
        if src.kind == "snapshot":
            raise EncryptionRuleError(f"{what} is not encrypted, so a volume made from it is not encrypted either")
        return TRANSCODE, True
    if _same_key(volumes, src, want):
        return COPY, True
    if src.kind != "backup":
        raise EncryptionRuleError(f"a volume made from {what} keeps its data key and CMK; "
                                  "--kms/--key must name the ones it has")
    return TRANSCODE, True


def _transcode(volumes: VolumeStore, name: str, src: hdr.Header, entry: Entry, chunks: Iterable, encrypt: bool,
               want: Want, size: int | None, origin: dict, owner: int | None) -> hdr.Header:
    new_size = check_grow(src.size, src.size if size is None else size)
    kms = want.kms or (src.kms_backend if src.encrypted else None) or "local"
    cipher = None
    if src.encrypted:
        with volumes.unwrap(entry, src) as dk:
            cipher = SectorCipher(dk)
    try:
        return volumes.create(name, new_size, encrypted=encrypt, kms=kms, key=want.key, origin=origin,
                              owner=owner, fill=lambda eng: transcode(chunks, src, cipher, eng))
    finally:
        if cipher is not None:
            cipher.close()


def from_copy(volumes: VolumeStore, copies: CopyStore, name: str, source: str, want: Want, *,
              size: int | None = None, owner: int | None = None, progress: Progress | None = None) -> hdr.Header:
    """A volume from a snapshot or an image (``copies`` says which)."""
    copies.meta(source)  # NotFound names the snapshot or image
    src_header, entry = copies.header(source)  # the header checked against the catalog, not meta.json
    src = Source(copies.kind, source, src_header.encrypted, src_header.kms_backend, src_header.key_id)
    how, encrypt = plan(volumes, src, want)
    origin = {"type": copies.kind, "source": source}
    if how == COPY:
        return volumes.create_copy(name, copies.write_image_to(source, progress), entry, origin=origin, size=size,
                                   owner=owner)
    fd = copies.open_image(source)
    try:
        image_size = src_header.data_offset + src_header.size
        chunks = _counted(read_chunks(fd, 0, image_size, CHUNK_SIZE), progress, image_size)
        return _transcode(volumes, name, src_header, entry, chunks, encrypt, want, size, origin, owner)
    finally:
        os.close(fd)


def from_backup(volumes: VolumeStore, store: BackupStore, m: Manifest, name: str, want: Want, *,
                size: int | None = None, owner: int | None = None, progress: Progress | None = None) -> hdr.Header:
    """Restore the backup of manifest ``m`` from ``store`` as the new volume
    ``name``; every chunk is verified before it is used."""
    src = Source("backup", m.id, m.encrypted, m.kms, m.key_id)
    how, encrypt = plan(volumes, src, want)
    origin = {"type": "backup", "source": store.source(m.id)}
    it = reader.chunks(store, m, progress)
    first = next(it)
    src_header = reader.header_of(m, first[1])
    entry = Entry.of_image(src_header)  # a backup is outside the catalog: its header (MAC) vouches for it
    chunks = itertools.chain([first], it)
    if how == COPY:
        def write_image(fd: int) -> None:
            for off, data in chunks:
                if data is not None:
                    pwrite_sparse(fd, off, data)
            os.ftruncate(fd, m.image_size)
        return volumes.create_copy(name, write_image, entry, origin=origin, size=size, owner=owner)
    return _transcode(volumes, name, src_header, entry, chunks, encrypt, want, size, origin, owner)


def _counted(chunks: Iterable, progress: Progress | None, end: int):
    for off, data in chunks:
        yield off, data
        if progress:
            progress(min(CHUNK_SIZE, end - off))
