"""The volume catalog against a hostile image store: a forged unencrypted
header, a substituted image, a cross-volume header-restore and a shrunk
header are refused on every path that opens an image, and no plaintext
reaches the image.  Also the catalog file itself, its adoption of an older
state directory, and `volume adopt`."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import shutil
import subprocess
import uuid

import pytest

from copy_helpers import MiB, data_area, expect_fail, header_of, pattern, write_sync
from daemon_fixture import EVSCRYPT, make_daemon, run_as  # noqa: F401  (fixture)
from evscrypt import errors
from evscrypt.catalog import FILE, VOLUME, Catalog
from evscrypt.cli.root import main
from evscrypt.image import header as hdr
from evscrypt.image.engine import Engine
from evscrypt.image.header import HEADER_AREA

INTEGRITY = errors.IntegrityError.exit_code
LAYOUT = [(0, 64 * 1024), (3 * MiB, 256 * 1024)]


def forge(image, **fields) -> None:
    """What an attacker who can write the image does: a new header of their
    making in both copies, with valid checksums and a higher sequence number."""
    fd = os.open(image, os.O_RDWR)
    try:
        loaded = hdr.load(fd)
        forged = dataclasses.replace(loaded.header, **fields)
        hdr.store(fd, forged, loaded)
    finally:
        os.close(fd)


def downgrade(image) -> None:
    """An encrypted volume's header replaced by a valid unencrypted one:
    same uuid, name and size, no key fields."""
    forge(image, encrypted=False, kms_backend=None, key_id=None, wrapped_dk=None, mac=None,
          encryption_context={})


def digest(path) -> bytes:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


# -- in process ---------------------------------------------------------------------

def test_catalog_records_each_image(store, home):
    store.create("a", 2 * MiB)
    store.create("p", 1 * MiB, encrypted=False)
    cat = home / FILE
    assert cat.stat().st_mode & 0o777 == 0o600
    doc = json.loads(cat.read_text())
    a = store.header("a")
    assert doc["volume"]["a"] == {"uuid": a.uuid, "name": "a", "encrypted": True, "kms": "local",
                                  "key_id": a.key_id, "data_offset": a.data_offset, "size": 2 * MiB}
    assert doc["volume"]["p"]["encrypted"] is False and doc["volume"]["p"]["key_id"] is None
    store.grow("a", 4 * MiB)
    assert json.loads(cat.read_text())["volume"]["a"]["size"] == 4 * MiB
    store.delete("a")
    assert "a" not in json.loads(cat.read_text())["volume"]
    assert not [n for n in os.listdir(home) if n.startswith(f".{FILE}")]  # no temporary left


def test_concurrent_creates_all_reach_the_catalog(home):
    procs = [subprocess.Popen([EVSCRYPT, "--home", str(home), "volume", "create", f"c{i}", "--size", "1M"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(8)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    assert sorted(json.loads((home / FILE).read_text())["volume"]) == [f"c{i}" for i in range(8)]


def test_downgraded_header_refused_offline(store, home, tmp_path, capsys):
    store.create("v", 4 * MiB)
    with store.engine("v") as (eng, _):
        eng.write(0, b"secret" * 1000)
    downgrade(store.path("v"))
    before = digest(store.path("v"))
    for args in (["volume", "info", "v"], ["volume", "dump-key", "v", "--key-file", str(tmp_path / "k")],
                 ["volume", "resize", "v", "--size", "8M"], ["snapshot", "create", "v", "s"],
                 ["image", "create", "i", "--from-volume", "v"], ["backup", "create", "v", str(tmp_path / "b")],
                 ["volume", "header-backup", "v", str(tmp_path / "h")]):
        capsys.readouterr()
        assert main(["--home", str(home), *args]) == INTEGRITY, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "header field encrypted is False but the catalog says True" in err, err
    with pytest.raises(errors.IntegrityError):
        with store.engine("v"):
            pass
    assert digest(store.path("v")) == before  # nothing was written
    assert not (tmp_path / "k").exists() and not (tmp_path / "h").exists()
    assert not (home / "snapshots").exists() or not os.listdir(home / "snapshots")


def test_substituted_image_refused(store):
    store.create("a", 4 * MiB)
    store.create("b", 4 * MiB)
    shutil.copyfile(store.path("b"), store.path("a"))
    with pytest.raises(errors.IntegrityError, match="header field uuid"):
        store.open_volume("a")
    with pytest.raises(errors.IntegrityError, match="header field uuid"):
        store.data_key("a")


def test_shrunk_header_refused(store):
    """An unencrypted header has no MAC: a smaller size is the catalog's to catch."""
    store.create("p", 4 * MiB, encrypted=False)
    forge(store.path("p"), size=1 * MiB)
    with pytest.raises(errors.IntegrityError, match="size is 1048576 but the catalog says at least 4194304"):
        store.open_volume("p")


def test_moved_data_offset_refused(store):
    store.create("p", 4 * MiB, encrypted=False)
    forge(store.path("p"), data_offset=2 * MiB)
    with pytest.raises(errors.IntegrityError, match="data_offset"):
        store.open_volume("p")


def test_header_restore_cannot_change_uuid_or_encryption(store, home, tmp_path, capsys):
    store.create("a", 4 * MiB)
    store.create("b", 4 * MiB)
    saved_a = tmp_path / "a.hdr"
    store.backup_header("a", saved_a)
    # b's own header destroyed: nothing in the image to compare with, the catalog still refuses
    fd = os.open(store.path("b"), os.O_RDWR)
    os.pwrite(fd, os.urandom(HEADER_AREA), 0)
    os.close(fd)
    before = digest(store.path("b"))
    assert main(["--home", str(home), "volume", "header-restore", "b", str(saved_a)]) == INTEGRITY
    assert "header field uuid" in capsys.readouterr().err
    assert digest(store.path("b")) == before
    # b's own header, downgraded, in a backup file: refused too
    saved_b = tmp_path / "b.hdr"
    store.create("c", 4 * MiB)
    store.backup_header("c", saved_b)
    downgrade(saved_b)
    before = digest(store.path("c"))
    assert main(["--home", str(home), "volume", "header-restore", "c", str(saved_b)]) == INTEGRITY
    assert "header field encrypted" in capsys.readouterr().err
    assert digest(store.path("c")) == before


def test_substituted_snapshot_refused(store, home, capsys):
    store.create("a", 2 * MiB)
    store.create("b", 2 * MiB)
    assert main(["--home", str(home), "snapshot", "create", "a", "sa"]) == 0
    shutil.copyfile(store.path("b"), home / "snapshots" / "sa" / "image")
    capsys.readouterr()
    assert main(["--home", str(home), "volume", "create", "c", "--from-snapshot", "sa"]) == INTEGRITY
    assert "header field uuid" in capsys.readouterr().err
    assert not store.exists("c")


def test_engine_needs_an_explicit_cipher_and_fails_closed(store):
    """Detach leaves a closed cipher that raises, never plaintext."""
    with pytest.raises(TypeError):
        Engine(0, 4096, HEADER_AREA, None)
    store.create("v", 2 * MiB)
    op = store.open_volume("v")
    eng = op.engine()
    eng.write(0, b"x" * 4096)
    fd = os.open(store.path("v"), os.O_RDONLY)
    before = os.pread(fd, 2 * MiB, op.header.data_offset)
    op.cipher.close()  # what detach does to the key, with the image still open
    for call in (lambda: eng.write(0, b"y" * 4096), lambda: eng.write(100, b"y"), lambda: eng.read(0, 4096)):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert os.pread(fd, 2 * MiB, op.header.data_offset) == before
    os.close(fd)
    op.close()


# -- adoption -------------------------------------------------------------------------

def test_state_directory_without_catalog_adopts_once(store, home, capsys):
    store.create("a", 1 * MiB)
    store.create("p", 1 * MiB, encrypted=False)
    assert main(["--home", str(home), "snapshot", "create", "a", "sa"]) == 0
    (home / FILE).unlink()  # a state directory from before the catalog
    capsys.readouterr()
    assert main(["--home", str(home), "volume", "list"]) == 0
    err = capsys.readouterr().err
    assert err.count("adopted 3 image(s)") == 1 and "volume a" in err and "snapshot sa" in err
    assert main(["--home", str(home), "volume", "list"]) == 0
    assert "adopted" not in capsys.readouterr().err
    doc = json.loads((home / FILE).read_text())
    assert sorted(doc["volume"]) == ["a", "p"] and list(doc["snapshot"]) == ["sa"]
    assert doc["snapshot"]["sa"]["name"] == "a"  # the context of the snapshot's DK binds volume a
    with store.engine("a"):
        pass


def test_image_without_entry_is_refused_until_adopted(store, home, capsys):
    store.create("v", 1 * MiB)
    Catalog(home).remove(VOLUME, "v")
    with pytest.raises(errors.IntegrityError, match="no catalog entry.*volume adopt v"):
        store.open_volume("v")
    capsys.readouterr()
    assert main(["--home", str(home), "volume", "adopt", "v", "--yes"]) == 0
    out, err = capsys.readouterr()
    h = store.path("v")
    assert "adopted volume v" in out and "will trust" in err and header_of(h).uuid in err
    with store.engine("v"):
        pass
    # already there: nothing to do; a different image: refused without --replace
    assert main(["--home", str(home), "volume", "adopt", "v", "--yes"]) == 0
    assert "already in the catalog" in capsys.readouterr().out
    store.create("w", 1 * MiB)
    shutil.copyfile(store.path("w"), h)
    assert main(["--home", str(home), "volume", "adopt", "v", "--yes"]) == errors.AlreadyExists.exit_code
    assert "--replace" in capsys.readouterr().err
    assert main(["--home", str(home), "volume", "adopt", "v", "--yes", "--replace"]) == 0
    assert Catalog(home).get(VOLUME, "v").uuid == header_of(h).uuid


def test_adopt_is_root_only(store, home):
    store.create("v", 1 * MiB)
    nobody = pwd.getpwnam("nobody")
    out = run_as(nobody.pw_uid, nobody.pw_gid, lambda: main(["--home", str(home), "volume", "adopt", "v", "--yes"]))
    assert out == {"ok": errors.PermissionDenied.exit_code}


def test_catalog_damage_is_a_clear_error(store, home, capsys):
    store.create("v", 1 * MiB)
    (home / FILE).write_text("{not json")
    capsys.readouterr()
    assert main(["--home", str(home), "volume", "info", "v"]) == errors.FormatError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "catalog" in err and "damaged" in err


# -- on a real daemon ---------------------------------------------------------------

@pytest.mark.fuse
def test_downgrade_refused_at_attach_and_no_plaintext_reaches_the_image(make_daemon):  # noqa: F811
    d = make_daemon()
    d.cli("volume", "create", "v", "--size", "8M")
    writes = pattern("v", LAYOUT)
    write_sync(d.attach("v"), writes)
    d.cli("detach", "v")
    downgrade(d.image("v"))
    before = data_area(d.image("v"))
    expect_fail(d, INTEGRITY, "attach", "v", match="header field encrypted is False but the catalog says True")
    assert "v" not in os.listdir(d.mountpoint)
    assert "v" not in [v["name"] for v in d.status()["volumes"]]
    after = data_area(d.image("v"))
    assert after == before
    assert not any(w in after for w in writes.values())


@pytest.mark.fuse
def test_substituted_image_refused_for_its_owner(make_daemon):  # noqa: F811
    """Copying root's volume over a user's (both under evs/default, which is
    open to everyone) would let the user read root's data; the catalog refuses."""
    user = "evscat" + uuid.uuid4().hex[:6]
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", user], check=True)
    try:
        pw = pwd.getpwnam(user)
        d = make_daemon(start=False, extra_args=("--socket-group", grp.getgrgid(pw.pw_gid).gr_name))
        os.chmod(d.runtime, 0o755)
        d.start()
        d.cli("volume", "create", "rootvol", "--size", "8M")
        write_sync(d.attach("rootvol"), pattern("root", LAYOUT))
        d.cli("detach", "rootvol")
        d.cli("volume", "create", "uvol", "--size", "8M", "--owner", user)
        shutil.copyfile(d.image("rootvol"), d.image("uvol"))  # keeps uvol's owner
        out = run_as(pw.pw_uid, pw.pw_gid, lambda: d.client().attach("uvol"))
        assert out["error"] == "IntegrityError" and "header field uuid" in out["message"], out
        assert "uvol" not in os.listdir(d.mountpoint)
    finally:
        subprocess.run(["userdel", user], capture_output=True)


def test_open_volume_reads_the_header_under_the_lock(store, monkeypatch):
    """A resize or header-restore cannot slip in between reading the header
    and taking the image's lock: the header is read with the lock held."""
    from evscrypt.image.backing import is_locked

    store.create("v", 1 * MiB)
    seen = []
    real = hdr.load

    def load(fd, path="image"):
        seen.append(is_locked(store.path("v")))
        return real(fd, path)

    monkeypatch.setattr(hdr, "load", load)
    store.open_volume("v").close()
    with store.locked("v"):
        pass
    assert seen == [True, True]
