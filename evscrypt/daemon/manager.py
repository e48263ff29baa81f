"""The volume manager: which volumes are attached, and their DK lifecycle.

Attach opens the volume the one way there is (VolumeStore.open_volume:
lock, read the header under the lock, check it against the catalog, check
access, unwrap, verify the MAC, build the cipher), then exposes the file.
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
Everything in here runs on the trio thread; an attachment's requests run
in FUSE worker threads too, and attachment.py says how it guards itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import trio

from ..errors import Busy, EvscryptError, KeyStateError, NotFound, PermissionDenied, StorageError
from ..image import header as hdr
from ..image.backing import storage_error, sync
from ..image.copy import sparse_copy
from ..kms.base import KeyState
from ..names import check_name
from ..reattach import Verdict, check as check_reattach
from ..volumes import VolumeStore, check_grow, grow_image
from . import loopmount
from .attachment import Attachment
from .kernel import FuseKernel
from .pools import Pools

log = logging.getLogger("evscrypt.manager")

#: How long `status` waits for key states before answering with the last known.
STATUS_KMS_DEADLINE = 3.0


class VolumeManager:
    """``kernel`` is told when the mount's contents change (kernel.py);
    ``pools`` gives the limiters of the worker threads (pools.py)."""

    def __init__(self, store: VolumeStore, disks: Path, kernel: FuseKernel, pools: Pools):
        self.store = store
        self.disks = disks
        self.kernel = kernel
        self.pools = pools
        self.by_name: dict[str, Attachment] = {}
        self.by_inode: dict[int, Attachment] = {}
        # force-detached volumes that still have open handles: their inode
        # answers EIO (not ENOENT) until the last handle is released
        self.zombies: dict[int, Attachment] = {}
        self._next_inode = 2  # 1 is the FUSE root
        self._name_locks: dict[str, trio.Lock] = {}
        # set once the daemon is stopping (evscrypt stop, SIGTERM): attach is
        # refused from then on, so nothing is attached behind the sweep
        self.stopping = False
        # set by the daemon at start, reported by status: data_path, xts_backend, c_path
        self.facts: dict = {}
        # whether attach hands volumes to the C data path (cpath.py): set by the daemon
        self.c_path = False

    def _lock(self, name: str) -> trio.Lock:
        return self._name_locks.setdefault(name, trio.Lock())

    def disk_path(self, name: str) -> Path:
        return self.disks / name

    @staticmethod
    def _check_owner(a_owner: int, uid: int, name: str) -> None:
        if uid != 0 and uid != a_owner:
            raise PermissionDenied(f"volume {name!r} belongs to another user")

    # -- attach ----------------------------------------------------------------
    def _open(self, name: str, uid: int, break_lock: bool = False) -> Attachment:
        """Open the volume (in a worker thread: KMS and store calls block)."""
        vol = self.store.open_volume(name, uid, repair=True, break_lock=break_lock)
        return Attachment(name=name, vol=vol, engine=vol.engine(), owner=uid if uid != 0 else vol.owner, inode=0,
                          key_state=KeyState.ENABLED.value if vol.entry.encrypted else None)

    async def attach(self, name: str, uid: int, mount: str | None = None, mkfs: str | None = None,
                     break_lock: bool = False) -> dict:
        check_name(name)
        if self.stopping:
            raise Busy("the daemon is stopping; attach after it has started again")
        if break_lock and uid != 0:
            # it fences another host: that is the administrator's call
            raise PermissionDenied("only root can attach with --break-lock")
        if mount and uid != 0:
            # the daemon mounts as root: a user must not pick where
            raise PermissionDenied("only root can attach with --mount; use the disk file, or ask root")
        async with self._lock(name):
            a = self.by_name.get(name)
            fresh = a is None
            if fresh:
                a = await trio.to_thread.run_sync(self._open, name, uid, break_lock,
                                                  limiter=self.pools.slow_limiter)
                if self.stopping:  # a stop began while the KMS answered: its sweep has not seen this one
                    a.close()
                    raise Busy("the daemon is stopping; attach after it has started again")
                a.inode, self._next_inode = self._next_inode, self._next_inode + 1
                if self.c_path:
                    a.serve_in_c()
                self.by_name[name] = a
                self.by_inode[a.inode] = a
                log.info("attached %s (%s)", name, "encrypted" if a.header.encrypted else "not encrypted")
            else:
                self._check_owner(a.owner, uid, name)
            if mount and a.mount is None:
                try:
                    a.mount = await trio.to_thread.run_sync(
                        loopmount.setup, self.disk_path(name), Path(mount), mkfs, limiter=self.pools.slow_limiter)
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
    async def _reattach(self, a: Attachment, abandon: bool = False) -> Verdict:
        """Could ``a`` attach again after a detach?  Asks the KMS in a thread
        and remembers the answer (and the key state) for status.  With
        ``abandon``, a cancel (status's deadline) does not wait for a KMS
        that does not answer: the thread finishes alone, its answer unused."""
        h = a.header
        if not h.encrypted:
            a.reattach = check_reattach(a.name, h, a.owner, None)  # no KMS: nothing to wait for
            return a.reattach
        backend = self.store.backend(h.kms_backend)
        v = await trio.to_thread.run_sync(check_reattach, a.name, h, a.owner, backend,
                                          limiter=self.pools.slow_limiter, abandon_on_cancel=abandon)
        a.reattach = v
        a.key_state = v.state
        return v

    async def reattach_all(self, atts: list[Attachment]) -> list[Verdict]:
        """:meth:`_reattach` for many volumes at once; the KMS calls run in
        parallel (up to the slow-call limiter), each bounded by its backend."""
        out: dict[str, Verdict] = {}

        async def one(a: Attachment) -> None:
            out[a.name] = await self._reattach(a)

        async with trio.open_nursery() as n:
            for a in atts:
                n.start_soon(one, a)
        return [out[a.name] for a in atts]

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
            verdict = await self._reattach(a)
            if not verdict.ok:
                if not force:
                    raise KeyStateError(verdict.message + "; use --force to detach anyway")
                warnings.append(verdict.message)
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
            return {"name": name, "detached": True, "warnings": warnings, "reattach": verdict.to_dict()}

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
        self.kernel.forget_entry(a.inode, a.name)
        await trio.to_thread.run_sync(a.stop_c)  # waits for the requests running in C
        while a.inflight:
            await trio.sleep(0.005)
        await trio.to_thread.run_sync(self.kernel.drop_data, a.inode)
        try:
            if not (a.vol.image.closed or a.failed):
                await trio.to_thread.run_sync(sync, a.fd, limiter=self.pools.io_limiter)
        except OSError as e:
            log.error("volume %s: fsync at detach failed: %s", a.name, e.strerror)
        except StorageError as e:  # a store's flush
            log.error("volume %s: flush at detach failed: %s", a.name, e.message)
        finally:
            a.close()
        log.info("detached %s; key wiped", a.name)

    async def stop(self, uid: int, force: bool = False) -> dict:
        """Detach everything, for `evscrypt stop`; the daemon exits after
        answering.  Refused while any attached volume could not be attached
        again, unless ``force``: then each such volume gets a warning."""
        if uid != 0:
            raise PermissionDenied("only root can stop the daemon")
        if self.stopping:
            raise Busy("the daemon is already stopping")
        self.stopping = True  # no attach from here on: the check below covers everything attached
        try:
            atts = list(self.by_name.values())
            blocked = [v for v in await self.reattach_all(atts) if not v.ok]
            if blocked and not force:
                raise KeyStateError(
                    f"refusing to stop: {len(blocked)} attached volume(s) could not be attached again: "
                    + "; ".join(f"[{v.volume}] {v.message}" for v in blocked)
                    + "; fix the keys, detach the volumes, or use --force",
                    details={"blocked": [v.to_dict() for v in blocked]})
        except BaseException:
            self.stopping = False
            raise
        for v in blocked:
            log.warning("volume %s: %s; stopping anyway (evscrypt stop --force)", v.volume, v.message)
        names = [a.name for a in atts]
        await self._detach_each()
        log.info("stopped on request: detached %d volume(s)", len(names))
        return {"stopped": True, "pid": os.getpid(), "detached": names,
                "warnings": [v.message for v in blocked], "blocked": [v.to_dict() for v in blocked]}

    async def detach_all(self, why: str) -> None:
        """Detach everything because the daemon must stop (``why``: SIGTERM,
        SIGINT).  This cannot be refused, so first say, once per volume, what
        it costs: the volumes that could not be attached again."""
        self.stopping = True
        for v in await self.reattach_all(list(self.by_name.values())):
            if not v.ok:
                log.warning("volume %s: %s; detaching it anyway: the daemon is stopping (%s)", v.volume,
                            v.message, why)
        await self._detach_each()

    async def _detach_each(self) -> None:
        for name in list(self.by_name):
            a = self.by_name.get(name)
            if a is None:
                continue
            async with self._lock(name):
                if self.by_name.get(name) is not a:
                    continue  # detached meanwhile (a stop request and a signal may overlap)
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
                    await trio.to_thread.run_sync(sync, a.fd, limiter=self.pools.io_limiter)
                    method = await trio.to_thread.run_sync(self._copy_image, a, fd, limiter=self.pools.io_limiter)
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
                await trio.to_thread.run_sync(self._grow, a, new, limiter=self.pools.io_limiter)
                a.set_size(size)
                await trio.to_thread.run_sync(self.kernel.drop_attr, a.inode)
                log.info("resized %s to %d bytes", name, size)
                if a.mount:
                    try:
                        await trio.to_thread.run_sync(loopmount.grow, a.mount, limiter=self.pools.slow_limiter)
                    except EvscryptError as e:
                        # the volume has grown; only the filesystem on it has not
                        log.warning("volume %s: %s", name, e.message)
                        warnings.append(f"the volume has grown but its filesystem has not: {e.message}")
            return {**self.describe(a), "warnings": warnings}

    def _grow(self, a: Attachment, new: hdr.Header) -> None:
        grow_image(a.vol, new)
        self.store.catalog.grow(a.name, new.size)

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
            "reattach": a.reattach.to_dict() if a.reattach else None,
            "owner": a.owner,
            "open_handles": a.opened,
            "state": "failed" if a.failed else "ok",
            "error": a.failed,
            "mount": a.mount.to_dict() if a.mount else None,
            "attached_at": a.attached_at,
            "io": vars(a.counters_now()),
            "c_path": a.in_c,
            "io_in_c": a.counters_in_c(),
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
                        n.start_soon(self._reattach, a, True)
        out = {"pid": os.getpid(), "mountpoint": str(self.disks), **self.facts,
               "volumes": [self.describe(a) for a in atts]}
        if uid == 0:  # counts of every volume's requests: root's alone
            out["fuse_requests"] = self.kernel.request_counts()
        return out
