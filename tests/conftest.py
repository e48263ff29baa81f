"""Shared fixtures: a fresh state directory, a volume store on it, a local
KMS with an injectable clock (everything under pytest's tmp_path), and the
session's fresh pip-installed venv (stock pyfuse3).  The Ceph test cluster
(ceph_fixture.py) starts only for the tests that use it."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ceph_fixture import ceph_cluster, rbd_namespace  # noqa: F401  (one cluster per session, for every module)
from evscrypt.kms.local import LocalKMS
from evscrypt.paths import kms_dir
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
    return LocalKMS(kms_dir(home, "local"), clock=clock)


#: The checkout under test (what `pip install .` installs).
CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def stock_venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install CHECKOUT``, exactly as a user without
    make gets evscrypt: stock pyfuse3 from the package index (the trio data
    path), no test extra, no boto3.  Built once per test session; pip's own
    cache makes a second session quick (pyfuse3 has no wheels, so its first
    build compiles it)."""
    venv = tmp_path_factory.mktemp("stock-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(CHECKOUT)],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, \
        f"pip install {CHECKOUT} into a fresh venv failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return venv


@pytest.fixture
def evscrypt_exe(request) -> tuple[str, str]:
    """(the `evscrypt` program, the data path it must run) for the daemon
    fixtures: the project venv's, or with the parameter "stock" (see
    daemon_fixture.both_pyfuse3) the session's fresh pip-installed venv's."""
    from daemon_fixture import DATA_PATHS, EVSCRYPT

    flavour = getattr(request, "param", "patched")
    exe = EVSCRYPT if flavour == "patched" else str(request.getfixturevalue("stock_venv") / "bin" / "evscrypt")
    return exe, DATA_PATHS[flavour]
