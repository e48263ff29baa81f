"""systemd integration: the units verify, and the daemon speaks sd_notify."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVSCRYPT = str(Path(sys.executable).parent / "evscrypt")


def _install_units(tmp_path: Path) -> Path:
    d = tmp_path / "units"
    subprocess.run([str(ROOT / "scripts/install-systemd.sh")], env=dict(os.environ, UNIT_DIR=str(d)),
                   check=True, capture_output=True)
    return d


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(path)
    return cp


def test_units_are_hardened_and_installed_with_the_binary(tmp_path):
    d = _install_units(tmp_path)
    svc = _unit(d / "evscrypt.service")["Service"]
    assert svc["Type"] == "notify"
    for key, value in {"NoNewPrivileges": "yes", "LimitCORE": "0", "ProtectSystem": "full",
                       "PrivateTmp": "yes"}.items():
        assert svc[key] == value, key
    assert "CAP_SYS_ADMIN" in svc["CapabilityBoundingSet"]  # FUSE and mount need it
    assert os.path.realpath(EVSCRYPT) in svc["ExecStart"]
    assert svc["ExecStop"].split() == [os.path.realpath(EVSCRYPT), "stop"]  # the detach guard, not a bare SIGTERM
    attach = _unit(d / "evscrypt-attach@.service")
    assert "evscrypt.service" in attach["Unit"]["After"]
    assert attach["Service"]["ExecStart"].split()[1:3] == ["attach", "%I"]
    assert attach["Service"]["ExecStop"].split()[1:3] == ["detach", "%I"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    d = _install_units(tmp_path)
    shutil.copy(d / "evscrypt-attach@.service", d / "evscrypt-attach@data.service")
    p = subprocess.run(["systemd-analyze", "verify", str(d / "evscrypt.service"),
                        str(d / "evscrypt-attach@data.service")],
                       env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{d}:"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="needs /dev/fuse and fusermount3")
def test_daemon_sends_ready_and_stopping():
    home = Path(tempfile.mkdtemp(prefix="evs-sd-"))
    runtime = Path(tempfile.mkdtemp(prefix="evr-"))
    notify = runtime / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(notify))
    s.settimeout(30)
    env = dict(os.environ, EVSCRYPT_HOME=str(home), EVSCRYPT_RUNTIME_DIR=str(runtime), NOTIFY_SOCKET=str(notify))
    p = subprocess.Popen([EVSCRYPT, "daemon"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert s.recv(256) == b"READY=1"
        # READY means the mount and the socket are both up
        assert os.path.ismount(runtime / "disks")
        assert subprocess.run([EVSCRYPT, "status"], env=env, capture_output=True).returncode == 0
        p.send_signal(signal.SIGTERM)
        assert s.recv(256) == b"STOPPING=1"
        assert p.wait(timeout=30) == 0
        assert not os.path.ismount(runtime / "disks")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        s.close()
        subprocess.run(["fusermount3", "-u", "-z", str(runtime / "disks")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
