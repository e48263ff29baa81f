"""Volumes made from snapshots, images and backups, under the encryption rules.

The rules of the cloud model:

- a volume from a snapshot is encrypted exactly when the snapshot is, with
  the same DK and CMK;
- a volume from an image likewise: an encrypted image gives a volume under
  its DK and CMK, an unencrypted one an unencrypted volume (EVS: "creating
  from an image whose source disk is not encrypted: no encryption");
- an image is replicated (`image copy`) as EVS/IMS and EC2 CopyImage do: an
  encrypted image stays encrypted, under its own DK and CMK, or re-encrypted
  under a new DK and the CMK asked for; an unencrypted one stays
  unencrypted, or becomes encrypted under a new DK; never encrypted to
  unencrypted.  That is how an encrypted volume is made from a plain image;
- a volume restored from a backup keeps the backup's encryption unless told
  otherwise: ``encrypt`` and ``key`` choose freely.

``kms`` or ``key`` without ``encrypt`` asks for encryption, as ``encrypt``
does; with ``encrypt=False`` they contradict it and are refused.

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
import uuid as uuidlib
from dataclasses import dataclass
from typing import Callable, Iterable

from .backup import reader
from .backup.manifest import CHUNK_SIZE, Manifest
from .backup.store import BackupStore
from .catalog import Entry
from .crypto.xts import SectorCipher
from .errors import EncryptionRuleError, InvalidArgument
from .image import header as hdr
from .image.backing import close, truncate
from .image.copy import pwrite_sparse, read_chunks
from .image.transcode import transcode
from .snapshots import CopyStore, ImageStore
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


def _wanted(src: Source, want: Want) -> bool:
    """Whether the new volume or image is to be encrypted."""
    if want.encrypt is False and (want.key or want.kms):
        raise InvalidArgument("--kms and --key make no sense with --no-encrypt")
    if want.encrypt is not None:
        return want.encrypt
    return True if (want.key or want.kms) else src.encrypted


def plan(volumes: VolumeStore, src: Source, want: Want) -> tuple[str, bool]:
    """(COPY or TRANSCODE, whether the new volume is encrypted), or
    EncryptionRuleError when the rules forbid what was asked."""
    encrypt = _wanted(src, want)
    what = f"{src.kind} {src.name!r}"
    if not encrypt:
        if not src.encrypted:
            return COPY, False
        if src.kind != "backup":
            raise EncryptionRuleError(f"{what} is encrypted, so a volume made from it is encrypted too")
        return TRANSCODE, False
    if not src.encrypted:
        if src.kind == "image":
            raise EncryptionRuleError(
                f"{what} is not encrypted, so a volume made from it is not encrypted either; for an encrypted "
                f"volume, first make an encrypted copy of the image: evscrypt image copy {src.name} NEW "
                f"--encrypt [--key KEY], then create the volume from NEW")
        if src.kind == "snapshot":
            raise EncryptionRuleError(f"{what} is not encrypted, so a volume made from it is not encrypted either")
        return TRANSCODE, True
    if _same_key(volumes, src, want):
        return COPY, True
    if src.kind != "backup":
        raise EncryptionRuleError(f"a volume made from {what} keeps its data key and CMK; "
                                  "--kms/--key must name the ones it has")
    return TRANSCODE, True


def plan_image_copy(volumes: VolumeStore, src: Source, want: Want) -> tuple[str, bool]:
    """(COPY or TRANSCODE, whether the copy is encrypted) for `image copy`.

    COPY keeps the image bytes: an unencrypted image, or an encrypted one
    under its own CMK, whose DK the copy shares (as a volume made from the
    image would).  TRANSCODE writes the data again under a new DK: an
    unencrypted image encrypted on the way, or an encrypted one moved to
    another CMK; a new CMK over the old DK would leave whoever holds that
    DK (dump-key) able to read the copy."""
    encrypt = _wanted(src, want)
    if src.encrypted and not encrypt:
        raise EncryptionRuleError(f"image {src.name!r} is encrypted: a copy of it is encrypted too "
                                  "(encrypted images never become unencrypted)")
    if not encrypt:
        return COPY, False
    if src.encrypted and _same_key(volumes, src, want):
        return COPY, True
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
                                   owner=owner, start=copies.clone_source(source))
    fd = copies.open_image(source)
    try:
        image_size = src_header.data_offset + src_header.size
        chunks = _counted(read_chunks(fd, 0, image_size, CHUNK_SIZE), progress, image_size)
        return _transcode(volumes, name, src_header, entry, chunks, encrypt, want, size, origin, owner)
    finally:
        close(fd)


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
        def write_image(fd) -> None:
            truncate(fd, m.image_size)  # first: an RBD image, unlike a file, does not grow by writes
            for off, data in chunks:
                if data is not None:
                    pwrite_sparse(fd, off, data)
        return volumes.create_copy(name, write_image, entry, origin=origin, size=size, owner=owner)
    return _transcode(volumes, name, src_header, entry, chunks, encrypt, want, size, origin, owner)


def copy_image(volumes: VolumeStore, images: ImageStore, source: str, name: str, want: Want, *,
               progress: Progress | None = None) -> dict:
    """Replicate image ``source`` as the new image ``name`` (see
    :func:`plan_image_copy`); returns the new image's meta."""
    src_meta = images.meta(source)  # NotFound names the image
    images.path(name)  # a bad name fails before any work
    src_header, src_entry = images.header(source)  # checked against the catalog
    src = Source("image", source, src_header.encrypted, src_header.kms_backend, src_header.key_id)
    how, encrypt = plan_image_copy(volumes, src, want)

    def fill(image) -> tuple[dict, Entry]:
        if how == COPY:
            if src_header.encrypted:
                with volumes.unwrap(src_entry, src_header):  # as for any use of the image: the CMK must be Enabled
                    pass
            fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                images.write_image_to(source, progress)(fd)
                os.fsync(fd)
                h = hdr.load(fd, f"the copy of image {source!r}").header  # what was copied, not what was checked
            finally:
                os.close(fd)
            entry = src_entry  # the same bytes, the same DK and context
            entry.check(h, f"the copy of image {source!r}", exact_size=True, done="nothing was kept")
        else:
            h = _transcode_image(volumes, images, source, src_header, src_entry, image, name, want, progress)
            entry = Entry.of(h, name)  # a new DK, bound to this image's name
        return {"volume": src_meta.get("volume"), "volume_uuid": h.uuid, "copied_from": source,
                "size": h.size, "encrypted": h.encrypted, "kms": h.kms_backend, "key_id": h.key_id}, entry

    return images.build(name, fill)


def _transcode_image(volumes: VolumeStore, images: ImageStore, source: str, src: hdr.Header, entry: Entry, image,
                     name: str, want: Want, progress: Progress | None) -> hdr.Header:
    """Write image ``source`` into the new file ``image``, encrypted under a new DK."""
    kms = want.kms or (src.kms_backend if src.encrypted else None) or "local"
    cipher = None
    src_fd = images.open_image(source)
    try:
        if src.encrypted:
            with volumes.unwrap(entry, src) as dk:
                cipher = SectorCipher(dk)
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            end = src.data_offset + src.size
            chunks = _counted(read_chunks(src_fd, 0, end, CHUNK_SIZE), progress, end)
            h = volumes.initialise(fd, str(uuidlib.uuid4()), name, src.size, encrypted=True, kms=kms, key=want.key,
                                   origin={"type": "image", "source": source},
                                   fill=lambda eng: transcode(chunks, src, cipher, eng))
            os.fsync(fd)
            return h
        finally:
            os.close(fd)
    finally:
        close(src_fd)
        if cipher is not None:
            cipher.close()


def _counted(chunks: Iterable, progress: Progress | None, end: int):
    for off, data in chunks:
        yield off, data
        if progress:
            progress(min(CHUNK_SIZE, end - off))
