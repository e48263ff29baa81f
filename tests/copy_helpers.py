"""Helpers for the snapshot, image, backup and resize tests: data patterns,
writes through a FUSE disk, reads that bypass the page cache (so the bytes
come from the daemon), the data area of an image, and leftovers of
interrupted operations."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from pathlib import Path

from daemon_fixture import expect_fail, pwrite_all, rand, read_direct  # noqa: F401  (re-exported for the copy tests)
from evscrypt.image import header as hdr
from evscrypt.paths import TEMP_AREAS

MiB = 1 << 20
SECTOR = 4096


def pattern(seed, layout: list[tuple[int, int]]) -> dict[int, bytes]:
    """{offset: data} for (offset, length) pairs, with reproducible random data."""
    return {off: rand(n, (seed, off)) for off, n in layout}


def write_sync(path: Path, writes: dict[int, bytes]) -> None:
    """Write every piece through ``path`` (a FUSE disk) and fsync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, data in writes.items():
            pwrite_all(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)



def assert_reads(path: Path, writes: dict[int, bytes], zeros: list[tuple[int, int]] = ()) -> None:
    """Every piece reads back identically through ``path``; ``zeros`` ranges read as zeros."""
    for off, data in writes.items():
        got = read_direct(path, off, len(data))
        assert got == data, f"{path}: bytes at {off}+{len(data)} differ"
    for off, n in zeros:
        assert read_direct(path, off, n) == bytes(n), f"{path}: {off}+{n} should read as zeros"


def header_of(image: Path) -> hdr.Header:
    fd = os.open(image, os.O_RDONLY)
    try:
        return hdr.load(fd).header
    finally:
        os.close(fd)


def data_area(image: Path, off: int = 0, length: int | None = None) -> bytes:
    """Bytes of the stored data area (ciphertext of an encrypted volume)."""
    h = header_of(image)
    length = h.size - off if length is None else length
    with open(image, "rb") as f:
        f.seek(h.data_offset + off)
        data = f.read(length)
    return data + bytes(length - len(data))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def leftovers(*dirs: Path) -> list[str]:
    """Hidden temporary entries (what an interrupted build would leave) in ``dirs``."""
    out = []
    for d in dirs:
        if Path(d).is_dir():
            out += [str(Path(d) / n) for n in os.listdir(d) if n.startswith(".")]
    return out


def state_leftovers(home: Path) -> list[str]:
    return leftovers(*(home / area for area in TEMP_AREAS))


def cli_json(d, *args) -> object:
    return json.loads(d.cli(*args, "--json").stdout)


def _default_sigint() -> None:
    """In the child: SIGINT back to its default.  A suite started in the
    background (`make test &`, CI) inherits SIGINT ignored, as shells do for
    background jobs, and a CLI that ignores it would never see the Ctrl-C the
    tests send it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_cli(d, *args: str) -> subprocess.Popen:
    from daemon_fixture import EVSCRYPT

    return subprocess.Popen([EVSCRYPT, *map(str, args)], env=d.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def open_fifo_writer(path: Path, proc: subprocess.Popen) -> int:
    """Open the FIFO ``path`` for writing once ``proc`` has opened it for
    reading: the event that says ``proc`` has got exactly that far.  Returns
    a blocking fd.  Fails if ``proc`` ends first."""
    import errno
    import fcntl
    import time

    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        else:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return fd
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the command ended (exit {proc.returncode}) before it opened {path}: {err}")
        time.sleep(0.002)
