"""The C data path (evscrypt/daemon/_cpath.c) on a real daemon and mount.

Aligned reads and writes of up to 128 KiB are answered in C by several FUSE
worker threads at once; everything else goes to Python.  These tests drive
both at once: fio with verify on four volumes through four workers; full
sector writes in C racing partial writes in Python on the same sectors
(the shared sector locks); the image checked against the per-sector
``cryptography`` reference; and the daemon with ``EVSCRYPT_CPATH=0``.
Force-detach under load and snapshots under concurrent writes run with the
C path on in test_data_path.py (it is the default); here they run again
with four workers, and a forced detach of one of two busy volumes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import threading

import pytest

from copy_helpers import MiB, rand
from daemon_fixture import make_daemon, needs_fio, read_direct  # noqa: F401  (fixtures by name)
from evscrypt.crypto.xts import SECTOR_SIZE
import test_data_path as tdp
from test_data_path import aligned, assert_image_matches, attached_status, fio_cmd, fio_json

pytestmark = pytest.mark.fuse

KiB = 1 << 10
WORKERS = "4"


@pytest.fixture
def workers(monkeypatch):
    """Daemons made after this run four FUSE worker threads."""
    monkeypatch.setenv("EVSCRYPT_FUSE_THREADS", WORKERS)
    monkeypatch.delenv("EVSCRYPT_CPATH", raising=False)


def c_daemon(make_daemon):
    d = make_daemon()
    st = d.client().status()
    if not st.get("c_path"):
        pytest.skip("the C data path cannot run here (no VAES, or built without _cpath)")
    assert st["fuse_threads"] == int(WORKERS)
    return d


def verify_job(name: str, path, rw: str, size: str, bs: str, extra=()) -> list[str]:
    return [f"--name={name}", f"--filename={path}", f"--rw={rw}", f"--size={size}", bs, "--ioengine=libaio",
            "--direct=1", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--randrepeat=0", *extra]


@needs_fio
@pytest.mark.timeout(300)
def test_four_volumes_through_four_workers_verify(make_daemon, workers, tmp_path):
    d = c_daemon(make_daemon)
    paths = [d.attach_new(f"v{i}", "48M") for i in range(4)]
    for i in range(4):
        assert attached_status(d, f"v{i}")["c_path"] is True
    args = []
    for i, p in enumerate(paths):
        # 4 KiB and 64 KiB in C; 1 MiB and the unaligned 6 KiB... sizes in Python
        args += verify_job(f"c{i}", p, "randwrite", "24M", "--bssplit=4k/60:64k/30:128k/10")
        args += verify_job(f"py{i}", p, "randwrite", "16M", "--bssplit=1m/70:512k/30", ["--offset=28M"])
    p = subprocess.run(fio_cmd(*args), capture_output=True, text=True, cwd=tmp_path, timeout=280)
    assert p.returncode == 0, f"fio exited {p.returncode}:\n{p.stderr}\n{p.stdout[-3000:]}"
    for job in fio_json(p)["jobs"]:
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] == job["write"]["io_bytes"] > 0, job["jobname"]
    # the counters add the requests C served to Python's
    st = {v["name"]: v for v in d.client().status()["volumes"]}
    for i in range(4):
        io = st[f"v{i}"]["io"]
        assert io["bytes_written"] >= 40 * MiB and io["bytes_read"] >= 40 * MiB and io["errors"] == 0, io
    # what fio wrote in C decrypts, sector by sector, with the reference
    want = read_direct(paths[0], 0, 44 * MiB)
    d.cli("detach", "v0")
    assert_image_matches(d, "v0", want)
    assert "Traceback" not in d.log and " ERROR " not in d.log, d.log


def _pwrite_direct(fd: int, off: int, data: bytes) -> None:
    b = aligned(len(data))
    b.write(data)
    assert os.pwritev(fd, [b], off) == len(data)


class Aio:
    """Linux native AIO through the raw system calls (x86-64 numbers), for
    writes that are in flight together: the kernel holds a FUSE file's lock
    through a synchronous O_DIRECT write, so only asynchronous ones overlap
    a buffered write of the same file."""

    IO_SETUP, IO_DESTROY, IO_GETEVENTS, IO_SUBMIT = 206, 207, 208, 209
    PWRITE = 1

    class Iocb(ctypes.Structure):  # struct iocb, linux/aio_abi.h
        _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                    ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                    ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                    ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]

    class Event(ctypes.Structure):  # struct io_event
        _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                    ("res2", ctypes.c_int64)]

    def __init__(self, depth: int):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.ctx = ctypes.c_ulong(0)
        self._call(self.IO_SETUP, ctypes.c_long(depth), ctypes.byref(self.ctx))

    def _call(self, nr: int, *args) -> int:
        r = self.libc.syscall(ctypes.c_long(nr), *args)
        if r < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return r

    def pwrite_all(self, fd: int, writes: list[tuple[int, mmap.mmap]]) -> None:
        """Submit every (offset, buffer) write at once, wait for all."""
        cbs = (self.Iocb * len(writes))()
        ptrs = (ctypes.POINTER(self.Iocb) * len(writes))()
        keep = []
        for i, (off, buf) in enumerate(writes):
            c = (ctypes.c_char * len(buf)).from_buffer(buf)
            keep.append(c)
            cbs[i] = self.Iocb(data=i, opcode=self.PWRITE, fildes=fd, buf=ctypes.addressof(c), nbytes=len(buf),
                               offset=off)
            ptrs[i] = ctypes.pointer(cbs[i])
        assert self._call(self.IO_SUBMIT, self.ctx, ctypes.c_long(len(writes)), ptrs) == len(writes)
        events = (self.Event * len(writes))()
        done = 0
        while done < len(writes):
            done += self._call(self.IO_GETEVENTS, self.ctx, ctypes.c_long(1), ctypes.c_long(len(writes) - done),
                               ctypes.byref(events, done * ctypes.sizeof(self.Event)), None)
        assert all(e.res == len(writes[e.data][1]) for e in events), [e.res for e in events]
        del keep

    def close(self) -> None:
        self._call(self.IO_DESTROY, self.ctx)


@pytest.mark.timeout(300)
def test_whole_sector_writes_in_c_and_partial_writes_in_python_do_not_interleave(make_daemon, workers):
    """Python's read-modify-write of a partial sector and C's write of the
    whole sector share the sector's lock: a partial write never puts back an
    older version of the rest of a sector that C has written meanwhile.

    Round after round, all sectors get a new whole version at once
    (asynchronous O_DIRECT writes, served in C) while another thread writes
    the first 512 bytes of each, over and over (buffered writes, which reach
    the daemon unaligned: Python).  After each round, with no partial write
    running, the rest of every sector must be that round's version.  (The
    kernel takes the file's lock to queue each request, so the two kinds
    rarely race here; test_python_and_c_take_the_same_sector_locks shows
    the locks are the same.)"""
    d = c_daemon(make_daemon)
    path = d.attach_new("race", "8M")
    sectors, rounds, head = 16, 400, 512
    full_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    part_fd = os.open(path, os.O_RDWR)
    aio = Aio(sectors)
    partial_lock = threading.Lock()  # held through each partial write: "none running"
    stop = threading.Event()
    errors: list[BaseException] = []

    def version(r: int, s: int) -> bytes:
        return ((b"%06d:%04d|" % (r, s)) * (SECTOR_SIZE // 12 + 1))[:SECTOR_SIZE]

    def partial() -> None:
        try:
            while not stop.is_set():
                for s in range(sectors):
                    with partial_lock:
                        assert os.pwrite(part_fd, rand(head, f"p{s}"), s * SECTOR_SIZE) == head
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=partial)
    t.start()
    bad = []
    try:
        bufs = [aligned(SECTOR_SIZE) for _ in range(sectors)]
        for r in range(rounds):
            for s, b in enumerate(bufs):
                b[:] = version(r, s)
            aio.pwrite_all(full_fd, [(s * SECTOR_SIZE, b) for s, b in enumerate(bufs)])
            with partial_lock:
                got = read_direct(path, 0, sectors * SECTOR_SIZE)
            bad += [(r, s) for s in range(sectors)
                    if got[s * SECTOR_SIZE + head:(s + 1) * SECTOR_SIZE] != version(r, s)[head:]]
            if errors:
                break
    finally:
        stop.set()
        t.join()
        aio.close()
        os.close(full_fd)
        os.close(part_fd)
    assert not errors, errors
    assert not bad, f"{len(bad)} sectors hold an older version after their round, the first: {bad[:5]}"
    v = attached_status(d, "race")
    assert v["c_path"] and v["io"]["errors"] == 0
    assert v["io"]["writes"] >= sectors * rounds


def test_python_and_c_take_the_same_sector_locks(tmp_path):
    """A registered volume's engine takes its sector locks from the C side
    (cpath.SharedLocks, the stripes _cpath's writes take): while C holds a sector's stripe, Python's read-modify-write
    of that sector waits."""
    from evscrypt.daemon import cpath
    from evscrypt.image.engine import Engine
    from evscrypt.crypto.xts import SectorCipher
    from evscrypt.secret import Secret
    if cpath._cpath is None:
        pytest.skip("built without _cpath")
    img = tmp_path / "img"
    img.write_bytes(bytes(8 * SECTOR_SIZE))
    fd = os.open(img, os.O_RDWR)
    key = Secret(64)
    key.buffer[:] = rand(64, "key")
    eng = Engine(fd, 8 * SECTOR_SIZE, 0, SectorCipher(key))
    locks = cpath.SharedLocks()
    eng.set_locks(locks)
    done = threading.Event()
    t = threading.Thread(target=lambda: (eng.write(3 * SECTOR_SIZE + 100, b"x" * 10), done.set()))
    try:
        locks.c.take(3 + 64, 1, True)  # another sector of the same stripe, as C would
        t.start()
        assert not done.wait(0.3), "the partial write did not wait for the C side's lock"
        locks.c.take(3 + 64, 1, False)
        assert done.wait(30)
        assert bytes(eng.read(3 * SECTOR_SIZE + 100, 10)) == b"x" * 10
    finally:
        t.join()
        os.close(fd)
        key.wipe()


def test_sector_stripes_are_taken_at_once_and_released_by_any_thread():
    """An RBD write takes its stripes in a FUSE worker and librbd's
    completion thread releases them: a stripe is a flag, not a mutex that
    only its owner may unlock."""
    from evscrypt.daemon import cpath
    if cpath._cpath is None:
        pytest.skip("built without _cpath")
    locks = cpath._cpath.SectorLocks(stripes=8)
    locks.take(1, 2, True)  # stripes 1 and 2
    took = threading.Event()
    waiter = threading.Thread(target=lambda: (locks.take(9, 8, True), took.set()))  # all 8 stripes
    waiter.start()
    try:
        releaser = threading.Thread(target=locks.take, args=(2, 1, False))  # another thread frees stripe 2
        releaser.start()
        releaser.join()
        assert not took.wait(0.2), "took every stripe while stripe 1 was still held"
        threading.Thread(target=locks.take, args=(1, 1, False)).start()
        assert took.wait(30)
    finally:
        waiter.join()
    locks.take(0, 8, False)
    h = cpath.SharedLocks(4096).one(5000)  # Python's aio path takes and releases the same way
    h.acquire()
    threading.Thread(target=h.release).start()
    h.acquire()
    h.release()


@needs_fio
@pytest.mark.timeout(300)
def test_force_detach_under_load_on_several_workers(make_daemon, workers, tmp_path):
    """A forced detach of one busy volume: its requests fail with EIO, C
    stops serving it before its key is wiped, and the other busy volume
    goes on, verified."""
    d = c_daemon(make_daemon)
    a, b = d.attach_new("a", "32M"), d.attach_new("b", "32M")
    load = subprocess.Popen(
        fio_cmd("--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randrw", "--bs=4k", "--size=32M",
                "--time_based", "--runtime=600", "--name=load", f"--filename={a}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    other = subprocess.Popen(fio_cmd(*verify_job("b", b, "randwrite", "32M", "--bs=4k")),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        while attached_status(d, "a")["io"]["writes"] < 2000:
            assert load.poll() is None, load.communicate()
        p = d.cli("detach", "a", "--force", timeout=600)
        assert p.stdout.strip() == "detached a" and "EIO" in p.stderr, p.stderr
        out, err = load.communicate(timeout=600)
        job = fio_json(subprocess.CompletedProcess([], load.returncode, out, err))["jobs"][0]
        assert job["error"] == errno.EIO, (job["error"], err)
        out, err = other.communicate(timeout=280)
        assert other.returncode == 0, err
        job = fio_json(subprocess.CompletedProcess([], 0, out, err))["jobs"][0]
        assert job["error"] == 0 and job["read"]["io_bytes"] == 32 * MiB
    finally:
        for f in (load, other):
            if f.poll() is None:
                f.kill()
                f.wait(10)
    assert d.alive
    assert "Traceback" not in d.log and " ERROR " not in d.log, d.log
    assert [v["name"] for v in d.status()["volumes"]] == ["b"]
    # attached again, it is served in C again, with what it held
    d.attach("a")
    assert attached_status(d, "a")["c_path"] is True


@pytest.mark.timeout(300)
def test_snapshots_under_concurrent_writes_on_several_workers(make_daemon, workers, tmp_path):
    """test_data_path's crash-consistency check of snapshots taken under
    concurrent writers, with four workers writing in C: the write gate holds
    and drains the writes running in C (cpath.hold_writes) too."""
    d = c_daemon(make_daemon)
    tdp.test_snapshots_under_concurrent_writes_are_crash_consistent(d, tmp_path)
    assert "Traceback" not in d.log and " ERROR " not in d.log, d.log


def test_cpath_off_serves_everything_in_python(make_daemon, monkeypatch):
    monkeypatch.setenv("EVSCRYPT_CPATH", "0")
    monkeypatch.delenv("EVSCRYPT_FUSE_THREADS", raising=False)
    d = make_daemon()
    st = d.client().status()
    assert st["c_path"] is False and st["fuse_threads"] == 1
    path = d.attach_new("py", "8M")
    assert attached_status(d, "py")["c_path"] is False
    data = rand(256 * KiB, "py")
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        _pwrite_direct(fd, 64 * KiB, data)
    finally:
        os.close(fd)
    assert read_direct(path, 64 * KiB, len(data)) == data
    d.cli("detach", "py")
    assert_image_matches(d, "py", bytes(64 * KiB) + data + bytes(8 * MiB - 64 * KiB - len(data)))
    assert "aligned I/O of encrypted volumes in C: no (EVSCRYPT_CPATH=0)" in d.log
