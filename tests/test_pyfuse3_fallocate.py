"""fallocate(2) on a real pyfuse3 mount reaches Operations.fallocate.

Stock pyfuse3 3.5.0 never registers the FUSE fallocate op, so the kernel gets
ENOSYS and every fallocate(2) fails with EOPNOTSUPP.  scripts/build-pyfuse3.sh
installs a patched build (patches/pyfuse3-3.5.0-fallocate.patch); these tests
mount a tiny in-memory pyfuse3 filesystem in a subprocess and check that
punch-hole, zero-range and mode 0 reach Python with the caller's exact mode,
offset and length, and that the errno the handler raises comes back to the
caller (EOPNOTSUPP: that call only; ENOSYS: the kernel stops asking).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fuse_attrs

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 is missing"),
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SIZE = 1 << 20
#: The handler answers this length with FUSEError(EOPNOTSUPP).
REJECT_LENGTH = 12345

def pattern(size: int = SIZE) -> bytes:
    """The file's initial contents: no zero bytes, so zeroed ranges stand out."""
    return bytes(i % 251 + 1 for i in range(size))


#: The filesystem, run as a script; fuse_attrs.py goes first (its source, so
#: the script needs nothing from this directory, whichever interpreter runs it).
DAEMON = inspect.getsource(fuse_attrs) + textwrap.dedent(
    r'''
    import errno, json, os, stat, sys, time
    import pyfuse3, trio

    mountpoint, log_path, flavour, size, reject_length = sys.argv[1:6]
    size, reject_length = int(size), int(reject_length)
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
    NAME, INO = b"data", pyfuse3.ROOT_INODE + 1
    log = open(log_path, "a", buffering=1)

    def record(**kw):
        log.write(json.dumps(kw) + "\n")

    class Fs(pyfuse3.Operations):
        enable_writeback_cache = False

        def __init__(self):
            super().__init__()
            self.data = bytearray(i % 251 + 1 for i in range(size))
            self.next_fh = 10

        def _attr(self, ino):
            return entry_attrs(ino, len(self.data))

        async def getattr(self, ino, ctx=None):
            if ino not in (pyfuse3.ROOT_INODE, INO):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def lookup(self, parent, name, ctx=None):
            if parent != pyfuse3.ROOT_INODE or name != NAME:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(INO)

        async def setattr(self, ino, attr, fields, fh, ctx):
            if fields.update_size:
                del self.data[attr.st_size:]
                self.data.extend(bytes(attr.st_size - len(self.data)))
            return self._attr(ino)

        async def opendir(self, ino, ctx):
            return ino

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, NAME, self._attr(INO), 1)

        async def releasedir(self, fh):
            pass

        async def open(self, ino, flags, ctx):
            if ino != INO:
                raise pyfuse3.FUSEError(errno.EISDIR)
            self.next_fh += 1
            record(op="open", fh=self.next_fh)
            return pyfuse3.FileInfo(fh=self.next_fh)

        async def read(self, fh, off, size):
            return bytes(self.data[off:off + size])

        async def write(self, fh, off, buf):
            if off > len(self.data):
                self.data.extend(bytes(off - len(self.data)))
            self.data[off:off + len(buf)] = buf
            return len(buf)

        async def flush(self, fh):
            pass

        async def release(self, fh):
            pass

        async def fallocate(self, fh, mode, offset, length):
            record(op="fallocate", fh=fh, mode=mode, offset=offset, length=length)
            if flavour == "enosys":
                raise pyfuse3.FUSEError(errno.ENOSYS)
            if length == reject_length:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            end = offset + length
            if not mode & FALLOC_FL_KEEP_SIZE and end > len(self.data):
                self.data.extend(bytes(end - len(self.data)))
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                end = min(end, len(self.data))
                if offset < end:
                    self.data[offset:end] = bytes(end - offset)

    ops = Fs()
    opts = set(pyfuse3.default_options)
    opts.add("fsname=falloctest")
    pyfuse3.init(ops, mountpoint, opts)
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)
    '''
)


class Mount:
    """The daemon subprocess and what its fallocate handler has seen."""

    def __init__(self, tmp_path: Path, flavour: str):
        self.dir = tmp_path / f"mnt-{flavour}"
        self.dir.mkdir()
        self.file = self.dir / "data"
        self.log = tmp_path / f"calls-{flavour}.jsonl"
        self.log.touch()
        self.stderr = tmp_path / f"daemon-{flavour}.err"
        script = tmp_path / "falloc_daemon.py"
        script.write_text(DAEMON)
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(self.dir), str(self.log), flavour,
                 str(SIZE), str(REJECT_LENGTH)],
                stdout=err, stderr=err,
            )
        self._seen = 0
        deadline = time.monotonic() + 120  # only catches a hang: a busy machine starts slowly
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.stderr.read_text()}")
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"mount did not appear:\n{self.stderr.read_text()}")
            time.sleep(0.05)

    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def new_calls(self) -> list[dict]:
        """fallocate calls since the previous new_calls()."""
        entries = self.entries()
        new, self._seen = entries[self._seen:], len(entries)
        return [{k: v for k, v in e.items() if k != "op"} for e in new if e["op"] == "fallocate"]

    def last_fh(self) -> int:
        return [e["fh"] for e in self.entries() if e["op"] == "open"][-1]

    def close(self) -> None:
        if os.path.ismount(self.dir):
            subprocess.run(["fusermount3", "-u", str(self.dir)], check=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], check=False)


def _mount(tmp_path, flavour):
    m = Mount(tmp_path, flavour)
    try:
        yield m
    finally:
        m.close()
    assert m.proc.returncode == 0, f"daemon failed ({m.proc.returncode}):\n{m.stderr.read_text()}"


@pytest.fixture
def mount(tmp_path):
    yield from _mount(tmp_path, "normal")


@pytest.fixture
def enosys_mount(tmp_path):
    yield from _mount(tmp_path, "enosys")


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def util_fallocate(*args: str) -> None:
    if shutil.which("fallocate") is None:
        pytest.skip("fallocate(1) from util-linux is missing")
    r = subprocess.run(["fallocate", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"fallocate {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")


def zeroed(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + bytes(end - start) + data[end:]


def test_pyfuse3_has_fallocate_handler():
    import pyfuse3

    assert hasattr(pyfuse3.Operations, "fallocate"), (
        "pyfuse3 has no fallocate handler: run scripts/build-pyfuse3.sh "
        f"{sys.prefix}")


def test_punch_hole_ctypes(mount):
    expect = pattern()
    fd = os.open(mount.file, os.O_RDWR)
    try:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        fallocate(fd, mode, 3 * 4096, 2 * 4096)
        expect = zeroed(expect, 3 * 4096, 5 * 4096)
        assert mount.new_calls() == [
            dict(fh=mount.last_fh(), mode=mode, offset=3 * 4096, length=2 * 4096)]
        # Unaligned: FUSE hands the range over byte-exact.
        fallocate(fd, mode, 100_001, 3_333)
        expect = zeroed(expect, 100_001, 103_334)
        assert mount.new_calls() == [
            dict(fh=mount.last_fh(), mode=mode, offset=100_001, length=3_333)]
        # Same fd: the kernel must have dropped its cached pages of the range.
        assert os.pread(fd, SIZE, 0) == expect
        # 64-bit offsets survive the trip (past EOF: nothing to punch).
        fallocate(fd, mode, 5 << 30, 1 << 33)
        assert mount.new_calls() == [
            dict(fh=mount.last_fh(), mode=mode, offset=5 << 30, length=1 << 33)]
    finally:
        os.close(fd)
    assert mount.file.read_bytes() == expect
    assert mount.file.stat().st_size == SIZE


def test_punch_hole_util_linux(mount):
    util_fallocate("--punch-hole", "--offset", "65536", "--length", "131072", str(mount.file))
    assert mount.new_calls() == [
        dict(fh=mount.last_fh(), mode=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
             offset=65536, length=131072)]
    assert mount.file.read_bytes() == zeroed(pattern(), 65536, 196608)
    assert mount.file.stat().st_size == SIZE


def test_zero_range(mount):
    util_fallocate("--zero-range", "--offset", "8192", "--length", "4096", str(mount.file))
    assert mount.new_calls() == [
        dict(fh=mount.last_fh(), mode=FALLOC_FL_ZERO_RANGE, offset=8192, length=4096)]
    expect = zeroed(pattern(), 8192, 12288)
    assert mount.file.read_bytes() == expect

    with open(mount.file, "r+b") as f:
        fallocate(f.fileno(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 500_000, 77)
        assert mount.new_calls() == [
            dict(fh=mount.last_fh(), mode=FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                 offset=500_000, length=77)]
        expect = zeroed(expect, 500_000, 500_077)
        assert os.pread(f.fileno(), SIZE, 0) == expect
    assert mount.file.stat().st_size == SIZE


def test_mode_0_allocates_and_extends(mount):
    fd = os.open(mount.file, os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 4096)  # inside the file: no change
        assert mount.new_calls() == [dict(fh=mount.last_fh(), mode=0, offset=0, length=4096)]
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)
    util_fallocate("--offset", str(SIZE - 4096), "--length", str(SIZE), str(mount.file))
    assert mount.new_calls() == [
        dict(fh=mount.last_fh(), mode=0, offset=SIZE - 4096, length=SIZE)]
    assert mount.file.stat().st_size == 2 * SIZE - 4096
    assert mount.file.read_bytes() == pattern() + bytes(SIZE - 4096)


def test_eopnotsupp_fails_only_that_call(mount):
    """EOPNOTSUPP is the errno for "not this mode/range": the kernel passes it
    to the caller and keeps sending later fallocate requests."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    fd = os.open(mount.file, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            fallocate(fd, mode, 0, REJECT_LENGTH)
        assert exc.value.errno == errno.EOPNOTSUPP
        fallocate(fd, mode, 0, 4096)
        assert mount.new_calls() == [
            dict(fh=mount.last_fh(), mode=mode, offset=0, length=REJECT_LENGTH),
            dict(fh=mount.last_fh(), mode=mode, offset=0, length=4096)]
    finally:
        os.close(fd)
    assert mount.file.read_bytes() == zeroed(pattern(), 0, 4096)


def test_enosys_disables_fallocate_for_the_mount(enosys_mount):
    """ENOSYS means "no fallocate at all": the caller sees EOPNOTSUPP and the
    kernel never sends fallocate to this daemon again."""
    m = enosys_mount
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    fd = os.open(m.file, os.O_RDWR)
    try:
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                fallocate(fd, mode, 0, 4096)
            assert exc.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as exc:
            fallocate(fd, 0, 0, 4096)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert m.new_calls() == [dict(fh=m.last_fh(), mode=mode, offset=0, length=4096)]
    assert m.file.read_bytes() == pattern()


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="upstream's FUSE tests mount as root here")
def test_the_patchs_own_upstream_test_passes(tmp_path):
    """The patch carries its test in upstream's form (test/test_fs.py,
    test_fallocate): apply the patch alone to the pinned sdist and run that
    test, with upstream's own harness, against the installed build."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    script = (root / "scripts" / "build-pyfuse3.sh").read_text()
    version = re.search(r"^PATCHED_FOR=(\S+)$", script, re.M).group(1)
    sha256 = re.search(r"^SDIST_SHA256=(\S+)$", script, re.M).group(1)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-binary", "pyfuse3", "-d", str(tmp_path), f"pyfuse3=={version}"], check=True, timeout=300,
                   capture_output=True)
    sdist = tmp_path / f"pyfuse3-{version}.tar.gz"
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == sha256
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(tmp_path)], check=True)
    src = tmp_path / f"pyfuse3-{version}"
    with open(root / "patches" / f"pyfuse3-{version}-fallocate.patch", "rb") as f:
        subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(src)], stdin=f, check=True,
                       capture_output=True)
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--installed", "-q",
                        "test_fs.py::test_fallocate"], cwd=src / "test", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "1 passed" in p.stdout
