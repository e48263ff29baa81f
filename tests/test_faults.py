"""Faults under a real daemon: a crash mid-write, a full backing filesystem,
a backing filesystem that dies under an attached volume, damaged headers.

Every test runs a real `evscrypt daemon` subprocess (tests/daemon_fixture.py)
on real FUSE mounts.  The faults are real too: SIGKILL, a 48 MiB tmpfs that
fills up, an ext4 on a loop device shut down with the FS_IOC_SHUTDOWN ioctl
(what `xfs_io -x -c shutdown` does; from then on every read, write and fsync
on that filesystem fails with EIO), bytes overwritten in an image header.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from daemon_fixture import (  # noqa: F401  (fixtures are used by name)
    Daemon, daemon, expect_fail, is_mounted, loop_skip_reason, make_daemon, pwrite_all, rand, read_direct,
    volume_status, write_at,
)
from evscrypt.format import SECTOR_SIZE
from evscrypt.image import header as hdr

pytestmark = pytest.mark.fuse

MiB = 1 << 20
EXIT_FORMAT_ERROR, EXIT_STORAGE_ERROR = 7, 22
#: FS_IOC_SHUTDOWN (= XFS_IOC_GOINGDOWN = EXT4_IOC_SHUTDOWN): _IOR('X', 125, __u32)
FS_IOC_SHUTDOWN = 0x8004587D
SHUTDOWN_NOLOGFLUSH = 2

needs_loop = pytest.mark.skipif(loop_skip_reason() is not None, reason=loop_skip_reason() or "")


# -- helpers ---------------------------------------------------------------------
def aligned(n: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT wants."""
    return mmap.mmap(-1, n)



def write_direct(path: Path, off: int, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = aligned(len(data))
        buf[:] = data
        pwrite_all(fd, buf, off)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)



def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "evscrypt-test", str(path)],
                   check=True, capture_output=True)


def umount_lazy(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 48 MiB tmpfs.  Request it *before* make_daemon, so it is unmounted
    only after the daemon that uses it is dead."""
    d = tmp_path / "small"
    mount_tmpfs(d, "48m")
    try:
        yield d
    finally:
        umount_lazy(d)


@pytest.fixture
def small_ext4(tmp_path):
    """A 64 MiB ext4 on a loop device over a file.  Request it before
    make_daemon.  Yields (mountpoint, loop device)."""
    if loop_skip_reason():
        pytest.skip(loop_skip_reason())
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                          check=True).stdout.strip()
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
        subprocess.run(["mount", "-t", "ext4", loop, str(mnt)], check=True, capture_output=True)
        yield mnt, loop
    finally:
        umount_lazy(mnt)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def shutdown_fs(mnt: Path) -> None:
    """Shut the filesystem down: from now on all its I/O fails with EIO."""
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
    finally:
        os.close(fd)


def move_image(d: Daemon, name: str, to_dir: Path) -> Path:
    """Move a detached volume's image to another filesystem and leave a
    symlink in the state directory, so one daemon serves volumes on two
    filesystems."""
    src = d.image(name)
    dst = to_dir / src.name
    shutil.move(str(src), str(dst))
    os.symlink(dst, src)
    return dst


# -- SIGKILL in the middle of a write workload ------------------------------------------------
REC_MAGIC = b"EVSREC01"
_REC_HEAD = struct.Struct(">8sQQ")


def record(rec: int, sector: int) -> bytes:
    """Record number ``rec``, meant for ``sector``: 4 KiB, self-describing."""
    head = _REC_HEAD.pack(REC_MAGIC, rec, sector)
    return head + random.Random(rec).randbytes(SECTOR_SIZE - len(head))


class Writer(threading.Thread):
    """Writes numbered 4 KiB records at random sectors with O_DIRECT, some
    single (handled inline on the daemon's trio thread), some as 64 KiB runs
    of 16 records (handled in a worker thread), and fdatasyncs every batch.

    ``issued`` lists (record, sector) in issue order, appended *before* the
    pwrite; ``acked`` is how many of them were covered by an fdatasync that
    returned, set only after it returned.
    """

    BATCH = 8

    def __init__(self, path: Path, nsectors: int, seed):
        super().__init__(daemon=True)
        self.path, self.nsectors = path, nsectors
        self.rng = random.Random(repr(seed))
        self.issued: list[tuple[int, int]] = []
        self.acked = 0
        self.batches = 0
        self.error: OSError | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        buf = aligned(16 * SECTOR_SIZE)
        rec = 0
        try:
            while not self.stop.is_set():
                for _ in range(self.BATCH):
                    n = 16 if self.rng.random() < 0.25 else 1
                    first = self.rng.randrange(self.nsectors - n + 1)
                    for i in range(n):
                        buf[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = record(rec + i, first + i)
                        self.issued.append((rec + i, first + i))
                    rec += n
                    pwrite_all(fd, memoryview(buf)[:n * SECTOR_SIZE], first * SECTOR_SIZE)
                os.fdatasync(fd)
                self.acked = len(self.issued)
                self.batches += 1
        except OSError as e:
            self.error = e
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def test_sigkill_during_writes_keeps_acknowledged_records(daemon):
    size = 16 * MiB
    nsectors = size // SECTOR_SIZE
    daemon.cli("volume", "create", "crash", "--size", "16M")
    path = daemon.attach("crash")

    w = Writer(path, nsectors, "sigkill")
    w.start()
    while w.acked < 5000 and w.is_alive():  # an event; a hang is pytest-timeout's
        time.sleep(0.01)
    assert w.error is None, w.error
    # kill while a batch is in flight: somewhere among its writes or its fdatasync
    time.sleep(random.Random().uniform(0, 0.005))
    daemon.kill()
    assert daemon.returncode == -signal.SIGKILL
    w.join(30)
    if w.is_alive():
        w.stop.set()
        w.join(10)
    assert not w.is_alive(), "the writer is stuck on the dead FUSE mount"
    assert w.error is not None, "the writer never noticed the daemon died"
    assert w.error.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), w.error
    assert is_mounted(daemon.mountpoint)  # the dead daemon's mount is still there

    issued, acked = list(w.issued), w.acked
    assert acked >= 5000 and len(issued) > acked

    daemon.start()  # must clean up the stale FUSE mount first
    assert "stale FUSE mount" in daemon.log, daemon.log
    path = daemon.attach("crash")
    data = read_direct(path, 0, size)
    assert len(data) == size

    # per sector: every record ever issued for it, in order, and the index of
    # the last one an fdatasync acknowledged
    history: dict[int, list[int]] = {}
    last_acked: dict[int, int] = {}
    for idx, (rec, sector) in enumerate(issued):
        history.setdefault(sector, []).append(rec)
        if idx < acked:
            last_acked[sector] = len(history[sector]) - 1
    zero = bytes(SECTOR_SIZE)
    mv = memoryview(data)
    intact_acked = 0
    for sector in range(nsectors):
        got = bytes(mv[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE])
        recs = history.get(sector)
        if recs is None:
            assert got == zero, f"sector {sector} was never written but does not read as zeros"
            continue
        if sector in last_acked:
            # the acknowledged record, or something written to it later
            allowed = recs[last_acked[sector]:]
        else:
            allowed = [None] + recs  # None: still the old contents (zeros)
        if got == zero:
            assert None in allowed, (f"sector {sector}: acknowledged record {recs[last_acked[sector]]} "
                                     f"was lost (reads as zeros)")
            continue
        magic, rec, claimed = _REC_HEAD.unpack_from(got)
        assert magic == REC_MAGIC, f"sector {sector} holds garbage, not a record"
        assert claimed == sector, f"sector {sector} holds record {rec} meant for sector {claimed}"
        assert rec in allowed, (f"sector {sector} holds record {rec}; allowed {allowed[:5]}... "
                                f"(acknowledged {sector in last_acked})")
        assert got == record(rec, sector), f"sector {sector}: record {rec} is torn or damaged"
        if sector in last_acked and rec == recs[last_acked[sector]]:
            intact_acked += 1
    assert intact_acked > 1500
    daemon.cli("detach", "crash")
    daemon.stop()


# -- backing filesystem full -----------------------------------------------------------------
def test_backing_filesystem_full(small_tmpfs, make_daemon):
    """State directory on a 48 MiB tmpfs; two sparse 256 MiB volumes on it."""
    d = make_daemon(home=small_tmpfs)
    d.cli("volume", "create", "a", "--size", "256M")
    d.cli("volume", "create", "b", "--size", "256M")
    a, b = d.attach("a"), d.attach("b")
    early_a = rand(2 * MiB + 4096, "early a")
    early_b = rand(MiB, "early b")
    write_direct(a, 0, early_a)
    write_direct(b, 8 * MiB, early_b)

    # fill a until the backing filesystem is full
    chunk = rand(MiB, "fill")
    fill_start = 4 * MiB
    off = fill_start
    fd = os.open(a, os.O_RDWR | os.O_DIRECT)
    try:
        buf = aligned(MiB)
        buf[:] = chunk
        with pytest.raises(OSError) as e:
            while off < 256 * MiB:
                pwrite_all(fd, buf, off)
                off += MiB
        failed_at = off
        assert e.value.errno in (errno.ENOSPC, errno.EIO), e.value
        assert e.value.errno == errno.ENOSPC, "a full filesystem should read as ENOSPC, not a dead disk"
        # unaligned writes (read-modify-write in the daemon) fail the same way
        with pytest.raises(OSError) as e2:
            os.pwrite(fd, b"x" * 100, 200 * MiB + 7)
        assert e2.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert 30 * MiB < failed_at - fill_start < 48 * MiB
    assert shutil.disk_usage(small_tmpfs).free < MiB

    # the daemon is still up, b still reads its data, nothing is marked failed
    assert d.alive
    st = d.status()
    vols = {v["name"]: v for v in st["volumes"]}
    assert set(vols) == {"a", "b"}
    assert vols["a"]["state"] == "ok" and vols["a"]["error"] is None
    assert vols["a"]["io"]["errors"] >= 2
    assert vols["b"]["state"] == "ok"
    assert read_direct(b, 8 * MiB, MiB) == early_b

    # free space: discard what the fill wrote (punch-hole through the disk file)
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(fill_start),
                    "--length", str(failed_at + MiB - fill_start), str(a)], check=True)
    assert shutil.disk_usage(small_tmpfs).free > 30 * MiB
    more = rand(4 * MiB, "after")
    write_direct(a, fill_start, more)
    write_direct(b, 9 * MiB, chunk)
    assert read_direct(a, fill_start, 4 * MiB) == more
    assert read_direct(a, 0, len(early_a)) == early_a
    assert read_direct(a, fill_start + 4 * MiB, MiB) == bytes(MiB)  # discarded: zeros
    assert read_direct(b, 8 * MiB, 2 * MiB) == early_b + chunk
    assert volume_status(d, "a")["state"] == "ok"
    d.cli("detach", "a")
    d.cli("detach", "b")
    d.stop()


# -- the backing filesystem dies under an attached volume -------------------------------------
@needs_loop
def test_backing_image_unreadable_while_attached(small_ext4, make_daemon, tmp_path):
    """The image of volume "bad" lives on an ext4 on a loop device (through a
    symlink in the state directory); "good" stays on the test's filesystem.
    Shutting the ext4 down makes every read, write and fsync of bad.img fail
    with EIO while the daemon holds it open."""
    ext4, _ = small_ext4
    d = make_daemon()
    d.cli("volume", "create", "bad", "--size", "8M")
    d.cli("volume", "create", "good", "--size", "8M")
    move_image(d, "bad", ext4)
    bad, good = d.attach("bad"), d.attach("good")
    before = rand(MiB, "bad before")
    write_direct(bad, 0, before)
    write_direct(good, 0, rand(MiB, "good before"))
    assert read_direct(bad, 0, MiB) == before

    shutdown_fs(ext4)

    # reads of sectors the daemon must fetch now fail with EIO
    with pytest.raises(OSError) as e:
        read_direct(bad, 2 * MiB, 64 * 1024)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        read_direct(bad, 0, SECTOR_SIZE)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        write_direct(bad, 4 * MiB, rand(SECTOR_SIZE, "w"))
    assert e.value.errno == errno.EIO

    # the daemon says so, and keeps serving everything else
    assert d.alive
    vols = {v["name"]: v for v in d.status()["volumes"]}
    assert vols["bad"]["state"] == "failed", vols["bad"]
    err = vols["bad"]["error"]
    assert isinstance(err, str) and err and "\n" not in err
    assert "Input/output error" in err or "EIO" in err, err
    assert vols["bad"]["io"]["errors"] >= 1
    assert vols["good"]["state"] == "ok" and vols["good"]["error"] is None
    text = d.cli("status").stdout
    assert "failed" in text
    after = rand(2 * MiB, "good after")
    write_direct(good, 3 * MiB, after)
    assert read_direct(good, 0, MiB) == rand(MiB, "good before")
    assert read_direct(good, 3 * MiB, 2 * MiB) == after

    # the failed volume can still be detached (nothing left to flush), and
    # attaching it again says why it cannot
    d.cli("detach", "bad")
    line = expect_fail(d, EXIT_STORAGE_ERROR, "attach", "bad", alone=True)
    assert "bad" in line
    assert [v["name"] for v in d.status()["volumes"]] == ["good"]
    d.cli("detach", "good")
    d.stop()


@needs_loop
def test_status_answers_when_the_state_directory_dies(small_ext4, make_daemon, tmp_path):
    """State directory (keystore and images) on an ext4 that is shut down
    while a volume is attached: the volume fails, and `status` must still
    answer (key state unknown) instead of an internal error."""
    ext4, _ = small_ext4
    home = ext4 / "home"
    d = make_daemon(home=home)
    d.cli("volume", "create", "v", "--size", "8M")
    v = d.attach("v")
    write_direct(v, 0, rand(MiB, "v"))
    shutdown_fs(ext4)
    with pytest.raises(OSError) as e:
        read_direct(v, 4 * MiB, SECTOR_SIZE)
    assert e.value.errno == errno.EIO
    assert d.alive
    p = d.cli("status", "--json", check=False)
    assert p.returncode == 0, p.stderr
    vol = json.loads(p.stdout)["volumes"][0]
    assert vol["state"] == "failed"


# -- damaged headers ---------------------------------------------------------------------------
def header_valid(d: Daemon, name: str) -> list[bool]:
    return json.loads(d.cli("volume", "info", name, "--json").stdout)["header_copies_valid"]


def test_header_damage_repaired_or_refused(daemon):
    daemon.cli("volume", "create", "h", "--size", "4M")
    disk = daemon.attach("h")
    content = rand(256 * 1024, "header damage")
    write_direct(disk, 64 * 1024, content)
    daemon.cli("detach", "h")
    image = daemon.image("h")
    assert header_valid(daemon, "h") == [True, True]

    # primary copy (slot 0, the first 64 KiB) overwritten with garbage
    write_at(image, 0, rand(hdr.SLOT_SIZE, "garbage 0"))
    assert header_valid(daemon, "h") == [False, True]
    disk = daemon.attach("h")
    assert "repairing damaged header copy" in daemon.log
    assert header_valid(daemon, "h") == [True, True]  # repaired at attach
    assert read_direct(disk, 64 * 1024, len(content)) == content
    daemon.cli("detach", "h")
    assert header_valid(daemon, "h") == [True, True]

    # one flipped byte in the primary's payload: the checksum catches it too
    with open(image, "rb") as f:
        raw = bytearray(f.read(hdr.SLOT_SIZE))
    raw[hdr.PREFIX_SIZE + 10] ^= 0x01
    write_at(image, 0, bytes(raw))
    assert header_valid(daemon, "h") == [False, True]
    daemon.attach("h")
    assert header_valid(daemon, "h") == [True, True]
    daemon.cli("detach", "h")

    # both copies damaged: attach refuses with a one-line FormatError (exit 7)
    write_at(image, 0, rand(hdr.SLOT_SIZE, "garbage 0 again"))
    with open(image, "rb") as f:
        f.seek(hdr.SLOT_SIZE)
        raw = bytearray(f.read(hdr.SLOT_SIZE))
    raw[hdr.PREFIX_SIZE + 20] ^= 0x80
    write_at(image, hdr.SLOT_SIZE, bytes(raw))
    line = expect_fail(daemon, EXIT_FORMAT_ERROR, "attach", "h", alone=True)
    assert "'h'" in line and "header" in line
    expect_fail(daemon, EXIT_FORMAT_ERROR, "volume", "info", "h", alone=True)
    assert daemon.status()["volumes"] == []
    assert not (daemon.mountpoint / "h").exists()
    assert daemon.alive
