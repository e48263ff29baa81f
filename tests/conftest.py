"""Shared fixtures: a fresh state directory, a volume store on it, a local
KMS with an injectable clock.  Everything lives under pytest's tmp_path.
The Ceph test cluster (ceph_fixture.py) starts only for the tests that use it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from ceph_fixture import ceph_cluster, rbd_namespace  # noqa: F401  (one cluster per session, for every module)
from evscrypt.kms.local import LocalKMS
from evscrypt.volumes import VolumeStore


class FakeClock:
    """A settable UTC clock for LocalKMS(clock=...)."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh evscrypt state directory; no stray passphrase settings leak in."""
    monkeypatch.delenv("EVSCRYPT_PASSPHRASE_FILE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("EVSCRYPT_HOME", raising=False)
    monkeypatch.delenv("EVSCRYPT_DEBUG", raising=False)
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def store(home):
    return VolumeStore(home)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def kms(home, clock):
    """The local KMS of ``home`` (the directory VolumeStore uses), on a fake clock."""
    return LocalKMS(home / "kms" / "local", clock=clock)
