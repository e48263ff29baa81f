"""Backups end to end: to a directory and to S3 (real boto3 against moto's
server mode on 127.0.0.1), restores read back identically through their FUSE
disks, restore chooses its encryption, incremental backups, corrupt chunks
named, interrupted backups and restores leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from copy_helpers import (
    MiB, assert_reads, cli_json, data_area, expect_fail, header_of, open_fifo_writer, pattern, popen_cli, rand,
    read_direct, state_leftovers, write_sync,
)
from daemon_fixture import daemon, make_daemon  # noqa: F401  (fixtures are used by name)
from evscrypt import errors
from evscrypt.backup.manifest import CHUNK_SIZE
from evscrypt.volumes import VolumeStore
from kms_fixtures import _AWS_SCRUB, HOST, MOTO_SERVER, REGION, MotoServer

pytestmark = pytest.mark.fuse

#: pieces in chunks 0 (with the header), 1, 3 and the last one of a 40 MiB volume
LAYOUT = [(0, 4096), (3 * MiB + 100, 2 * MiB + 7), (7 * MiB, 2 * MiB), (25 * MiB, 64 * 1024), (40 * MiB - 8192, 8192)]
EXIT_CORRUPT, EXIT_INTERRUPTED = errors.BackupCorrupt.exit_code, 130


def make_volume(d, name: str, *flags: str, size: str = "40M", seed="data") -> dict[int, bytes]:
    d.cli("volume", "create", name, "--size", size, *flags)
    data = pattern((seed, name), LAYOUT)
    write_sync(d.attach(name), data)
    return data


def backup(d, vol: str, dest) -> dict:
    return cli_json(d, "backup", "create", vol, str(dest))


def restore(d, name: str, src: str, *flags: str) -> Path:
    d.cli("volume", "create", name, "--from-backup", src, *flags)
    return d.attach(name)


def dk_bytes(home: Path, name: str) -> bytes:
    store = VolumeStore(home)
    with store.data_key(name) as dk:
        return bytes(dk.buffer)


def chunk_files(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (dest / "chunks").iterdir()}


def manifest(dest: Path, backup_id: str) -> dict:
    return json.loads((dest / "backups" / f"{backup_id}.json").read_text())


def backup_data_area(dest: Path, backup_id: str) -> bytes:
    """The data area as the backup holds it, put together from its chunks."""
    m = manifest(dest, backup_id)
    image = b"".join((dest / "chunks" / c).read_bytes() if c else
                     bytes(min(m["chunk_size"], m["image_size"] - i * m["chunk_size"]))
                     for i, c in enumerate(m["chunks"]))
    return image[m["data_offset"]:]


# -- a directory store ---------------------------------------------------------------
def test_backup_of_attached_volume_restores_identically(daemon, tmp_path):
    d, dest = daemon, tmp_path / "bk"
    data = make_volume(d, "v")
    r = backup(d, "v", dest)
    assert r["chunks_written"] == r["chunks_stored"] == 4 and r["chunks"] == 6  # 41 MiB image, two hole chunks
    # writes after the backup are not in it
    write_sync(d.disk("v"), {0: rand(4096, "later")})

    # the store holds ciphertext and the wrapped DK only
    m = manifest(dest, r["id"])
    assert m["volume"] == "v" and m["encrypted"] is True and m["chunk_size"] == CHUNK_SIZE
    assert m["chunks"][2] is None and m["chunks"][4] is None and len(m["chunks"]) == 6
    assert m["uuid"] == header_of(d.image("v")).uuid
    blobs = chunk_files(dest)
    assert set(blobs) == {c for c in m["chunks"] if c}
    assert all(hashlib.sha256(b).hexdigest() == n for n, b in blobs.items())
    dk = dk_bytes(d.home, "v")
    for blob in [*blobs.values(), (dest / "backups" / f"{r['id']}.json").read_bytes()]:
        assert dk[:32] not in blob and dk[32:] not in blob
        for piece in data.values():
            assert piece[:64] not in blob

    listed = cli_json(d, "backup", "list", str(dest))
    assert [(b["id"], b["source"]) for b in listed] == [(r["id"], f"{dest}::{r['id']}")]
    assert r["source"] in d.cli("backup", "list", str(dest)).stdout
    d.cli("backup", "verify", r["source"])

    # same encryption and key: ciphertext copied, DK re-wrapped for the new volume
    disk = restore(d, "r1", r["source"])
    assert_reads(disk, data, zeros=[(20 * MiB, MiB)])
    h, src = header_of(d.image("r1")), header_of(d.image("v"))
    assert h.encrypted and h.key_id == src.key_id and h.uuid != src.uuid
    assert h.origin == {"type": "backup", "source": r["source"]}
    assert data_area(d.image("r1")) == backup_data_area(dest, r["id"])  # the very ciphertext
    assert dk_bytes(d.home, "r1") == dk
    # the manifest's path works as SRC too
    disk2 = restore(d, "r2", str(dest / "backups" / f"{r['id']}.json"), "--size", "64M")
    assert_reads(disk2, data)
    assert os.stat(disk2).st_size == 64 * MiB
    for v in ("v", "r1", "r2"):
        d.cli("detach", v)
    assert state_leftovers(d.home) == []


def test_restore_chooses_its_encryption(daemon, tmp_path):
    d, dest = daemon, tmp_path / "bk"
    d.cli("key", "create", "other")
    data = make_volume(d, "v")
    r = backup(d, "v", dest)
    backup_ct = backup_data_area(dest, r["id"])
    d.cli("detach", "v")

    # --no-encrypt: a plaintext image whose data area is the plaintext
    disk = restore(d, "plain", r["source"], "--no-encrypt")
    h = header_of(d.image("plain"))
    assert not h.encrypted and h.wrapped_dk is None and h.key_id is None
    area = data_area(d.image("plain"))
    for off, piece in data.items():
        assert area[off:off + len(piece)] == piece
    assert_reads(disk, data)

    # --key other: re-encrypted under a NEW DK and the other CMK
    disk = restore(d, "other", r["source"], "--key", "other")
    h = header_of(d.image("other"))
    other_id = cli_json(d, "key", "describe", "other")["key_id"]
    assert h.encrypted and h.key_id == other_id
    assert dk_bytes(d.home, "other") != dk_bytes(d.home, "v")
    area = data_area(d.image("other"))
    for off, piece in data.items():
        lo, hi = off - off % 4096, -(-(off + len(piece)) // 4096) * 4096
        assert area[lo:hi] != backup_ct[lo:hi]  # not the backup's ciphertext...
        assert area[lo:hi] != bytes(hi - lo)
    assert_reads(disk, data)  # ...yet the same data
    assert area[20 * MiB:21 * MiB] == bytes(MiB)  # unwritten stays unwritten (sparse)

    # an unencrypted volume: its backup is unencrypted; --encrypt encrypts the restore
    pdata = make_volume(d, "pv", "--no-encrypt", seed="plain")
    rp = backup(d, "pv", dest)
    listed = {b["id"]: b for b in cli_json(d, "backup", "list", str(dest))}
    assert listed[rp["id"]]["encrypted"] is False and listed[r["id"]]["encrypted"] is True
    assert_reads(restore(d, "pr", rp["source"]), pdata)
    assert not header_of(d.image("pr")).encrypted
    disk = restore(d, "pe", rp["source"], "--encrypt")
    h = header_of(d.image("pe"))
    assert h.encrypted and h.key_id
    assert data_area(d.image("pe"), 7 * MiB, 4096) != pdata[7 * MiB][:4096]
    assert_reads(disk, pdata)
    p = d.cli("volume", "create", "x", "--from-backup", rp["source"], "--no-encrypt", "--key", "other", check=False)
    assert p.returncode == 2 and "--no-encrypt contradicts --key" in p.stderr
    for v in ("plain", "other", "pv", "pr", "pe"):
        d.cli("detach", v)
    assert state_leftovers(d.home) == []


def test_incremental_backups_store_only_changed_chunks(daemon, tmp_path):
    d, dest = daemon, tmp_path / "bk"
    data = make_volume(d, "v")
    r1 = backup(d, "v", dest)
    before = set(chunk_files(dest))
    change = {25 * MiB + 128 * 1024: rand(4096, "change")}  # one sector, in chunk 3
    write_sync(d.disk("v"), change)
    r2 = backup(d, "v", dest)
    assert r2["chunks_written"] == 1 and r2["bytes_written"] == CHUNK_SIZE
    after = set(chunk_files(dest))
    assert len(after - before) == 1
    assert [b["id"] for b in cli_json(d, "backup", "list", str(dest))] == sorted([r1["id"], r2["id"]])
    # both backups restore to their own point in time
    assert_reads(restore(d, "old", r1["source"]), data, zeros=[(25 * MiB + 128 * 1024, 4096)])
    assert_reads(restore(d, "new", r2["source"]), {**data, **change})
    r3 = backup(d, "v", dest)
    assert r3["chunks_written"] == 0
    for v in ("v", "old", "new"):
        d.cli("detach", v)


def test_corrupt_backup_is_detected_and_names_the_chunk(daemon, tmp_path):
    d, dest = daemon, tmp_path / "bk"
    make_volume(d, "v")
    r = backup(d, "v", dest)
    d.cli("detach", "v")
    m = manifest(dest, r["id"])
    digest = m["chunks"][3]
    path = dest / "chunks" / digest
    blob = bytearray(path.read_bytes())
    blob[12345] ^= 0x01
    path.write_bytes(blob)
    line = expect_fail(d, EXIT_CORRUPT, "volume", "create", "bad", "--from-backup", r["source"])
    assert f"chunk 3 (sha256 {digest})" in line and "checksum" in line, line
    expect_fail(d, EXIT_CORRUPT, "backup", "verify", r["source"], match=f"chunk 3 (sha256 {digest})")
    expect_fail(d, EXIT_CORRUPT, "volume", "create", "bad", "--from-backup", r["source"], "--no-encrypt",
                match="chunk 3")
    path.unlink()
    expect_fail(d, EXIT_CORRUPT, "volume", "create", "bad", "--from-backup", r["source"],
                match=f"chunk 3 (sha256 {digest}) is missing")
    (dest / "backups" / f"{r['id']}.json").write_text("{not json")
    expect_fail(d, EXIT_CORRUPT, "volume", "create", "bad", "--from-backup", r["source"], match="manifest")
    expect_fail(d, errors.NotFound.exit_code, "volume", "create", "bad", "--from-backup", f"{dest}::nosuch")
    assert not d.image("bad").exists() and state_leftovers(d.home) == []


def wait_for(pred, what: str, proc):
    """Wait for an event (``pred()`` true) that ``proc`` brings about; fail
    if it ends first.  No deadline of its own: a hang is pytest-timeout's."""
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}: {err}")
        time.sleep(0.002)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_restore_leaves_nothing(daemon, tmp_path, sig):
    d, dest = daemon, tmp_path / "bk"
    data = make_volume(d, "v")
    r = backup(d, "v", dest)
    d.cli("detach", "v")
    # chunk 3 becomes a FIFO: the restore blocks there, half way, until we signal it
    digest = manifest(dest, r["id"])["chunks"][3]
    blob = (dest / "chunks" / digest).read_bytes()
    (dest / "chunks" / digest).unlink()
    os.mkfifo(dest / "chunks" / digest)
    vols = d.home / "volumes"
    for flags in ((), ("--no-encrypt",)):  # the copy path, then the transcode path
        p = popen_cli(d, "volume", "create", "r", "--from-backup", r["source"], *flags)
        fifo = open_fifo_writer(dest / "chunks" / digest, p)  # the restore is reading chunk 3 now
        assert any(n.startswith(".r.img") for n in os.listdir(vols))
        p.send_signal(sig)
        # then end the read: a signal that lands just before the read() starts
        # has already been taken (Python runs its handler at the next
        # bytecode), and the read would wait for ever.  On its way back from
        # the read the restore meets the pending interrupt, never a short chunk.
        os.close(fifo)
        out, err = p.communicate(timeout=600)
        assert p.returncode == EXIT_INTERRUPTED, err
        assert ("interrupted" in err or "aborted" in err) and "Traceback" not in err
        assert not d.image("r").exists() and state_leftovers(d.home) == []
    # the backup itself is fine
    (dest / "chunks" / digest).unlink()
    (dest / "chunks" / digest).write_bytes(blob)
    assert_reads(restore(d, "r", r["source"]), data)
    d.cli("detach", "r")


def test_interrupted_backup_leaves_no_backup(daemon, tmp_path):
    d, dest = daemon, tmp_path / "bk"
    d.cli("volume", "create", "big", "--size", "320M")
    plain = rand(CHUNK_SIZE, "big")  # the same plaintext in every chunk; the ciphertexts differ (XTS tweak)
    with VolumeStore(d.home).engine("big", write=True) as (eng, _):
        for i in range(39):
            eng.write(i * CHUNK_SIZE, plain)
    disk = d.attach("big")  # attached: the backup goes through a quiesced copy in the state directory
    p = popen_cli(d, "backup", "create", "big", str(dest))
    chunks = dest / "chunks"
    wait_for(lambda: chunks.is_dir() and any(not n.startswith(".") for n in os.listdir(chunks)),
             "the first chunk was stored", p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_INTERRUPTED, f"the backup was not interrupted (exit {p.returncode}): {err}"
    stored = [n for n in os.listdir(chunks)]
    assert stored and all(not n.startswith(".") for n in stored)  # whole chunks only
    assert os.listdir(dest / "backups") == []  # no manifest: no backup
    assert "no backups" in d.cli("backup", "list", str(dest)).stdout
    assert state_leftovers(d.home) == []  # the temporary copy is gone
    # the volume works on: its writes are not held
    write_sync(disk, {319 * MiB: rand(4096, "still")})  # in the last chunk, which the backup never reached
    assert read_direct(disk, 319 * MiB, 4096) == rand(4096, "still")
    # the orphan chunks are harmless, and the next backup reuses them
    r = backup(d, "big", dest)
    new = {c for c in manifest(dest, r["id"])["chunks"] if c} - set(stored)
    assert r["chunks_written"] == len(new) < r["chunks_stored"]
    d.cli("detach", "big")


# -- S3 through moto's server mode ------------------------------------------------------
@pytest.fixture
def s3(tmp_path):
    """moto_server on a free 127.0.0.1 port; yields (boto3 client, env for the CLI)."""
    if not os.path.exists(MOTO_SERVER):
        pytest.skip(f"{MOTO_SERVER} is not installed (pip install 'moto[server]')")
    import boto3

    log_dir = tmp_path / "moto"
    log_dir.mkdir()
    server = MotoServer(log_dir).start()
    try:
        env = {"AWS_ENDPOINT_URL_S3": server.url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null",
               "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": f"{HOST},localhost", "no_proxy": f"{HOST},localhost"}
        client = boto3.client("s3", endpoint_url=server.url, region_name=REGION,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="evs-backups")
        yield client, env
    finally:
        server.stop()


def test_s3_backup_restore_incremental_and_corrupt(daemon, s3):
    client, env = s3
    d = daemon
    for k in _AWS_SCRUB:
        d.env.pop(k, None)
    d.env.update(env)
    data = make_volume(d, "v")
    dest = "s3://evs-backups/hosts/h1"
    r = backup(d, "v", dest)
    assert r["source"] == f"{dest}::{r['id']}" and r["chunks_written"] == 4

    keys = [o["Key"] for o in client.list_objects_v2(Bucket="evs-backups")["Contents"]]
    chunk_keys = [k for k in keys if k.startswith("hosts/h1/chunks/")]
    assert len(chunk_keys) == 4 and f"hosts/h1/backups/{r['id']}.json" in keys
    # full chunks went up as multipart uploads (5 + 3 MiB parts): S3's ETag says so
    etags = [client.head_object(Bucket="evs-backups", Key=k)["ETag"].strip('"') for k in chunk_keys]
    assert sum(e.endswith("-2") for e in etags) == 3, etags  # chunks 0, 1 and 3; chunk 5 is 1 MiB
    dk = dk_bytes(d.home, "v")
    for k in chunk_keys:
        blob = client.get_object(Bucket="evs-backups", Key=k)["Body"].read()
        assert dk[:32] not in blob and all(piece[:64] not in blob for piece in data.values())

    listed = cli_json(d, "backup", "list", dest)
    assert [b["source"] for b in listed] == [r["source"]]
    assert_reads(restore(d, "r1", r["source"]), data, zeros=[(20 * MiB, MiB)])
    assert header_of(d.image("r1")).encrypted
    assert_reads(restore(d, "r2", r["source"], "--no-encrypt"), data)

    # incremental: one changed sector, one new object
    change = {7 * MiB: rand(4096, "s3-change")}
    write_sync(d.disk("v"), change)
    r2 = backup(d, "v", dest)
    assert r2["chunks_written"] == 1
    keys2 = [o["Key"] for o in client.list_objects_v2(Bucket="evs-backups", Prefix="hosts/h1/chunks/")["Contents"]]
    assert len(keys2) == 5
    assert_reads(restore(d, "r3", r2["source"]), {**data, **change})

    # a corrupt object is named on restore
    victim = json.loads(client.get_object(Bucket="evs-backups",
                                          Key=f"hosts/h1/backups/{r2['id']}.json")["Body"].read())["chunks"][1]
    key = f"hosts/h1/chunks/{victim}"
    blob = bytearray(client.get_object(Bucket="evs-backups", Key=key)["Body"].read())
    blob[-1] ^= 0xFF
    client.put_object(Bucket="evs-backups", Key=key, Body=bytes(blob))
    expect_fail(d, EXIT_CORRUPT, "volume", "create", "bad", "--from-backup", r2["source"],
                match=f"chunk 1 (sha256 {victim})")
    expect_fail(d, errors.NotFound.exit_code, "backup", "list", "s3://no-such-bucket/x", match="bucket")
    expect_fail(d, errors.NotFound.exit_code, "backup", "create", "v", "s3://no-such-bucket/x", match="bucket")
    assert not d.image("bad").exists() and state_leftovers(d.home) == []
    for v in ("v", "r1", "r2", "r3"):
        d.cli("detach", v)
