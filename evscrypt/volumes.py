"""The volume store: named volumes in a backing store (evscrypt.store): local
files in the state directory (evscrypt.paths) or an RBD pool that many hosts
share, as the state directory records it (evscrypt.store.chosen).

It creates volumes (generating and wrapping the DK), lists and describes them,
and deletes volumes that are not attached.  It is the one way to open a
volume (:meth:`VolumeStore.open_volume`): open the image, take its lock,
read the header under the lock, check it against the catalog, check the
caller's access, unwrap the DK with the catalog's encryption context and
verify the header MAC, build the cipher.  The daemon's attach and the
offline CLI paths all go through it, so none of them can skip a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .catalog import IMAGE, SNAPSHOT, VOLUME, Catalog, Entry, SharedCatalog, encryption_context
from .crypto.xts import SectorCipher
from .errors import (
    AlreadyExists, Busy, EncryptionRuleError, EvscryptError, InvalidArgument, KeyNotFound, NotFound,
    PermissionDenied,
)
from .format import DEFAULT_DATA_OFFSET, SECTOR_SIZE
from .fsutil import write_private
from .image import header as hdr
from .image import headerfile
from .image.backing import storage_error, truncate
from .image.engine import PLAINTEXT, Engine
from .kms import KMSBackend, open_backend
from .names import check_name
from .paths import volumes_dir
from .secret import Secret
from .store import check_unencrypted, chosen, open_store
from .store.base import Image, holder_description

log = logging.getLogger("evscrypt.volumes")

#: Largest volume we accept: 64 TiB, far beyond what a sparse file on one
#: host should carry, and small enough that offsets fit every API.
MAX_SIZE = 64 << 40

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
    """An open image, the header as read and the catalog entry it was
    checked against."""

    image: Image
    loaded: hdr.Loaded
    entry: Entry

    @property
    def fd(self):
        """The image's I/O handle (evscrypt.image.backing): an fd, or the store's Image."""
        return self.image.handle

    @property
    def header(self) -> hdr.Header:
        return self.loaded.header

    def close(self) -> None:
        self.image.close()


@dataclass
class OpenVolume(Opened):
    """A volume opened for I/O: locked, checked, its key unwrapped.

    ``cipher`` is None only for a volume the catalog says is unencrypted.
    :meth:`close` wipes the keys and leaves the cipher closed (it raises if
    used), never absent, so nothing can fall back to plaintext."""

    owner: int = 0
    cipher: SectorCipher | None = None
    mac_key: Secret | None = None  # reseals the header on resize

    def engine(self) -> Engine:
        h = self.header
        return Engine(self.fd, h.size, h.data_offset, self.cipher if self.entry.encrypted else PLAINTEXT,
                      zero_unwritten=h.zero_unwritten)

    def close(self) -> None:
        if self.cipher is not None:
            self.cipher.close()
        if self.mac_key is not None:
            self.mac_key.wipe()
        super().close()


class VolumeStore:
    def __init__(self, home: Path, store: str | None = None):
        """The volumes of state directory ``home``, in the backing store it
        records, or ``store`` (a spec: evscrypt.store) if it records none."""
        self.home = Path(home)
        self.images = open_store(chosen(self.home, store), volumes_dir(self.home))
        self._backends: dict[str, KMSBackend] = {}
        # a shared store keeps its catalog, so every host sees the same volumes
        self.catalog = SharedCatalog(self.images.catalog()) if self.images.shared \
            else Catalog(self.home, scan=self._scan)

    def backend(self, name: str) -> KMSBackend:
        if name not in self._backends:
            self._backends[name] = open_backend(name, self.home)
        return self._backends[name]

    def location(self, name: str) -> str:
        """Where volume ``name``'s image lives: a path, or rbd:POOL/NAME."""
        return self.images.location(check_name(name))

    def path(self, name: str) -> Path:
        """The image file of volume ``name`` in a store of local files, for
        tools and tests that read the file itself."""
        return Path(self.location(name))

    def exists(self, name: str) -> bool:
        return self.images.exists(check_name(name))

    def names(self) -> list[str]:
        """Volumes with an image, and catalog entries whose image is missing
        (listed, so that a deleted image does not go unnoticed)."""
        return sorted(set(self.images.names()) | set(self.catalog.names(VOLUME)))

    def _scan(self):
        """Every image already in the state directory, for the catalog's
        first use: (kind, name, header, name bound by its context)."""
        from .snapshots import images, snapshots  # snapshots imports this module

        found = [(VOLUME, name, self.images.path(name)) for name in self.images.names()]
        for kind, copies in ((SNAPSHOT, snapshots(self.home)), (IMAGE, images(self.home))):
            found += [(kind, n, copies.image_path(n)) for n in copies.names()]
        for kind, name, path in found:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                h = hdr.load(fd, str(path)).header
            except (EvscryptError, OSError):
                continue  # a damaged image is not adopted; 'volume adopt' can, once it is repaired
            finally:
                os.close(fd)
            yield kind, name, h, name if kind == VOLUME else Entry.of_image(h).name

    # -- open ------------------------------------------------------------------
    def _open_image(self, name: str, write: bool) -> Image:
        try:
            return self.images.open(check_name(name), write=write)
        except NotFound:
            if self.catalog.get(VOLUME, name) is not None:
                raise NotFound(f"volume {name!r} is in the catalog but its image {self.location(name)} is missing")
            raise NotFound(f"volume {name!r} not found")

    def _open_locked(self, name: str, break_lock: bool = False) -> Image:
        """The image open read-write under its exclusive attach lock (Busy,
        naming the holder, while it is attached here or elsewhere); closing
        the image releases the lock.  ``break_lock`` first takes the lock
        away from a holder that is dead (fenced, on a shared store: it can
        never write again); Busy if it still answers."""
        img = self._open_image(name, True)
        try:
            if break_lock and (holder := self.images.holder(name)) is not None:
                self.images.break_lock(name, holder)
            try:
                img.lock(holder_description())
            except Busy:
                holder = self.images.holder(name)
                raise Busy(f"volume {name!r} is attached: its image is locked by {holder or 'another user'}")
        except BaseException:
            img.close()
            raise
        return img

    @staticmethod
    def _load(name: str, image: Image) -> hdr.Loaded:
        try:
            return hdr.load(image.handle, image.name)
        except EvscryptError as e:
            raise type(e)(f"volume {name!r}: {e.message}")
        except OSError as e:
            raise storage_error(e, f"cannot read volume {name!r}")

    def _opened(self, name: str, image: Image, cls=Opened, **kw) -> Opened:
        """Read the header and check it against the catalog (closes the image on failure)."""
        try:
            loaded = self._load(name, image)
            entry = self.catalog.check(VOLUME, name, loaded.header)
        except BaseException:
            image.close()
            raise
        return cls(image, loaded, entry, **kw)

    def open(self, name: str, write: bool = False) -> Opened:
        """The image and its checked header, without the lock: for reading
        what the header says (info, header-backup, dump-key)."""
        return self._opened(name, self._open_image(name, write))

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[Opened]:
        """The open image under its exclusive attach lock (Busy while it is
        attached), its header read under the lock and checked, for offline
        copies and header changes."""
        op = self._opened(name, self._open_locked(name))
        try:
            yield op
        finally:
            op.close()

    @contextlib.contextmanager
    def frozen(self, name: str) -> Iterator[tuple[Opened, str]]:
        """Volume ``name`` at one point in time, read-only, attached on any
        host or not: a snapshot of the store (crash-consistent; on RBD the
        holder of the lock takes it), its header read and checked; and the
        snapshot's name.  Only for a shared store, whose snapshots are
        consistent while others write; the snapshot goes at the end."""
        snap = f"evscrypt-{uuidlib.uuid4().hex[:12]}"
        try:
            self.images.snapshot(check_name(name), snap)
        except NotFound:
            raise NotFound(f"volume {name!r} not found") from None
        try:
            op = self._opened(name, self.images.open(name, snapshot=snap))
            try:
                yield op, snap
            finally:
                op.close()
        finally:
            self.images.delete_snapshot(name, snap)

    def open_volume(self, name: str, uid: int = 0, *, repair: bool = False, break_lock: bool = False) -> OpenVolume:
        """Open volume ``name`` for I/O by user ``uid``; the one way to do it.

        Open the image, take its lock (Busy if attached), read the header
        under the lock, check it against the catalog, check that ``uid`` may
        use the volume and its CMK, unwrap the DK with the catalog's context
        and key and verify the header MAC, build the cipher.  The caller
        closes the result (which wipes the keys and releases the lock).
        ``repair`` rewrites a damaged header copy; ``break_lock`` takes the
        lock of a dead holder (see :meth:`_open_locked`)."""
        op = self._opened(name, self._open_locked(name, break_lock), OpenVolume)
        try:
            op.owner = op.image.owner()
            if uid != 0 and uid != op.owner:
                raise PermissionDenied(f"volume {name!r} belongs to another user")
            if not op.entry.encrypted:
                check_unencrypted(self.images, name)
            if op.entry.encrypted:
                # a user may use only CMKs they own or were granted
                with self._this_hosts_key(op.entry):
                    self.backend(op.entry.kms).check_access(op.entry.key_id, uid)
                with self.unwrap(op.entry, op.header) as dk:
                    op.cipher = SectorCipher(dk)
                    op.mac_key = hdr.mac_key(dk)
            if repair and op.loaded.damaged:
                log.warning("volume %s: repairing damaged header copy (%s)", name,
                            "; ".join(e for e in op.loaded.errors if e))
                op.loaded = hdr.store(op.fd, op.header, op.loaded)
        except BaseException:
            op.close()
            raise
        return op

    @contextlib.contextmanager
    def _this_hosts_key(self, entry: Entry):
        """A local soft-HSM's CMKs live in the state directory of the host
        that made them: in a store that many hosts share, a CMK this host
        does not have is most likely another host's, and no retry helps."""
        try:
            yield
        except KeyNotFound:
            if self.images.shared and entry.kms == "local":
                raise KeyNotFound(f"volume {entry.name!r} is encrypted with a CMK of another host's local "
                                  f"soft-HSM: only the host that created it can unwrap its key; use --kms aws "
                                  f"for volumes in a store that many hosts share") from None
            raise

    def unwrap(self, entry: Entry, header: hdr.Header) -> Secret:
        """The DK in ``header``, unwrapped by the KMS and CMK the catalog
        ``entry`` names, under the encryption context built from the entry,
        then checked against the header MAC."""
        if not entry.encrypted:
            raise InvalidArgument(f"volume {entry.name!r} is not encrypted")
        with self._this_hosts_key(entry):
            dk = self.backend(entry.kms).decrypt(header.wrapped_dk, entry.context(), entry.key_id)
        try:
            hdr.verify(header, dk)
        except BaseException:
            dk.wipe()
            raise
        return dk

    def data_key(self, name: str) -> Secret:
        """Volume ``name``'s DK, by the checked path (attached or not)."""
        op = self.open(name)
        try:
            if not op.entry.encrypted:
                raise EncryptionRuleError(f"volume {name!r} is not encrypted; it has no data key")
            return self.unwrap(op.entry, op.header)
        finally:
            op.close()

    # -- header backup, restore, adopt ------------------------------------------
    def backup_header(self, name: str, dest: Path) -> hdr.Loaded:
        """Save volume ``name``'s header area (both copies) to ``dest``."""
        op = self.open(name)
        try:
            return headerfile.backup(op.fd, dest)
        finally:
            op.close()

    def restore_header(self, name: str, src: Path) -> hdr.Header:
        """Write a saved header back into detached volume ``name``.  The
        catalog, not the image, says which header may go in, so this works
        when both copies in the image are destroyed and still never accepts
        another volume's header."""
        with self._open_locked(name) as img:
            return headerfile.restore(img.handle, src, self.catalog.require(VOLUME, name), f"volume {name!r}")

    def adoption(self, name: str) -> tuple[Entry, Entry | None]:
        """What adopting volume ``name`` would record (read from its image,
        not checked against anything), and its current entry, if any."""
        with self._open_image(name, False) as img:
            h = self._load(name, img).header
        return Entry.of(h, name), self.catalog.get(VOLUME, name)

    def adopt(self, name: str, expected: Entry) -> Entry:
        """Record volume ``name``'s image in the catalog as it is now, if it
        still says ``expected`` (what the user was shown), under its lock."""
        with self._open_locked(name) as img:
            entry = Entry.of(self._load(name, img).header, name)
            if entry != expected:
                raise Busy(f"volume {name!r} changed while it was being adopted; nothing was recorded")
            self.catalog.put(VOLUME, name, entry)
        return entry

    # -- create ----------------------------------------------------------------
    def create(self, name: str, size: int, *, encrypted: bool = True, kms: str = "local",
               key: str | None = None, preallocate: bool = False, origin: dict | None = None,
               owner: int | None = None, progress: Callable[[int], None] | None = None,
               fill: Callable[[Engine], None] | None = None) -> hdr.Header:
        """Create a volume; ``fill`` may write its initial contents.

        The image is built under a temporary name and renamed into place only
        when complete, so an interrupted create leaves no half-made volume.
        A preallocated volume has no unwritten sectors, so it drops the
        zero-unwritten feature: like dm-crypt, a zeroed sector then decrypts
        to garbage instead of reading as zeros.
        """
        check_size(size)
        if not encrypted:
            check_unencrypted(self.images, name, creating=True)
        vol_uuid = str(uuidlib.uuid4())
        return self._build(name, vol_uuid, owner, lambda fd: self.initialise(
            fd, vol_uuid, name, size, encrypted=encrypted, kms=kms, key=key, preallocate=preallocate,
            origin=origin, progress=progress, fill=fill))

    def initialise(self, fd, vol_uuid: str, name: str, size: int, *, encrypted: bool, kms: str = "local",
                   key: str | None = None, preallocate: bool = False, origin: dict | None = None,
                   progress: Callable[[int], None] | None = None,
                   fill: Callable[[Engine], None] | None = None) -> hdr.Header:
        """Write a new image into the empty file ``fd``: its header (for an
        encrypted one, a new DK wrapped by the CMK under the context of
        ``vol_uuid`` and ``name``), then its contents.  ``fd`` is an image
        handle (evscrypt.image.backing).  Volumes are made by
        :meth:`create`; `image copy` makes encrypted images with it."""
        check_size(size)
        h = hdr.Header(uuid=vol_uuid, name=name, size=size, encrypted=encrypted,
                       data_offset=DEFAULT_DATA_OFFSET, origin=origin or {"type": "empty", "source": None})
        if preallocate:
            h.features = [f for f in h.features if f != hdr.ZERO_UNWRITTEN]
        dk = None
        try:
            if encrypted:
                backend = self.backend(kms)
                h.encryption_context = encryption_context(vol_uuid, name)
                dk, wrapped, key_id = backend.generate_data_key(key or backend.default_key(),
                                                                h.encryption_context)
                h.kms_backend, h.key_id, h.wrapped_dk = kms, key_id, wrapped
                hdr.seal(h, dk)
            truncate(fd, h.data_offset + size)
            hdr.store(fd, h)
            if preallocate or fill:
                cipher = SectorCipher(dk) if dk else None
                try:
                    eng = Engine(fd, size, h.data_offset, cipher or PLAINTEXT, zero_unwritten=h.zero_unwritten)
                    if preallocate:
                        fill_zeros(eng, 0, size, progress)
                    if fill:
                        fill(eng)
                finally:
                    if cipher:
                        cipher.close()
        finally:
            if dk:
                dk.wipe()
        return h

    def create_copy(self, name: str, write_image: Callable[[int], None], source: Entry, *, origin: dict,
                    size: int | None = None, owner: int | None = None,
                    start: tuple[str, str] | None = None) -> hdr.Header:
        """Create a volume whose image starts as a byte copy of another one (a
        snapshot, an image, a backup): same encryption, same DK, same CMK.

        ``write_image(fd)`` writes the source image (header and data area)
        into the new, empty image; with ``start`` (a store image and one of
        its snapshots), the new image is a copy-on-write clone of that
        snapshot (BackingStore.build) and ``write_image`` has nothing to write.  Its header, as copied, is checked against
        ``source`` (the source's catalog entry) and then bound to the new
        volume: a new UUID and name, hence a new encryption context, under
        which the CMK re-wraps the source DK (unwrapped and checked against
        the source header's MAC first); the MAC is sealed again.  ``size``
        may only grow.
        """
        vol_uuid = str(uuidlib.uuid4())

        def build(fd: int) -> hdr.Header:
            write_image(fd)
            src = hdr.load(fd, f"source image of {name!r}").header
            source.check(src, f"source image of {name!r}", exact_size=True)
            new_size = src.size if size is None else size
            check_grow(src.size, new_size)
            h = dataclasses.replace(src, uuid=vol_uuid, name=name, size=new_size, created=hdr.now_iso(),
                                    origin=origin, encryption_context={}, mac=None)
            cipher = None  # an unencrypted copy's grown part stays a hole
            if src.encrypted:
                h.encryption_context = encryption_context(vol_uuid, name)
                with self.unwrap(source, src) as dk:
                    h.wrapped_dk, h.key_id = self.backend(src.kms_backend).wrap_data_key(
                        src.key_id, dk, h.encryption_context)
                    hdr.seal(h, dk)
                    cipher = SectorCipher(dk)
            try:
                extend_image(fd, h, src.size, cipher)  # overwrites both copies of the source header
            finally:
                if cipher is not None:
                    cipher.close()
            return h

        return self._build(name, vol_uuid, owner, build, start)

    def _build(self, name: str, vol_uuid: str, owner: int | None, build: Callable[[object], hdr.Header],
               start: tuple[str, str] | None = None) -> hdr.Header:
        """Run ``build(handle)`` on a new temporary image, then put it in
        place and record it in the catalog (BackingStore.build).

        Anything that stops the build (an error, Ctrl-C, SIGTERM turned into
        KeyboardInterrupt by the CLI) removes the temporary image; a kill -9
        leaves it, hidden (locally, unlocked, for
        :func:`evscrypt.tempentry.collect`)."""
        if self.images.exists(check_name(name)):
            raise AlreadyExists(f"volume {name!r} already exists")

        def fill(img: Image) -> hdr.Header:
            if owner is not None and owner != os.geteuid():
                img.set_owner(owner)
            return build(img.handle)

        try:
            return self.images.build(name, fill, lambda h: self.catalog.adding(VOLUME, name, Entry.of(h, name)),
                                     start)
        except AlreadyExists:
            raise AlreadyExists(f"volume {name!r} already exists") from None
        except OSError as e:
            raise storage_error(e, f"cannot create volume {name!r}") from None

    # -- inspect -------------------------------------------------------------
    def header(self, name: str) -> hdr.Header:
        op = self.open(name)
        op.close()
        return op.header

    def info(self, name: str) -> dict:
        op = self.open(name)
        try:
            h = op.header
            allocated = op.image.allocated()
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
            "image_path": self.location(name),
            "allocated": allocated,
            "created": h.created,
            "origin": h.origin,
            "features": h.features,
            "attached": self.images.holder(name) is not None,
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
        with the new size (its MAC needs the DK, so this goes through the KMS),
        then raise the catalog's smallest allowed size."""
        op = self.open_volume(name)
        try:
            h = op.header
            check_grow(h.size, size)
            if size == h.size:
                return h
            new = dataclasses.replace(h, size=size)
            grow_image(op, new)
        finally:
            op.close()
        self.catalog.grow(name, size)
        return new

    def delete(self, name: str) -> None:
        """Delete a detached volume; a damaged header does not prevent it,
        nor does a missing image (its catalog entry goes)."""
        try:
            self.images.delete(check_name(name))  # under the image's lock
        except NotFound:  # no image
            if self.catalog.get(VOLUME, name) is None:
                raise NotFound(f"volume {name!r} not found") from None
        except Busy:
            raise Busy(f"volume {name!r} is attached: its image is locked by "
                       f"{self.images.holder(name) or 'another user'}") from None
        self.catalog.remove(VOLUME, name)

    def dump_key(self, name: str, key_file: Path) -> str:
        """Write the raw 64-byte DK to ``key_file`` (0600); return where the
        image lives.  Goes through the KMS."""
        if not self.header(name).encrypted:
            raise EncryptionRuleError(f"volume {name!r} is not encrypted: it has no data key to dump")
        with self.data_key(name) as dk:
            write_private(key_file, dk.view())
        return self.location(name)

    @contextlib.contextmanager
    def engine(self, name: str, write: bool = False) -> Iterator[tuple[Engine, hdr.Header]]:
        """An engine on a volume for offline use (tools and tests), holding
        the attach lock so it cannot race an attached daemon."""
        op = self.open_volume(name)
        try:
            yield op.engine(), op.header
        finally:
            op.close()


#: Encrypted zeros are written this much at a time.
_FILL_CHUNK = 1 << 20


def fill_zeros(eng: Engine, start: int, end: int, progress: Callable[[int], None] | None = None) -> None:
    """Write zeros (encrypted, on an encrypted volume) over [start, end)."""
    zeros = bytes(min(_FILL_CHUNK, end - start))
    off = start
    while off < end:
        n = min(len(zeros), end - off)
        eng.write(off, memoryview(zeros)[:n])
        off += n
        if progress:
            progress(n)


def extend_image(fd, new: hdr.Header, old_size: int, cipher, prev: hdr.Loaded | None = None) -> hdr.Loaded:
    """Make the image open on ``fd`` hold ``new.size`` bytes of data, then
    store the header ``new`` (sealed already) over ``prev``: the file first,
    so a crash in between leaves the old size, and a longer file under it is
    harmless.  A volume without unwritten sectors (a preallocated one) gets
    zeros over its grown part, through ``cipher`` (PLAINTEXT for an
    unencrypted volume; None leaves that part a hole, which reads as zeros).
    Growing a volume and creating a larger one from a copy share it."""
    truncate(fd, new.data_offset + new.size)
    if cipher is not None and not new.zero_unwritten and new.size > old_size:
        fill_zeros(Engine(fd, new.size, new.data_offset, cipher, zero_unwritten=False), old_size, new.size)
    return hdr.store(fd, new, prev)


def grow_image(op: OpenVolume, new: hdr.Header) -> None:
    """Grow an open volume's image to ``new.size`` (:func:`extend_image`),
    its header resealed with the volume's MAC key.  The daemon's resize and
    the offline one share it."""
    if new.encrypted:
        hdr.seal_with(new, op.mac_key)
    try:
        op.loaded = extend_image(op.fd, new, op.header.size, op.cipher if new.encrypted else PLAINTEXT, op.loaded)
    except OSError as e:
        raise storage_error(e, f"cannot resize volume {op.header.name!r}")


def cryptsetup_command(image: Path, key_file: Path, header: hdr.Header, mapping: str | None = None) -> str:
    """The dm-crypt command that opens this image with its dumped DK, its
    paths quoted for the shell."""
    q = shlex.quote
    return (f"cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size {SECTOR_SIZE} "
            f"--offset {header.data_offset // 512} --key-file {q(str(key_file))} {q(str(image))} "
            f"{q(mapping or header.name)}")
