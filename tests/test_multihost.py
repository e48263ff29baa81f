"""Volumes in a Ceph RBD pool shared by two hosts.

Two real daemons on this machine play two hosts: each has its own state
directory, runtime directory and RADOS client (client.hosta, client.hostb),
and both use one RBD pool (a fresh namespace per test, tests/ceph_fixture.py)
and one KMS (moto's server, tests/kms_fixtures.py).  Real FUSE, real fio,
real ext4 on loop devices, a real Ceph cluster: nothing is mocked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from ceph_fixture import HOSTS
from daemon_fixture import (
    Daemon, DaemonFactory, expect_fail, fuse_skip_reason, loop_skip_reason, needs_fio, rand, read_direct, run_fio, write_at,
)
from kms_fixtures import moto_kms  # noqa: F401  (fixture used by name)

MiB = 1 << 20
KEY = "alias/shared"


class Hosts(DaemonFactory):
    def __init__(self, tmp_path, cluster, namespace):
        super().__init__(tmp_path)
        self.cluster, self.namespace = cluster, namespace
        self.store = f"rbd://{cluster.pool}/{namespace}"

    def host(self, client: str, **env: str) -> Daemon:
        """A daemon of its own (state, runtime, RADOS client) on the shared pool."""
        d = self(home=self.tmp_path / client / "home", start=False)
        d.env.update(EVSCRYPT_STORE=self.store, CEPH_CONF=self.cluster.conf, EVSCRYPT_RBD_CLIENT=client, **env)
        return d.start()


@pytest.fixture
def hosts(tmp_path, ceph_cluster, rbd_namespace, moto_kms):
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)
    moto_kms.create_key(KEY)
    h = Hosts(tmp_path, ceph_cluster, rbd_namespace)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def ab(hosts):
    return hosts.host(HOSTS[0]), hosts.host(HOSTS[1])


def create(d: Daemon, name: str, size: str = "16M", *extra: str) -> None:
    d.cli("volume", "create", name, "--size", size, "--kms", "aws", "--key", KEY, *extra)


def names(d: Daemon) -> list[str]:
    return [v["name"] for v in json.loads(d.cli("volume", "list", "--json").stdout)]


def test_created_on_a_is_listed_and_described_on_b(ab):
    a, b = ab
    create(a, "v")
    assert names(b) == ["v"]
    info = json.loads(b.cli("volume", "info", "v", "--json").stdout)
    assert info["image_path"].startswith("rbd:") and info["encrypted"] and info["attached"] is False
    b.cli("volume", "delete", "v")
    assert names(a) == []


def test_unencrypted_volumes_only_on_hosts_that_allow_them(hosts):
    """A pool writer can record any volume as unencrypted (an unencrypted
    header has no MAC), so a host uses unencrypted volumes in a shared store
    only when it is set to: B refuses to create or attach one, A (allowed)
    does both, and B still lists it."""
    a = hosts.host(HOSTS[0], EVSCRYPT_SHARED_UNENCRYPTED="allow")
    b = hosts.host(HOSTS[1])
    expect_fail(b, 25, "volume", "create", "p", "--size", "16M", "--no-encrypt",
                match="cannot create unencrypted volume 'p'")
    assert names(b) == []
    a.cli("volume", "create", "p", "--size", "16M", "--no-encrypt")
    data = rand(8192, "plain")
    write_at(a.attach("p"), 4096, data)
    a.cli("detach", "p")
    assert names(b) == ["p"]
    expect_fail(b, 25, "attach", "p", match="recorded as unencrypted")
    assert read_direct(a.attach("p"), 4096, len(data)) == data


def test_attached_on_a_is_busy_on_b_naming_the_holder(ab):
    a, b = ab
    create(a, "v")
    a.attach("v")
    line = expect_fail(b, 6, "attach", "v", match="is attached")
    assert f"pid {a.pid}" in line, line  # the holder describes itself
    assert json.loads(b.cli("volume", "info", "v", "--json").stdout)["attached"] is True
    expect_fail(b, 6, "volume", "delete", "v", match="is attached")


def test_detach_on_a_then_attach_on_b_keeps_the_data(ab):
    a, b = ab
    create(a, "v")
    data = rand(3 * MiB, "handover")
    write_at(a.attach("v"), 5 * 4096, data)
    a.cli("detach", "v")
    assert read_direct(b.attach("v"), 5 * 4096, len(data)) == data
    expect_fail(a, 6, "attach", "v", match=f"pid {b.pid}")


def test_a_crashed_holder_is_fenced_by_break_lock(ab, hosts):
    a, b = ab
    create(a, "v")
    data = rand(1 * MiB, "crash")
    write_at(b.attach("v"), 0, data)
    b.kill()  # SIGKILL: the host crashed with the lock held
    expect_fail(a, 6, "attach", "v", match="is attached")
    before = hosts.cluster.blocklist()
    path = a.attach("v", "--break-lock")
    assert read_direct(path, 0, len(data)) == data
    assert hosts.cluster.blocklist() != before  # the dead client is fenced
    write_at(path, 0, b"after the takeover")
    assert read_direct(path, 0, 18) == b"after the takeover"


def test_break_lock_is_refused_while_the_holder_answers(ab):
    a, b = ab
    create(a, "v")
    path = a.attach("v")
    expect_fail(b, 6, "attach", "v", "--break-lock", match="alive")
    write_at(path, 0, b"still mine")  # A was neither fenced nor stopped
    assert read_direct(path, 0, 10) == b"still mine"


def test_a_state_directory_keeps_its_store(ab, hosts):
    a, _ = ab
    create(a, "v")
    expect_fail(a, 3, "--store", f"rbd://{hosts.cluster.pool}/other", "volume", "list", match="uses the store")
    expect_fail(a, 3, "--store", "local", "volume", "list", match="uses the store")
    expect_fail(a, 3, "--store", "nfs://x", "volume", "list", match="unknown store")
    assert names(a) == ["v"]


def test_a_local_directory_is_not_turned_into_a_shared_one(tmp_path, hosts):
    d = hosts(home=tmp_path / "plain", start=False)
    d.cli("volume", "list")  # a state directory of local files now
    expect_fail(d, 3, "--store", hosts.store, "volume", "list", match="local files")


def test_a_local_kms_volume_unwraps_only_on_its_host(ab):
    a, b = ab
    a.cli("volume", "create", "l", "--size", "8M", "--kms", "local")
    expect_fail(b, 11, "attach", "l", match="only the host that created it")
    a.attach("l")  # its own host can


@needs_fio
def test_fio_verify_across_hosts(ab):
    a, b = ab
    create(a, "f", "48M")
    args = ["--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1"]
    job = run_fio(a.attach("f"), args + ["--do_verify=1"])
    assert job["read"]["io_bytes"] == 32 * MiB
    a.cli("detach", "f")
    job = run_fio(b.attach("f"), args + ["--verify_only"])
    assert job["read"]["io_bytes"] == 32 * MiB


def _files(mnt) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(mnt.iterdir()) if p.is_file()}


def test_ext4_moves_between_hosts(ab, tmp_path):
    reason = loop_skip_reason()
    if reason:
        pytest.skip(reason)
    a, b = ab
    create(a, "fs", "64M")
    mnt_a, mnt_b = a.mount_dir(tmp_path, "mnt-a"), b.mount_dir(tmp_path, "mnt-b")
    a.cli("attach", "fs", "--mount", str(mnt_a), "--mkfs", "ext4")
    for i in range(5):
        (mnt_a / f"f{i}").write_bytes(rand(300_000 + i, ("ext4", i)))
    want = _files(mnt_a)
    a.cli("detach", "fs")
    b.cli("attach", "fs", "--mount", str(mnt_b))
    assert _files(mnt_b) == want


def test_the_pool_holds_no_plaintext(ab, hosts):
    import rados

    a, _ = ab
    create(a, "p", "8M")
    marker = b"EVSCRYPT-PLAINTEXT-MARKER-" * 157  # 4082 bytes: within one sector
    path = a.attach("p")
    for off in range(0, 4 * MiB, 256 * 1024):
        write_at(path, off, marker)
    a.cli("detach", "p")
    seen = 0
    with rados.Rados(conffile=hosts.cluster.conf, rados_id="admin") as c, c.open_ioctx(hosts.cluster.pool) as io:
        io.set_namespace(hosts.namespace)
        for obj in io.list_objects():
            size, _ = io.stat(obj.key)
            raw = io.read(obj.key, size) if size else b""
            seen += len(raw)
            assert b"EVSCRYPT-PLAINTEXT-MARKER" not in raw, obj.key
            for key, value in io.get_xattrs(obj.key):
                assert b"EVSCRYPT-PLAINTEXT-MARKER" not in value
    assert seen >= 16 * 4096  # the data objects were read, not just the header


def _parent(hosts, image: str) -> str | None:
    import rados
    import rbd

    with rados.Rados(conffile=hosts.cluster.conf, rados_id="admin") as c, c.open_ioctx(hosts.cluster.pool) as io:
        io.set_namespace(hosts.namespace)
        with rbd.Image(io, image, read_only=True) as img:
            try:
                return img.get_parent_image_spec()["image_name"]
            except rbd.ImageNotFound:
                return None


def test_snapshots_and_images_are_shared_and_volumes_are_clones(ab, hosts):
    a, b = ab
    create(a, "v")
    path = a.attach("v")
    first, second = rand(64 * 1024, "first"), rand(64 * 1024, "second")
    write_at(path, 8192, first)
    b.cli("snapshot", "create", "v", "s1")  # B snapshots the volume A has attached
    write_at(path, 8192, second)
    a.cli("image", "create", "i1", "--from-volume", "v")
    snaps = json.loads(a.cli("snapshot", "list", "--json").stdout)
    assert [(s["name"], s["volume"], s["encrypted"]) for s in snaps] == [("s1", "v", True)]
    assert [i["name"] for i in json.loads(b.cli("image", "list", "--json").stdout)] == ["i1"]
    b.cli("volume", "create", "w", "--from-snapshot", "s1")
    assert _parent(hosts, "w") == ".snapshot=s1"  # a copy-on-write clone, not a copy
    assert read_direct(b.attach("w"), 8192, len(first)) == first
    a.cli("volume", "create", "u", "--from-image", "i1")
    assert read_direct(a.attach("u"), 8192, len(second)) == second
    # a clone outlives its snapshot; the encryption rules are those of any store
    a.cli("snapshot", "delete", "s1")
    assert json.loads(b.cli("snapshot", "list", "--json").stdout) == []
    b.cli("detach", "w")
    assert read_direct(b.attach("w"), 8192, len(first)) == first
    expect_fail(a, 25, "volume", "create", "x", "--from-image", "i1", "--no-encrypt")
    expect_fail(b, 3, "image", "copy", "i1", "i2")


def test_backup_of_a_volume_attached_elsewhere_and_restore(ab, tmp_path):
    a, b = ab
    create(a, "v")
    data = rand(2 * MiB, "backup")
    write_at(a.attach("v"), 4096, data)
    dest = tmp_path / "backups"
    r = json.loads(b.cli("backup", "create", "v", str(dest), "--json").stdout)  # read through librbd on B
    b.cli("volume", "create", "r", "--from-backup", r["source"])
    assert read_direct(b.attach("r"), 4096, len(data)) == data
    assert names(a) == ["r", "v"]


def test_unaligned_and_large_requests_on_an_rbd_volume(ab):
    """Whole sectors go to librbd in the background (aio); a partial sector
    is a read-modify-write; large requests span RBD objects."""
    a, _ = ab
    create(a, "u", "16M")
    path = a.attach("u")
    model = bytearray(16 * MiB)
    for off, n, seed in ((4090, 10, "edge"), (5000, 100, "inside"), (8192, 4096, "whole"),
                         (3 * MiB - 7, 2 * MiB + 9, "spanning"), (12 * MiB, 1 * MiB, "large")):
        data = rand(n, seed)
        write_at(path, off, data)
        model[off:off + n] = data
    with open(path, "rb") as f:
        assert f.read() == bytes(model)
    a.cli("detach", "u")
    assert read_direct(a.attach("u"), 0, 16 * MiB) == bytes(model)


def _locker(hosts, image: str) -> str:
    """The RADOS address that holds ``image``'s lock."""
    import rados
    import rbd

    with rados.Rados(conffile=hosts.cluster.conf, rados_id="admin") as c, c.open_ioctx(hosts.cluster.pool) as io:
        io.set_namespace(hosts.namespace)
        with rbd.Image(io, image, read_only=True) as img:
            return img.list_lockers()["lockers"][0][2]


def test_a_fenced_holder_fails_its_io_and_the_volume(ab, hosts):
    """When the cluster fences a host (blocklists its client), that host's
    requests fail with EIO and the volume is marked failed: nothing is
    written behind a new holder's back."""
    a, _ = ab
    create(a, "f", "8M")
    path = a.attach("f")
    write_at(path, 0, b"before")
    hosts.cluster.ceph("osd", "blocklist", "add", _locker(hosts, "f"))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    with pytest.raises(OSError) as e:
        for i in range(64):  # until the fence reaches this client (its next OSD map)
            os.pwrite(fd, rand(4096, i), 4096 * (i % 16))
            os.fsync(fd)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:  # and close() says so too (FLUSH of a failed volume)
        os.close(fd)
    assert e.value.errno == errno.EIO
    v = next(v for v in a.status()["volumes"] if v["name"] == "f")
    assert v["state"] != "ok" and v["io"]["errors"] >= 1
    assert "Traceback" not in a.log and "Exception ignored" not in a.log, a.log


def test_resize_of_an_attached_volume_is_seen_by_the_other_host(ab):
    a, b = ab
    create(a, "g", "8M")
    path = a.attach("g")
    a.cli("volume", "resize", "g", "--size", "24M")
    assert os.stat(path).st_size == 24 * MiB
    write_at(path, 20 * MiB, b"in the grown part")
    a.cli("detach", "g")
    assert json.loads(b.cli("volume", "info", "g", "--json").stdout)["size"] == 24 * MiB
    assert read_direct(b.attach("g"), 20 * MiB, 17) == b"in the grown part"


def test_dump_key_of_a_volume_in_the_pool_says_to_export_it_first(ab, hosts, tmp_path):
    a, _ = ab
    create(a, "k", "8M")
    p = a.cli("volume", "dump-key", "k", "--key-file", str(tmp_path / "k.key"))
    assert f"rbd export {hosts.cluster.pool}/{hosts.namespace}/k k.img" in p.stderr
    assert "cryptsetup open" in p.stdout and " k.img " in p.stdout
    assert os.stat(tmp_path / "k.key").st_size == 64


def _rbd_export(hosts, image: str, dest) -> None:
    import subprocess

    subprocess.run(["rbd", "-c", hosts.cluster.conf, "export", f"{hosts.cluster.pool}/{hosts.namespace}/{image}",
                    str(dest)], check=True, capture_output=True)


def test_aligned_io_of_an_rbd_volume_runs_in_c_and_decrypts_with_the_reference(ab, hosts, tmp_path):
    """Aligned reads and writes of an RBD volume are answered by the C data
    path (librbd's aio, its completion thread decrypting and replying);
    unaligned and large ones by Python, on the same sectors.  What C wrote
    decrypts, sector by sector, with the reference built on `cryptography`."""
    from test_data_path import reference_plaintext

    a, _ = ab
    create(a, "c", "8M")
    path = a.attach("c")
    st = a.status()
    v = next(v for v in st["volumes"] if v["name"] == "c")
    if not v["c_path"]:
        pytest.skip("the C data path cannot run here (no VAES, or built without _cpath)")
    if "EVSCRYPT_FUSE_THREADS" not in a.env:
        assert st["fuse_threads"] == 1  # librbd's aio: a worker never waits (pools.fuse_threads)
    want = bytearray(4 * MiB)
    for i, (off, n) in enumerate([(0, 4096), (64 * 1024, 64 * 1024), (1 * MiB, 128 * 1024), (2 * MiB, MiB),
                                  (3 * MiB + 4096, 4096)]):
        data = rand(n, i)
        write_at(path, off, data)  # 4 KiB-128 KiB in C; 1 MiB in Python
        want[off:off + n] = data
    # an unaligned write in Python across sectors that C wrote
    write_at(path, 64 * 1024 + 100, b"x" * 5000)
    want[64 * 1024 + 100:64 * 1024 + 5100] = b"x" * 5000
    for off, n in [(0, 4096), (64 * 1024, 64 * 1024), (1 * MiB, 128 * 1024), (0, 4 * MiB)]:
        assert read_direct(path, off, n) == bytes(want[off:off + n]), (off, n)
    v = next(v for v in a.status()["volumes"] if v["name"] == "c")
    in_c = v["io_in_c"]
    assert in_c["writes"] >= 4 and in_c["reads"] >= 3, in_c
    assert v["io"]["writes"] > in_c["writes"] and v["io"]["errors"] == 0, v["io"]  # and Python served some
    a.cli("detach", "c")
    a.cli("volume", "dump-key", "c", "--key-file", str(tmp_path / "c.key"))
    _rbd_export(hosts, "c", tmp_path / "c.img")
    key = (tmp_path / "c.key").read_bytes()
    assert reference_plaintext(tmp_path / "c.img", key, 0, 4 * MiB) == bytes(want)


def test_the_c_path_finds_librbds_handle_only_where_it_is_sure(hosts):
    """The handle is read from python-rbd's Image object: found when the
    layout is the one known, with librbd giving the image's own size for it,
    and None (the volume stays in Python) when anything does not match."""
    import rados
    import rbd

    from evscrypt.daemon import cpath

    if cpath._cpath is None:
        pytest.skip("built without _cpath")
    with rados.Rados(conffile=hosts.cluster.conf, rados_id="admin") as c, \
            c.open_ioctx(hosts.cluster.pool) as io, c.open_ioctx(hosts.cluster.pool) as other:
        io.set_namespace(hosts.namespace)
        rbd.RBD().create(io, "probe", 3 * MiB)
        with rbd.Image(io, "probe") as img:
            got = cpath._cpath.rbd_handle(img, io)
            assert got is not None and got[0] != 0 and got[1] == 3 * MiB
            assert cpath._cpath.rbd_handle(img, other) is None  # not the Ioctx it was opened on
            assert cpath._cpath.rbd_handle(io, io) is None  # not an Image at all
        rbd.RBD().remove(io, "probe")


def test_gc_removes_a_dead_builds_image_from_the_pool(ab, hosts):
    """A host killed while it built a volume leaves a hidden image in the
    pool, which no listing shows: `evscrypt gc` on any host removes it once
    it is old enough (here: --older-than 0), and leaves volumes alone."""
    import rados
    import rbd

    _, b = ab
    create(b, "v", "4M")
    with rados.Rados(conffile=hosts.cluster.conf, rados_id="admin") as c, c.open_ioctx(hosts.cluster.pool) as io:
        io.set_namespace(hosts.namespace)
        rbd.RBD().create(io, ".w.tmp-0123abcd", MiB)
    young = json.loads(b.cli("gc", "--json").stdout)  # the default age: an hour
    assert young["removed"] == [] and any(p.endswith("/.w.tmp-0123abcd") for p in young["busy"]), young
    got = json.loads(b.cli("gc", "--older-than", "0", "--json").stdout)
    assert [p.rsplit("/", 1)[1] for p in got["removed"]] == [".w.tmp-0123abcd"], got
    assert names(b) == ["v"]
    with rados.Rados(conffile=hosts.cluster.conf, rados_id="admin") as c, c.open_ioctx(hosts.cluster.pool) as io:
        io.set_namespace(hosts.namespace)
        assert ".w.tmp-0123abcd" not in rbd.RBD().list(io)
