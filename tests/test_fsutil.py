"""The file helpers the catalog, the local keystore, header backups and
dump-key share: the lock file and the new private file, and each caller's
own error when they fail."""

from __future__ import annotations

import stat

import pytest

from evscrypt.catalog import VOLUME, Catalog
from evscrypt.errors import AlreadyExists, KMSUnavailable, StorageError
from evscrypt.fsutil import locked_file, write_private
from evscrypt.image.backing import is_locked
from evscrypt.kms.local import LocalKMS
from evscrypt.secret import Secret


class Unusable(Exception):
    pass


def test_locked_file_holds_an_exclusive_lock_for_the_body_only(tmp_path):
    lock = tmp_path / ".lock"
    with locked_file(lock, Unusable):
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert is_locked(lock)  # another open file is refused, even in this process
    assert not is_locked(lock)


def test_locked_file_releases_the_lock_when_the_body_raises(tmp_path):
    lock = tmp_path / ".lock"
    with pytest.raises(ZeroDivisionError):
        with locked_file(lock, Unusable):
            1 / 0
    assert not is_locked(lock)


def test_locked_file_raises_the_callers_error_when_it_cannot_open(tmp_path):
    (tmp_path / ".lock").mkdir()  # a directory cannot be opened for writing, even by root
    with pytest.raises(Unusable) as e:
        with locked_file(tmp_path / ".lock", lambda err: Unusable(err.strerror)):
            pytest.fail("the body ran without the lock")
    assert "directory" in str(e.value)


def test_catalog_lock_that_cannot_be_opened_is_a_storage_error(tmp_path):
    home = tmp_path / "home"
    (home / ".catalog.lock").mkdir(parents=True)
    with pytest.raises(StorageError, match="cannot lock the catalog in"):
        Catalog(home).remove(VOLUME, "v")


def test_keystore_lock_that_cannot_be_opened_makes_the_kms_unavailable(tmp_path):
    kdir = tmp_path / "kms"
    (kdir / ".lock").mkdir(parents=True)
    with pytest.raises(KMSUnavailable, match="the local keystore .* is unusable"):
        LocalKMS(kdir).create_key("k")


def test_keystore_directory_that_cannot_be_made_makes_the_kms_unavailable(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KMSUnavailable, match="the local keystore .* is unusable"):
        LocalKMS(tmp_path / "file" / "kms").create_key("k")


def test_write_private_creates_a_0600_file_holding_the_data(tmp_path):
    dest = tmp_path / "f"
    with Secret.random(64) as key:
        write_private(dest, key.view())
        assert dest.read_bytes() == bytes(key.buffer)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_write_private_never_replaces_a_file(tmp_path):
    dest = tmp_path / "f"
    dest.write_bytes(b"keep me")
    with pytest.raises(AlreadyExists, match="refusing to overwrite"):
        write_private(dest, b"new")
    assert dest.read_bytes() == b"keep me"


def test_write_private_where_it_cannot_create_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="cannot create"):
        write_private(tmp_path / "missing" / "f", b"data")
