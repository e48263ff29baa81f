"""Preallocated volumes behave like dm-crypt: no zero-unwritten feature, so a
sector zeroed in the image decrypts to garbage (it does not read as zeros),
and discard writes encrypted zeros instead of punching holes; growing one
fills the new part with encrypted zeros too."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from copy_helpers import MiB, data_area, header_of
from daemon_fixture import make_daemon, pread_all  # noqa: F401  (fixture)
from evscrypt.crypto.xts import reference_crypt
from evscrypt.format import SECTOR_SIZE
from evscrypt.image.header import ZERO_UNWRITTEN

ZERO = bytes(SECTOR_SIZE)


def zero_sector_in_image(store, name: str, n: int) -> None:
    h = store.header(name)
    fd = os.open(store.path(name), os.O_WRONLY)
    try:
        os.pwrite(fd, ZERO, h.data_offset + n * SECTOR_SIZE)
    finally:
        os.close(fd)


def test_preallocated_volume_has_no_zero_unwritten_and_zeroed_sectors_read_as_garbage(store):
    store.create("pre", 1 * MiB, preallocate=True)
    store.create("sparse", 1 * MiB)
    assert ZERO_UNWRITTEN not in store.header("pre").features
    assert ZERO_UNWRITTEN in store.header("sparse").features
    with store.data_key("pre") as dk:
        key = bytes(dk.buffer)
    for name in ("pre", "sparse"):
        with store.engine(name) as (eng, _):
            eng.write(5 * SECTOR_SIZE, b"\xab" * SECTOR_SIZE)
        zero_sector_in_image(store, name, 5)
    with store.engine("sparse") as (eng, _):
        assert eng.read(5 * SECTOR_SIZE, SECTOR_SIZE) == ZERO  # the documented limit of zero-unwritten
    with store.engine("pre") as (eng, _):
        got = eng.read(5 * SECTOR_SIZE, SECTOR_SIZE)
        # exactly what dm-crypt reads there: the decryption of a zero sector
        assert got == reference_crypt(key, 5, ZERO, encrypt=False) and got != ZERO
        assert eng.read(4 * SECTOR_SIZE, 3 * SECTOR_SIZE)[SECTOR_SIZE:2 * SECTOR_SIZE] == got


def test_discard_on_preallocated_volume_writes_encrypted_zeros(store):
    store.create("pre", 1 * MiB, preallocate=True)
    with store.data_key("pre") as dk:
        key = bytes(dk.buffer)
    with store.engine("pre") as (eng, h):
        eng.write(0, os.urandom(64 * 1024))
        eng.discard(SECTOR_SIZE + 100, 8 * SECTOR_SIZE)  # partial head and tail sectors
        assert eng.read(SECTOR_SIZE + 100, 8 * SECTOR_SIZE) == bytes(8 * SECTOR_SIZE)
    stored = data_area(store.path("pre"), 0, 10 * SECTOR_SIZE)
    for n in range(2, 9):  # the whole sectors: encrypted zeros, not holes
        assert stored[n * SECTOR_SIZE:(n + 1) * SECTOR_SIZE] == reference_crypt(key, n, ZERO, encrypt=True)
    assert os.stat(store.path("pre")).st_blocks * 512 >= 1 * MiB  # nothing was punched


def test_grown_preallocated_volume_is_filled(store):
    store.create("pre", 1 * MiB, preallocate=True)
    store.grow("pre", 2 * MiB)
    stored = data_area(store.path("pre"))
    assert len(stored) == 2 * MiB
    assert all(stored[i:i + SECTOR_SIZE] != ZERO for i in range(0, 2 * MiB, SECTOR_SIZE))
    with store.engine("pre") as (eng, _):
        assert eng.read(1 * MiB, 1 * MiB) == bytes(1 * MiB)


def test_larger_copy_of_preallocated_volume(store):
    """A volume made larger from a snapshot grows like a resize: an encrypted
    one without zero-unwritten gets encrypted zeros over its new part (with
    the DK it shares with the source); an unencrypted one keeps a hole
    there, which reads as zeros all the same."""
    from evscrypt import clone
    from evscrypt.snapshots import snapshots

    copies = snapshots(store.home)
    for name, encrypted in (("enc", True), ("pln", False)):
        store.create(name, 1 * MiB, encrypted=encrypted, preallocate=True)
        copies.create(f"s-{name}", store, name, online=None)
        h = clone.from_copy(store, copies, f"big-{name}", f"s-{name}", clone.Want(), size=3 * MiB)
        assert h.size == 3 * MiB and ZERO_UNWRITTEN not in h.features and h.encrypted is encrypted
        with store.engine(f"big-{name}") as (eng, _):
            assert eng.read(0, 3 * MiB) == bytes(3 * MiB)
    grown = data_area(store.path("big-enc"), 1 * MiB)
    with store.data_key("big-enc") as dk:
        key = bytes(dk.buffer)
    for n in (256, 511, 767):  # the first, a middle and the last sector of the grown part
        assert grown[(n - 256) * SECTOR_SIZE:(n - 255) * SECTOR_SIZE] == reference_crypt(key, n, ZERO, encrypt=True)
    h = header_of(store.path("big-pln"))
    fd = os.open(store.path("big-pln"), os.O_RDONLY)
    try:  # the grown part, past the copied 1 MiB, is one hole up to the end
        assert os.lseek(fd, h.data_offset + 1 * MiB, os.SEEK_HOLE) == h.data_offset + 1 * MiB
        with pytest.raises(OSError) as e:
            os.lseek(fd, h.data_offset + 1 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_punch_hole_through_fuse_on_preallocated_volume(make_daemon):  # noqa: F811
    d = make_daemon()
    d.cli("volume", "create", "pre", "--size", "4M", "--preallocate")
    disk = d.attach("pre")
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x5a" * (256 * 1024), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", "0", "-l", str(256 * 1024), str(disk)],
                   check=True)
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert pread_all(fd, 256 * 1024, 0) == bytes(256 * 1024)
    finally:
        os.close(fd)
    d.cli("detach", "pre")
    h = header_of(d.image("pre"))
    assert ZERO_UNWRITTEN not in h.features
    stored = data_area(d.image("pre"), 0, 256 * 1024)
    assert all(stored[i:i + SECTOR_SIZE] != ZERO for i in range(0, len(stored), SECTOR_SIZE))
