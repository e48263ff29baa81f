"""Snapshots and images: point-in-time copies of a volume in the state directory.

A snapshot lives in ``<home>/snapshots/NAME/`` and an image in
``<home>/images/NAME/`` (evscrypt.paths).  Each directory holds ``image``, a byte copy of the
volume's backing image (the header with its wrapped DK, then the data area
as stored: ciphertext, holes kept, a reflink where the filesystem can), and
``meta.json``.  Being a copy of the header and the ciphertext, it keeps the
volume's encryption, DK and CMK; nothing is decrypted to make it.

Each is built in a hidden temporary directory that is renamed into place
when complete, so an interrupted create leaves nothing a listing would show;
the directory is locked while it is built, so `evscrypt gc` can tell the
one a kill -9 left behind from one still being built (evscrypt.tempentry).

Taking the copy (:func:`capture`, through evscrypt.offline): a detached
volume is copied here under its exclusive attach lock, so no attach can race
it; an attached volume is copied by the daemon (:func:`copy_by_daemon`),
which holds new writes and drains the running ones while it copies, so the
copy is crash-consistent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from .catalog import IMAGE, SNAPSHOT, VOLUME, Entry
from .errors import AlreadyExists, EncryptionRuleError, EvscryptError, FormatError, NotFound
from .fsutil import fsync_dir, rename_noreplace, temp_name, write_atomic
from .image import header as hdr
from .image.backing import close, size_of, storage_error
from .image.copy import sparse_copy
from . import tempentry
from .names import check_name
from .offline import offline_or_daemon
from .paths import COPY_IMAGE as IMAGE_FILE, COPY_META as META_FILE, images_dir, snapshots_dir
from .volumes import VolumeStore

META_VERSION = 1

#: (volume name, destination file, volume uuid): ask the daemon for a
#: quiesced copy of an attached volume.  The CLI supplies it.
Online = Callable[[str, Path, str], None]
Progress = Callable[[int], None]

def capture(store: VolumeStore, name: str, dest: Path, online: Online | None,
            progress: Progress | None = None) -> tuple[hdr.Header, Entry]:
    """Copy volume ``name``'s image into the new file ``dest`` at one point in
    time; return the header that was copied, checked against the volume's
    catalog entry, and that entry."""
    def offline() -> tuple[hdr.Header, Entry]:
        with store.locked(name) as op:
            try:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise storage_error(e, f"cannot create {dest}")
            try:
                sparse_copy(op.fd, fd, progress=progress)
                os.fsync(fd)
            except OSError as e:
                raise storage_error(e, f"cannot copy volume {name!r}")
            finally:
                os.close(fd)
            return op.header, op.entry

    return offline_or_daemon(name, offline,
                             None if online is None else lambda: copy_by_daemon(store, name, dest, online))


def copy_by_daemon(store: VolumeStore, name: str, dest: Path, online: Online) -> tuple[hdr.Header, Entry]:
    """:func:`capture` of an attached volume: the daemon copies it into
    ``dest``.  NotFound if it is not attached (any more); ``dest`` is then gone."""
    entry = store.catalog.require(VOLUME, name)
    uuid = store.header(name).uuid
    try:
        online(name, dest, uuid)
    except NotFound:
        if dest.exists():
            dest.unlink()
        raise
    fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = hdr.load(fd, str(dest)).header
    finally:
        os.close(fd)
    entry.check(h, f"the copy of volume {name!r}", done="nothing was kept")
    return h, entry


class CopyStore:
    """The snapshots (``kind="snapshot"``) or the images (``kind="image"``) of one state directory."""

    def __init__(self, home: Path, kind: str):
        assert kind in (SNAPSHOT, IMAGE)
        self.kind = kind
        self.home = Path(home)
        self.dir = snapshots_dir(self.home) if kind == SNAPSHOT else images_dir(self.home)
        self.catalog = VolumeStore(self.home).catalog  # the one that adopts on first use

    def path(self, name: str) -> Path:
        return self.dir / check_name(name, self.kind)

    def image_path(self, name: str) -> Path:
        return self.path(name) / IMAGE_FILE

    def exists(self, name: str) -> bool:
        return (self.path(name) / META_FILE).exists()

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir()
                      if not p.name.startswith(".") and (p / META_FILE).exists())

    #: Where :meth:`meta` reads what a copy is, for its messages.
    meta_where = META_FILE

    def _meta_bytes(self, name: str) -> bytes | None:
        """The copy's record as stored; None if there is no such copy."""
        try:
            return (self.path(name) / META_FILE).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FormatError(f"{self.kind} {name!r}: {META_FILE} is unreadable ({e})")

    def meta(self, name: str) -> dict:
        raw = self._meta_bytes(name)
        if raw is None:
            raise NotFound(f"{self.kind} {name!r} not found")
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{self.kind} {name!r}: {self.meta_where} is unreadable ({e})")
        if not isinstance(d, dict) or d.get("version") != META_VERSION:
            raise FormatError(f"{self.kind} {name!r}: {self.meta_where} has an unknown format")
        return d

    def info(self, name: str) -> dict:
        d = self.meta(name)
        try:
            st = os.stat(self.image_path(name))
            d["allocated"] = st.st_blocks * 512
        except OSError:
            d["allocated"] = None
        d["path"] = str(self.path(name))
        return d

    def list(self, volume: str | None = None) -> list[dict]:
        out = []
        for n in self.names():
            try:
                d = self.info(n)
            except EvscryptError as e:  # one damaged entry must not hide the others
                d = {"name": n, "error": e.message}
            if volume is None or d.get("volume") == volume:
                out.append(d)
        return out

    # -- create / delete -----------------------------------------------------
    def create(self, name: str, store: VolumeStore, volume: str, online: Online | None,
               progress: Progress | None = None) -> dict:
        """Copy volume ``volume`` into a new snapshot or image called ``name``."""
        store.path(volume)  # validates the volume name before any work

        def fill(image: Path) -> tuple[dict, Entry]:
            h, entry = capture(store, volume, image, online, progress)
            return {"volume": volume, "volume_uuid": h.uuid, **self._encryption(h)}, \
                dataclasses.replace(entry, size=h.size)

        return self.build(name, fill)

    @staticmethod
    def _encryption(h: hdr.Header) -> dict:
        return {"size": h.size, "encrypted": h.encrypted, "kms": h.kms_backend, "key_id": h.key_id}

    def build(self, name: str, fill: Callable[[Path], tuple[dict, Entry]]) -> dict:
        """Make the entry ``name``: ``fill(image)`` writes the new file
        ``image`` and returns what meta.json says of it besides its name,
        and the catalog entry its header must match from now on.

        All of it happens in a hidden temporary directory, locked while we
        work in it (see evscrypt.tempentry), renamed into place when
        complete; anything that stops it removes the directory."""
        final = self.path(name)
        if final.exists():
            raise AlreadyExists(f"{self.kind} {name!r} already exists")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempentry.held(final, directory=True, mode=0o700) as (tmp, _):
            try:
                t0 = time.monotonic()
                filled, entry = fill(tmp / IMAGE_FILE)
                meta = {"version": META_VERSION, "kind": self.kind, "name": name, "created": hdr.now_iso(), **filled}
                meta["seconds"] = round(time.monotonic() - t0, 3)
                write_atomic(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
                fsync_dir(tmp)
                with self.catalog.adding(self.kind, name, entry):
                    rename_noreplace(tmp, final, f"{self.kind} {name!r}")
                fsync_dir(self.dir)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, OSError):
                    raise storage_error(e, f"cannot create {self.kind} {name!r}")
                raise
        return meta

    def delete(self, name: str) -> None:
        """Delete in two steps: a rename out of sight (atomic), then the files.
        The directory is locked first, so no collector takes it half-way."""
        final = self.path(name)
        if not final.is_dir():
            raise NotFound(f"{self.kind} {name!r} not found")
        with tempentry.lock_for_removal(final):
            trash = temp_name(final, "deleting")
            os.rename(final, trash)
            fsync_dir(self.dir)
            self.catalog.remove(self.kind, name)
            shutil.rmtree(trash, ignore_errors=True)

    def header(self, name: str) -> tuple[hdr.Header, Entry]:
        """The image's header, checked against its catalog entry, and the entry."""
        fd = self.open_image(name)
        try:
            h = hdr.load(fd, f"{self.kind} {name!r}").header
        finally:
            close(fd)
        return h, self.catalog.check(self.kind, name, h)

    def image_size(self, name: str) -> int:
        fd = self.open_image(name)
        try:
            return size_of(fd)
        finally:
            close(fd)

    def clone_source(self, name: str) -> tuple[str, str] | None:
        """The store image and snapshot that a volume made from this copy is
        a copy-on-write clone of (VolumeStore.create_copy); None: copied."""
        return None

    def open_image(self, name: str):
        """The copy's image handle (evscrypt.image.backing), for one use;
        :func:`evscrypt.image.backing.close` it."""
        try:
            return os.open(self.image_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{self.kind} {name!r} not found")
        except OSError as e:
            raise storage_error(e, f"cannot open {self.kind} {name!r}")

    def write_image_to(self, name: str, progress: Progress | None = None) -> Callable[[int], None]:
        """A ``write_image`` for VolumeStore.create_copy: clone this image into the new volume."""
        def write(fd) -> None:
            src = self.open_image(name)
            try:
                sparse_copy(src, fd, progress=progress)
            finally:
                close(src)
        return write


class ImageStore(CopyStore):
    def __init__(self, home: Path):
        super().__init__(home, IMAGE)

    def export(self, name: str, dest: Path, progress: Progress | None = None) -> Path:
        """Write the image's disk (the plaintext data area, sparse) to ``dest``
        (a new file, or a directory to put NAME.raw in).  Encrypted images are refused."""
        meta = self.meta(name)
        if meta.get("encrypted"):
            raise EncryptionRuleError(f"image {name!r} is encrypted: encrypted images cannot be exported")
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"{name}.raw"
        if os.path.lexists(dest):
            raise AlreadyExists(f"{dest} already exists; refusing to overwrite it")
        h, _ = self.header(name)
        if h.encrypted:  # meta.json disagrees with the header: trust the header
            raise EncryptionRuleError(f"image {name!r} is encrypted: encrypted images cannot be exported")
        tmp = temp_name(dest)
        src = self.open_image(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            close(src)
            raise storage_error(e, f"cannot create {dest}")
        try:
            sparse_copy(src, fd, src_offset=h.data_offset, length=h.size, progress=progress)
            os.fsync(fd)
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise AlreadyExists(f"{dest} already exists; refusing to overwrite it")
            os.unlink(tmp)
            fsync_dir(dest.parent)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise storage_error(e, f"cannot export image {name!r} to {dest}")
            raise
        finally:
            os.close(fd)
            close(src)
        return dest


def snapshots(home: Path) -> CopyStore:
    """The snapshots of state directory ``home``: in its store, if that is
    shared (evscrypt.storecopies), else in the state directory."""
    volumes = VolumeStore(home)
    if volumes.images.shared:
        from .storecopies import StoreCopies
        return StoreCopies(volumes, SNAPSHOT)
    return CopyStore(home, SNAPSHOT)


def images(home: Path) -> ImageStore:
    """The images of state directory ``home`` (as :func:`snapshots`)."""
    volumes = VolumeStore(home)
    if volumes.images.shared:
        from .storecopies import StoreImages
        return StoreImages(volumes)
    return ImageStore(home)
