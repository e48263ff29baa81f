"""`volume header-backup` / `header-restore` repair a volume whose header
copies are both destroyed, and refuse what would do harm."""

from __future__ import annotations

import os

import pytest

from evscrypt import errors
from evscrypt.cli.root import main
from evscrypt.image.header import HEADER_AREA, SLOT_SIZE


def run(home, *args):
    return main(["--home", str(home), *map(str, args)])


def test_backup_then_restore_after_both_copies_are_destroyed(store, home, tmp_path, capsys):
    store.create("hv", 8 << 20)
    with store.engine("hv") as (eng, _):
        eng.write(4096, b"payload" * 100)
    img = store.path("hv")
    saved = tmp_path / "hv.header"
    assert run(home, "volume", "header-backup", "hv", saved) == 0
    assert os.stat(saved).st_mode & 0o777 == 0o600
    assert os.path.getsize(saved) == HEADER_AREA
    fd = os.open(img, os.O_RDWR)
    os.pwrite(fd, os.urandom(HEADER_AREA), 0)  # both copies gone
    os.close(fd)
    capsys.readouterr()
    assert run(home, "volume", "info", "hv") == errors.FormatError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no valid header copy" in err
    assert run(home, "volume", "header-restore", "hv", saved) == 0
    assert store.info("hv")["header_copies_valid"] == [True, True]
    with store.engine("hv") as (eng, _):  # the key unwraps and the MAC verifies again
        assert eng.read(4096, 700) == b"payload" * 100


def test_restore_refuses_another_volumes_header(store, home, tmp_path, capsys):
    store.create("a", 4 << 20)
    store.create("b", 4 << 20)
    saved = tmp_path / "a.header"
    assert run(home, "volume", "header-backup", "a", saved) == 0
    before = open(store.path("b"), "rb").read(HEADER_AREA)
    assert run(home, "volume", "header-restore", "b", saved) == errors.IntegrityError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "header field uuid" in err and "nothing was written" in err
    assert open(store.path("b"), "rb").read(HEADER_AREA) == before


def test_backup_never_overwrites_and_restore_rejects_garbage(store, home, tmp_path, capsys):
    store.create("v", 4 << 20)
    f = tmp_path / "exists"
    f.write_bytes(b"keep")
    assert run(home, "volume", "header-backup", "v", f) == errors.AlreadyExists.exit_code
    assert f.read_bytes() == b"keep"
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(SLOT_SIZE * 2))
    assert run(home, "volume", "header-restore", "v", junk) == errors.FormatError.exit_code
    short = tmp_path / "short"
    short.write_bytes(b"x" * 100)
    assert run(home, "volume", "header-restore", "v", short) == errors.FormatError.exit_code
    assert store.info("v")["header_copies_valid"] == [True, True]


def test_restore_refused_while_attached(store, home, tmp_path, capsys):
    store.create("busy", 4 << 20)
    saved = tmp_path / "busy.header"
    assert run(home, "volume", "header-backup", "busy", saved) == 0
    with store.engine("busy"):  # holds the attach lock, as the daemon does
        assert run(home, "volume", "header-restore", "busy", saved) == errors.Busy.exit_code
