"""The backing-store contract, run on both stores (local files and a real
Ceph RBD pool), and the RBD store's multi-host behaviour: the exclusive
attach lock between two RADOS clients in two processes, refusal to break a
live holder's lock, breaking and fencing a dead (killed or hung) one, and
the catalog's compare-and-swap under two concurrent writers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from evscrypt.errors import AlreadyExists, Busy, NotFound
from evscrypt.store.local import LocalStore

PEER = Path(__file__).resolve().parent / "store_peer.py"
MiB = 1 << 20


class Peer:
    """store_peer.py in its own process: another host."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(PEER), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        out = self.proc.stdout.readline().strip()
        assert out, f"peer exited (status {self.proc.poll()})"
        return out

    def do(self, line: str) -> str:
        self.send(line)
        return self.answer()

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(params=["local", "rbd"])
def kind(request):
    return request.param


@pytest.fixture
def stores(kind, tmp_path, request):
    """make(client) -> a store, and peer_argv(client) -> the argv of a
    store_peer on the same store (another host, for RBD another RADOS client)."""
    opened = []
    if kind == "local":
        root = tmp_path / "store"

        def make(client="hosta"):
            s = LocalStore(root)
            opened.append(s)
            return s

        def argv(client="hostb"):
            return ["local", str(root)]
    else:
        from evscrypt.store.rbd import RBDStore

        cluster = request.getfixturevalue("ceph_cluster")
        ns = request.getfixturevalue("rbd_namespace")

        def make(client="hosta", **kw):
            s = RBDStore(cluster.pool, namespace=ns, client=client, conf=cluster.conf, **kw)
            opened.append(s)
            return s

        def argv(client="hostb"):
            return ["rbd", cluster.conf, cluster.pool, ns, client]
    yield make, argv
    for s in opened:
        s.close()


@pytest.fixture
def bstore(stores):
    return stores[0]()


@pytest.fixture
def peers():
    made = []

    def start(argv):
        p = Peer(argv)
        made.append(p)
        return p

    yield start
    for p in made:
        p.close()


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- the contract, on both stores ---------------------------------------------------

def test_create_read_write(bstore):
    with bstore.create("v1", 4 * MiB) as img:
        assert img.size() == 4 * MiB
        buf = bytearray(b"\xff" * 8192)
        img.pread_into(buf, 0)
        assert buf == bytes(8192), "a new image reads as zeros"
        data = pattern(3 * 4096, 1)
        img.pwrite(bytearray(data), MiB + 4096)
        img.flush()
    with bstore.open("v1") as img:
        buf = bytearray(3 * 4096)
        img.pread_into(buf, MiB + 4096)
        assert buf == data
        tail = bytearray(b"\xff" * 8192)
        img.pread_into(tail, 4 * MiB - 4096)  # half of it lies past the end
        assert tail == bytes(8192)
    assert bstore.names() == ["v1"] and bstore.exists("v1") and not bstore.exists("v2")


def test_build_under_a_temporary_name(bstore):
    from evscrypt.errors import InvalidArgument
    from evscrypt.store.base import temp_name

    tmp = temp_name("v1")
    with bstore.create(tmp, MiB) as img:
        img.pwrite(pattern(4096, 2), 0)
        assert bstore.names() == [], "a temporary image is not listed"
    bstore.rename(tmp, "v1")
    assert bstore.names() == ["v1"]
    for bad in (".v1", ".v1.tmp-xyz", "../v1", ".a/b.tmp-0123abcd"):
        with pytest.raises(InvalidArgument):
            bstore.create(bad, MiB)


def test_data_extents(bstore):
    with bstore.create("v1", 16 * MiB) as img:
        img.pwrite(pattern(4096, 1), 5 * MiB)
        ext = list(img.data_extents(0, 16 * MiB))
        covered = [(o, n) for o, n in ext if o <= 5 * MiB < o + n]
        assert covered, "the written block lies in an extent"
        assert sum(n for _, n in ext) < 16 * MiB, "holes are left out"
        assert all(0 <= o and o + n <= 16 * MiB for o, n in ext)
        assert list(img.data_extents(8 * MiB, 16 * MiB)) == []


def test_create_existing_and_open_missing(bstore):
    bstore.create("v1", MiB).close()
    with pytest.raises(AlreadyExists):
        bstore.create("v1", MiB)
    with pytest.raises(NotFound):
        bstore.open("nope")


def test_aio_round_trip(bstore):
    with bstore.create("v1", 4 * MiB) as img:
        writes = [img.aio_write(pattern(65536, i), i * 65536) for i in range(16)]
        assert [w.wait() for w in writes] == [None] * 16
        reads = [img.aio_read(i * 65536, 65536) for i in range(16)]
        assert all(r.wait() == pattern(65536, i) for i, r in enumerate(reads))


def test_aio_completions_are_called(bstore):
    """The form the daemon uses: each request calls done(data, error) once
    it has finished, in whichever thread the store completes it."""
    import threading

    got, finished = {}, threading.Semaphore(0)

    def done(key):
        def call(data, error):
            got[key] = (data, error)
            finished.release()
        return call

    with bstore.create("v1", 4 * MiB) as img:
        for i in range(8):
            img.aio_write(pattern(4096, i), i * 4096, done(("w", i)))
        for _ in range(8):
            finished.acquire()
        for i in range(8):
            img.aio_read(i * 4096, 4096, done(("r", i)))
        for _ in range(8):
            finished.acquire()
    assert all(got[("w", i)] == (None, None) for i in range(8))
    assert all(got[("r", i)] == (pattern(4096, i), None) for i in range(8))


def test_a_failed_aio_request_reports_its_error(bstore):
    """A write the store refuses (read-only here) reaches done() as the
    evscrypt error, not as an exception in the caller."""
    import threading

    from evscrypt.errors import StorageError

    bstore.create("v1", MiB).close()
    out, finished = [], threading.Event()
    with bstore.open("v1") as img:  # read-only
        img.aio_write(bytes(4096), 0, lambda data, error: (out.append(error), finished.set()))
        finished.wait(60)
    assert len(out) == 1 and isinstance(out[0], StorageError), out


def test_discard_reads_zeros(bstore):
    with bstore.create("v1", 4 * MiB) as img:
        img.pwrite(pattern(MiB, 3), MiB)
        img.discard(MiB + 8192, 65536)
        buf = bytearray(MiB)
        img.pread_into(buf, MiB)
        want = bytearray(pattern(MiB, 3))
        want[8192:8192 + 65536] = bytes(65536)
        assert buf == want


def test_resize_grows_with_zeros(bstore):
    with bstore.create("v1", MiB) as img:
        img.pwrite(pattern(4096, 5), MiB - 4096)
        img.resize(3 * MiB)
        assert img.size() == 3 * MiB
        buf = bytearray(2 * MiB + 4096)
        img.pread_into(buf, MiB - 4096)
        assert buf[:4096] == pattern(4096, 5) and buf[4096:] == bytes(2 * MiB)


def test_rename_never_replaces(bstore):
    bstore.create("a", MiB).close()
    bstore.create("b", MiB).close()
    with pytest.raises(AlreadyExists):
        bstore.rename("a", "b")
    bstore.rename("a", "c")
    assert bstore.names() == ["b", "c"]
    with pytest.raises(NotFound):
        bstore.rename("a", "d")


def test_lock_conflicts_and_names_the_holder(bstore):
    bstore.create("v1", MiB).close()
    a = bstore.open("v1", write=True)
    b = bstore.open("v1", write=True)
    try:
        a.lock("host A pid 1")
        with pytest.raises(Busy, match="locked by") as e:
            b.lock("host B")
        holder = bstore.holder("v1")
        assert holder is not None and holder.owner in e.value.message
        with pytest.raises(Busy):
            bstore.delete("v1")
        a.unlock()
        assert bstore.holder("v1") is None
        b.lock("host B")
        assert bstore.holder("v1") is not None
    finally:
        a.close()
        b.close()
    assert bstore.holder("v1") is None, "close releases the lock"
    bstore.delete("v1")
    assert bstore.names() == []


def test_snapshot_and_clone(bstore):
    with bstore.create("v1", 2 * MiB) as img:
        img.pwrite(pattern(MiB, 1), 0)
    bstore.snapshot("v1", "s1")
    with bstore.open("v1", write=True) as img:
        img.pwrite(pattern(MiB, 2), 0)
    assert bstore.snapshots("v1") == ["s1"]
    with bstore.open("v1", snapshot="s1") as snap:
        buf = bytearray(MiB)
        snap.pread_into(buf, 0)
        assert buf == pattern(MiB, 1), "the snapshot keeps the old contents"
    bstore.clone("v1", "s1", "c1")
    with bstore.open("c1", write=True) as c:
        c.pwrite(pattern(4096, 9), MiB)
    bstore.delete("v1")  # the clone outlives its parent and the snapshot
    assert bstore.names() == ["c1"]
    with bstore.open("c1") as c:
        buf = bytearray(MiB + 4096)
        c.pread_into(buf, 0)
        assert buf[:MiB] == pattern(MiB, 1) and buf[MiB:] == pattern(4096, 9)
    bstore.delete("c1")
    assert bstore.names() == []


def test_delete_snapshot(bstore):
    bstore.create("v1", MiB).close()
    bstore.snapshot("v1", "s1")
    bstore.snapshot("v1", "s2")
    bstore.delete_snapshot("v1", "s1")
    assert bstore.snapshots("v1") == ["s2"]
    with pytest.raises(NotFound):
        bstore.delete_snapshot("v1", "s1")


def test_export_is_the_image_sparse(bstore, tmp_path):
    with bstore.create("v1", 16 * MiB) as img:
        img.pwrite(pattern(8192, 4), 0)
        img.pwrite(pattern(4096, 6), 9 * MiB)
    bstore.snapshot("v1", "s1")
    with bstore.open("v1", write=True) as img:
        img.pwrite(pattern(4096, 8), 0)
    dest = tmp_path / "out.img"
    bstore.export("v1", dest, snapshot="s1")
    data = dest.read_bytes()
    want = bytearray(16 * MiB)
    want[0:8192] = pattern(8192, 4)
    want[9 * MiB:9 * MiB + 4096] = pattern(4096, 6)
    assert data == want
    assert os.stat(dest).st_blocks * 512 < 2 * MiB, "holes stay holes"
    with pytest.raises(AlreadyExists):
        bstore.export("v1", dest)


def test_catalog_compare_and_swap(bstore):
    cat = bstore.catalog()
    assert cat.read() == ({}, 0)
    v1 = cat.commit(0, {"vol/a": b"1"})
    assert cat.commit(0, {"vol/b": b"2"}) is None  # created meanwhile
    v2 = cat.commit(v1, {"vol/b": b"2"}, delete=["vol/a"])
    assert cat.commit(v1, {"vol/c": b"3"}) is None  # a stale version
    assert v2 > v1
    assert cat.read() == ({"vol/b": b"2"}, v2)


def test_catalog_two_writers_lose_nothing(stores, peers):
    """Two processes (two hosts) increment one counter concurrently; every
    increment is a read-modify-write, so a lost update shows in the total."""
    make, argv = stores
    a, b = peers(argv("hosta")), peers(argv("hostb"))
    n = 150
    a.send(f"count {n}")
    b.send(f"count {n}")
    assert a.answer().startswith("counted") and b.answer().startswith("counted")
    assert make().catalog().read().entries["n"] == str(2 * n).encode()


def test_lock_between_two_hosts(stores, peers):
    make, argv = stores
    s = make("hosta")
    s.create("v1", MiB).close()
    peer = peers(argv("hostb"))
    assert peer.do("lock v1") == "locked"
    with s.open("v1", write=True) as img:
        with pytest.raises(Busy, match="locked by") as e:
            img.lock("host A")
    assert "store_peer" in e.value.message, "the message names the holder"
    with pytest.raises(Busy, match="alive"):
        s.break_lock("v1", s.holder("v1"))
    assert peer.do("write v1 0 7") == "written", "a refused break leaves the holder working"
    assert peer.do("unlock v1") == "unlocked"
    with s.open("v1", write=True) as img:
        img.lock("host A")
        buf = bytearray(4096)
        img.pread_into(buf, 0)
        assert buf == bytes([7]) * 4096


# -- RBD: dead holders, fencing --------------------------------------------------------

@pytest.mark.parametrize("kind", ["rbd"])
def test_break_lock_of_a_killed_holder(kind, stores, peers, ceph_cluster):
    make, argv = stores
    s = make("hosta", liveness_timeout=2.0)  # a dead holder never answers: any timeout is right
    s.create("v1", MiB).close()
    peer = peers(argv("hostb"))
    assert peer.do("lock v1") == "locked"
    assert peer.do("write v1 4096 9") == "written" and peer.do("flush v1") == "flushed"
    holder = s.holder("v1")
    peer.kill(signal.SIGKILL)
    with s.open("v1", write=True) as img:
        with pytest.raises(Busy, match="locked by"):
            img.lock("host A")  # the lock outlives its holder
    s.break_lock("v1", holder)
    assert holder.owner in ceph_cluster.blocklist(), "the dead holder is fenced"
    with s.open("v1", write=True) as img:
        img.lock("host A")
        buf = bytearray(4096)
        img.pread_into(buf, 4096)
        assert buf == bytes([9]) * 4096, "the data is intact"
    s.delete("v1")  # the blocklist dropped the dead client's watch: no 30 s wait


@pytest.mark.parametrize("kind", ["rbd"])
def test_a_hung_holder_is_fenced(kind, stores, peers):
    """A holder that stops answering (SIGSTOP: a hung host) counts as dead;
    once its lock is broken it can never write again, even when it wakes."""
    make, argv = stores
    s = make("hosta", liveness_timeout=2.0)
    s.create("v1", MiB).close()
    peer = peers(argv("hostb"))
    assert peer.do("lock v1") == "locked"
    holder = s.holder("v1")
    peer.kill(signal.SIGSTOP)
    s.break_lock("v1", holder)
    with s.open("v1", write=True) as img:
        img.lock("host A")
        img.pwrite(bytes([1]) * 4096, 0)
        img.flush()
    peer.kill(signal.SIGCONT)
    answer = peer.do("write v1 0 2")
    if answer == "written":  # librbd may cache the write: the flush must fail then
        answer = peer.do("flush v1")
    assert answer.startswith("error"), answer
    with s.open("v1") as img:
        buf = bytearray(4096)
        img.pread_into(buf, 0)
        assert buf == bytes([1]) * 4096, "the fenced holder changed nothing"


@pytest.mark.parametrize("kind", ["rbd"])
def test_a_dead_bystander_does_not_make_the_holder_look_dead(kind, stores, peers):
    """Another client that had the image open and died leaves a watch that
    misses notifies for ~30 s; only the holder's own answer counts."""
    make, argv = stores
    s = make("hosta", liveness_timeout=2.0)
    s.create("v1", MiB).close()
    bystander = peers(argv("hosta"))
    assert bystander.do("open v1") == "opened"
    bystander.kill(signal.SIGKILL)
    holder_peer = peers(argv("hostb"))
    assert holder_peer.do("lock v1") == "locked"
    with pytest.raises(Busy, match="alive"):
        s.break_lock("v1", s.holder("v1"))
    assert holder_peer.do("write v1 0 3") == "written"


@pytest.mark.parametrize("kind", ["rbd"])
def test_break_lock_of_a_released_holder_does_nothing(kind, stores, peers, ceph_cluster):
    make, argv = stores
    s = make("hosta")
    s.create("v1", MiB).close()
    peer = peers(argv("hostb"))
    assert peer.do("lock v1") == "locked"
    holder = s.holder("v1")
    assert peer.do("unlock v1") == "unlocked"
    s.break_lock("v1", holder)
    assert holder.owner not in ceph_cluster.blocklist()


def test_local_break_lock_refuses_a_live_holder(tmp_path, peers):
    s = LocalStore(tmp_path / "store")
    s.create("v1", MiB).close()
    peer = peers(["local", str(tmp_path / "store")])
    assert peer.do("lock v1") == "locked"
    holder = s.holder("v1")
    assert holder.owner == f"pid {peer.proc.pid}" and "store_peer" in holder.description
    with pytest.raises(Busy, match="alive"):
        s.break_lock("v1", holder)
    peer.kill(signal.SIGKILL)
    assert s.holder("v1") is None, "the kernel drops a dead holder's flock"


# -- failure paths ------------------------------------------------------------------

def test_open_store_picks_the_store(tmp_path, ceph_cluster, rbd_namespace, monkeypatch):
    from evscrypt.errors import InvalidArgument
    from evscrypt.store import open_store
    from evscrypt.store.rbd import RBDStore

    assert isinstance(open_store(None, tmp_path), LocalStore)
    for bad in ("rbd://", "rbd://a/b/c", "s3://bucket"):
        with pytest.raises(InvalidArgument):
            open_store(bad, tmp_path)
    monkeypatch.setenv("CEPH_CONF", ceph_cluster.conf)
    monkeypatch.setenv("EVSCRYPT_RBD_CLIENT", "hostb")
    with open_store(f"rbd://{ceph_cluster.pool}/{rbd_namespace}", tmp_path) as s:
        assert isinstance(s, RBDStore) and (s.client, s.namespace) == ("hostb", rbd_namespace)
        s.create("v1", MiB).close()
        assert s.names() == ["v1"]


def test_rbd_unreachable_cluster_and_missing_pool(tmp_path, ceph_cluster):
    import re

    from evscrypt.errors import StorageError
    from evscrypt.store.rbd import RBDStore

    with pytest.raises(NotFound, match="no-such-pool"):
        RBDStore("no-such-pool", conf=ceph_cluster.conf, client="hosta")
    conf = tmp_path / "dead.conf"  # a monitor address where nothing listens
    conf.write_text(re.sub(r"mon host = .*", "mon host = v2:127.0.0.1:1",
                           ceph_cluster.dir.joinpath("ceph.conf").read_text()))
    with pytest.raises(StorageError, match="cannot reach"):
        RBDStore(ceph_cluster.pool, conf=str(conf), client="hosta", connect_timeout=1)


@pytest.mark.parametrize("kind", ["rbd"])
def test_rbd_io_errors_are_storage_errors(kind, bstore):
    from evscrypt.errors import StorageError

    with bstore.create("v1", MiB) as img:
        with pytest.raises(StorageError, match="cannot write"):
            img.pwrite(bytes(4096), MiB)  # past the end
        with pytest.raises(StorageError, match="cannot write"):
            img.aio_write(bytes(4096), MiB).wait()


def test_rbd_notify_of_a_missing_pool(ceph_cluster):
    from evscrypt.errors import StorageError
    from evscrypt.store import rados_notify

    with pytest.raises(StorageError, match="no-such-pool"):
        rados_notify.notify(ceph_cluster.conf, "hosta", "no-such-pool", "", "x", 1000)


def test_rbd_notify_reports_acks_and_timeouts(ceph_cluster, rbd_namespace, peers):
    """The ctypes call against librados: a live watcher acks, a notify with
    no watchers returns at once with nothing, a missing object is an error."""
    from evscrypt.errors import StorageError
    from evscrypt.store import rados_notify
    from evscrypt.store.rbd import RBDStore

    s = RBDStore(ceph_cluster.pool, namespace=rbd_namespace, client="hosta", conf=ceph_cluster.conf)
    try:
        s.create("v1", MiB).close()
        peer = peers(["rbd", ceph_cluster.conf, ceph_cluster.pool, rbd_namespace, "hostb"])
        assert peer.do("lock v1") == "locked"
        img = s._image("v1")
        oid, watchers = f"rbd_header.{img.id()}", {w["id"] for w in img.watchers_list()}
        img.close()
        r = rados_notify.notify(ceph_cluster.conf, "hosta", ceph_cluster.pool, rbd_namespace, oid, 10000)
        assert r.acked == watchers and len(watchers) == 1 and not r.timed_out
        s.create("v2", MiB).close()  # nobody has it open: no watchers
        img = s._image("v2")
        oid = f"rbd_header.{img.id()}"
        img.close()
        r = rados_notify.notify(ceph_cluster.conf, "hosta", ceph_cluster.pool, rbd_namespace, oid, 10000)
        assert r == (frozenset(), frozenset())
        with pytest.raises(StorageError, match="No such file"):
            rados_notify.notify(ceph_cluster.conf, "hosta", ceph_cluster.pool, rbd_namespace, "missing", 10000)
    finally:
        s.close()


def test_local_catalog_damaged(tmp_path):
    from evscrypt.errors import FormatError

    s = LocalStore(tmp_path)
    s.catalog().commit(0, {"a": b"1"})
    (tmp_path / ".catalog.json").write_text("{not json")
    with pytest.raises(FormatError, match="catalog"):
        s.catalog().read()


def test_temporary_images_of_dead_builds_are_collected(bstore, kind):
    """A build killed mid-way leaves a hidden temporary image; gc removes it
    once no client has it open and it is old enough, and leaves alone an
    image a build still has open, one younger than the age given, volumes
    and evscrypt's own hidden copies.  A local store's live in the state
    directory (evscrypt.tempentry), so it has none to collect."""
    from evscrypt.store.base import STALE_TEMP_AGE, copy_image_name, temp_name

    if kind == "local":
        assert bstore.collect_temporary(0).to_dict() == {"removed": [], "busy": [], "errors": []}
        return
    bstore.create("kept", MiB).close()
    bstore.create(copy_image_name("snapshot", "s1"), MiB).close()
    dead, open_one = temp_name("a"), temp_name("b")
    bstore.create(dead, MiB).close()  # its build was killed: nobody has it open
    building = bstore.create(open_one, MiB)
    try:
        young = bstore.collect_temporary(STALE_TEMP_AGE)  # both were made just now
        assert young.removed == [] and sorted(young.busy) == sorted(bstore.location(n) for n in (dead, open_one))
        got = bstore.collect_temporary(0)
        assert got.removed == [bstore.location(dead)] and got.busy == [bstore.location(open_one)], got
        assert not bstore.exists(dead) and bstore.exists(open_one)
    finally:
        building.close()
    assert bstore.collect_temporary(0).removed == [bstore.location(open_one)]
    assert bstore.names() == ["kept"] and bstore.exists(copy_image_name("snapshot", "s1"))
