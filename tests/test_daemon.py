"""The daemon end to end, on real FUSE mounts, loop devices and ext4.

Every test runs a real `evscrypt daemon` subprocess (tests/daemon_fixture.py)
and drives it through the CLI and through the files it exposes, then checks
the result offline: the plaintext through the volume engine, the ciphertext
in the backing image against the per-sector XTS reference.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import json
import mmap
import os
import pwd
import random
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from daemon_fixture import (  # noqa: F401  (fixtures are used by name)
    Daemon, both_pyfuse3, daemon, expect_fail, is_mounted, loop_skip_reason, loops_under, make_daemon, mounts_of,
    needs_fio, pread_all, pwrite_all, rand, read_direct, run_as, run_fio, volume_status, write_at,
)
from evscrypt.crypto.xts import SECTOR_SIZE, reference_crypt
from evscrypt.errors import EvscryptError
from evscrypt.format import SECTOR_SIZE
from evscrypt.paths import socket_path
from evscrypt.volumes import VolumeStore

pytestmark = pytest.mark.fuse

MiB = 1 << 20
EXIT_NOT_FOUND, EXIT_BUSY, EXIT_KEY_STATE, EXIT_DAEMON_UNAVAILABLE = 4, 6, 12, 19


def needs_loop(fn):
    fn = pytest.mark.skipif(loop_skip_reason() is not None, reason=loop_skip_reason() or "")(fn)
    return pytest.mark.loop(fn)




# -- helpers ---------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wait_for(pred, timeout: float = 120.0, what: str = "condition"):
    """Poll for an event the kernel brings about (a loop device freed); the
    bound only catches a hang, with the margin a busy machine needs."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)



# -- data path --------------------------------------------------------------------
@both_pyfuse3
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_roundtrip_plaintext_and_ciphertext(daemon, encrypted):
    size = 8 * MiB
    name = "rt"
    daemon.cli("volume", "create", name, "--size", "8M", *([] if encrypted else ["--no-encrypt"]))
    path = daemon.attach(name)
    assert path == daemon.disk(name)

    model = bytearray(size)
    writes = [
        (0, rand(4096, 1)),                           # aligned, first sector
        (2 * 4096 + 5, b"\xa5"),                      # one byte mid-sector
        (3 * 4096 + 100, rand(2 * 4096 + 7, 2)),      # unaligned head and tail, 3 sectors
        (10 * 4096 - 1, b"\x01\x02"),                 # straddles a sector boundary
        (20 * 4096, bytes(4096)),                     # explicit zeros: a *written* sector
        (1 * MiB, rand(1 * MiB, 3)),                  # aligned 1 MiB (worker-thread path)
        (3 * MiB + 123, rand(200_000, 4)),            # large and unaligned
        (size - 4096 + 1, rand(4095, 5)),             # up to the very last byte
        (3 * 4096 + 50, rand(300, 6)),                # overwrite inside an earlier write
    ]
    written: set[int] = set()
    fd = os.open(path, os.O_RDWR)
    try:
        for off, data in writes:
            pwrite_all(fd, data, off)
            model[off:off + len(data)] = data
            written.update(range(off // SECTOR_SIZE, (off + len(data) - 1) // SECTOR_SIZE + 1))
        os.fsync(fd)
        # read back: every written range, and random unaligned ranges
        for off, data in writes:
            assert pread_all(fd, len(data), off) == bytes(model[off:off + len(data)])
        rng = random.Random(7)
        for _ in range(60):
            off = rng.randrange(size)
            length = rng.randrange(1, min(300_000, size - off) + 1)
            assert pread_all(fd, length, off) == bytes(model[off:off + length]), (off, length)
        assert os.pread(fd, 100, size) == b""  # at EOF
        assert pread_all(fd, 100, size - 10) == bytes(model[-10:])  # clamped at EOF
    finally:
        os.close(fd)
    daemon.cli("detach", name)
    assert name not in os.listdir(daemon.mountpoint)

    # (a) plaintext through the offline engine
    store = VolumeStore(daemon.home)
    with store.engine(name) as (eng, header):
        assert eng.read(0, size) == bytes(model)
    # (b) ciphertext of each written sector against the per-sector reference, and
    # (c) every unwritten sector is zero in the image
    image = daemon.image(name).read_bytes()
    area = image[header.data_offset:header.data_offset + size]
    assert len(area) == size
    if encrypted:
        dk = store.data_key(name)
        try:
            key = bytes(dk.buffer)
        finally:
            dk.wipe()
        expected = bytearray(size)
        for n in sorted(written):
            lo = n * SECTOR_SIZE
            plain = bytes(model[lo:lo + SECTOR_SIZE])
            ct = reference_crypt(key, n, plain, encrypt=True)
            assert ct != plain
            expected[lo:lo + SECTOR_SIZE] = ct
    else:
        expected = model
    if area != expected:
        bad = next(n for n in range(size // SECTOR_SIZE)
                   if area[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] != expected[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE])
        pytest.fail(f"image sector {bad} ({'written' if bad in written else 'unwritten'}) is wrong")
    unwritten = [n for n in range(size // SECTOR_SIZE) if n not in written]
    assert len(unwritten) > 1000
    assert all(area[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] == bytes(SECTOR_SIZE) for n in unwritten)

    # (c) through the mount again (fresh attach, O_DIRECT): same bytes, zeros where unwritten
    path = daemon.attach(name)
    assert read_direct(path, 0, size) == bytes(model)
    for n in (7, 100, size // SECTOR_SIZE - 2):
        assert n not in written
        assert read_direct(path, n * SECTOR_SIZE, SECTOR_SIZE) == bytes(SECTOR_SIZE)
    daemon.cli("detach", name)


def test_disk_never_grows_or_shrinks(daemon):
    size = 1 * MiB
    daemon.cli("volume", "create", "b", "--size", "1M")
    path = daemon.attach("b")
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", size)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 8192, size + 4096)
        assert e.value.errno == errno.ENOSPC
        # a write crossing the end is cut at the end (a short write), never extends
        assert os.pwrite(fd, b"y" * 20, size - 10) == 10
        with pytest.raises(OSError) as e:
            os.posix_fallocate(fd, size - 10, 100)
        assert e.value.errno == errno.ENOSPC
        for newsize in (0, 4096, size + 4096):
            with pytest.raises(OSError) as e:
                os.ftruncate(fd, newsize)
            assert e.value.errno == errno.EPERM, newsize
        with pytest.raises(OSError) as e:
            os.truncate(path, 0)
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            os.open(path, os.O_WRONLY | os.O_TRUNC)
        assert e.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == size
        assert pread_all(fd, 20, size - 10) == b"y" * 10
    finally:
        os.close(fd)
    time.sleep(1.1)  # past the attribute cache: the daemon's own answer
    assert os.stat(path).st_size == size
    assert volume_status(daemon, "b")["size"] == size
    assert read_direct(path, size - 4096, 4096)[-10:] == b"y" * 10


def test_namespace_is_read_only(daemon):
    daemon.cli("volume", "create", "n", "--size", "1M")
    path = daemon.attach("n")
    mnt = daemon.mountpoint
    attempts = {
        "create file": lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o600),
        "create exclusive": lambda: os.open(mnt / "n2", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600),
        "mkdir": lambda: os.mkdir(mnt / "dir"),
        "mknod": lambda: os.mknod(mnt / "fifo", 0o600 | stat.S_IFIFO),
        "symlink": lambda: os.symlink("n", mnt / "link"),
        "hard link": lambda: os.link(path, mnt / "hard"),
        "rename": lambda: os.rename(path, mnt / "renamed"),
        "unlink": lambda: os.unlink(path),
        "chmod": lambda: os.chmod(path, 0o644),
        "chown": lambda: os.chown(path, 1, 1),
    }
    for what, fn in attempts.items():
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == errno.EPERM, f"{what}: {e.value}"
    assert sorted(os.listdir(mnt)) == ["n"]
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_listing_shows_attached_volumes_only(daemon):
    for name in ("a", "b", "c"):
        daemon.cli("volume", "create", name, "--size", "1M")
    assert os.listdir(daemon.mountpoint) == []
    daemon.attach("b")
    daemon.attach("a")
    assert sorted(os.listdir(daemon.mountpoint)) == ["a", "b"]
    assert not (daemon.mountpoint / "c").exists()
    st = os.stat(daemon.disk("a"))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_size == MiB
    daemon.cli("detach", "a")
    assert os.listdir(daemon.mountpoint) == ["b"]
    assert not daemon.disk("a").exists()
    expect_fail(daemon, EXIT_NOT_FOUND, "detach", "a")  # not attached
    expect_fail(daemon, EXIT_NOT_FOUND, "attach", "nosuch")
    assert os.listdir(daemon.mountpoint) == ["b"]


def test_disk_belongs_to_the_attaching_user(make_daemon):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    uid, gid = nobody.pw_uid, nobody.pw_gid
    d = make_daemon(start=False, extra_args=("--socket-group", grp.getgrgid(gid).gr_name))
    os.chmod(d.runtime, 0o755)  # mkdtemp makes it 0700; the socket is 0660 to the group
    d.cli("volume", "create", "mine", "--size", "1M")
    d.cli("volume", "create", "roots", "--size", "1M")
    os.chown(d.image("mine"), uid, gid)
    d.start()

    r = run_as(uid, gid, lambda: d.client().attach("mine")["path"])
    assert r == {"ok": str(d.disk("mine"))}, r
    st = os.stat(d.disk("mine"))
    assert st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600
    assert volume_status(d, "mine")["owner"] == uid

    def use_own_disk():
        fd = os.open(d.disk("mine"), os.O_RDWR)
        try:
            os.pwrite(fd, b"hello from nobody", 4096)
            return os.pread(fd, 17, 4096).decode()
        finally:
            os.close(fd)

    assert run_as(uid, gid, use_own_disk) == {"ok": "hello from nobody"}
    # another user's volume: the daemon refuses to attach it, and the kernel refuses
    # to open another user's 0600 disk file
    r = run_as(uid, gid, lambda: d.client().attach("roots"))
    assert r["error"] == "PermissionDenied", r
    d.attach("roots")
    assert run_as(uid, gid, lambda: os.open(d.disk("roots"), os.O_RDONLY)) == {"errno": errno.EACCES}
    r = run_as(uid, gid, lambda: d.client().detach("roots", force=True))
    assert r["error"] == "PermissionDenied", r
    assert sorted(os.listdir(d.mountpoint)) == ["mine", "roots"]
    d.cli("detach", "mine")  # root may detach anyone's volume
    with VolumeStore(d.home).engine("mine") as (eng, _):
        assert eng.read(4096, 17) == b"hello from nobody"


# -- the data path of each install ------------------------------------------------
def punch_hole(fd: int, off: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, 0x02 | 0x01, off, length) != 0:  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@both_pyfuse3
def test_data_path_is_logged_reported_and_decides_discard(daemon, evscrypt_exe):
    """The daemon logs one line naming its data path, and status names it and
    the XTS backend.  Discard frees sectors on the patched build; on stock
    pyfuse3 the fallocate op never reaches the daemon, so it answers
    EOPNOTSUPP and the data stays."""
    from evscrypt.crypto import backend

    data_path = evscrypt_exe[1]
    st = daemon.status()
    assert st["data_path"] == data_path and st["discard"] == (data_path == "threads")
    assert st["xts_backend"] == backend.describe(backend.choose())  # same machine, same environment
    lines = [line for line in daemon.log.splitlines() if "data path:" in line]
    assert len(lines) == 1 and f"data path: {data_path} (" in lines[0], daemon.log
    assert f"XTS: {st['xts_backend']}" in lines[0]

    daemon.cli("volume", "create", "dp", "--size", "1M")
    path = daemon.attach("dp")
    write_at(path, 0, b"\x5a" * (2 * SECTOR_SIZE))
    fd = os.open(path, os.O_RDWR)
    try:
        if data_path == "threads":
            punch_hole(fd, 0, SECTOR_SIZE)
            assert volume_status(daemon, "dp")["io"]["discards"] == 1
            assert read_direct(path, 0, 2 * SECTOR_SIZE) == bytes(SECTOR_SIZE) + b"\x5a" * SECTOR_SIZE
        else:
            with pytest.raises(OSError) as e:
                punch_hole(fd, 0, SECTOR_SIZE)
            assert e.value.errno == errno.EOPNOTSUPP
            assert volume_status(daemon, "dp")["io"]["discards"] == 0
            assert read_direct(path, 0, 2 * SECTOR_SIZE) == b"\x5a" * (2 * SECTOR_SIZE)
    finally:
        os.close(fd)


# -- fio -------------------------------------------------------------------------
FIO_PATTERNS = {"rand4k": ["--rw=randwrite", "--bs=4k"], "seq1M": ["--rw=write", "--bs=1M"]}
FIO_ENGINES = {"libaio": ["--ioengine=libaio", "--iodepth=16", "--direct=1"], "psync": ["--ioengine=psync"]}


@both_pyfuse3
@needs_fio
@pytest.mark.parametrize("engine", FIO_ENGINES)
@pytest.mark.parametrize("pattern", FIO_PATTERNS)
def test_fio_verify(daemon, pattern, engine):
    daemon.cli("volume", "create", "f", "--size", "48M")
    path = daemon.attach("f")
    args = FIO_PATTERNS[pattern] + FIO_ENGINES[engine]
    job = run_fio(path, args + ["--do_verify=1"])
    assert job["write"]["io_bytes"] == 32 * MiB
    assert job["read"]["io_bytes"] == 32 * MiB  # the verify pass read everything back
    # the data is in the image, not only in the page cache: verify again on a fresh attach
    daemon.cli("detach", "f")
    path = daemon.attach("f")
    job = run_fio(path, args + ["--verify_only"])
    assert job["read"]["io_bytes"] == 32 * MiB
    v = volume_status(daemon, "f")
    assert v["io"]["errors"] == 0 and v["state"] == "ok"


# -- loop devices and ext4 ----------------------------------------------------------
def files_in(mnt: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(mnt.iterdir()) if p.is_file()}


def write_files(mnt: Path, seed: int, n: int = 4) -> dict[str, str]:
    sums = {}
    for i in range(n):
        data = rand(random.Random(seed + i).randrange(1, 3 * MiB), (seed, i))
        p = mnt / f"file{seed}-{i}.bin"
        p.write_bytes(data)
        sums[p.name] = hashlib.sha256(data).hexdigest()
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    return sums


@both_pyfuse3
@needs_loop
def test_ext4_mount_detach_reattach(daemon, tmp_path):
    daemon.cli("volume", "create", "fs", "--size", "64M")
    mnt = daemon.mount_dir(tmp_path, "mnt")
    p = daemon.cli("attach", "fs", "--mount", str(mnt), "--mkfs", "ext4")
    assert p.stdout.strip() == str(daemon.disk("fs"))
    assert "mounted ext4" in p.stderr and str(mnt) in p.stderr
    assert is_mounted(mnt)
    m = volume_status(daemon, "fs")["mount"]
    assert m["fstype"] == "ext4" and m["created_fs"] is True and m["mountpoint"] == str(mnt)
    assert loops_under(daemon.mountpoint) == [m["loop"]]
    sums = write_files(mnt, 1)
    assert files_in(mnt) == sums

    daemon.cli("detach", "fs")
    assert not is_mounted(mnt)
    assert loops_under(daemon.mountpoint) == []
    assert os.listdir(daemon.mountpoint) == []

    # re-attach without mkfs: the filesystem and the files are there
    daemon.cli("attach", "fs", "--mount", str(mnt))
    assert is_mounted(mnt)
    assert volume_status(daemon, "fs")["mount"]["created_fs"] is False
    assert files_in(mnt) == sums
    more = write_files(mnt, 2, n=2)
    daemon.cli("detach", "fs")
    assert not is_mounted(mnt)

    # --mkfs on a disk that already holds a filesystem does not reformat it
    daemon.cli("attach", "fs", "--mount", str(mnt), "--mkfs", "ext4")
    assert volume_status(daemon, "fs")["mount"]["created_fs"] is False
    assert files_in(mnt) == {**sums, **more}
    # attaching again with the same mount is a no-op that prints the same path
    assert daemon.attach("fs", "--mount", str(mnt)) == daemon.disk("fs")
    daemon.cli("detach", "fs")
    assert not is_mounted(mnt) and loops_under(daemon.mountpoint) == []
    # offline: the image passes fsck through a plain view of the decrypted data
    with VolumeStore(daemon.home).engine("fs") as (eng, _):
        raw = tmp_path / "plain.img"
        with open(raw, "wb") as f:
            for off in range(0, eng.size, 4 * MiB):
                f.write(eng.read(off, 4 * MiB))
    r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_loop
def test_mount_without_filesystem_is_refused(daemon, tmp_path):
    daemon.cli("volume", "create", "blank", "--size", "8M")
    mnt = daemon.mount_dir(tmp_path, "mnt")
    line = expect_fail(daemon, 3, "attach", "blank", "--mount", str(mnt))  # InvalidArgument
    assert "--mkfs" in line
    assert not is_mounted(mnt)
    wait_for(lambda: loops_under(daemon.mountpoint) == [], what="loop device freed")
    # Whether the volume itself stays attached depends on when the kernel delivers
    # the loop's RELEASE (the error path tests `opened == 0`): see the xfail below.


@needs_loop
def test_failed_mount_keeps_an_existing_attachment(daemon, tmp_path):
    """Regression: a failed `attach --mount` must not detach a volume attached before it."""
    daemon.cli("volume", "create", "vol", "--size", "8M")
    path = daemon.attach("vol")
    write_at(path, 0, b"attached before")
    mnt = daemon.mount_dir(tmp_path, "mnt")
    expect_fail(daemon, 3, "attach", "vol", "--mount", str(mnt))  # blank disk, no --mkfs
    # and one that fails before any loop device exists (the control protocol takes
    # any filesystem name; the CLI offers only ext4 and xfs)
    with pytest.raises(EvscryptError) as e:
        daemon.client().attach("vol", mount=str(mnt), mkfs="btrfs")
    assert type(e.value).__name__ == "InvalidArgument"
    assert not is_mounted(mnt)
    wait_for(lambda: loops_under(daemon.mountpoint) == [], what="loop device freed")
    assert os.listdir(daemon.mountpoint) == ["vol"], "the failed mount request detached the volume"
    v = volume_status(daemon, "vol")
    assert v is not None and v["mount"] is None
    assert read_direct(path, 0, 4096)[:15] == b"attached before"


@needs_loop
def test_detach_refuses_busy_filesystem_and_force(daemon, tmp_path):
    daemon.cli("volume", "create", "fs", "--size", "64M")
    mnt = daemon.mount_dir(tmp_path, "mnt")
    daemon.cli("attach", "fs", "--mount", str(mnt), "--mkfs", "ext4")
    sums = write_files(mnt, 3, n=2)
    held = os.open(mnt / "held", os.O_CREAT | os.O_RDWR, 0o600)  # keeps the filesystem busy
    try:
        line = expect_fail(daemon, EXIT_BUSY, "detach", "fs")
        assert "--force" in line
        assert is_mounted(mnt) and files_in(mnt).keys() >= sums.keys()
        assert volume_status(daemon, "fs")["mount"] is not None
        daemon.cli("detach", "fs", "--force")
        assert not is_mounted(mnt)  # lazily unmounted
        assert os.listdir(daemon.mountpoint) == []
    finally:
        os.close(held)
    # once the last user of the lazily unmounted filesystem is gone, its loop goes too
    wait_for(lambda: loops_under(daemon.mountpoint) == [], what="loop device autocleared")
    daemon.cli("attach", "fs", "--mount", str(mnt))
    got = files_in(mnt)
    assert {k: got[k] for k in sums} == sums
    daemon.cli("detach", "fs")


@needs_loop
def test_refused_detach_leaves_the_mount_alone(daemon, tmp_path):
    daemon.cli("volume", "create", "fs", "--size", "64M")
    mnt = daemon.mount_dir(tmp_path, "mnt")
    daemon.cli("attach", "fs", "--mount", str(mnt), "--mkfs", "ext4")
    (mnt / "f").write_text("hello")
    fd = os.open(daemon.disk("fs"), os.O_RDONLY)  # someone else has the disk file open
    try:
        expect_fail(daemon, EXIT_BUSY, "detach", "fs")
        # refused: the volume must be exactly as it was, filesystem still mounted
        assert is_mounted(mnt), "refused detach unmounted the filesystem"
        assert (mnt / "f").read_text() == "hello"
        assert volume_status(daemon, "fs")["mount"] is not None
    finally:
        os.close(fd)


# -- lifecycle ----------------------------------------------------------------------
@both_pyfuse3
def test_data_persists_across_restart(daemon):
    daemon.cli("volume", "create", "p", "--size", "4M")
    path = daemon.attach("p")
    data = rand(300_001, "persist")
    write_at(path, 12345, data)
    old_pid = daemon.pid
    daemon.restart()  # SIGTERM (exit 0 required), then a new daemon on the same dirs
    assert daemon.pid != old_pid
    assert os.listdir(daemon.mountpoint) == []  # nothing is attached after a restart
    path = daemon.attach("p")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_all(fd, len(data), 12345) == data
        assert pread_all(fd, 12345, 0) == bytes(12345)
    finally:
        os.close(fd)


def test_double_attach_and_second_daemon(make_daemon):
    d = make_daemon()
    d.cli("volume", "create", "dup", "--size", "1M")
    first = d.cli("attach", "dup").stdout
    again = d.cli("attach", "dup")
    assert again.returncode == 0 and again.stdout == first
    assert os.listdir(d.mountpoint) == ["dup"]
    write_at(d.disk("dup"), 0, b"first daemon")

    # another daemon on the same home cannot attach it: the image is locked
    d2 = make_daemon()  # same home, its own runtime dir
    assert d2.runtime != d.runtime
    expect_fail(d2, EXIT_BUSY, "attach", "dup", alone=True)
    assert os.listdir(d2.mountpoint) == []
    assert d2.status()["volumes"] == []
    d2.stop()

    # a second daemon on the same runtime dir refuses to start and leaves the first alone
    d3 = make_daemon(runtime=d.runtime, start=False)
    proc = d3.popen()
    try:
        rc = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == EXIT_BUSY, d3.log
    assert "already" in d3.log
    assert d.alive and is_mounted(d.mountpoint)
    assert [v["name"] for v in d.status()["volumes"]] == ["dup"]
    with open(d.disk("dup"), "rb") as f:
        assert f.read(12) == b"first daemon"
    d.stop()


@both_pyfuse3
def test_detach_refuses_while_open_and_force(daemon):
    path = daemon.attach_new("o", "1M")
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_all(fd, b"keep me" * 100, 0)
        os.fsync(fd)
        line = expect_fail(daemon, EXIT_BUSY, "detach", "o")
        assert "open" in line
        assert volume_status(daemon, "o")["open_handles"] == 1
        assert os.pread(fd, 7, 0) == b"keep me"  # still attached and working
        p = daemon.cli("detach", "o", "--force")
        assert "EIO" in p.stderr and p.stdout.strip() == "detached o"
        assert "o" not in os.listdir(daemon.mountpoint)
        for what, fn in [("write", lambda: os.pwrite(fd, b"lost", 0)),
                         ("fsync", lambda: os.fsync(fd))]:
            with pytest.raises(OSError) as e:
                fn()
            assert e.value.errno == errno.EIO, what
        with pytest.raises(OSError) as e:  # EIO expected; ENOENT is a known bug, see the xfail below
            os.pread(fd, 4096, 64 * 1024)
        assert e.value.errno in (errno.EIO, errno.ENOENT)
    finally:
        with contextlib.suppress(OSError):  # close reports the EIO of the flush too
            os.close(fd)
    with VolumeStore(daemon.home).engine("o") as (eng, _):
        assert eng.read(0, 700) == b"keep me" * 100


@needs_loop
def test_detach_refuses_with_loop_device_and_force(daemon):
    daemon.cli("volume", "create", "l", "--size", "4M")
    path = daemon.attach("l")
    write_at(path, 0, b"L" * 4096)
    loop = daemon.losetup(path)
    line = expect_fail(daemon, EXIT_BUSY, "detach", "l")
    assert loop in line
    with open(loop, "rb") as f:
        assert f.read(4096) == b"L" * 4096
    daemon.cli("detach", "l", "--force")
    assert "l" not in os.listdir(daemon.mountpoint)
    fd = os.open(loop, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], 4 * MiB - 4096)  # never read: not in any cache
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    subprocess.run(["losetup", "-d", loop], check=True)
    wait_for(lambda: loops_under(daemon.mountpoint) == [], what="loop device freed")
    path = daemon.attach("l")  # attach works again, the data is intact
    assert read_direct(path, 0, 4096) == b"L" * 4096


def test_force_detach_drops_cached_plaintext(daemon):
    """Regression: after detach --force no plaintext comes back from the page cache,
    neither through read() on an old fd nor through an existing mapping."""
    daemon.cli("volume", "create", "c", "--size", "1M")
    path = daemon.attach("c")
    fd = os.open(path, os.O_RDWR)
    m = None
    try:
        pwrite_all(fd, b"top secret" * 410, 0)
        os.fsync(fd)
        assert os.pread(fd, 10, 0) == b"top secret"  # in the page cache now
        m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        assert m[:10] == b"top secret"  # and mapped
        daemon.cli("detach", "c", "--force")
        try:
            data = os.pread(fd, 10, 0)
        except OSError:
            data = None
        assert data != b"top secret", "plaintext readable through an old fd after detach --force"
        # A mapping of dropped pages faults (SIGBUS): read it in a child process.
        r = run_as(None, None, lambda: bytes(m[:10]).decode(errors="replace"))
        assert r != {"ok": "top secret"}, "plaintext readable through a mapping after detach --force"
    finally:
        if m is not None:
            m.close()
        with contextlib.suppress(OSError):
            os.close(fd)


@both_pyfuse3
def test_force_detach_read_gives_eio(daemon):
    path = daemon.attach_new("e", "1M")
    fd = os.open(path, os.O_RDWR)
    try:
        daemon.cli("detach", "e", "--force")
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 0)
        assert e.value.errno == errno.EIO
        time.sleep(1.2)  # past ATTR_TIMEOUT: whatever the kernel asks first (getattr), the read fails
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 64 * 1024)
        assert e.value.errno == errno.EIO, errno.errorcode.get(e.value.errno)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- key states --------------------------------------------------------------------
def test_key_disabled_or_pending_deletion_while_attached(daemon):
    daemon.cli("key", "create", "k1")
    daemon.cli("volume", "create", "kv", "--size", "2M", "--key", "k1")
    path = daemon.attach("kv")
    write_at(path, 0, b"before")

    def io_works(tag: bytes, off: int) -> None:
        write_at(path, off, tag)
        assert read_direct(path, off - off % 4096, 4096)[off % 4096:off % 4096 + len(tag)] == tag

    def refuses_then_forced(state: str) -> None:
        line = expect_fail(daemon, EXIT_KEY_STATE, "detach", "kv")
        assert state in line and "attached again" in line and "--force" in line
        assert "kv" in os.listdir(daemon.mountpoint)  # refused: still attached
        assert volume_status(daemon, "kv")["key_state"] == state
        p = daemon.cli("detach", "kv", "--force")
        assert "evscrypt: warning:" in p.stderr and state in p.stderr and "attached again" in p.stderr
        assert p.stdout.strip() == "detached kv"
        assert "kv" not in os.listdir(daemon.mountpoint)
        expect_fail(daemon, EXIT_KEY_STATE, "attach", "kv")
        assert "kv" not in os.listdir(daemon.mountpoint)

    # Disabled
    daemon.cli("key", "disable", "k1")
    io_works(b"while disabled", 8192 + 7)
    refuses_then_forced("Disabled")
    daemon.cli("key", "enable", "k1")
    path = daemon.attach("kv")
    assert read_direct(path, 0, 4096)[:6] == b"before"
    assert read_direct(path, 8192, 4096)[7:21] == b"while disabled"

    # PendingDeletion; cancelling returns the key to Disabled, which still refuses
    daemon.cli("key", "schedule-deletion", "k1", "--days", "7")
    io_works(b"while pending", 3 * 4096 + 11)
    refuses_then_forced("PendingDeletion")
    daemon.cli("key", "cancel-deletion", "k1")
    desc = json.loads(daemon.cli("key", "describe", "k1", "--json").stdout)
    assert desc["state"] == "Disabled"
    expect_fail(daemon, EXIT_KEY_STATE, "attach", "kv")
    daemon.cli("key", "enable", "k1")
    path = daemon.attach("kv")
    assert read_direct(path, 0, 4096)[:6] == b"before"
    assert read_direct(path, 3 * 4096, 4096)[11:24] == b"while pending"
    daemon.cli("detach", "kv")  # Enabled again: plain detach, no warning
    with VolumeStore(daemon.home).engine("kv") as (eng, _):
        assert eng.read(8192 + 7, 14) == b"while disabled"


# -- signals -----------------------------------------------------------------------
def raw_and_ext4(daemon: Daemon, tmp_path: Path) -> tuple[Path, Path]:
    """Volume raw (4 MiB) attached as a disk, and volume fs (64 MiB) attached
    with ext4 mounted: (raw's disk, fs's mount point)."""
    daemon.cli("volume", "create", "raw", "--size", "4M")
    daemon.cli("volume", "create", "fs", "--size", "64M")
    raw = daemon.attach("raw")
    mnt = daemon.mount_dir(tmp_path, "mnt")
    daemon.cli("attach", "fs", "--mount", str(mnt), "--mkfs", "ext4")
    return raw, mnt


@both_pyfuse3
@needs_loop
def test_sigterm_detaches_everything_and_keeps_fsynced_data(daemon, tmp_path):
    raw, mnt = raw_and_ext4(daemon, tmp_path)
    data = rand(100_000, "sigterm")
    fd = os.open(raw, os.O_RDWR)  # left open across the SIGTERM
    pwrite_all(fd, data, 4096 + 3)
    os.fsync(fd)
    content = rand(2 * MiB + 5, "ext4 sigterm")
    with open(mnt / "f.bin", "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())

    daemon.signal(signal.SIGTERM)
    try:
        assert daemon.wait() == 0, daemon.log
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert "received SIGTERM" in daemon.log
    assert not is_mounted(daemon.mountpoint)
    assert not is_mounted(mnt)
    assert loops_under(daemon.mountpoint) == []
    assert not socket_path(daemon.runtime).exists()
    expect_fail(daemon, EXIT_DAEMON_UNAVAILABLE, "status")

    daemon.start()
    raw = daemon.attach("raw")
    assert read_direct(raw, 4096, 102_400)[3:3 + len(data)] == data
    daemon.cli("attach", "fs", "--mount", str(mnt))
    assert (mnt / "f.bin").read_bytes() == content
    daemon.cli("detach", "fs")
    daemon.cli("detach", "raw")


@needs_loop
def test_sigkill_stale_mounts_cleaned_and_fsynced_data_intact(daemon, tmp_path):
    raw, mnt = raw_and_ext4(daemon, tmp_path)
    loop = volume_status(daemon, "fs")["mount"]["loop"]
    synced = {}
    for i, off in enumerate((0, 5000, 2 * MiB + 1, 4 * MiB - 4096)):
        chunk = rand(4096, ("kill", i))
        write_at(raw, off, chunk)
        synced[off] = chunk
    content = rand(3 * MiB, "ext4 kill")
    (mnt / "synced.bin").write_bytes(content)
    subprocess.run(["sync"], check=True)

    daemon.kill()
    assert daemon.returncode == -signal.SIGKILL
    # the crash leaves a dead FUSE mount, and ext4 on a loop over it
    assert is_mounted(daemon.mountpoint) and is_mounted(mnt)
    assert loops_under(daemon.mountpoint) == [loop]
    with pytest.raises(OSError) as e:
        os.listdir(daemon.mountpoint)
    assert e.value.errno == errno.ENOTCONN

    daemon.start()  # same runtime dir: cleans up what the dead one left
    assert "stale" in daemon.log
    assert not is_mounted(mnt)
    assert mounts_of(loop) == []
    assert loops_under(daemon.mountpoint) == []
    assert os.listdir(daemon.mountpoint) == []
    raw = daemon.attach("raw")
    fd = os.open(raw, os.O_RDONLY)
    try:
        for off, chunk in synced.items():
            assert pread_all(fd, len(chunk), off) == chunk, off
    finally:
        os.close(fd)
    daemon.cli("attach", "fs", "--mount", str(mnt))
    assert (mnt / "synced.bin").read_bytes() == content
    daemon.cli("detach", "fs")
    daemon.cli("detach", "raw")
    daemon.stop()


# -- status --------------------------------------------------------------------------
def test_status_json_counters_and_exit_codes(daemon, make_daemon):
    daemon.cli("volume", "create", "s", "--size", "1M")
    daemon.cli("volume", "create", "idle", "--size", "1M")
    path = daemon.attach("s")
    st = daemon.status()
    assert st["running"] is True and st["pid"] == daemon.pid and st["mountpoint"] == str(daemon.mountpoint)
    assert [v["name"] for v in st["volumes"]] == ["s"]
    v0 = st["volumes"][0]
    assert v0["path"] == str(path) and v0["size"] == MiB and v0["encrypted"] is True
    assert v0["state"] == "ok" and v0["key_state"] == "Enabled" and v0["open_handles"] == 0
    assert v0["io"] == {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
                        "fsyncs": 0, "discards": 0, "errors": 0}

    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(3):
            pwrite_all(fd, rand(4096, i), i * 4096)
        os.fsync(fd)
        v1 = volume_status(daemon, "s")
        assert v1["open_handles"] == 1
    finally:
        os.close(fd)
    assert read_direct(path, 0, 3 * 4096) == b"".join(rand(4096, i) for i in range(3))
    v2 = volume_status(daemon, "s")
    io1, io2 = v1["io"], v2["io"]
    assert io1["writes"] >= 3 and io1["bytes_written"] == 3 * 4096 and io1["fsyncs"] >= 1
    assert io2["reads"] > io1["reads"] and io2["bytes_read"] >= io1["bytes_read"] + 3 * 4096
    assert io2["writes"] == io1["writes"] and io2["errors"] == 0
    assert v2["open_handles"] == 0

    text = daemon.cli("status").stdout
    assert f"pid {daemon.pid}" in text and "s" in text.split()

    daemon.stop()
    line = expect_fail(daemon, EXIT_DAEMON_UNAVAILABLE, "status")
    assert "not running" in line
    p = daemon.cli("status", "--json", check=False)
    assert p.returncode == EXIT_DAEMON_UNAVAILABLE
    assert json.loads(p.stdout)["running"] is False
    never = make_daemon(start=False)
    expect_fail(never, EXIT_DAEMON_UNAVAILABLE, "status")
    expect_fail(never, EXIT_DAEMON_UNAVAILABLE, "attach", "s")
