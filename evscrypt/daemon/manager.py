"""The volume manager: which volumes are attached, and their DK lifecycle.

Attach follows the fixed order: read the header, unwrap the DK through the
KMS, verify the header MAC, take the image's exclusive lock, expose the file.
The DK exists only inside the attachment's SectorCipher (a locked, wipeable
copy); the copy the KMS returned is wiped as soon as the cipher is built.
Detach flushes, removes the file from the mount, waits for in-flight I/O to
drain and wipes the key.

Locks: ``_name_locks[name]`` (trio) serialises attach and detach of one
volume, so a detach never races the attach of the same name.  Everything else
in here runs on the trio thread and needs no lock.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..crypto.xts import SectorCipher
from ..errors import Busy, EvscryptError, KeyStateError, NotFound, PermissionDenied
from ..image import header as hdr
from ..image.backing import lock_exclusive
from ..image.engine import Engine
from ..kms.base import KeyState
from ..names import check_name
from ..volumes import VolumeStore
from . import loopmount

log = logging.getLogger("evscrypt.manager")

#: Worker threads for crypto, pread/pwrite and fsync; 2 cores here, but I/O
#: waits overlap, so a few more threads than cores keep the disk busy.
IO_THREADS = 8
#: Requests at least this large leave the trio thread; smaller ones are
#: cheaper inline than the thread hop.
THREAD_MIN = 64 * 1024


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
    attached_at: float = field(default_factory=time.time)
    opened: int = 0  # open FUSE file handles
    inflight: int = 0  # I/O requests running now
    failed: str | None = None  # why the backing image stopped working
    detached: bool = False
    mount: loopmount.MountInfo | None = None
    counters: Counters = field(default_factory=Counters)
    key_state: str | None = None

    @property
    def size(self) -> int:
        return self.header.size

    def close(self) -> None:
        """Wipe the key and release the image (and with it the lock)."""
        if self.cipher is not None:
            self.cipher.close()
            self.cipher = None
            self.engine.cipher = None
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
        # set by the FUSE layer: forget a directory entry / a file's cached data
        self.invalidate = lambda inode, name: None
        self.invalidate_data = lambda inode: None

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
        try:
            owner = os.fstat(op.fd).st_uid
            self._check_owner(owner, uid, name)
            h = op.header
            if h.encrypted:
                dk = self.store.unwrap(h)  # KMS unwrap, then header MAC
            lock_exclusive(op.fd, name)
            if op.loaded.damaged:
                log.warning("volume %s: repairing damaged header copy (%s)", name,
                            "; ".join(e for e in op.loaded.errors if e))
                hdr.store(op.fd, h, op.loaded)
            cipher = SectorCipher(dk) if dk is not None else None
        except BaseException:
            op.close()
            raise
        finally:
            if dk is not None:
                dk.wipe()
        return Attachment(name=name, header=h, image=op.path, fd=op.fd,
                          engine=Engine(op.fd, h.size, h.data_offset, cipher), cipher=cipher,
                          owner=uid if uid != 0 else owner, inode=0,
                          key_state=KeyState.ENABLED.value if h.encrypted else None)

    async def attach(self, name: str, uid: int, mount: str | None = None, mkfs: str | None = None) -> dict:
        check_name(name)
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
                lambda: self.store.backend(h.kms_backend).describe(h.key_id), limiter=self.kms_limiter)
        except EvscryptError as e:
            a.key_state = "Unknown"
            return f"cannot check key state ({e.message}); volume {a.name} may not attach again"
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
        a.detached = True
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

    async def status(self, refresh_keys: bool = True) -> dict:
        vols = []
        for a in list(self.by_name.values()):
            if refresh_keys and a.header.encrypted:
                await self._key_warning(a)
            vols.append(self.describe(a))
        return {"pid": os.getpid(), "mountpoint": str(self.disks), "volumes": vols}
