"""Growing volumes: offline, and online while attached (the FUSE file grows at
once; ext4 on a loop device follows with resize2fs, online where the kernel
lets us: it needs CAP_SYS_RESOURCE).  Shrinking is refused; the header (size,
MAC) is rewritten crash-safely and the volume attaches again."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from copy_helpers import MiB, assert_reads, cli_json, expect_fail, header_of, pattern, rand, write_sync
from daemon_fixture import daemon, is_mounted, loop_skip_reason, make_daemon  # noqa: F401
from evscrypt import errors
from evscrypt.image.header import HEADER_AREA
from evscrypt.volumes import VolumeStore

pytestmark = pytest.mark.fuse

INVALID = errors.InvalidArgument.exit_code
LAYOUT = [(0, 4096), (3 * MiB + 17, 50_000), (8 * MiB - 4096, 4096)]


def status_size(d, name: str) -> int:
    return next(v["size"] for v in d.status()["volumes"] if v["name"] == name)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_offline_grow(daemon, encrypted):
    d = daemon
    d.cli("volume", "create", "v", "--size", "8M", *([] if encrypted else ["--no-encrypt"]))
    data = pattern("offline", LAYOUT)
    write_sync(d.attach("v"), data)
    d.cli("detach", "v")
    seq_before = header_of(d.image("v"))
    d.cli("volume", "resize", "v", "--size", "16M")
    d.cli("volume", "resize", "v", "--size", "+8M")
    h = header_of(d.image("v"))
    assert h.size == 24 * MiB and h.encrypted is encrypted and h.uuid == seq_before.uuid
    assert os.path.getsize(d.image("v")) == h.data_offset + 24 * MiB
    if encrypted:
        store = VolumeStore(d.home)
        store.data_key("v").wipe()  # the MAC was resealed over the new size
        assert h.mac != seq_before.mac
    expect_fail(d, INVALID, "volume", "resize", "v", "--size", "16M", match="only grow")
    expect_fail(d, INVALID, "volume", "resize", "v", "--size", "24M+1")
    d.cli("volume", "resize", "v", "--size", "24M")  # the same size: nothing to do
    disk = d.attach("v")
    assert os.stat(disk).st_size == 24 * MiB
    assert_reads(disk, data, zeros=[(20 * MiB, MiB)])
    d.cli("detach", "v")


def test_online_grow_of_the_disk_file(daemon):
    d = daemon
    d.cli("volume", "create", "v", "--size", "8M")
    disk = d.attach("v")
    data = pattern("online", LAYOUT)
    write_sync(disk, data)
    fd = os.open(disk, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"x" * 4096, 8 * MiB)  # past the end: the disk does not grow by itself
        p = d.cli("volume", "resize", "v", "--size", "12M")
        assert "has grown" in p.stdout
        # at once, without waiting out the attribute cache, on the open fd and by path
        assert os.fstat(fd).st_size == 12 * MiB and os.stat(disk).st_size == 12 * MiB
        more = {8 * MiB: rand(4 * MiB, "grown")}
        assert os.pwrite(fd, more[8 * MiB], 8 * MiB) == 4 * MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    assert status_size(d, "v") == 12 * MiB
    assert_reads(disk, {**data, **more})
    expect_fail(d, INVALID, "volume", "resize", "v", "--size", "8M", match="only grow")
    assert cli_json(d, "volume", "info", "v")["size"] == 12 * MiB  # the header, read offline
    # the header stays sealed: the volume attaches again, with the data
    d.cli("detach", "v")
    assert header_of(d.image("v")).size == 12 * MiB
    disk = d.attach("v")
    assert os.stat(disk).st_size == 12 * MiB
    assert_reads(disk, {**data, **more})
    # both header copies were written with the new size
    with open(d.image("v"), "rb") as f:
        slots = f.read(HEADER_AREA)
    assert slots.count(b'"size":12582912') == 2
    d.cli("detach", "v")


def _df(mnt) -> int:
    st = os.statvfs(mnt)
    return st.f_blocks * st.f_frsize


def _files(mnt, seed, n=3) -> dict[str, str]:
    sums = {}
    for i in range(n):
        blob = rand(MiB + i * 4096, (seed, i))
        (mnt / f"f{seed}{i}").write_bytes(blob)
        sums[f"f{seed}{i}"] = hashlib.sha256(blob).hexdigest()
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    return sums


def can_resize_online() -> bool:
    """Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which
    some containers drop even for root."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def resize2fs(loop: str, mnt) -> None:
    """Grow the ext4 on ``loop`` to its device: online if allowed, else with a
    short unmount (the volume stays attached and the loop device stays)."""
    if can_resize_online():
        r = subprocess.run(["resize2fs", loop], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return
    subprocess.run(["umount", str(mnt)], check=True)
    r = subprocess.run(["e2fsck", "-f", "-y", loop], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    r = subprocess.run(["resize2fs", loop], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(["mount", loop, str(mnt)], check=True)


def _check(mnt, sums) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.loop
@pytest.mark.skipif(loop_skip_reason() is not None, reason=loop_skip_reason() or "")
@pytest.mark.parametrize("how", ["attach-mount", "own-loop"])
def test_online_grow_with_ext4_and_resize2fs(daemon, tmp_path, how):
    d = daemon
    d.cli("volume", "create", "fs", "--size", "64M")
    mnt = d.mount_dir(tmp_path, "mnt")
    if how == "attach-mount":
        d.cli("attach", "fs", "--mount", str(mnt), "--mkfs", "ext4")
        loop = None
    else:  # a loop device and filesystem of the user's own on the disk file
        disk = d.attach("fs")
        loop = d.losetup(disk)
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)
    before = _df(mnt)
    sums = _files(mnt, "a")
    p = d.cli("volume", "resize", "fs", "--size", "160M")
    assert "has grown" in p.stdout
    if how == "attach-mount":
        # the daemon ran losetup --set-capacity and resize2fs on its loop device
        loop = next(v for v in d.status()["volumes"] if v["name"] == "fs")["mount"]["loop"]
        if can_resize_online():
            assert "grew the ext4 filesystem" in p.stderr, p.stderr
        else:
            assert "its filesystem has not" in p.stderr, p.stderr  # a warning, not a failure
            resize2fs(loop, mnt)
    else:
        subprocess.run(["losetup", "--set-capacity", loop], check=True)
        resize2fs(loop, mnt)
    after = _df(mnt)
    assert after > before + 80 * MiB, (before, after)
    _check(mnt, sums)
    # the new space is usable: more than the old filesystem could hold
    big = mnt / "big"
    blob = rand(8 * MiB, "big")
    with open(big, "wb") as f:
        for _ in range(10):
            f.write(blob)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    if how == "own-loop":
        subprocess.run(["umount", str(mnt)], check=True)
        subprocess.run(["losetup", "-d", loop], check=True)
    d.cli("detach", "fs")
    assert not is_mounted(mnt)
    assert header_of(d.image("fs")).size == 160 * MiB
    d.cli("attach", "fs", "--mount", str(mnt))
    _check(mnt, sums)
    assert big.stat().st_size == 80 * MiB
    with open(big, "rb") as f:
        f.seek(72 * MiB)
        assert f.read(8 * MiB) == blob
    assert _df(mnt) == after
    d.cli("detach", "fs")
