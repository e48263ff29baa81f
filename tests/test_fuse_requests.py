"""The FUSE requests that the data path costs, counted by the daemon itself.

`status --json` shows, under ``fuse_requests``, every request the daemon
has read from /dev/fuse, by opcode (pyfuse3.request_counts(), from
patches/pyfuse3-3.5.0-threads.patch).  With reads and writes mixed, the
kernel used to ask for the file's attributes (GETATTR) before nearly every
read, because each write marks them stale and libfuse's default
auto_inval_data revalidates them on every read; each GETATTR went through
the trio thread.  The daemon now turns auto_inval_data off, and answers the
GETATTR, FSYNC and FLUSH that remain from the worker thread.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess

import pytest

from daemon_fixture import daemon, make_daemon, needs_fio, read_direct  # noqa: F401

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def fuse_requests(d) -> dict[str, int]:
    return d.client(timeout=30).status()["fuse_requests"]


def since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}


@needs_fio
@pytest.mark.timeout(180)
def test_mixed_reads_and_writes_cost_no_getattr_per_read(daemon, tmp_path):
    """fio 4k randrw 70/30 at queue depth 16, verified: the daemon receives
    one READ per read and one WRITE per write, and hardly any GETATTR (before
    the fix, one for most reads: about 0.3-0.7 per READ)."""
    d = daemon
    d.cli("volume", "create", "m", "--size", "64M")
    path = d.attach("m")
    before = fuse_requests(d)
    p = subprocess.run(
        ["fio", "--output-format=json", "--verify_state_save=0", "--name=mixed", f"--filename={path}",
         "--ioengine=libaio", "--direct=1", "--iodepth=16", "--rw=randrw", "--rwmixread=70", "--bs=4k",
         "--size=32M", "--randrepeat=0", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=150)
    n = since(before, fuse_requests(d))
    assert p.returncode == 0, f"fio exited {p.returncode}:\n{p.stderr}\n{p.stdout[-3000:]}"
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    reads, writes = job["read"]["total_ios"], job["write"]["total_ios"]
    # the mixed phase, then the verify pass reads back every written block
    assert reads + writes > 8192 and writes > 1000, (reads, writes)
    assert n["READ"] == reads and n["WRITE"] == writes, (n, reads, writes)
    assert n.get("GETATTR", 0) * 50 < n["READ"], n
    d.cli("detach", "m")


def test_each_request_is_counted_and_served(daemon):
    """Exact counts for a known sequence of calls on the disk file, and the
    volume's own counters agree (fsync is served by fsync_sync)."""
    d = daemon
    d.cli("volume", "create", "c", "--size", "4M")
    path = d.attach("c")
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        before = fuse_requests(d)
        buf = mmap.mmap(-1, 4096)
        buf.write(b"c" * 4096)
        for i in range(6):
            assert os.pwrite(fd, buf, i * 4096) == 4096
        for i in range(9):
            assert os.preadv(fd, [buf], (i % 6) * 4096) == 4096
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(os.dup(fd))  # a close: FLUSH
        after = fuse_requests(d)
    finally:
        os.close(fd)
    n = since(before, after)
    assert (n["WRITE"], n["READ"], n["FSYNC"], n["FLUSH"]) == (6, 9, 2, 1), n
    # and at most the kernel's one look for security.capability before the
    # first write (answered ENOSYS: it never asks again)
    assert set(n) <= {"WRITE", "READ", "FSYNC", "FLUSH", "GETATTR", "GETXATTR"}, n
    assert n.get("GETXATTR", 0) <= 1, n
    io = next(v["io"] for v in d.status()["volumes"] if v["name"] == "c")
    assert (io["writes"], io["reads"], io["fsyncs"], io["errors"]) == (6, 9, 2, 0), io
    assert read_direct(path, 0, 6 * 4096) == b"c" * 6 * 4096
    d.cli("detach", "c")


def test_force_detached_handle_gets_eio_from_every_sync_handler(daemon):
    """After detach --force, an open handle's fstat (GETATTR: the worker
    declines, the trio thread answers), fsync and close (FLUSH) fail with EIO."""
    d = daemon
    d.cli("volume", "create", "z", "--size", "1M")
    path = d.attach("z")
    fd = os.open(path, os.O_RDWR)
    closed = False
    try:
        assert os.fstat(fd).st_size == MiB
        d.cli("detach", "z", "--force")
        before = fuse_requests(d)
        for call in (lambda: os.fstat(fd), lambda: os.fsync(fd)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EIO
        closed = True
        with pytest.raises(OSError) as e:
            os.close(fd)
        assert e.value.errno == errno.EIO
        n = since(before, fuse_requests(d))
        assert n.get("GETATTR", 0) >= 1 and n["FSYNC"] == 1 and n["FLUSH"] == 1, n
    finally:
        if not closed:
            os.close(fd)

