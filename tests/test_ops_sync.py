"""The synchronous FUSE handlers of evscrypt.daemon.ops, driven in-process
(no mount): getattr_sync, fsync_sync and flush_sync, which pyfuse3's worker
thread calls without the trio thread.

Their contract with the patched pyfuse3 (tests/test_pyfuse3_threads.py): a
result, a Future of it, or None to hand the request to the async handler in
the trio thread.  These tests pin down when evscrypt declines (an inode the
trio thread must answer; a snapshot holding the write gate), and that the
request counting and the gate are left balanced on every path.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import pyfuse3
import pytest
import trio

from evscrypt.daemon.attachment import Attachment
from evscrypt.daemon.kernel import FuseKernel
from evscrypt.daemon.manager import VolumeManager
from evscrypt.daemon.ops import Operations
from evscrypt.daemon.pools import Pools
from evscrypt.volumes import VolumeStore

MiB = 1 << 20


@pytest.fixture
def setup(tmp_path):
    """An Operations over a manager with one unencrypted volume attached
    (inode 2) and open (handle 7), on a real image file."""
    store = VolumeStore(tmp_path / "home")
    store.create("v", MiB, encrypted=False)
    pools = Pools.sized(4)
    m = VolumeManager(store, tmp_path / "disks", FuseKernel(), pools)
    ops = Operations(m)
    vol = store.open_volume("v")
    a = Attachment(name="v", vol=vol, engine=vol.engine(), owner=0, inode=2)
    m.by_name["v"] = m.by_inode[2] = a
    ops._handles[7] = a
    a.opened = 1
    try:
        yield ops, m, a
    finally:
        pools.close()
        a.close()


def balanced(a: Attachment) -> bool:
    return a.inflight == 0 and a.gate.active == 0


def fuse_errno(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as e:
        call()
    return e.value.errno


def test_getattr_sync_answers_attached_volumes_and_declines_the_rest(setup):
    ops, m, a = setup
    attr = ops.getattr_sync(2)
    assert (attr.st_ino, attr.st_size, attr.st_blocks) == (2, MiB, MiB // 512)
    assert ops.getattr_sync(pyfuse3.ROOT_INODE).st_ino == pyfuse3.ROOT_INODE
    assert ops.getattr_sync(99) is None  # unknown: ENOENT comes from the async getattr
    # force-detached with a handle still open: the async getattr answers EIO
    m.by_inode.pop(2)
    m.by_name.pop("v")
    a.mark_detached()
    m.zombies[2] = a
    assert ops.getattr_sync(2) is None
    with pytest.raises(pyfuse3.FUSEError) as e:
        trio.run(ops.getattr, 2)
    assert e.value.errno == errno.EIO


def test_getattr_sync_shows_a_resize_whole(setup):
    """A resize replaces the header: the size and the block count agree."""
    ops, m, a = setup
    m._grow(a, dataclasses.replace(a.header, size=3 * MiB))  # what resize does, in its worker thread
    attr = ops.getattr_sync(2)
    assert (attr.st_size, attr.st_blocks) == (3 * MiB, 3 * MiB // 512)


def test_fsync_sync_runs_in_the_pool_and_counts(setup):
    ops, m, a = setup
    for datasync in (False, True):
        fut = ops.fsync_sync(7, datasync)
        assert fut.result(timeout=30) is True
    assert a.counters.fsyncs == 2 and a.counters.errors == 0 and balanced(a)


def test_fsync_sync_declines_while_a_snapshot_holds_the_gate(setup):
    """With the gate closed the request goes to the async fsync, which waits
    for the gate; fsync_sync leaves no count behind."""
    ops, m, a = setup

    async def main():
        async with a.gate.quiesce():
            assert ops.fsync_sync(7, False) is None
            assert balanced(a)
        assert ops.fsync_sync(7, False).result(timeout=30) is True

    trio.run(main)
    assert a.counters.fsyncs == 1 and balanced(a)


def test_fsync_sync_failure_is_an_errno_and_leaves_the_gate(setup):
    ops, m, a = setup
    r, w = os.pipe()  # fsync of a pipe fails with EINVAL
    a.engine.fd = r
    try:
        fut = ops.fsync_sync(7, False)
        with pytest.raises(pyfuse3.FUSEError) as e:
            fut.result(timeout=30)
        assert e.value.errno == errno.EINVAL
    finally:
        a.engine.fd = a.fd
        os.close(r)
        os.close(w)
    assert a.counters.errors == 1 and a.counters.fsyncs == 0 and balanced(a)
    assert a.failed is None  # not an I/O error of the image: the volume stays usable
    assert ops.fsync_sync(7, True).result(timeout=30) is True


def test_fsync_and_flush_sync_after_detach_or_failure_give_eio(setup):
    ops, m, a = setup
    assert ops.flush_sync(7) is True
    a.failed = "the image went away"
    assert fuse_errno(lambda: ops.fsync_sync(7, False)) == errno.EIO
    assert fuse_errno(lambda: ops.flush_sync(7)) == errno.EIO
    a.failed = None
    a.mark_detached()
    assert fuse_errno(lambda: ops.fsync_sync(7, False)) == errno.EIO
    assert fuse_errno(lambda: ops.flush_sync(7)) == errno.EIO
    assert fuse_errno(lambda: ops.fsync_sync(8, False)) == errno.EIO  # no such handle
    assert balanced(a) and a.counters.fsyncs == 0
