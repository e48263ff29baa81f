"""The volume store: named images under ``<home>/volumes``.

It creates volumes (generating and wrapping the DK), lists and describes them,
unwraps a volume's DK through its KMS backend and checks the header MAC, and
deletes volumes that are not attached.  It is the one place that decides the
encryption context, so every path that wraps or unwraps a DK agrees on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .crypto.xts import SECTOR_SIZE, SectorCipher
from .errors import AlreadyExists, EncryptionRuleError, EvscryptError, InvalidArgument, NotFound, StorageError
from .fsutil import fsync_dir
from .image import header as hdr
from .image.backing import is_locked, lock_exclusive, pwrite_all, storage_error
from .image.engine import Engine
from .image.geometry import DEFAULT_DATA_OFFSET
from .kms import KMSBackend, open_backend
from .names import check_name
from .secret import Secret
from . import tempentry

#: Largest volume we accept: 64 TiB, far beyond what a sparse file on one
#: host should carry, and small enough that offsets fit every API.
MAX_SIZE = 64 << 40
CONTEXT_UUID = "evscrypt:volume-uuid"
CONTEXT_NAME = "evscrypt:volume-name"


def encryption_context(uuid: str, name: str) -> dict[str, str]:
    return {CONTEXT_UUID: uuid, CONTEXT_NAME: name}


def check_size(size: int) -> int:
    if size <= 0 or size % SECTOR_SIZE:
        raise InvalidArgument("volume size must be a positive multiple of 4096 bytes")
    if size > MAX_SIZE:
        raise InvalidArgument("volume size exceeds the 64 TiB limit")
    return size


def check_grow(old: int, new: int) -> int:
    """A volume only ever grows: shrinking would cut off data a filesystem owns."""
    check_size(new)
    if new < old:
        raise InvalidArgument(f"cannot shrink a volume ({old} to {new} bytes): volumes can only grow")
    return new


@dataclass
class Opened:
    """An open image: its fd and the header as read."""

    path: Path
    fd: int
    loaded: hdr.Loaded

    @property
    def header(self) -> hdr.Header:
        return self.loaded.header

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VolumeStore:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.dir = self.home / "volumes"
        self._backends: dict[str, KMSBackend] = {}

    def backend(self, name: str) -> KMSBackend:
        if name not in self._backends:
            self._backends[name] = open_backend(name, self.home)
        return self._backends[name]

    def path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.img"

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name[:-4] for p in self.dir.iterdir() if p.name.endswith(".img") and not p.name.startswith("."))

    # -- open ------------------------------------------------------------------
    def open(self, name: str, write: bool = False) -> Opened:
        path = self.path(name)
        try:
            fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"volume {name!r} not found")
        except OSError as e:
            raise storage_error(e, f"cannot open volume {name!r}")
        try:
            loaded = hdr.load(fd, str(path))
        except EvscryptError as e:
            os.close(fd)
            raise type(e)(f"volume {name!r}: {e.message}")
        except OSError as e:
            os.close(fd)
            raise storage_error(e, f"cannot read volume {name!r}")
        return Opened(path, fd, loaded)

    def unwrap(self, header: hdr.Header) -> Secret:
        """The volume's DK, unwrapped by its KMS and checked against the MAC."""
        if not header.encrypted:
            raise InvalidArgument(f"volume {header.name!r} is not encrypted")
        kms = self.backend(header.kms_backend)
        dk = kms.decrypt(header.wrapped_dk, header.encryption_context, header.key_id)
        try:
            header.verify(dk)
        except BaseException:
            dk.wipe()
            raise
        return dk

    # -- create ----------------------------------------------------------------
    def create(self, name: str, size: int, *, encrypted: bool = True, kms: str = "local",
               key: str | None = None, preallocate: bool = False, origin: dict | None = None,
               owner: int | None = None, progress: Callable[[int], None] | None = None,
               fill: Callable[[Engine], None] | None = None) -> hdr.Header:
        """Create a volume; ``fill`` may write its initial contents.

        The image is built under a temporary name and renamed into place only
        when complete, so an interrupted create leaves no half-made volume.
        """
        check_size(size)
        vol_uuid = str(uuidlib.uuid4())
        return self._build(name, vol_uuid, owner, lambda fd: self.initialise(
            fd, vol_uuid, name, size, encrypted=encrypted, kms=kms, key=key, preallocate=preallocate,
            origin=origin, progress=progress, fill=fill))

    def initialise(self, fd: int, vol_uuid: str, name: str, size: int, *, encrypted: bool, kms: str = "local",
                   key: str | None = None, preallocate: bool = False, origin: dict | None = None,
                   progress: Callable[[int], None] | None = None,
                   fill: Callable[[Engine], None] | None = None) -> hdr.Header:
        """Write a new image into the empty file ``fd``: its header (for an
        encrypted one, a new DK wrapped by the CMK under the context of
        ``vol_uuid`` and ``name``), then its contents.  Volumes are made by
        :meth:`create`; `image copy` makes encrypted images with it."""
        check_size(size)
        h = hdr.Header(uuid=vol_uuid, name=name, size=size, encrypted=encrypted,
                       data_offset=DEFAULT_DATA_OFFSET, origin=origin or {"type": "empty", "source": None})
        dk = None
        try:
            if encrypted:
                backend = self.backend(kms)
                h.encryption_context = encryption_context(vol_uuid, name)
                dk, wrapped, key_id = backend.generate_data_key(key or backend.default_key(),
                                                                h.encryption_context)
                h.kms_backend, h.key_id, h.wrapped_dk = kms, key_id, wrapped
                h.seal(dk)
            os.ftruncate(fd, h.data_offset + size)
            hdr.store(fd, h)
            if preallocate or fill:
                cipher = SectorCipher(dk) if dk else None
                try:
                    eng = Engine(fd, size, h.data_offset, cipher)
                    if preallocate:
                        self._preallocate(eng, progress)
                    if fill:
                        fill(eng)
                finally:
                    if cipher:
                        cipher.close()
        finally:
            if dk:
                dk.wipe()
        return h

    def create_copy(self, name: str, write_image: Callable[[int], None], *, origin: dict,
                    size: int | None = None, owner: int | None = None) -> hdr.Header:
        """Create a volume whose image starts as a byte copy of another one (a
        snapshot, an image, a backup): same encryption, same DK, same CMK.

        ``write_image(fd)`` writes the source image (header and data area)
        into the new, empty file.  The header is then bound to the new volume:
        a new UUID and name, hence a new encryption context, under which the
        CMK re-wraps the source DK (unwrapped and checked against the source
        header's MAC first); the MAC is sealed again.  ``size`` may only grow.
        """
        vol_uuid = str(uuidlib.uuid4())

        def build(fd: int) -> hdr.Header:
            write_image(fd)
            src = hdr.load(fd, f"source image of {name!r}").header
            new_size = src.size if size is None else size
            check_grow(src.size, new_size)
            h = dataclasses.replace(src, uuid=vol_uuid, name=name, size=new_size, created=hdr.now_iso(),
                                    origin=origin, encryption_context={}, mac=None)
            if src.encrypted:
                h.encryption_context = encryption_context(vol_uuid, name)
                with self.unwrap(src) as dk:
                    h.wrapped_dk, h.key_id = self.backend(src.kms_backend).wrap_data_key(
                        src.key_id, dk, h.encryption_context)
                    h.seal(dk)
            os.ftruncate(fd, h.data_offset + new_size)
            hdr.store(fd, h)  # overwrites both copies of the source header
            return h

        return self._build(name, vol_uuid, owner, build)

    def _build(self, name: str, vol_uuid: str, owner: int | None, build: Callable[[int], hdr.Header]) -> hdr.Header:
        """Run ``build(fd)`` on a new temporary image, then link it into place.

        Anything that stops the build (an error, Ctrl-C, SIGTERM turned into
        KeyboardInterrupt by the CLI) removes the temporary file; a kill -9
        leaves it, unlocked, for :func:`evscrypt.tempentry.collect`."""
        check_name(name)
        final = self.path(name)
        if final.exists():
            raise AlreadyExists(f"volume {name!r} already exists")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            tmp, fd = tempentry.create(final)  # locked until fd is closed, after the link or the unlink
        except OSError as e:
            raise storage_error(e, f"cannot create volume {name!r}")
        try:
            if owner is not None and owner != os.geteuid():
                os.fchown(fd, owner, -1)
            h = build(fd)
            os.fsync(fd)
            try:
                os.link(tmp, final)  # unlike rename, refuses to replace a racing create
            except FileExistsError:
                raise AlreadyExists(f"volume {name!r} already exists")
            # the image is in place: its flock would now read as "attached"
            tempentry.release(fd)
            with contextlib.suppress(FileNotFoundError):  # a collector may take the spare name first
                os.unlink(tmp)
            fsync_dir(self.dir)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise storage_error(e, f"cannot create volume {name!r}")
            raise
        finally:
            os.close(fd)
        return h

    @staticmethod
    def _preallocate(eng: Engine, progress) -> None:
        """Fill the data area with encrypted zeros, so no sector is unwritten."""
        chunk = 1 << 20
        zeros = bytes(chunk)
        off = 0
        while off < eng.size:
            n = min(chunk, eng.size - off)
            eng._write_sectors(off // SECTOR_SIZE, memoryview(zeros)[:n])
            off += n
            if progress:
                progress(n)

    # -- inspect -------------------------------------------------------------
    def header(self, name: str) -> hdr.Header:
        op = self.open(name)
        op.close()
        return op.header

    def info(self, name: str) -> dict:
        op = self.open(name)
        try:
            h = op.header
            st = os.fstat(op.fd)
        finally:
            op.close()
        d = {
            "name": name,
            "uuid": h.uuid,
            "size": h.size,
            "encrypted": h.encrypted,
            "sector_size": h.sector_size,
            "cipher": h.cipher if h.encrypted else None,
            "data_offset": h.data_offset,
            "kms": h.kms_backend,
            "key_id": h.key_id,
            "key_alias": None,
            "key_state": None,
            "image_path": str(op.path),
            "allocated": st.st_blocks * 512,
            "created": h.created,
            "origin": h.origin,
            "features": h.features,
            "attached": is_locked(op.path),
            "header_copies_valid": list(op.loaded.valid),
        }
        if h.encrypted:
            d.update(self.key_status(h.kms_backend, h.key_id))
        return d

    def key_status(self, kms: str, key_id: str) -> dict:
        """The alias and state of a CMK, for info displays: never raises (a
        KMS that does not answer makes the state "Unknown (why)")."""
        try:
            ki = self.backend(kms).describe(key_id)
        except EvscryptError as e:
            return {"key_alias": None, "key_state": f"Unknown ({e.message})"}
        return {"key_alias": ki.alias, "key_state": ki.state.value}

    def grow(self, name: str, size: int) -> hdr.Header:
        """Grow a detached volume: extend the image, then store the header
        with the new size (its MAC needs the DK, so this goes through the KMS)."""
        with self.locked(name) as op:
            h = op.header
            check_grow(h.size, size)
            if size == h.size:
                return h
            new = dataclasses.replace(h, size=size)
            if h.encrypted:
                with self.unwrap(h) as dk:
                    new.seal(dk)
            try:
                # the file first: a crash in between leaves the old size, and
                # a longer file under it is harmless
                os.ftruncate(op.fd, h.data_offset + size)
                hdr.store(op.fd, new, op.loaded)
            except OSError as e:
                raise storage_error(e, f"cannot resize volume {name!r}")
        return new

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[Opened]:
        """The open image under its exclusive attach lock (Busy while it is
        attached), for offline copies and header changes."""
        op = self.open(name, write=True)
        try:
            lock_exclusive(op.fd, name)
            try:  # read again under the lock: a daemon may have changed it just before
                op.loaded = hdr.load(op.fd, str(op.path))
            except EvscryptError as e:
                raise type(e)(f"volume {name!r}: {e.message}")
            yield op
        finally:
            op.close()

    def delete(self, name: str) -> None:
        """Delete a detached volume; a damaged header does not prevent it."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"volume {name!r} not found")
        except OSError as e:
            raise storage_error(e, f"cannot open volume {name!r}")
        try:
            lock_exclusive(fd, name)
            os.unlink(path)
            fsync_dir(self.dir)
        finally:
            os.close(fd)

    def dump_key(self, name: str, key_file: Path) -> Path:
        """Write the raw 64-byte DK to ``key_file`` (0600).  Goes through the KMS."""
        h = self.header(name)
        if not h.encrypted:
            raise EncryptionRuleError(f"volume {name!r} is not encrypted: it has no data key to dump")
        with self.unwrap(h) as dk:
            try:
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise AlreadyExists(f"{key_file} already exists; refusing to overwrite it")
            except OSError as e:
                raise StorageError(f"cannot create {key_file}: {e.strerror}")
            try:
                pwrite_all(fd, dk.view(), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.path(name)

    @contextlib.contextmanager
    def engine(self, name: str, write: bool = False) -> Iterator[tuple[Engine, hdr.Header]]:
        """An engine on a volume for offline use (tools and tests), holding
        the attach lock so it cannot race an attached daemon."""
        op = self.open(name, write=True)
        cipher = None
        try:
            lock_exclusive(op.fd, name)
            if op.header.encrypted:
                with self.unwrap(op.header) as dk:
                    cipher = SectorCipher(dk)
            yield Engine(op.fd, op.header.size, op.header.data_offset, cipher), op.header
        finally:
            if cipher:
                cipher.close()
            op.close()


def cryptsetup_command(image: Path, key_file: Path, header: hdr.Header, mapping: str | None = None) -> str:
    """The dm-crypt command that opens this image with its dumped DK."""
    return (f"cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size {SECTOR_SIZE} "
            f"--offset {header.data_offset // 512} --key-file {key_file} {image} {mapping or header.name}")
