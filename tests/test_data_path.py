"""The concurrent FUSE data path end to end, on a real daemon and mount.

READ and WRITE requests are served in pyfuse3's worker thread (read_sync,
write_sync); requests of at least ``OFFLOAD_MIN`` go to the I/O pool and are
answered when their Future completes; a write that finds the write gate
closed (a snapshot taking its copy point) falls back to the async handler in
the trio thread.  These tests drive that path with fio at high queue depth,
unaligned and boundary requests, exact counters, a forced detach under load
and snapshots under concurrent writers, and check the result against an
in-test model and against the per-sector XTS reference applied to the
backing image.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from copy_helpers import MiB, SECTOR, data_area, header_of, rand
from daemon_fixture import (  # noqa: F401  (fixtures by name)
    daemon, make_daemon, needs_fio, pread_all, pwrite_all, read_direct, volume_status, write_at,
)
from evscrypt.crypto.xts import SECTOR_SIZE, reference_crypt
from evscrypt.daemon.ops import OFFLOAD_MIN
from evscrypt.volumes import VolumeStore

pytestmark = pytest.mark.fuse

KiB = 1 << 10
ZERO_SECTOR = bytes(SECTOR_SIZE)


# -- helpers ---------------------------------------------------------------------
def volume_key(d, name: str) -> bytes:
    """The volume's DK, unwrapped in-process through its KMS (as test_daemon does)."""
    with VolumeStore(d.home).data_key(name) as dk:
        return bytes(dk.buffer)


def reference_plaintext(image: Path, key: bytes, off: int, length: int) -> bytes:
    """Decrypt ``length`` bytes of the data area at ``off`` (sector aligned)
    with the per-sector reference; an all-zero stored sector is unwritten and
    reads as zeros."""
    assert off % SECTOR_SIZE == 0 and length % SECTOR_SIZE == 0
    ct = data_area(image, off, length)
    out = bytearray(length)
    first = off // SECTOR_SIZE
    for i in range(length // SECTOR_SIZE):
        sector = ct[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]
        if sector != ZERO_SECTOR:
            out[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE] = reference_crypt(key, first + i, sector, False)
    return bytes(out)


def assert_image_matches(d, name: str, plain: bytes) -> None:
    """The backing image of the detached volume ``name`` decrypts, sector by
    sector with the reference, to ``plain``; written sectors are ciphertext."""
    key = volume_key(d, name)
    got = reference_plaintext(d.image(name), key, 0, len(plain))
    if got != plain:
        bad = next(n for n in range(len(plain) // SECTOR_SIZE)
                   if got[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] != plain[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE])
        pytest.fail(f"{name}: sector {bad} of the image does not decrypt to what the daemon served")
    ct = data_area(d.image(name), 0, len(plain))
    for n in range(0, len(plain) // SECTOR_SIZE, 97):  # a sample: no plaintext in the image
        p = plain[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE]
        if p != ZERO_SECTOR:
            assert ct[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] != p, f"{name}: sector {n} is stored in the clear"


def attached_status(d, name: str) -> dict:
    """The volume's status through the control socket (no CLI start-up)."""
    for v in d.client().status()["volumes"]:
        if v["name"] == name:
            return v
    raise AssertionError(f"{name} is not attached")


def io_counters(d, name: str) -> dict:
    """The volume's I/O counters through the control socket (no CLI start-up)."""
    return attached_status(d, name)["io"]


def fio_json(p: subprocess.CompletedProcess) -> dict:
    return json.loads(p.stdout[p.stdout.index("{"):])


def fio_cmd(*args: str) -> list[str]:
    # no verify state files (they would land in the working directory)
    return ["fio", "--output-format=json", "--fallocate=none", "--verify_state_save=0", *args]


def aligned(n: int) -> mmap.mmap:
    """A page-aligned buffer (anonymous mapping) for O_DIRECT."""
    return mmap.mmap(-1, n)


BSSPLIT = "--bssplit=4k/30:16k/25:128k/20:256k/15:1m/10"
#: random writes at depth 32, then a verify pass that reads everything back
MIXED = ["--ioengine=libaio", "--direct=1", "--iodepth=32", "--rw=randwrite", "--verify=crc32c",
         "--verify_fatal=1", "--do_verify=1", "--randrepeat=0"]
#: fio's random map trims a large block to the free run it lands in, so a
#: bssplit job alone sends few whole 1 MiB writes; one job per size beside it,
#: each on its own part of the disk, makes sure every size runs at depth.
SIZE_JOBS = [("mixed", BSSPLIT, 0, 16 * MiB),
             ("bs4k", "--bs=4k", 16 * MiB, 6 * MiB), ("bs16k", "--bs=16k", 22 * MiB, 6 * MiB),
             ("bs128k", "--bs=128k", 28 * MiB, 8 * MiB), ("bs256k", "--bs=256k", 36 * MiB, 12 * MiB),
             ("bs1m", "--bs=1m", 48 * MiB, 16 * MiB)]


def check_fio_jobs(p: subprocess.CompletedProcess, sizes: dict[str, int]) -> None:
    """fio succeeded, every job wrote its whole span and read all of it back
    in its verify pass, with no verify error."""
    assert p.returncode == 0, f"fio exited {p.returncode}:\n{p.stderr}\n{p.stdout[-3000:]}"
    assert "verify" not in p.stderr.lower() and "error" not in p.stderr.lower(), p.stderr
    jobs = {j["jobname"]: j for j in fio_json(p)["jobs"]}
    assert sorted(jobs) == sorted(sizes)
    for name, job in jobs.items():
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == sizes[name], (name, job["write"])
        assert job["read"]["io_bytes"] == sizes[name], (name, job["read"])  # the verify pass


# -- 1 and 2: fio, mixed sizes at queue depth 32, and the reference oracle ------------
@needs_fio
@pytest.mark.timeout(180)
def test_fio_mixed_sizes_qd32_verify_and_reference_image(daemon, tmp_path):
    d = daemon
    size = 80 * MiB
    d.cli("volume", "create", "mx", "--size", "80M")
    path = d.attach("mx")
    jobs = []
    for name, bs, off, n in SIZE_JOBS:  # all at once, each at depth 32
        jobs += [f"--name={name}", bs, f"--offset={off}", f"--size={n}"]
    p = subprocess.run(fio_cmd(*MIXED, f"--filename={path}", *jobs),
                       capture_output=True, text=True, timeout=150, cwd=tmp_path)
    check_fio_jobs(p, {name: n for name, _, _, n in SIZE_JOBS})
    v = volume_status(d, "mx")
    assert v["state"] == "ok" and v["io"]["errors"] == 0
    span = sum(n for *_, n in SIZE_JOBS)
    # what the daemon serves now, from the image (O_DIRECT: not the page cache)
    served = read_direct(path, 0, size)
    assert served[span:] == bytes(size - span)  # fio stayed inside its span
    written = sum(served[i:i + SECTOR_SIZE] != ZERO_SECTOR for i in range(0, span, SECTOR_SIZE))
    assert written == span // SECTOR_SIZE  # fio filled every sector of its span
    d.cli("detach", "mx")
    # the independent oracle: the image decrypts, per sector with the reference
    # XTS and the DK from the KMS, to exactly what the daemon served
    assert_image_matches(d, "mx", served)


@needs_fio
@pytest.mark.timeout(180)
def test_fio_two_volumes_concurrently(daemon, tmp_path):
    d = daemon
    span = 32 * MiB
    paths = {}
    for name in ("va", "vb"):
        d.cli("volume", "create", name, "--size", "40M")
        paths[name] = d.attach(name)
    jobs = []
    for name, path in paths.items():
        jobs += [f"--name={name}", f"--filename={path}"]
    # one fio, two jobs (two processes) running at the same time, one per volume
    p = subprocess.run(fio_cmd(*MIXED, BSSPLIT, f"--size={span}", *jobs),
                       capture_output=True, text=True, timeout=150, cwd=tmp_path)
    check_fio_jobs(p, {name: span for name in paths})
    served = {name: read_direct(path, 0, 40 * MiB) for name, path in paths.items()}
    assert served["va"] != served["vb"]
    for name in paths:
        assert served[name][span:] == bytes(40 * MiB - span)
        assert volume_status(d, name)["io"]["errors"] == 0
        d.cli("detach", name)
        assert_image_matches(d, name, served[name])


# -- 3: unaligned and boundary requests against a model ----------------------------
@pytest.mark.timeout(120)
def test_unaligned_and_boundary_requests_match_model(daemon):
    d = daemon
    size = 16 * MiB
    d.cli("volume", "create", "ub", "--size", "16M")
    path = d.attach("ub")
    model = bytearray(size)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)  # FUSE takes unaligned O_DIRECT
    buffered = os.open(path, os.O_RDWR)

    def dwrite(off: int, data: bytes) -> None:
        assert os.pwrite(direct, data, off) == len(data), (off, len(data))
        model[off:off + len(data)] = data

    def dcheck(off: int, length: int) -> None:
        got = os.pread(direct, length, off)
        assert got == bytes(model[off:off + length]), (off, length)

    try:
        sizes = (OFFLOAD_MIN - 512, OFFLOAD_MIN, OFFLOAD_MIN + 512)  # inline, offloaded, offloaded
        cases = [(1, 100), (4095, 2), (3 * SECTOR + 17, 2 * SECTOR + 100), (10 * SECTOR - 1, 2)]
        for k, n in enumerate(sizes):
            cases += [(1 * MiB + k * 256 * KiB, n),            # sector aligned start
                      (4 * MiB + k * 256 * KiB + 513, n),      # unaligned start and end
                      ((k + 6) * MiB - 7, n)]                  # straddles a MiB boundary
        cases += [(1 * MiB + 100, 300), (4 * MiB + 513 + 1000, OFFLOAD_MIN)]  # inside earlier writes
        cases += [(size - 777, 777), (size - OFFLOAD_MIN - 1, OFFLOAD_MIN + 1)]  # up to the last byte
        for i, (off, n) in enumerate(cases):
            dwrite(off, rand(n, ("case", i)))
            dcheck(off, n)
        # reads of the sizes around OFFLOAD_MIN at many alignments
        for n in sizes:
            for off in (0, 1, 511, 4096, 4097, 1 * MiB - 3, size - n, size - n - 1):
                dcheck(off, n)

        # the end of the disk: a write crossing it is cut there (a short
        # write), a write at or past it is ENOSPC; nothing grows
        tail = rand(10_000, "tail")
        assert os.pwrite(buffered, tail, size - 5000) == 5000
        model[size - 5000:] = tail[:5000]
        # the same with O_DIRECT: the daemon writes the part inside the disk and
        # answers a short count; the kernel turns a short direct write into EIO
        # (fuse_get_res_by_io), or passes the count on
        tail2 = rand(8192, "tail2")
        try:
            n = os.pwrite(direct, tail2, size - 4096 + 512)
        except OSError as e:
            assert e.errno == errno.EIO, e
        else:
            assert n == 4096 - 512
        model[size - 4096 + 512:] = tail2[:4096 - 512]
        for fd in (buffered, direct):
            for off, n in ((size, 1), (size, 4096), (size + 4096, 8192), (size + 1, OFFLOAD_MIN)):
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, b"z" * n, off)
                assert e.value.errno == errno.ENOSPC, (fd, off, n)
            assert os.fstat(fd).st_size == size
            # reads at and past the end are empty, a read crossing it is short
            assert os.pread(fd, 4096, size) == b""
            assert os.pread(fd, OFFLOAD_MIN, size + 4096) == b""
            assert os.pread(fd, OFFLOAD_MIN + 512, size - 100) == bytes(model[-100:])
            assert pread_all(fd, OFFLOAD_MIN, size - 5000) == bytes(model[-5000:])

        # a seeded random mix of unaligned writes and reads of any size
        rng = random.Random(20240601)
        for i in range(150):
            n = rng.choice([rng.randrange(1, 8192), rng.randrange(1, 600 * KiB),
                            OFFLOAD_MIN + rng.randrange(-1024, 1025)])
            off = rng.randrange(0, size - n + 1)
            if rng.random() < 0.5:
                dwrite(off, rand(n, ("mix", i)))
            else:
                dcheck(off, n)
        assert read_direct(path, 0, size) == bytes(model)
        v = volume_status(d, "ub")
        assert v["state"] == "ok" and v["io"]["errors"] == 0
    finally:
        os.close(direct)
        os.close(buffered)
    d.cli("detach", "ub")
    assert_image_matches(d, "ub", bytes(model))


# -- 4: counters add up exactly -------------------------------------------------
@needs_fio
@pytest.mark.timeout(120)
def test_counters_add_up_exactly(daemon, tmp_path):
    d = daemon
    path = d.attach_new("ct", "64M")
    base = io_counters(d, "ct")
    assert base == {"reads": 0, "writes": 0, "bytes_read": 0, "bytes_written": 0,
                    "fsyncs": 0, "discards": 0, "errors": 0}
    # O_DIRECT requests up to 1 MiB reach the daemon as one request each
    sizes = ([4 * KiB] * 10 + [16 * KiB] * 5 + [OFFLOAD_MIN - 4 * KiB] * 3 + [OFFLOAD_MIN] * 3
             + [OFFLOAD_MIN + 4 * KiB] * 3 + [256 * KiB] * 4 + [1 * MiB] * 3)
    buf = aligned(1 * MiB)
    buf.write(rand(1 * MiB, "counters"))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        off = 0
        for n in sizes:
            assert os.pwritev(fd, [memoryview(buf)[:n]], off) == n
            off += n
        assert os.pwrite(fd, b"u" * 100, off + 1) == 100  # unaligned, still one request
        off = 0
        for n in sizes:
            assert os.preadv(fd, [memoryview(buf)[:n]], off) == n
            off += n
        assert len(os.pread(fd, 333, 7)) == 333
        os.fsync(fd)
    finally:
        os.close(fd)
    want = {"reads": len(sizes) + 1, "writes": len(sizes) + 1, "bytes_read": sum(sizes) + 333,
            "bytes_written": sum(sizes) + 100, "fsyncs": 1, "discards": 0, "errors": 0}
    assert io_counters(d, "ct") == want

    # concurrent requests from Python threads: small ones inline, large ones in the pool
    def worker(k: int) -> None:
        b = aligned(256 * KiB)
        f = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            for i in range(8):
                o = 32 * MiB + (k * 8 + i) * 256 * KiB
                assert os.pwritev(f, [b], o) == 256 * KiB
                assert os.preadv(f, [b], o) == 256 * KiB
                assert os.pwritev(f, [memoryview(b)[:4096]], o) == 4096
                assert os.preadv(f, [memoryview(b)[:4096]], o) == 4096
        finally:
            os.close(f)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    for k in ("reads", "writes"):
        want[k] += 4 * 8 * 2
    want["bytes_read"] += 4 * 8 * (256 * KiB + 4096)
    want["bytes_written"] += 4 * 8 * (256 * KiB + 4096)
    assert io_counters(d, "ct") == want

    # libaio at queue depth 16: a known number of fixed-size requests
    common = ["--ioengine=libaio", "--direct=1", "--iodepth=16", "--size=16M", "--offset=40M",
              f"--filename={path}", "--randrepeat=0"]
    for rw, bs in (("randwrite", 256 * KiB), ("randread", OFFLOAD_MIN), ("randwrite", 4 * KiB)):
        p = subprocess.run(fio_cmd(*common, f"--rw={rw}", f"--bs={bs}", "--name=c"), capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        kind, nbytes = ("writes", "bytes_written") if "write" in rw else ("reads", "bytes_read")
        want[kind] += 16 * MiB // bs
        want[nbytes] += 16 * MiB
    # the same numbers through the CLI
    v = volume_status(d, "ct")
    assert v["io"] == want, (v["io"], want)
    assert v["state"] == "ok"


# -- 5: detach --force under load -------------------------------------------------
class Loader(threading.Thread):
    """Repeats one O_DIRECT request on its own fd until it fails or is told to stop."""

    def __init__(self, path: Path, kind: str, size: int, span: int, seed: int):
        super().__init__(daemon=True)
        self.path, self.kind, self.size, self.span = path, kind, size, span
        self.rng = random.Random(seed)
        self.ok = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        buf = aligned(self.size)
        buf.write(rand(self.size, (self.kind, self.size)))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        except BaseException as e:
            self.error = e
            return
        try:
            while not self.stop.is_set():
                off = self.rng.randrange(self.span // self.size) * self.size
                if self.kind == "write":
                    n = os.pwritev(fd, [buf], off)
                else:
                    n = os.preadv(fd, [buf], off)
                assert n == self.size
                self.ok += 1
        except BaseException as e:
            self.error = e
        finally:
            with contextlib.suppress(OSError):  # close reports the flush's EIO after the detach
                os.close(fd)


def test_a_detached_disk_name_cannot_be_opened_nor_created(daemon):
    """What a program that opens the disk only after a detach sees: ENOENT,
    or EPERM when it asks for O_CREAT, as fio does (the disks directory is
    managed by attach and detach only).  Not EIO: that is for handles that
    were open across the detach."""
    d = daemon
    d.cli("volume", "create", "gone", "--size", "8M")
    path = d.attach("gone")
    d.cli("detach", "gone")
    for flags, want in ((os.O_RDWR, errno.ENOENT), (os.O_RDWR | os.O_CREAT, errno.EPERM)):
        with pytest.raises(OSError) as e:
            os.open(path, flags, 0o600)
        assert e.value.errno == want, (flags, e.value)


@needs_fio
@pytest.mark.timeout(300)
def test_force_detach_under_load(daemon, tmp_path):
    d = daemon
    path = d.attach_new("fd", "64M")
    span = 48 * MiB  # the load stays below; `keep` lies above it
    keep_off, keep = 56 * MiB + 512, rand(300 * KiB, "keep")
    write_at(path, keep_off, keep)

    loaders = [Loader(path, kind, size, span, seed=i)
               for i, (kind, size) in enumerate([("write", MiB), ("write", 4096), ("read", MiB), ("read", 4096)])]
    fio = subprocess.Popen(
        fio_cmd("--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randrw",
                "--bssplit=4k/40:128k/30:1m/30", f"--size={span}", "--time_based", "--runtime=600",
                "--name=load", f"--filename={path}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    stale = os.open(path, os.O_RDWR | os.O_DIRECT)  # kept open across detach and re-attach
    try:
        for t in loaders:
            t.start()
        # Wait for the load to be under way: every loader has completed
        # requests, the daemon has served writes, and fio holds the disk open
        # (a sixth handle, beside the four loaders' and `stale`).  fio being
        # alive is not enough: started late on a busy machine, it would open
        # the disk only after the detach, and its open (O_CREAT) of a name
        # that is gone fails with EPERM (fio's "error 1"), not EIO.
        while True:
            assert all(t.error is None for t in loaders), [t.error for t in loaders]
            assert fio.poll() is None, fio.communicate()
            v = attached_status(d, "fd")
            if min(t.ok for t in loaders) >= 20 and v["io"]["writes"] >= 200 and v["open_handles"] >= 6:
                break
            time.sleep(0.05)

        p = d.cli("detach", "fd", "--force", timeout=600)  # the bound only catches a hang
        assert p.stdout.strip() == "detached fd" and "EIO" in p.stderr, p.stderr

        # every request on the open handles fails with EIO; nothing hangs
        for t in loaders:
            t.join()
            assert isinstance(t.error, OSError) and t.error.errno == errno.EIO, (t.kind, t.size, t.error)
        out, err = fio.communicate(timeout=600)
        assert fio.returncode != 0, "fio did not notice the detach"
        job = fio_json(subprocess.CompletedProcess([], fio.returncode, out, err))["jobs"][0]
        assert job["error"] == errno.EIO, (job["error"], err)  # stopped by the error, not by its runtime

        # the daemon is alive and answers, and logged no failure: no request
        # used the volume's key after it was wiped; the volume is gone
        assert d.alive, d.log
        assert "Traceback" not in d.log and " ERROR " not in d.log, d.log
        assert [v["name"] for v in d.status()["volumes"]] == []
        assert "fd" not in os.listdir(d.mountpoint)
        for what, fn in (("write", lambda: os.pwrite(stale, b"x" * 4096, 0)),
                         ("read", lambda: os.pread(stale, 4096, 0))):
            with pytest.raises(OSError) as e:
                fn()
            assert e.value.errno == errno.EIO, what

        # attach again: the data is there, I/O works, and the old handle still
        # belongs to the detached volume (EIO, not the new attachment)
        path = d.attach("fd")
        assert read_direct(path, keep_off, len(keep)) == keep
        probe = rand(4096, "after")
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            b = aligned(4096)
            b.write(probe)
            assert os.pwritev(fd, [b], 60 * MiB) == 4096
        finally:
            os.close(fd)
        assert read_direct(path, 60 * MiB, 4096) == probe
        with pytest.raises(OSError) as e:
            os.pwrite(stale, b"y" * 4096, 60 * MiB)
        assert e.value.errno == errno.EIO
        assert read_direct(path, 60 * MiB, 4096) == probe
        v = volume_status(d, "fd")
        assert v["state"] == "ok" and v["io"]["errors"] == 0 and v["open_handles"] == 0
    finally:
        for t in loaders:
            t.stop.set()
        if fio.poll() is None:
            fio.kill()
            fio.wait(10)
        with contextlib.suppress(OSError):
            os.close(stale)
    d.cli("detach", "fd")
    assert d.alive


# -- 6: snapshots under concurrent writers ------------------------------------------
SNAP_SLOTS = 64
#: the order a writer visits its slots in, again in every round: not the
#: order of their offsets, so a copy that ran while writes went on (a copy
#: not taken at one point in time) shows as a state no prefix of the writes
#: leaves
SLOT_ORDER = random.Random("slots").sample(range(SNAP_SLOTS), SNAP_SLOTS)
ROUND_POS = {j: i for i, j in enumerate(SLOT_ORDER)}  # slot -> its place in a round
MAGIC = b"EVSDPATH"
HDR = struct.Struct("<8sIIQ")  # magic, writer, sector in slot, sequence number


def slot_size(writer: int, j: int) -> int:
    """Writer 0 writes mostly 4 KiB requests (served inline), writer 1 mostly
    256 KiB ones (offloaded to the I/O pool)."""
    rare = j % 4 == 3
    if writer == 0:
        return 256 * KiB if rare else 4 * KiB
    return 4 * KiB if rare else 256 * KiB


#: SLOT_OFF[w][j]: where slot j of writer w starts in its region; the last entry is the region's size
SLOT_OFF = [[sum(slot_size(w, i) for i in range(j)) for j in range(SNAP_SLOTS + 1)] for w in (0, 1)]


def seq_block(writer: int, seq: int) -> bytes:
    """The data of write number ``seq`` of ``writer``: it goes to slot
    SLOT_ORDER[seq % SNAP_SLOTS], and every 4 KiB sector of it names the
    writer, the sequence number and its place, so a torn write shows."""
    j = SLOT_ORDER[seq % SNAP_SLOTS]
    fill = bytes([(seq * 7 + writer) & 0xFF]) * (SECTOR_SIZE - HDR.size)
    return b"".join(HDR.pack(MAGIC, writer, k, seq) + fill for k in range(slot_size(writer, j) // SECTOR_SIZE))


def slot_seq(region: bytes, writer: int, j: int) -> int | None:
    """The sequence number slot ``j`` of ``region`` holds (None: never
    written); fails on a torn or foreign slot."""
    data = region[SLOT_OFF[writer][j]:SLOT_OFF[writer][j + 1]]
    if data == bytes(len(data)):
        return None
    _, _, _, seq = HDR.unpack_from(data)
    assert SLOT_ORDER[seq % SNAP_SLOTS] == j and data == seq_block(writer, seq), f"writer {writer}: slot {j} is torn"
    return seq


def expected_seq(n_done: int, j: int) -> int | None:
    """What slot j holds after writes 0 .. n_done-1 of one writer."""
    i = ROUND_POS[j]  # slot j is written by writes i, i + SNAP_SLOTS, ...
    if n_done <= i:
        return None
    return i + (n_done - 1 - i) // SNAP_SLOTS * SNAP_SLOTS


def prefix_of(region: bytes, writer: int) -> int:
    """The number of writes whose result ``region`` shows, checking that it is
    exactly the state after some prefix of the writer's sequence."""
    seqs = [slot_seq(region, writer, j) for j in range(SNAP_SLOTS)]
    n_done = max((s for s in seqs if s is not None), default=-1) + 1
    assert seqs == [expected_seq(n_done, j) for j in range(SNAP_SLOTS)], \
        f"writer {writer}: not the state after any prefix of its writes ({n_done} written)"
    return n_done


class SeqWriter(threading.Thread):
    """Writes seq_block(writer, 0), (writer, 1), ... one after another with
    O_DIRECT, round and round a region of 4 KiB and 256 KiB slots; ``acked``
    counts the writes that had returned."""

    def __init__(self, path: Path, writer: int, base: int):
        super().__init__(daemon=True)
        self.path, self.writer, self.base = path, writer, base
        self.acked = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        buf = aligned(256 * KiB)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            try:
                seq = 0
                while not self.stop.is_set():
                    data = seq_block(self.writer, seq)
                    buf[:len(data)] = data
                    n = os.pwritev(fd, [memoryview(buf)[:len(data)]],
                                   self.base + SLOT_OFF[self.writer][SLOT_ORDER[seq % SNAP_SLOTS]])
                    assert n == len(data), (n, len(data))
                    seq += 1
                    self.acked = seq
            finally:
                os.close(fd)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.mark.timeout(150)
def test_snapshots_under_concurrent_writes_are_crash_consistent(daemon, tmp_path):
    d = daemon
    d.cli("volume", "create", "sv", "--size", "64M")
    path = d.attach("sv")
    bases = [2 * MiB, 16 * MiB]  # regions of 4.2 and 12.1 MiB
    writers = [SeqWriter(path, w, base) for w, base in enumerate(bases)]
    # The kernel holds the file's lock through a blocking O_DIRECT write, so
    # the two writers never have a write in flight at the same time; fio's
    # asynchronous writes, on a part of the disk of their own, put many at
    # the closed gate at once.
    fio = None
    if shutil.which("fio"):
        fio = subprocess.Popen(
            fio_cmd("--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randwrite",
                    "--bssplit=4k/50:256k/50", "--offset=32M", "--size=28M", "--time_based", "--runtime=5",
                    "--name=bg", f"--filename={path}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    taken = []  # (snapshot name, acked before, acked after) per writer
    try:
        for w in writers:
            w.start()
        while min(w.acked for w in writers) < SNAP_SLOTS:  # an event; a hang is pytest-timeout's
            assert all(w.error is None for w in writers), [w.error for w in writers]
            time.sleep(0.02)
        for i in range(8):
            before = [w.acked for w in writers]
            d.cli("snapshot", "create", "sv", f"s{i}", timeout=60)
            after = [w.acked for w in writers]
            taken.append((f"s{i}", before, after))
            assert all(w.is_alive() for w in writers), [w.error for w in writers]
            time.sleep(0.05 * i)
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)
        if fio is not None:
            try:
                out, err = fio.communicate(timeout=30)
            finally:
                if fio.poll() is None:
                    fio.kill()
                    fio.wait(10)
    for w in writers:
        assert not w.is_alive(), "a writer hung"
        assert w.error is None, f"writer {w.writer}: {w.error!r}"
    if fio is not None:  # every asynchronous write completed, none failed
        assert fio.returncode == 0, err
        job = fio_json(subprocess.CompletedProcess([], 0, out, err))["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0, job
    # the writers kept writing through every snapshot
    for _, before, after in taken:
        assert all(a > b for a, b in zip(after, before)), taken

    # the live volume holds the last write of every slot
    for w, base in zip(writers, bases):
        assert prefix_of(read_direct(path, base, SLOT_OFF[w.writer][-1]), w.writer) == w.acked
    v = volume_status(d, "sv")
    assert v["state"] == "ok" and v["io"]["errors"] == 0

    # every snapshot is crash-consistent: for each writer it holds exactly the
    # state after a prefix of its writes, every write acknowledged before the
    # snapshot began is in it, none started after it ended, none torn
    key = volume_key(d, "sv")
    for name, before, after in taken:
        image = d.home / "snapshots" / name / "image"
        for w, base in zip(writers, bases):
            region = reference_plaintext(image, key, base, SLOT_OFF[w.writer][-1])
            n = prefix_of(region, w.writer)
            assert before[w.writer] <= n <= after[w.writer] + 1, (name, w.writer, before, n, after)
    d.cli("detach", "sv")
