"""A backup store in a local directory (a mounted NAS, a USB disk, ...).

Each object is written under a hidden temporary name, fsynced and renamed
into place, so a crash or an interrupt never leaves a torn chunk or manifest
under its real name.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NotFound, StorageError
from ..fsutil import fsync_dir, write_atomic
from ..image.backing import storage_error
from .store import BACKUPS, CHUNKS, BackupStore


class DirStore(BackupStore):
    def __init__(self, path: str, create: bool = False):
        self.path = Path(path)
        self.url = str(self.path)
        if create:
            try:
                for d in (self.path, self.path / CHUNKS, self.path / BACKUPS):
                    d.mkdir(mode=0o700, exist_ok=True)
            except FileNotFoundError:
                raise NotFound(f"backup destination {self.path}: its parent directory does not exist")
            except OSError as e:
                raise storage_error(e, f"cannot create backup destination {self.path}")
        elif not self.path.is_dir():
            raise NotFound(f"backup destination {self.path} does not exist")

    def __repr__(self) -> str:
        return f"<DirStore {self.path}>"

    def known_chunks(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.path / CHUNKS) if not n.startswith(".")}
        except FileNotFoundError:
            return set()
        except OSError as e:
            raise storage_error(e, f"cannot list {self.path / CHUNKS}")

    def put_chunk(self, digest: str, data) -> None:
        try:
            write_atomic(self.path / CHUNKS / digest, data)
        except OSError as e:
            raise storage_error(e, f"cannot write chunk {digest} to {self.path}")

    def get_chunk(self, digest: str) -> bytes:
        return self._read(self.path / CHUNKS / digest, f"chunk {digest}")

    def put_manifest(self, backup_id: str, data: bytes) -> None:
        try:
            (self.path / BACKUPS).mkdir(mode=0o700, exist_ok=True)
            write_atomic(self.path / BACKUPS / f"{backup_id}.json", data)
            fsync_dir(self.path)
        except OSError as e:
            raise storage_error(e, f"cannot write the manifest of backup {backup_id} to {self.path}")

    def get_manifest(self, backup_id: str) -> bytes:
        return self._read(self.path / BACKUPS / f"{backup_id}.json", f"backup {backup_id}")

    def manifest_ids(self) -> list[str]:
        try:
            names = os.listdir(self.path / BACKUPS)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise storage_error(e, f"cannot list {self.path / BACKUPS}")
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def _read(self, path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{what} not found in {self.path}")
        except IsADirectoryError:
            raise StorageError(f"{what} in {self.path} is a directory")
        except OSError as e:
            raise storage_error(e, f"cannot read {what} from {self.path}")
