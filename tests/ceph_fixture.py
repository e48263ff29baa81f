"""A throw-away Ceph cluster for the tests, started once per session.

``ceph_cluster`` runs scripts/ceph-cluster.sh (one ceph-mon, one ceph-osd on
a sparse file, 127.0.0.1 only) in a temporary directory, creates one RBD
pool, and removes it all at the end of the session; it reports its start-up
time, its daemons' RSS and its teardown time in the terminal summary.
``rbd_namespace`` gives each test a fresh RBD namespace in that pool, so
tests never see each other's images and never wait to remove them (a
killed client's watch blocks removal for ~30 s).

Where ceph is not installed the tests skip, except on CI (CI set), where a
missing cluster is a failure: `make install` installs it there.

tests/conftest.py imports the fixtures, so every module shares the one
cluster (a module that imported them itself would start a second one).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ceph-cluster.sh"
POOL = "evscrypt-test"
#: The two "hosts" of the multi-host tests: RADOS clients with the caps an
#: evscrypt host needs (profile rbd, which includes blocklisting others).
HOSTS = ("hosta", "hostb")


def unavailable() -> str | None:
    """Why no cluster can run here, or None."""
    for tool in ("ceph-mon", "ceph-osd", "ceph", "monmaptool", "ceph-authtool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install ceph-mon ceph-osd ceph-common)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return "python rados/rbd modules are missing (make install links Debian's into the venv)"
    return None


@dataclass
class Cluster:
    dir: Path
    conf: str
    pool: str
    clients: set = field(default_factory=set)
    _ns: itertools.count = field(default_factory=lambda: itertools.count(1))

    def ceph(self, *args: str) -> str:
        return subprocess.run(["ceph", "-c", self.conf, *args], check=True, capture_output=True,
                              text=True).stdout

    def add_client(self, name: str) -> str:
        """A cephx user ``client.NAME`` for one evscrypt host; its key goes
        into the cluster's keyring, which every client reads."""
        if name not in self.clients:
            key = self.ceph("auth", "get-or-create", f"client.{name}", "mon", "profile rbd",
                            "osd", f"profile rbd pool={self.pool}")
            with open(self.dir / "keyring", "a") as f:
                f.write(key if key.endswith("\n") else key + "\n")
            self.clients.add(name)
        return name

    def new_namespace(self) -> str:
        import rados
        import rbd

        ns = f"t{next(self._ns)}"
        with rados.Rados(conffile=self.conf, rados_id="admin") as c, c.open_ioctx(self.pool) as io:
            rbd.RBD().namespace_create(io, ns)
        return ns

    def blocklist(self) -> str:
        return self.ceph("osd", "blocklist", "ls")


def _rss_kib(pid_file: Path) -> int:
    pid = pid_file.read_text().strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory, request):
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"no Ceph cluster on CI: {reason}")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("ceph")
    t0 = time.monotonic()
    r = subprocess.run([str(SCRIPT), "start", str(d), POOL], capture_output=True, text=True)
    started = time.monotonic() - t0
    if r.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((d / "log").glob("*.log")))
        subprocess.run([str(SCRIPT), "stop", str(d)], capture_output=True)
        pytest.fail(f"ceph-cluster.sh start failed: {r.stderr}{logs}")
    rss = sum(_rss_kib(d / "run" / f"{n}.pid") for n in ("mon.a", "osd.0"))
    cluster = Cluster(d, str(d / "ceph.conf"), POOL)
    for h in HOSTS:
        cluster.add_client(h)
    try:
        yield cluster
    finally:
        rss_end = sum(_rss_kib(d / "run" / f"{n}.pid") for n in ("mon.a", "osd.0"))
        t0 = time.monotonic()
        subprocess.run([str(SCRIPT), "stop", str(d)], check=True, capture_output=True)
        stopped = time.monotonic() - t0
        request.config.pluginmanager.register(_Summary(
            f"ceph test cluster: pool ready in {started:.2f} s; mon+osd RSS {rss // 1024} MiB "
            f"at start, {rss_end // 1024} MiB at the end; torn down in {stopped:.2f} s"))


class _Summary:
    """A plugin that prints one line in the terminal summary (output written
    during a fixture's teardown would be captured)."""

    def __init__(self, line: str):
        self.line = line

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(self.line)


@pytest.fixture
def rbd_namespace(ceph_cluster) -> str:
    return ceph_cluster.new_namespace()
