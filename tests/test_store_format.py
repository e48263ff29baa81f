"""An RBD volume holds exactly the local format: a volume image copied into
an RBD image and exported again (by the store and by the `rbd export` tool,
an independent oracle) is the same file, byte for byte, and evscrypt's local
store opens it and reads the same plaintext.  The pool holds ciphertext only.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from evscrypt.image import header as hdr

MiB = 1 << 20
#: A plaintext that cannot occur by chance in ciphertext.
PLAIN = b"evscrypt plaintext marker: this must never reach the pool. " * 70


@pytest.fixture
def rstore(ceph_cluster, rbd_namespace):
    from evscrypt.store.rbd import RBDStore

    s = RBDStore(ceph_cluster.pool, namespace=rbd_namespace, client="hosta", conf=ceph_cluster.conf)
    yield s
    s.close()


def _local_volume(store, size: int) -> bytes:
    """An encrypted local volume with PLAIN written at a few places; its image bytes."""
    store.create("vol", size)
    with store.engine("vol", write=True) as (eng, _):
        for off in (0, 5 * MiB + 4096, size - 2 * len(PLAIN)):
            eng.write(off, PLAIN)
    return store.path("vol").read_bytes()


def test_rbd_image_is_the_local_format(store, rstore, ceph_cluster, rbd_namespace, tmp_path):
    image = _local_volume(store, 8 * MiB)
    with rstore.create("vol", len(image)) as img:
        for off in range(0, len(image), MiB):
            chunk = image[off:off + MiB]
            if chunk.strip(b"\0"):
                img.pwrite(chunk, off)
    with rstore.open("vol") as img:
        area = bytearray(hdr.HEADER_AREA)
        img.pread_into(area, 0)
    assert hdr.load_bytes(area).header.uuid == store.header("vol").uuid

    ours = tmp_path / "ours.img"
    rstore.export("vol", ours)
    tool = tmp_path / "tool.img"
    subprocess.run(["rbd", "-c", ceph_cluster.conf, "--id", "hosta", "export",
                    f"{ceph_cluster.pool}/{rbd_namespace}/vol", str(tool)], check=True, capture_output=True)
    assert ours.read_bytes() == image
    assert tool.read_bytes() == image

    # the local store opens the export: the same volume, the same plaintext
    os.unlink(store.path("vol"))
    shutil.copyfile(ours, store.path("vol"))
    with store.engine("vol") as (eng, _):
        assert eng.read(5 * MiB + 4096, len(PLAIN)) == PLAIN


def test_the_pool_holds_no_plaintext(store, rstore, ceph_cluster, rbd_namespace):
    import rados

    image = _local_volume(store, 8 * MiB)
    assert PLAIN not in image
    with rstore.create("vol", len(image)) as img:
        img.pwrite(image, 0)
        img.flush()
    cipher = image[hdr.HEADER_AREA:].lstrip(b"\0")[:4096]  # the first written sector, encrypted
    assert len(cipher) == 4096
    found = False
    with rados.Rados(conffile=ceph_cluster.conf, rados_id="admin") as c, c.open_ioctx(ceph_cluster.pool) as io:
        io.set_namespace(rbd_namespace)
        for obj in io.list_objects():
            data = io.read(obj.key, 8 * MiB)
            found |= cipher in data
            assert PLAIN[:64] not in data, f"plaintext in RADOS object {obj.key}"
    assert found, "the scan saw the data objects (their ciphertext)"
