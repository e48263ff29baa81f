"""The Ceph RBD store: each image is one RBD image in a pool (and an
optional RBD namespace), holding exactly the bytes a local image file holds.

- I/O goes through librbd (python-rbd releases the GIL for it), so worker
  threads overlap; aio_read/aio_write keep several requests in flight from
  one thread.
- The attach lock is RBD's exclusive lock, taken explicitly with
  ``lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)``: other clients then fail fast
  (EROFS) instead of taking the lock over.  Advisory locks (lock_exclusive)
  are never used: mixed with the exclusive-lock feature, a second client
  spins at 100% CPU.
- A holder is *alive* while its watch on the image header is registered and
  it answers a notify on that header within ``liveness_timeout``.  A dead
  holder's lock is broken with RBD's fencing: librbd blocklists its address
  (rbd_blocklist_on_break_lock), so it can never write again, and the
  blocklist also drops its stale watch at once (else it blocks removal for
  about 30 s, until the OSD times it out).
- Snapshots are RBD snapshots; a clone is an RBD clone, format 2, so it needs
  no protected snapshot and outlives its parent (a deleted parent waits in
  the RBD trash until its last clone is gone).
- The catalog is the omap of one RADOS object, updated under
  ``assert_version``: a compare-and-swap on the object's version.

rados/rbd errors are converted to the evscrypt error tree here.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import threading
from pathlib import Path

import rados
import rbd

from ..errors import AlreadyExists, Busy, EvscryptError, NotFound, StorageError
from ..fsutil import fsync_dir, temp_name
from ..image.copy import pwrite_sparse
from ..names import check_name
from . import rados_notify
from ..tempentry import Collected
from .base import (
    STALE_TEMP_AGE, BackingStore, Catalog, CatalogView, Holder, Image, Pending, check_image_name, is_temp_name,
)

#: layering for clones, exclusive-lock for attach, object-map + fast-diff
#: so export and clone reads skip what was never written, deep-flatten so a
#: clone can outlive its parent's snapshots.
FEATURES = (rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP
            | rbd.RBD_FEATURE_FAST_DIFF | rbd.RBD_FEATURE_DEEP_FLATTEN)
#: Image metadata key where a holder describes itself (host, pid, time).
HOLDER_KEY = "evscrypt.holder"
#: Image metadata key for the uid the image belongs to (none: root's).
OWNER_KEY = "evscrypt.owner"
CATALOG_OBJECT = "evscrypt.catalog"
#: One read op returns the whole catalog, so its version is that of what was
#: read; the OSD caps one omap read at 131072 entries (osd_max_omap_entries_per_request).
CATALOG_MAX = 100_000
#: Export reads in pieces of this size (an RBD object).
EXPORT_STEP = 4 << 20
#: Export keeps holes at this granularity: evscrypt's sector size.
BLOCK = 4096
#: How long to wait for the OSDs at connect before saying the cluster is down.
CONNECT_TIMEOUT = 30


def _error(e: Exception, what: str) -> Exception:
    """rados/rbd exception -> evscrypt error."""
    if isinstance(e, (rbd.ImageNotFound, rados.ObjectNotFound)):
        return NotFound(f"{what}: not found")
    if isinstance(e, (rbd.ImageExists, rados.ObjectExists)):
        return AlreadyExists(f"{what}: already exists")
    if isinstance(e, (rbd.ImageBusy, rbd.ImageHasSnapshots)):
        return Busy(f"{what}: in use")
    return StorageError(f"{what}: {e}")


@contextlib.contextmanager
def _converted(what: str):
    try:
        yield
    except (rbd.Error, rados.Error) as e:
        raise _error(e, what) from None


class RBDPending(Pending):
    """An aio request; with ``done``, its completion calls it from librbd's
    completion thread (python-rbd takes the GIL for the callback).  On every
    request: slots, and the message made only for a failure."""

    __slots__ = ("image", "verb", "done", "data", "completion")

    def __init__(self, image: str, verb: str, done=None):
        self.image, self.verb, self.done = image, verb, done
        self.data = None
        self.completion = None

    @property
    def what(self) -> str:
        return f"cannot {self.verb} image {self.image!r}"

    def _error(self, completion) -> StorageError | None:
        ret = completion.get_return_value()
        return StorageError(f"{self.what}: {os.strerror(-ret)}") if ret < 0 else None

    def on_read(self, completion, data) -> None:  # librbd's thread
        self.data = data
        if self.done is not None:
            # python-rbd passes None for a failed read: only then ask why
            # (get_return_value drops the GIL, and another thread takes it)
            self.done(data, None) if data is not None else self.done(None, self._error(completion))

    def on_write(self, completion) -> None:  # librbd's thread
        self.done(None, self._error(completion))

    def wait(self):
        self.completion.wait_for_complete_and_cb()
        ret = self.completion.get_return_value()
        if ret < 0:
            raise StorageError(f"{self.what}: {os.strerror(-ret)}")
        return self.data


class RBDImage(Image):
    def __init__(self, name: str, image: rbd.Image, ioctx: rados.Ioctx):
        self.name, self._img, self._ioctx = name, image, ioctx
        self._locked = False

    def librbd_objects(self) -> tuple[rbd.Image, rados.Ioctx] | None:
        """The python-rbd Image and the Ioctx it was opened on, for the
        daemon's C data path, which calls librbd on the same open (and
        locked) image itself (daemon/_cpath_rbd.c); None once closed."""
        return None if self._img is None else (self._img, self._ioctx)

    def size(self) -> int:
        with _converted(f"image {self.name!r}"):
            return self._img.size()

    @property
    def closed(self) -> bool:
        return self._img is None

    def owner(self) -> int:
        with _converted(f"image {self.name!r}"):
            try:
                return int(self._img.metadata_get(OWNER_KEY))
            except KeyError:
                return 0

    def set_owner(self, uid: int) -> None:
        with _converted(f"image {self.name!r}"):
            self._img.metadata_set(OWNER_KEY, str(int(uid)))

    def pread_into(self, buf, offset: int) -> None:
        mv = memoryview(buf)
        try:  # not _converted(): the hot path, where a generator's cost shows
            data = self._img.read(offset, len(mv))  # bytes past the end are not returned
        except (rbd.Error, rados.Error) as e:
            raise _error(e, f"cannot read image {self.name!r}") from None
        mv[:len(data)] = data
        if len(data) < len(mv):
            mv[len(data):] = bytes(len(mv) - len(data))

    def pwrite(self, data, offset: int) -> None:
        try:  # python-rbd takes bytes only
            self._img.write(data if type(data) is bytes else bytes(data), offset)
        except (rbd.Error, rados.Error) as e:
            raise _error(e, f"cannot write image {self.name!r}") from None

    def aio_read(self, offset: int, length: int, done=None) -> RBDPending:
        p = RBDPending(self.name, "read", done)
        try:  # not _converted(): the hot path
            p.completion = self._img.aio_read(offset, length, p.on_read)
        except (rbd.Error, rados.Error) as e:
            raise _error(e, p.what) from None
        return p

    def aio_write(self, data, offset: int, done=None) -> RBDPending:
        p = RBDPending(self.name, "write", done)
        try:
            p.completion = self._img.aio_write(data if type(data) is bytes else bytes(data), offset,
                                               None if done is None else p.on_write)
        except (rbd.Error, rados.Error) as e:
            raise _error(e, p.what) from None
        return p

    def data_extents(self, start: int, end: int):
        """From the object map (fast-diff), parents included."""
        out = []
        with _converted(f"cannot read image {self.name!r}"):
            end = min(end, self._img.size())
            if end > start:
                self._img.diff_iterate(start, end - start, None,
                                       lambda off, n, exists: out.append((off, n)) if exists else None)
        return iter(out)

    def discard(self, offset: int, length: int) -> None:
        # not discard(): librbd skips a discard's parts that do not cover
        # whole 64 KiB granules (rbd_skip_partial_discard), and they would
        # keep their old bytes; write_zeroes deallocates what it can and
        # writes zeros over the rest
        if length > 0:
            with _converted(f"cannot discard in image {self.name!r}"):
                self._img.write_zeroes(offset, length)

    def flush(self) -> None:
        with _converted(f"cannot flush image {self.name!r}"):
            self._img.flush()

    def resize(self, size: int) -> None:
        with _converted(f"cannot resize image {self.name!r}"):
            self._img.resize(size)

    def lock(self, description: str) -> None:
        """Only a free lock is taken.  librbd itself would take a dead
        holder's lock over (breaking and blocklisting it), but only once the
        holder's watch has timed out, ~30 s after the crash; until then
        lock_acquire blocks.  Taking over is break_lock's job, on request."""
        if self._locked:
            return
        with _converted(f"image {self.name!r}"):
            holder = _holder(self._img)
        if holder is not None:
            raise Busy(f"image {self.name!r} is locked by {holder}")
        try:
            self._img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except rbd.ReadOnlyImage:  # EROFS: another client holds it
            raise Busy(f"image {self.name!r} is locked by {_holder(self._img) or 'another client'}") from None
        except (rbd.Error, rados.Error) as e:
            raise _error(e, f"cannot lock image {self.name!r}") from None
        self._locked = True
        with _converted(f"image {self.name!r}"):
            self._img.metadata_set(HOLDER_KEY, description)
            # librbd's cache writes through until the first flush
            # (rbd_cache_writethrough_until_flush), to protect guests that
            # never flush; evscrypt flushes at every fsync and at detach, as
            # the local store's page cache is written back at fsync
            self._img.flush()

    def unlock(self) -> None:
        if not self._locked:
            return
        self._locked = False
        with _converted(f"cannot unlock image {self.name!r}"):
            with contextlib.suppress(KeyError):
                self._img.metadata_remove(HOLDER_KEY)
            self._img.lock_release()

    def close(self) -> None:
        if self._img is None:
            return
        try:
            self.unlock()
        finally:
            img, self._img = self._img, None
            with _converted(f"cannot close image {self.name!r}"):
                img.close()


def _holder(img: rbd.Image) -> Holder | None:
    # list_lockers, not lock_get_owners: that needs the exclusive-lock
    # feature, which librbd turns off in a read-only open.  The locker's
    # address is what lock_get_owners calls the owner and lock_break takes.
    lockers = img.list_lockers()
    if not lockers or not lockers["lockers"]:
        return None
    try:
        desc = img.metadata_get(HOLDER_KEY)
    except KeyError:
        desc = ""
    return Holder(lockers["lockers"][0][2], desc)


class RBDCatalog(Catalog):
    """The omap of the RADOS object ``evscrypt.catalog``; version = the
    object's version, checked by ``assert_version`` in the same write op."""

    def __init__(self, store: "RBDStore"):
        self._io = store.cluster.open_ioctx(store.pool)
        self._io.set_namespace(store.namespace)
        # get_last_version() reports the last op of this ioctx, so ops on it
        # must not interleave
        self._io_lock = threading.Lock()

    def read(self) -> CatalogView:
        with self._io_lock, rados.ReadOpCtx() as op:
            it, _ = self._io.get_omap_vals(op, "", "", CATALOG_MAX + 1)
            try:
                self._io.operate_read_op(op, CATALOG_OBJECT)
            except rados.ObjectNotFound:
                return CatalogView({}, 0)
            except rados.Error as e:
                raise _error(e, "cannot read the catalog") from None
            entries = dict(it)
            if len(entries) > CATALOG_MAX:
                raise StorageError(f"the catalog has more than {CATALOG_MAX} entries")
            return CatalogView(entries, self._io.get_last_version())

    def commit(self, version: int, put=None, delete=()) -> int:
        put = put or {}
        delete = tuple(delete)
        with self._io_lock, rados.WriteOpCtx() as op:
            if version == 0:
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            else:
                op.assert_version(version)
            if put:
                self._io.set_omap(op, tuple(put), tuple(put.values()))
            if delete:
                self._io.remove_omap_keys(op, delete)
            try:
                self._io.operate_write_op(op, CATALOG_OBJECT)
            except (rados.ObjectExists, rados.ObjectNotFound):
                return None  # created meanwhile (version 0) or removed
            except rados.Error as e:
                if getattr(e, "errno", None) in (errno.ERANGE, errno.EOVERFLOW):  # version mismatch
                    return None
                raise _error(e, "cannot write the catalog") from None
            return self._io.get_last_version()

    def close(self) -> None:
        self._io.close()


class RBDStore(BackingStore):
    """Images in RBD pool ``pool`` (namespace ``namespace``), as client
    ``client`` of the cluster in ``conf`` (None: librados' search, CEPH_CONF)."""

    shared = True
    aio = True

    def __init__(self, pool: str, *, namespace: str = "", client: str = "admin", conf: str | None = None,
                 liveness_timeout: float = 10.0, connect_timeout: float = CONNECT_TIMEOUT):
        self.pool, self.namespace, self.client, self.conf = pool, namespace, client, conf
        self.liveness_timeout = liveness_timeout
        self.cluster = rados.Rados(conffile=conf or "", rados_id=client)
        try:
            # clone format 2: clones need no protected snapshot and a parent
            # with clones can be deleted (it waits in the trash)
            self.cluster.conf_set("rbd_default_clone_format", "2")
            self.cluster.conf_set("rbd_blocklist_on_break_lock", "true")
            # errors reach the user as one evscrypt line each, not as librbd's log
            self.cluster.conf_set("err_to_stderr", "false")
            self.cluster.conf_set("log_to_stderr", "false")
            # connect()'s own timeout argument is ignored by python-rados
            self.cluster.conf_set("client_mount_timeout", str(connect_timeout))
            self.cluster.connect()
            self.ioctx = self.cluster.open_ioctx(pool)
            self.ioctx.set_namespace(namespace)
        except rados.ObjectNotFound:
            self.cluster.shutdown()
            raise NotFound(f"RBD pool {pool!r} not found") from None
        except rados.Error as e:
            if self.cluster.state == "connected":
                self.cluster.shutdown()
            # else no shutdown: after a connect that timed out, rados_shutdown
            # blocks for good (librados 16); the handle is left to the process
            raise StorageError(f"cannot reach RBD pool {pool!r} as client.{client}: {e}") from None
        self.rbd = rbd.RBD()
        self._catalog = None

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
        self.ioctx.close()
        self.cluster.shutdown()

    def location(self, name: str) -> str:
        return f"rbd:{self.pool}/{self.namespace + '/' if self.namespace else ''}{check_image_name(name)}"

    def _image(self, name: str, *, write: bool = False, snapshot: str | None = None) -> rbd.Image:
        with _converted(f"image {name!r}" + (f" snapshot {snapshot!r}" if snapshot else "")):
            return rbd.Image(self.ioctx, check_image_name(name), snapshot=snapshot, read_only=not write)

    @contextlib.contextmanager
    def _using(self, name: str, what: str, *, write: bool = False):
        """Open image *name* for one short operation, turning vendor errors
        into evscrypt's with *what* as the context, and close it after."""
        img = self._image(name, write=write)
        try:
            with _converted(what):
                yield img
        finally:
            img.close()

    # -- images ------------------------------------------------------------------
    def names(self) -> list[str]:
        with _converted(f"RBD pool {self.pool!r}"):
            return sorted(n for n in self.rbd.list(self.ioctx) if not n.startswith("."))

    def exists(self, name: str) -> bool:
        try:
            self._image(name).close()
            return True
        except NotFound:
            return False

    def open(self, name: str, *, write: bool = False, snapshot: str | None = None) -> RBDImage:
        return RBDImage(name, self._image(name, write=write and snapshot is None, snapshot=snapshot), self.ioctx)

    def create(self, name: str, size: int) -> RBDImage:
        with _converted(f"cannot create image {name!r}"):
            self.rbd.create(self.ioctx, check_image_name(name), size, old_format=False, features=FEATURES)
        return self.open(name, write=True)

    def rename(self, old: str, new: str) -> None:
        with _converted(f"cannot rename image {old!r} to {new!r}"):
            self.rbd.rename(self.ioctx, check_image_name(old), check_image_name(new))

    def delete(self, name: str) -> None:
        """Under the lock: remove the snapshots (those with clones move to
        the RBD trash), then the image (to the trash too, while it still has
        snapshots that clones use); then purge what the trash can let go."""
        with self.open(name, write=True) as img:
            img.lock("deleting")
            with _converted(f"cannot delete image {name!r}"):
                for s in list(img._img.list_snaps()):
                    if s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER) == rbd.RBD_SNAP_NAMESPACE_TYPE_USER:
                        img._img.remove_snap(s["name"])
        with _converted(f"cannot delete image {name!r}"):
            try:
                self.rbd.remove(self.ioctx, name)
            except rbd.ImageHasSnapshots:  # snapshots in the trash, kept by clones
                self.rbd.trash_move(self.ioctx, name, 0)
            self._purge_trash()

    def collect_temporary(self, min_age: float = STALE_TEMP_AGE) -> Collected:
        """Remove the temporary images of builds that died: open by no client
        (no watcher on the header) and neither created nor written in the
        last ``min_age`` seconds; others are reported busy.  Any host may run
        it: a build on another host keeps its image open (watched)."""
        out = Collected()
        with _converted(f"RBD pool {self.pool!r}"):
            names = [n for n in self.rbd.list(self.ioctx) if is_temp_name(n)]
        now = datetime.datetime.utcnow()  # python-rbd's timestamps are naive UTC
        for name in names:
            try:
                with self._using(name, f"image {name!r}") as img:
                    last = max(img.create_timestamp(), img.modify_timestamp())
                    idle = not list(img.watchers_list()) and (now - last).total_seconds() >= min_age
                if not idle:
                    out.busy.append(self.location(name))
                    continue
                self.delete(name)
                out.removed.append(self.location(name))
            except NotFound:
                continue  # renamed into place or removed since the listing
            except EvscryptError as e:
                out.errors.append(f"{self.location(name)}: {e}")
        return out

    def _purge_trash(self) -> None:
        """Remove trashed images whose clones are all gone (others stay)."""
        for entry in list(self.rbd.trash_list(self.ioctx)):
            with contextlib.suppress(rbd.Error):
                self.rbd.trash_remove(self.ioctx, entry["id"])

    # -- the attach lock, from outside ---------------------------------------------
    def holder(self, name: str) -> Holder | None:
        with self._using(name, f"image {name!r}") as img:
            return _holder(img)

    def is_alive(self, name: str, holder: Holder) -> bool:
        """The holder's watch on the image header is registered and the holder
        answers a notify on the header within ``liveness_timeout``.

        A crashed host's watch stays registered until the OSD times it out
        (osd_client_watch_timeout, 30 s), so the notify is what tells it apart
        quickly: a live librbd client answers every notify on its header."""
        with self._using(name, f"image {name!r}") as img:
            ids = {w["id"] for w in img.watchers_list() if w["addr"] == holder.owner}
            oid = f"rbd_header.{img.id()}"
        if not ids:
            return False
        replies = rados_notify.notify(self.conf, self.client, self.pool, self.namespace, oid,
                                      int(self.liveness_timeout * 1000))
        return bool(ids & replies.acked)

    def break_lock(self, name: str, holder: Holder) -> None:
        if self.holder(name) != holder:
            return  # released or taken over meanwhile: not this holder's lock any more
        if self.is_alive(name, holder):
            raise Busy(f"image {name!r} is locked by {holder}, which is alive and answering; "
                              "its lock is not broken")
        with self._using(name, f"cannot break the lock of image {name!r}", write=True) as img:
            if any(o["owner"] == holder.owner for o in img.lock_get_owners()):
                # blocklists holder.owner first (rbd_blocklist_on_break_lock)
                img.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, holder.owner)

    # -- snapshots and clones ----------------------------------------------------------
    def snapshot(self, name: str, snap: str) -> None:
        with self._using(name, f"cannot create snapshot {name}@{snap}", write=True) as img:
            img.create_snap(check_name(snap, "snapshot"))

    def snapshots(self, name: str) -> list[str]:
        with self._using(name, f"image {name!r}") as img:
            return sorted(s["name"] for s in img.list_snaps()
                          if s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER)
                          == rbd.RBD_SNAP_NAMESPACE_TYPE_USER)

    def delete_snapshot(self, name: str, snap: str) -> None:
        with self._using(name, f"cannot delete snapshot {name}@{snap}", write=True) as img:
            img.remove_snap(snap)  # with clones: moved to the snapshot trash

    def clone(self, name: str, snap: str, new: str) -> None:
        with _converted(f"cannot clone {name}@{snap} to {new!r}"):
            self.rbd.clone(self.ioctx, check_image_name(name), check_name(snap, "snapshot"), self.ioctx,
                           check_image_name(new), features=FEATURES)

    def export(self, name: str, dest: Path, *, snapshot: str | None = None) -> None:
        """Like ``rbd export``: the image's bytes into a new sparse file,
        reading only the extents that hold data (parents included)."""
        dest = Path(dest)
        img = self.open(name, snapshot=snapshot)
        tmp = temp_name(dest)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                size = img.size()
                for off, n in img.data_extents(0, size):
                    # whole blocks, as pwrite_sparse needs (sizes are multiples of one)
                    end = min(size, -(-(off + n) // BLOCK) * BLOCK)
                    for o in range(off - off % BLOCK, end, EXPORT_STEP):
                        buf = bytearray(min(EXPORT_STEP, end - o))
                        img.pread_into(buf, o)
                        pwrite_sparse(fd, o, buf, BLOCK)
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise AlreadyExists(f"{dest} already exists") from None
            fsync_dir(dest.parent)
        except OSError as e:
            raise StorageError(f"cannot export image {name!r} to {dest}: {e.strerror}") from None
        finally:
            img.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def catalog(self) -> RBDCatalog:
        if self._catalog is None:
            self._catalog = RBDCatalog(self)
        return self._catalog
