"""The volume manager: which volumes are attached, and their DK lifecycle.

Attach follows the fixed order: read the header, unwrap the DK through the
KMS, verify the header MAC, take the image's exclusive lock, expose the file.
The DK exists only inside the attachment's SectorCipher (a locked, wipeable
copy); the copy the KMS returned is wiped as soon as the cipher is built.
Detach flushes, removes the file from the mount, waits for in-flight I/O to
drain and wipes the key.

A snapshot of an attached volume is taken here, crash-consistent: the
volume's write gate holds new writes and drains the running ones while the
image is copied.  A resize grows the image and its header in place; the
header MAC is resealed with the MAC key derived at attach, not the DK.

Locks: ``_name_locks[name]`` (trio) serialises attach, detach, snapshot and
resize of one volume, so none of them races another on the same name.
Everything else in here runs on the trio thread, except the I/O accounting
of an attachment: reads and writes run in FUSE worker threads, so
``Attachment.lock`` guards the in-flight count, the detached flag and the
counters (see :meth:`Attachment.io_begin`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..crypto.xts import SectorCipher
from ..errors import Busy, EvscryptError, KeyStateError, NotFound, PermissionDenied, StorageError
from ..image import header as hdr
from ..image.backing import lock_exclusive, storage_error
from ..image.copy import sparse_copy
from ..image.engine import Engine
from ..kms.base import KeyState
from ..names import check_name
from ..secret import Secret
from ..volumes import VolumeStore, check_grow
from . import loopmount
from .gate import WriteGate

log = logging.getLogger("evscrypt.manager")

#: Worker threads for crypto, pread/pwrite and fsync; 2 cores here, but I/O
#: waits overlap, so a few more threads than cores keep the disk busy.
IO_THREADS = 8
#: How long `status` waits for key states before answering with the last known.
STATUS_KMS_DEADLINE = 3.0


@dataclass
class Counters:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    fsyncs: int = 0
    discards: int = 0
    errors: int = 0


@dataclass
class Attachment:
    name: str
    header: hdr.Header
    image: Path
    fd: int
    engine: Engine
    cipher: SectorCipher | None
    owner: int
    inode: int
    loaded: hdr.Loaded | None = None  # the header as stored: the next store's sequence number
    mac_key: Secret | None = None  # reseals the header on resize; wiped with the DK
    gate: WriteGate = field(default_factory=WriteGate)
    attached_at: float = field(default_factory=time.time)
    opened: int = 0  # open FUSE file handles
    inflight: int = 0  # I/O requests running now
    failed: str | None = None  # why the backing image stopped working
    detached: bool = False
    mount: loopmount.MountInfo | None = None
    counters: Counters = field(default_factory=Counters)
    key_state: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return self.header.size

    def io_begin(self) -> bool:
        """Count a request in; False if the volume is detached or failed.

        Detach sets ``detached`` under the same lock and then waits for the
        count to drain, so no request can start after detach has looked and
        still be using the key when it is wiped.
        """
        with self.lock:
            if self.detached or self.failed:
                return False
            self.inflight += 1
            return True

    def io_done(self, reads: int = 0, writes: int = 0, bytes_read: int = 0, bytes_written: int = 0,
                fsyncs: int = 0, discards: int = 0, errors: int = 0) -> None:
        """Count a request out and add to the counters (every read and write
        passes here: plain arguments, not a loop over names)."""
        with self.lock:
            self.inflight -= 1
            c = self.counters
            c.reads += reads
            c.writes += writes
            c.bytes_read += bytes_read
            c.bytes_written += bytes_written
            c.fsyncs += fsyncs
            c.discards += discards
            c.errors += errors

    def read_done(self, nbytes: int) -> None:
        """io_done for a read that succeeded: the 4 KiB path's short form."""
        with self.lock:
            self.inflight -= 1
            c = self.counters
            c.reads += 1
            c.bytes_read += nbytes

    def write_done(self, nbytes: int) -> None:
        """io_done for a write that succeeded (an empty one counts no write)."""
        with self.lock:
            self.inflight -= 1
            if nbytes:
                c = self.counters
                c.writes += 1
                c.bytes_written += nbytes

    def mark_detached(self) -> None:
        with self.lock:
            self.detached = True

    def close(self) -> None:
        """Wipe the key and release the image (and with it the lock)."""
        if self.cipher is not None:
            self.cipher.close()
            self.cipher = None
            self.engine.cipher = None
        if self.mac_key is not None:
            self.mac_key.wipe()
            self.mac_key = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VolumeManager:
    def __init__(self, store: VolumeStore, disks: Path):
        self.store = store
        self.disks = disks
        self.by_name: dict[str, Attachment] = {}
        self.by_inode: dict[int, Attachment] = {}
        # force-detached volumes that still have open handles: their inode
        # answers EIO (not ENOENT) until the last handle is released
        self.zombies: dict[int, Attachment] = {}
        self._next_inode = 2  # 1 is the FUSE root
        self._name_locks: dict[str, trio.Lock] = {}
        self.io_limiter = trio.CapacityLimiter(IO_THREADS)
        self.kms_limiter = trio.CapacityLimiter(4)
        # set by the FUSE layer: forget a directory entry / a file's cached
        # data / a file's cached attributes (its size, after a resize)
        self.invalidate = lambda inode, name: None
        self.invalidate_data = lambda inode: None
        self.invalidate_attr = lambda inode: None
        # set by the FUSE layer: the requests it received, by FUSE opcode name
        self.request_counts = lambda: {}

    def _lock(self, name: str) -> trio.Lock:
        return self._name_locks.setdefault(name, trio.Lock())

    def disk_path(self, name: str) -> Path:
        return self.disks / name

    @staticmethod
    def _check_owner(a_owner: int, uid: int, name: str) -> None:
        if uid != 0 and uid != a_owner:
            raise PermissionDenied(f"volume {name!r} belongs to another user")

    # -- attach ----------------------------------------------------------------
    def _open_unlocked(self, name: str, uid: int) -> Attachment:
        """Steps 1-4 of attach; runs in a worker thread (KMS calls block)."""
        op = self.store.open(name, write=True)
        dk = None
        mac_key = None
        try:
            owner = os.fstat(op.fd).st_uid
            self._check_owner(owner, uid, name)
            h = op.header
            if h.encrypted:
                # a user may use only CMKs they own or were granted
                self.store.backend(h.kms_backend).check_access(h.key_id, uid)
                dk = self.store.unwrap(h)  # KMS unwrap, then header MAC
            lock_exclusive(op.fd, name)
            loaded = op.loaded
            if loaded.damaged:
                log.warning("volume %s: repairing damaged header copy (%s)", name,
                            "; ".join(e for e in loaded.errors if e))
                loaded = hdr.store(op.fd, h, loaded)
            cipher = SectorCipher(dk) if dk is not None else None
            mac_key = hdr.Header.mac_key(dk) if dk is not None else None
        except BaseException:
            op.close()
            if mac_key is not None:
                mac_key.wipe()
            raise
        finally:
            if dk is not None:
                dk.wipe()
        return Attachment(name=name, header=h, image=op.path, fd=op.fd,
                          engine=Engine(op.fd, h.size, h.data_offset, cipher), cipher=cipher,
                          owner=uid if uid != 0 else owner, inode=0, loaded=loaded, mac_key=mac_key,
                          key_state=KeyState.ENABLED.value if h.encrypted else None)

    async def attach(self, name: str, uid: int, mount: str | None = None, mkfs: str | None = None) -> dict:
        check_name(name)
        if mount and uid != 0:
            # the daemon mounts as root: a user must not pick where
            raise PermissionDenied("only root can attach with --mount; use the disk file, or ask root")
        async with self._lock(name):
            a = self.by_name.get(name)
            fresh = a is None
            if fresh:
                a = await trio.to_thread.run_sync(self._open_unlocked, name, uid, limiter=self.kms_limiter)
                a.inode, self._next_inode = self._next_inode, self._next_inode + 1
                self.by_name[name] = a
                self.by_inode[a.inode] = a
                log.info("attached %s (%s)", name, "encrypted" if a.header.encrypted else "not encrypted")
            else:
                self._check_owner(a.owner, uid, name)
            if mount and a.mount is None:
                try:
                    a.mount = await trio.to_thread.run_sync(
                        loopmount.setup, self.disk_path(name), Path(mount), mkfs, limiter=self.kms_limiter)
                except BaseException:
                    if fresh:
                        # leave nothing half-attached; the kernel releases the
                        # loop's handle on the file asynchronously
                        await self._wait_closed(a, 5.0)
                        await self._remove(a)
                    raise
            elif mount and a.mount and Path(a.mount.mountpoint) != Path(mount):
                raise Busy(f"volume {name!r} is already mounted at {a.mount.mountpoint}")
            return self.describe(a)

    # -- detach ----------------------------------------------------------------
    async def _key_warning(self, a: Attachment) -> str | None:
        """Why re-attaching after a detach would fail, or None."""
        if not a.header.encrypted:
            return None
        h = a.header
        try:
            info = await trio.to_thread.run_sync(
                lambda: self.store.backend(h.kms_backend).check_usable(h.key_id), limiter=self.kms_limiter)
        except (EvscryptError, OSError) as e:
            a.key_state = "Unknown"
            why = e.message if isinstance(e, EvscryptError) else (e.strerror or str(e))
            return f"cannot check key state ({why}); volume {a.name} may not attach again"
        a.key_state = info.state.value
        if info.state is KeyState.ENABLED:
            return None
        return (f"key {info.alias or info.key_id} is {info.state.value}: once detached, volume {a.name} "
                f"cannot be attached again until the key is enabled or its deletion is cancelled")

    async def detach(self, name: str, uid: int, force: bool = False) -> dict:
        check_name(name)
        async with self._lock(name):
            a = self.by_name.get(name)
            if a is None:
                if not self.store.exists(name):
                    raise NotFound(f"volume {name!r} not found")
                raise NotFound(f"volume {name!r} is not attached")
            self._check_owner(a.owner, uid, name)
            warnings = []
            warning = await self._key_warning(a)
            if warning:
                if not force:
                    raise KeyStateError(warning + "; use --force to detach anyway")
                warnings.append(warning)
            if not force:
                # refuse before undoing anything: a refused detach changes nothing
                own_loop = a.mount.loop if a.mount else None
                loops = [lp for lp in loopmount.loops_backing(self.disk_path(name)) if lp != own_loop]
                if loops:
                    raise Busy(f"volume {name!r} is in use by {', '.join(loops)} (use --force)")
                others = a.opened - (1 if own_loop else 0)  # the loop device holds one handle
                if others > 0:
                    raise Busy(f"volume {name!r} is open ({others} handle(s)); close it or use --force")
            if a.mount:
                await trio.to_thread.run_sync(loopmount.teardown, a.mount, force)
                a.mount = None
                await self._wait_closed(a, 5.0)
            if a.opened:
                if not force:
                    raise Busy(f"volume {name!r} is still open ({a.opened} handle(s)); use --force")
                warnings.append(f"{a.opened} open handle(s) on {name} will get EIO")
            await self._remove(a)
            return {"name": name, "detached": True, "warnings": warnings}

    async def _wait_closed(self, a: Attachment, timeout: float) -> None:
        """The kernel releases a loop device's file asynchronously."""
        with trio.move_on_after(timeout):
            while a.opened:
                await trio.sleep(0.02)

    async def _remove(self, a: Attachment) -> None:
        """Unexpose, drain in-flight I/O, flush, wipe the key, unlock."""
        self.by_name.pop(a.name, None)
        self.by_inode.pop(a.inode, None)
        a.mark_detached()
        if a.opened:
            self.zombies[a.inode] = a
        self.invalidate(a.inode, a.name)
        while a.inflight:
            await trio.sleep(0.005)
        await trio.to_thread.run_sync(self.invalidate_data, a.inode)
        try:
            if a.fd >= 0 and not a.failed:
                await trio.to_thread.run_sync(os.fsync, a.fd, limiter=self.io_limiter)
        except OSError as e:
            log.error("volume %s: fsync at detach failed: %s", a.name, e.strerror)
        finally:
            a.close()
        log.info("detached %s; key wiped", a.name)

    async def detach_all(self) -> None:
        for name in list(self.by_name):
            a = self.by_name.get(name)
            if a is None:
                continue
            async with self._lock(name):
                if a.mount:
                    try:
                        await trio.to_thread.run_sync(loopmount.teardown, a.mount, True)
                    except EvscryptError as e:
                        log.error("volume %s: %s", name, e.message)
                    a.mount = None
                    await self._wait_closed(a, 5.0)
                await self._remove(a)

    # -- snapshot ----------------------------------------------------------------
    def _snapshot_dest(self, dest: str) -> Path:
        """The copy goes only into a new file inside the state directory: the
        daemon runs as root and must not be steered into writing elsewhere."""
        p = Path(dest)
        home = Path(os.path.realpath(self.store.home))
        parent = Path(os.path.realpath(p.parent)) if p.is_absolute() else None
        if parent is None or not (parent == home or home in parent.parents) or p.name in ("", ".", ".."):
            raise PermissionDenied(f"snapshot destination {dest!r} is not inside the daemon's state "
                                   f"directory {home}")
        return parent / p.name

    def _attached(self, name: str, uid: int, uuid: str | None) -> Attachment:
        a = self.by_name.get(name)
        if a is None:
            raise NotFound(f"volume {name!r} is not attached")
        self._check_owner(a.owner, uid, name)
        if uuid is not None and a.header.uuid != uuid:
            raise Busy(f"the volume {name!r} attached here is not the one asked for (uuid {uuid})")
        if a.failed:
            raise StorageError(f"volume {name!r} has failed: {a.failed}")
        return a

    async def snapshot(self, name: str, dest: str, uid: int, uuid: str | None = None) -> dict:
        """Copy the image of an attached volume into the new file ``dest``,
        with its writes quiesced: a crash-consistent point in time."""
        check_name(name)
        path = self._snapshot_dest(dest)
        async with self._lock(name):
            a = self._attached(name, uid, uuid)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise storage_error(e, f"cannot create {path}")
            try:
                if uid != 0:
                    os.fchown(fd, uid, -1)
                t0 = time.monotonic()
                async with a.gate.quiesce():
                    # the kernel has handed every completed write to us and we
                    # have written it: fsync makes the copy point durable too
                    await trio.to_thread.run_sync(os.fsync, a.fd, limiter=self.io_limiter)
                    method = await trio.to_thread.run_sync(self._copy_image, a, fd, limiter=self.io_limiter)
                held = time.monotonic() - t0
            except OSError as e:
                raise storage_error(e, f"cannot snapshot volume {name!r}")
            finally:
                os.close(fd)
        log.info("snapshot of %s into %s (%s, writes held %.3f s)", name, path, method, held)
        return {"name": name, "dest": str(path), "method": method, "seconds": round(held, 3),
                "uuid": a.header.uuid}

    @staticmethod
    def _copy_image(a: Attachment, fd: int) -> str:
        def check(_n: int) -> None:
            # the CLI removes its temporary destination when interrupted: stop
            # copying (and holding writes) for nobody
            if os.fstat(fd).st_nlink == 0:
                raise StorageError("snapshot destination removed; copy abandoned")

        method = sparse_copy(a.fd, fd, length=a.header.data_offset + a.header.size, progress=check)
        os.fsync(fd)
        return method

    # -- resize ----------------------------------------------------------------
    async def resize(self, name: str, size: int, uid: int) -> dict:
        """Grow an attached volume: the image, then its header, then the size
        the FUSE file shows; then a loop device and filesystem made by
        attach --mount, if any."""
        check_name(name)
        async with self._lock(name):
            a = self._attached(name, uid, None)
            check_grow(a.size, size)
            warnings = []
            if size != a.size:
                new = dataclasses.replace(a.header, size=size)
                await trio.to_thread.run_sync(self._grow, a, new, limiter=self.io_limiter)
                a.header = new
                a.engine.size = size
                await trio.to_thread.run_sync(self.invalidate_attr, a.inode)
                log.info("resized %s to %d bytes", name, size)
                if a.mount:
                    try:
                        await trio.to_thread.run_sync(loopmount.grow, a.mount, limiter=self.kms_limiter)
                    except EvscryptError as e:
                        # the volume has grown; only the filesystem on it has not
                        log.warning("volume %s: %s", name, e.message)
                        warnings.append(f"the volume has grown but its filesystem has not: {e.message}")
            return {**self.describe(a), "warnings": warnings}

    @staticmethod
    def _grow(a: Attachment, new: hdr.Header) -> None:
        if new.encrypted:
            new.seal_with(a.mac_key)
        try:
            # the file first: a crash in between leaves the old size, and a
            # longer file under it is harmless
            os.ftruncate(a.fd, new.data_offset + new.size)
            a.loaded = hdr.store(a.fd, new, a.loaded)
        except OSError as e:
            raise storage_error(e, f"cannot resize volume {a.name!r}")

    # -- status ----------------------------------------------------------------
    def describe(self, a: Attachment) -> dict:
        return {
            "name": a.name,
            "path": str(self.disk_path(a.name)),
            "size": a.size,
            "encrypted": a.header.encrypted,
            "kms": a.header.kms_backend,
            "key_id": a.header.key_id,
            "key_state": a.key_state,
            "owner": a.owner,
            "open_handles": a.opened,
            "state": "failed" if a.failed else "ok",
            "error": a.failed,
            "mount": a.mount.to_dict() if a.mount else None,
            "attached_at": a.attached_at,
            "io": vars(a.counters).copy(),
        }

    async def status(self, refresh_keys: bool = True, uid: int = 0) -> dict:
        """Attached volumes.  Key states are refreshed in parallel under one
        short deadline; a KMS that does not answer in time leaves the last
        known state, so status stays fast when the KMS is down."""
        atts = [a for a in self.by_name.values() if uid == 0 or a.owner == uid]  # users see their own
        if refresh_keys:
            with trio.move_on_after(STATUS_KMS_DEADLINE):
                async with trio.open_nursery() as n:
                    for a in atts:
                        if a.header.encrypted:
                            n.start_soon(self._key_warning, a)
        out = {"pid": os.getpid(), "mountpoint": str(self.disks), "volumes": [self.describe(a) for a in atts]}
        if uid == 0:  # counts of every volume's requests: root's alone
            out["fuse_requests"] = self.request_counts()
        return out
