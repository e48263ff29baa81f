"""evscrypt.daemon.attachment in-process (no mount): the range rules of a
disk, the counters, and the rule that a detached volume answers EIO, on
both calling conventions (FUSE worker threads and the trio thread).

A storage error that fails the volume is shown end to end, on a real image
that stops being readable, in tests/test_faults.py."""

from __future__ import annotations

import pytest
import trio

from evscrypt.daemon.attachment import Attachment
from evscrypt.errors import NoSpace, StorageError
from evscrypt.volumes import VolumeStore

MiB = 1 << 20


@pytest.fixture
def att(tmp_path):
    store = VolumeStore(tmp_path / "home")
    store.create("v", MiB, encrypted=True)
    vol = store.open_volume("v")
    a = Attachment(name="v", vol=vol, engine=vol.engine(), owner=0, inode=2)
    try:
        yield a
    finally:
        a.close()


def io(a: Attachment) -> dict:
    return vars(a.counters).copy()


def test_worker_path_reads_and_writes_within_the_disk(att):
    a = att
    buf = a.enter_write(MiB - 4096, b"x" * 8192)  # cut at the end of the disk
    assert len(buf) == 4096
    assert a.finish_write(MiB - 4096, buf) == 4096
    assert bytes(a.read(MiB - 4096, 8192)) == b"x" * 4096  # short at the end
    assert a.read(MiB, 4096) == b""  # past it: empty
    with pytest.raises(NoSpace):
        a.enter_write(MiB, b"y" * 4096)  # a disk never grows
    c = io(a)
    assert (c["writes"], c["bytes_written"], c["reads"], c["bytes_read"]) == (1, 4096, 2, 4096)
    assert a.inflight == 0 and a.gate.active == 0


def test_trio_path_counts_like_the_worker_path(att):
    a = att
    lim = trio.CapacityLimiter(2)

    async def main():
        assert await a.write_async(0, b"z" * 8192, lim) == 8192
        assert bytes(await a.read_async(4096, 4096, lim)) == b"z" * 4096
        await a.fsync_async(True, lim)
        await a.discard_async(0, 4096, lim)
        await a.discard_async(MiB, 4096, lim)  # past the end: nothing to do, nothing counted
        with pytest.raises(NoSpace):
            await a.write_async(MiB, b"y", lim)

    trio.run(main)
    c = io(a)
    assert (c["writes"], c["bytes_written"], c["reads"], c["fsyncs"], c["discards"], c["errors"]) == \
        (1, 8192, 1, 1, 1, 0)
    assert bytes(a.read(0, 4096)) == bytes(4096)  # the discarded sector reads as zeros
    assert a.inflight == 0 and a.gate.active == 0


def test_a_closed_gate_turns_worker_writes_away_uncounted(att):
    a = att

    async def main():
        async with a.gate.quiesce():
            assert a.enter_write(0, b"w" * 4096) is None
            assert a.enter_fsync() is False
            assert a.inflight == 0 and a.gate.active == 0
        buf = a.enter_write(0, b"w" * 4096)
        a.finish_write(0, buf)

    trio.run(main)
    assert a.counters.writes == 1 and a.inflight == 0 and a.gate.active == 0


def test_detached_or_failed_volumes_refuse_every_request(att):
    a = att
    lim = trio.CapacityLimiter(1)
    a.failed = "the image went away"
    assert not a.usable
    for call in (lambda: a.read(0, 4096), lambda: a.enter_write(0, b"w"), a.enter_fsync,
                 lambda: trio.run(a.write_async, 0, b"w", lim)):
        with pytest.raises(StorageError):
            call()
    a.failed = None
    a.mark_detached()
    with pytest.raises(StorageError):
        a.read(0, 4096)
    assert a.inflight == 0 and a.gate.active == 0 and io(a)["errors"] == 0
