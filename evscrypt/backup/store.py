"""Where backups live: the store interface, and how DEST and SRC are spelled.

DEST is a directory or ``s3://bucket/prefix``.  Both hold the same layout::

    chunks/<sha256>        one chunk of image bytes, named by its SHA-256
    backups/<id>.json      one manifest per backup

SRC, what ``volume create --from-backup`` takes, is ``DEST::ID`` (as
``backup list`` prints it), or the manifest's own path or URL
(``DEST/backups/ID.json``).
"""

from __future__ import annotations

import abc
import os

from ..errors import InvalidArgument
from .manifest import check_id

CHUNKS = "chunks"
BACKUPS = "backups"
SEP = "::"


class BackupStore(abc.ABC):
    """A flat namespace of chunks and manifests.  Every put is atomic: a
    reader sees a whole object or none."""

    url: str

    @abc.abstractmethod
    def known_chunks(self) -> set[str]:
        """The hashes of every chunk already stored (one listing, so a backup
        does not ask about each chunk)."""

    @abc.abstractmethod
    def put_chunk(self, digest: str, data) -> None:
        ...

    @abc.abstractmethod
    def get_chunk(self, digest: str) -> bytes:
        """The chunk's bytes; NotFound if it is missing."""

    @abc.abstractmethod
    def put_manifest(self, backup_id: str, data: bytes) -> None:
        ...

    @abc.abstractmethod
    def get_manifest(self, backup_id: str) -> bytes:
        """The manifest's bytes; NotFound if there is no such backup."""

    @abc.abstractmethod
    def manifest_ids(self) -> list[str]:
        ...

    def source(self, backup_id: str) -> str:
        """The SRC that restores this backup."""
        return f"{self.url}{SEP}{backup_id}"


def is_s3(dest: str) -> bool:
    return dest.startswith("s3://")


def open_store(dest: str, create: bool = False) -> BackupStore:
    """The store at DEST; ``create`` makes a missing directory (backup create)."""
    if not dest:
        raise InvalidArgument("the backup destination is empty")
    if is_s3(dest):
        from .s3store import S3Store

        bucket, _, prefix = dest[5:].partition("/")
        if not bucket:
            raise InvalidArgument(f"{dest!r}: write S3 destinations as s3://BUCKET[/PREFIX]")
        return S3Store(bucket, prefix.strip("/"))
    from .dirstore import DirStore

    return DirStore(os.path.abspath(dest), create=create)


def parse_source(src: str) -> tuple[str, str]:
    """SRC -> (DEST, backup id)."""
    if SEP in src:
        dest, _, backup_id = src.rpartition(SEP)
    else:
        head, sep, tail = src.rstrip("/").rpartition(f"/{BACKUPS}/")
        if not sep or not tail.endswith(".json"):
            raise InvalidArgument(f"invalid backup source {src!r}: write DEST::ID as 'backup list DEST' shows it")
        dest, backup_id = head, tail[:-len(".json")]
    if not dest:
        raise InvalidArgument(f"invalid backup source {src!r}: the destination is missing")
    try:
        check_id(backup_id)
    except Exception:
        raise InvalidArgument(f"invalid backup source {src!r}: bad backup id")
    return dest, backup_id
