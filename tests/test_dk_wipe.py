"""The DK lives only in daemon memory while attached, and is gone after detach.

Reads the daemon's whole address space through /proc/PID/mem (as root; the
daemon is non-dumpable, so this needs CAP_SYS_PTRACE) and searches for each
32-byte half of the volume's data key.  The same search must find the key
before detach, or the test would prove nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from daemon_fixture import both_pyfuse3
from evscrypt.volumes import VolumeStore

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 and root (to read /proc/PID/mem)")


def scan_memory(pid: int, needles: list[bytes]) -> set[int]:
    """Indexes of the needles found anywhere in the process's readable memory."""
    found = set()
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            start, end, perms = int(m.group(1), 16), int(m.group(2), 16), m.group(3)
            if "r" not in perms or "[vvar" in line or "[vsyscall" in line:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            for i, n in enumerate(needles):
                if n in data:
                    found.add(i)
    return found


def test_scanner_finds_a_planted_key():
    """The scanner itself can find 32 random bytes in a live process."""
    secret = os.urandom(32)
    p = subprocess.Popen([sys.executable, "-c",
                          f"import sys,time; k=bytearray.fromhex('{secret.hex()}'); print('up', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"up"
        assert scan_memory(p.pid, [secret, os.urandom(32)]) == {0}
    finally:
        p.kill()
        p.wait()


@both_pyfuse3
def test_dk_absent_from_daemon_memory_after_detach(evscrypt_exe):
    """On both data paths: the trio path's reads and writes run in other
    threads (trio's), with other buffers, than the threads path's."""
    exe, data_path = evscrypt_exe
    home = Path(tempfile.mkdtemp(prefix="evs-wipe-"))
    runtime = Path(tempfile.mkdtemp(prefix="evr-"))
    env = dict(os.environ, EVSCRYPT_HOME=str(home), EVSCRYPT_RUNTIME_DIR=str(runtime))

    def cli(*args):
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, check=True).stdout

    cli("volume", "create", "secretvol", "--size", "16M")
    store = VolumeStore(home)
    with store.data_key("secretvol") as dk:
        halves = [bytes(dk.buffer[:32]), bytes(dk.buffer[32:])]
    daemon = subprocess.Popen([exe, "daemon"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        while subprocess.run([exe, "status"], env=env, capture_output=True).returncode != 0:
            assert daemon.poll() is None, daemon.communicate()  # died before it was up; a hang is pytest-timeout's
            time.sleep(0.1)
        assert f'"data_path": "{data_path}"' in cli("status", "--json")
        path = cli("attach", "secretvol").strip()
        # exercise the cipher: encrypt and decrypt through the mount
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(1 << 20), 4096)
            os.fsync(fd)
            assert len(os.pread(fd, 1 << 20, 0)) == 1 << 20
        finally:
            os.close(fd)

        before = scan_memory(daemon.pid, halves)
        assert before == {0, 1}, "the DK must be findable while attached, or this test proves nothing"

        cli("detach", "secretvol")
        after = scan_memory(daemon.pid, halves)
        assert after == set(), f"DK half/halves {sorted(after)} still in daemon memory after detach"

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        # the daemon's log never carries the key, in any common encoding
        log = daemon.stderr.read()
        assert "attached secretvol" in log and "key wiped" in log  # the log is the real one
        import base64
        for half in halves:
            for enc in (half.hex(), half.hex().upper(), base64.b64encode(half).decode(), repr(half)):
                assert enc not in log
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(runtime / "disks")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def test_set_nondumpable():
    """PR_SET_DUMPABLE 0 takes effect (the daemon calls this at start)."""
    code = ("import ctypes; from evscrypt.secret import set_nondumpable; libc = ctypes.CDLL(None); "
            "before = libc.prctl(3, 0, 0, 0, 0); set_nondumpable(); print(before, libc.prctl(3, 0, 0, 0, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "0"]
