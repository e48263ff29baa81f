"""The local store: each image is a sparse file ``ROOT/NAME.img``, as today.

Snapshots are sparse copies (a reflink where the filesystem can) in
``ROOT/.snapshots/NAME/SNAP.img``; a clone is a sparse copy of a snapshot.
The attach lock is a flock, which the kernel drops when its holder dies, so
a dead holder never needs to be fenced.  The catalog is a JSON file
replaced atomically under a flock.  Dot names are never images, so hidden
files and directories stay out of listings.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from ..errors import AlreadyExists, Busy, FormatError, InvalidArgument, NotFound
from ..fsutil import fsync_dir, rename_noreplace, temp_name, write_atomic
from ..image.backing import pread_into, punch_hole, pwrite_all, storage_error
from ..image.copy import data_extents, sparse_copy
from ..names import check_name
from .. import tempentry
from .base import BackingStore, Catalog, CatalogView, Holder, Image, check_image_name

SUFFIX = ".img"
SNAP_DIR = ".snapshots"
CATALOG_FILE = ".catalog.json"
CATALOG_LOCK = ".catalog.lock"


def _flock_holders(path: Path) -> list[int]:
    """Pids holding a flock on ``path``, from /proc/locks (Linux)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in text.splitlines():
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; "->" marks waiters
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == dev:
            pids.append(int(f[4]))
    return pids


def _describe_pid(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return cmd[:200]


class LocalImage(Image):
    def __init__(self, name: str, path: Path, fd: int, store: "LocalStore"):
        self.name, self.path, self.fd, self._store = name, path, fd, store
        self._locked = False

    @property
    def handle(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def owner(self) -> int:
        return os.fstat(self.fd).st_uid

    def set_owner(self, uid: int) -> None:
        try:
            os.fchown(self.fd, uid, -1)
        except OSError as e:
            raise storage_error(e, f"cannot give image {self.name!r} to uid {uid}")

    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def pread_into(self, buf, offset: int) -> None:
        try:
            pread_into(self.fd, buf, offset)
        except OSError as e:
            raise storage_error(e, f"cannot read image {self.name!r}")

    def pwrite(self, data, offset: int) -> None:
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as e:
            raise storage_error(e, f"cannot write image {self.name!r}")

    def data_extents(self, start: int, end: int):
        try:
            yield from data_extents(self.fd, start, end)
        except OSError as e:
            raise storage_error(e, f"cannot read image {self.name!r}")

    def discard(self, offset: int, length: int) -> None:
        try:
            punch_hole(self.fd, offset, length)
        except OSError as e:
            raise storage_error(e, f"cannot discard in image {self.name!r}")

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise storage_error(e, f"cannot flush image {self.name!r}")

    def resize(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise storage_error(e, f"cannot resize image {self.name!r}")

    def lock(self, description: str) -> None:
        # a flock has nowhere to keep ``description``: holder() describes a
        # holder by its pid and command line instead
        if self._locked:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = self._store.holder(self.name)
            raise Busy(f"image {self.name!r} is locked by {h or 'another open file'}")
        self._locked = True

    def unlock(self) -> None:
        if self._locked and self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._locked = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock too
            self.fd = -1
        self._locked = False


class LocalCatalog(Catalog):
    """``ROOT/.catalog.json``: {"version": N, "entries": {key: base64}}.

    A commit holds an exclusive flock on ``ROOT/.catalog.lock`` while it
    compares the version and replaces the file (tmp + rename), so readers
    never see half a file and no two commits interleave."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / CATALOG_FILE

    def read(self) -> CatalogView:
        try:
            d = json.loads(self.path.read_bytes())
            return CatalogView({k: base64.b64decode(v) for k, v in d["entries"].items()}, int(d["version"]))
        except FileNotFoundError:
            return CatalogView({}, 0)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"catalog {self.path} is unreadable ({e})")

    def commit(self, version: int, put=None, delete=()) -> int:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / CATALOG_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            cur = self.read()
            if cur.version != version:
                return None
            entries = dict(cur.entries)
            entries.update(put or {})
            for k in delete:
                entries.pop(k, None)
            doc = {"version": version + 1, "entries": {k: base64.b64encode(v).decode() for k, v in entries.items()}}
            write_atomic(self.path, json.dumps(doc, sort_keys=True).encode())
            return version + 1
        except OSError as e:
            raise storage_error(e, "cannot write the catalog")
        finally:
            os.close(fd)


class LocalStore(BackingStore):
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{check_image_name(name)}{SUFFIX}"

    def location(self, name: str) -> str:
        return str(self.path(name))

    def build(self, name, fill, guard, start=None):
        """As the base class, with an flock on the temporary file while it is
        built (evscrypt.tempentry), so ``evscrypt gc`` removes what a kill -9
        left and never what a running build still holds.  Always from an
        empty file: a local copy is written by ``fill``."""
        if start is not None:
            raise InvalidArgument("the local store builds images by copying, not from a clone")
        final = self.path(name)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            tmp, fd = tempentry.create(final)  # locked until fd is closed, after the link or the unlink
        except OSError as e:
            raise storage_error(e, f"cannot create image {name!r}")
        try:
            result = fill(LocalImage(name, tmp, fd, self))
            os.fsync(fd)
            with guard(result):
                try:
                    os.link(tmp, final)  # unlike rename, refuses to replace a racing create
                except FileExistsError:
                    raise AlreadyExists(f"image {name!r} already exists")
            # the image is in place: its flock would now read as "attached"
            tempentry.release(fd)
            with contextlib.suppress(FileNotFoundError):  # a collector may take the spare name first
                os.unlink(tmp)
            fsync_dir(self.root)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise storage_error(e, f"cannot create image {name!r}")
            raise
        finally:
            os.close(fd)
        return result

    def _snap_path(self, name: str, snap: str) -> Path:
        return self.root / SNAP_DIR / check_name(name) / f"{check_name(snap, 'snapshot')}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.root.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def _open_fd(self, path: Path, flags: int, what: str) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{what} not found")
        except OSError as e:
            raise storage_error(e, f"cannot open {what}")

    def open(self, name: str, *, write: bool = False, snapshot: str | None = None) -> LocalImage:
        if snapshot is not None:
            path = self._snap_path(name, snapshot)
            return LocalImage(name, path, self._open_fd(path, os.O_RDONLY, f"snapshot {name}@{snapshot}"), self)
        path = self.path(name)
        fd = self._open_fd(path, os.O_RDWR if write else os.O_RDONLY, f"image {name!r}")
        return LocalImage(name, path, fd, self)

    def create(self, name: str, size: int) -> LocalImage:
        path = self.path(name)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"image {name!r} already exists")
        except OSError as e:
            raise storage_error(e, f"cannot create image {name!r}")
        img = LocalImage(name, path, fd, self)
        try:
            os.ftruncate(fd, size)
            fsync_dir(self.root)
        except OSError as e:
            img.close()
            path.unlink(missing_ok=True)
            raise storage_error(e, f"cannot create image {name!r}")
        return img

    def rename(self, old: str, new: str) -> None:
        src, dst = self.path(old), self.path(new)
        if not src.exists():
            raise NotFound(f"image {old!r} not found")
        try:
            rename_noreplace(src, dst, f"image {new!r}")
            snaps = self.root / SNAP_DIR / old
            if snaps.is_dir():
                rename_noreplace(snaps, self.root / SNAP_DIR / new, f"snapshots of {new!r}")
            fsync_dir(self.root)
        except OSError as e:
            raise storage_error(e, f"cannot rename image {old!r}")

    def delete(self, name: str) -> None:
        with self.open(name, write=True) as img:
            img.lock("deleting")
            try:
                os.unlink(img.path)
                fsync_dir(self.root)
            except OSError as e:
                raise storage_error(e, f"cannot delete image {name!r}")
        shutil.rmtree(self.root / SNAP_DIR / name, ignore_errors=True)

    def holder(self, name: str) -> Holder | None:
        pids = _flock_holders(self.path(name))
        if not pids:
            return None
        return Holder(f"pid {pids[0]}", _describe_pid(pids[0]))

    def break_lock(self, name: str, holder: Holder) -> None:
        # the kernel releases a flock when its holder dies: a holder that is
        # still listed is a live process
        if self.holder(name) == holder:
            raise Busy(f"image {name!r} is locked by {holder}, which is alive; its lock is not broken")

    def snapshot(self, name: str, snap: str) -> None:
        dest = self._snap_path(name, snap)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._copy_to_new(self.path(name), dest, f"image {name!r}", f"snapshot {name}@{snap}")

    def snapshots(self, name: str) -> list[str]:
        if not self.exists(name):
            raise NotFound(f"image {name!r} not found")
        d = self.root / SNAP_DIR / name
        if not d.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in d.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def delete_snapshot(self, name: str, snap: str) -> None:
        try:
            self._snap_path(name, snap).unlink()
        except FileNotFoundError:
            raise NotFound(f"snapshot {name}@{snap} not found")

    def clone(self, name: str, snap: str, new: str) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._copy_to_new(self._snap_path(name, snap), self.path(new), f"snapshot {name}@{snap}", f"image {new!r}")

    def export(self, name: str, dest: Path, *, snapshot: str | None = None) -> None:
        src = self._snap_path(name, snapshot) if snapshot else self.path(name)
        self._copy_to_new(src, Path(dest), f"image {name!r}", str(dest))

    def _copy_to_new(self, src: Path, dest: Path, src_what: str, dest_what: str) -> None:
        """Sparse-copy ``src`` to the new file ``dest``: built under a temporary
        name and linked into place, so ``dest`` is whole or absent."""
        sfd = self._open_fd(src, os.O_RDONLY, src_what)
        tmp = temp_name(dest)
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                sparse_copy(sfd, dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
            try:
                os.link(tmp, dest)  # unlike rename, refuses to replace
            except FileExistsError:
                raise AlreadyExists(f"{dest_what} already exists")
            fsync_dir(dest.parent)
        except OSError as e:
            raise storage_error(e, f"cannot write {dest_what}")
        finally:
            os.close(sfd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def catalog(self) -> LocalCatalog:
        return LocalCatalog(self.root)
