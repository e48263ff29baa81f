"""A real `evscrypt daemon` in a subprocess, for tests on real FUSE mounts.

:class:`Daemon` runs ``.venv/bin/evscrypt daemon`` in the foreground with a
private state directory (EVSCRYPT_HOME) and a short private runtime directory
under /tmp (the control socket path must stay under 108 bytes).  Its log goes
to a file, never to a pipe that could fill up and stall the daemon.

Teardown is unconditional and ordered so that nothing outlives a test, even
after a crash or a SIGKILL in the middle of it:

1. SIGKILL the daemon if it is still alive;
2. ``umount -l`` the test's own mount directories and every filesystem on a
   loop device whose backing file lies under the FUSE mountpoint;
3. ``losetup -d`` those loop devices (while the FUSE mount still exists, so
   their backing path still reads as a path under it);
4. ``fusermount3 -u -z`` the FUSE mountpoint (``umount -l`` as a fallback).

Import the fixtures into a test module (``from daemon_fixture import daemon,
make_daemon``) or use the class directly.  The daemons run the project
venv's ``evscrypt`` (patched pyfuse3: the threads data path); a test marked
:data:`both_pyfuse3` runs once more on the session's fresh pip-installed venv
(stock pyfuse3: the trio data path), and every daemon checks at start that
it runs the data path its venv should give.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from evscrypt.client import Client
# the daemon's own view of mounts and loop devices, re-exported under the names the tests use
from evscrypt.daemon.loopmount import is_mountpoint as is_mounted, loops_backing as loops_under, mounts_of  # noqa: F401
from evscrypt.paths import disks_dir, socket_path, volume_image

#: The installed entry point of the project venv (same interpreter as pytest).
EVSCRYPT = str(Path(sys.executable).parent / "evscrypt")
#: Which data path each flavour of install runs (see evscrypt/daemon/datapath.py).
DATA_PATHS = {"patched": "threads", "stock": "trio"}
FUSERMOUNT = shutil.which("fusermount3")
#: Bounds that only catch a hang: a busy machine (other suites, fio) may
#: take many seconds to start Python and mount FUSE, so they are generous.
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
#: Environment that must not leak from the caller into the daemon or the CLI.
_SCRUB = ("EVSCRYPT_PASSPHRASE_FILE", "CREDENTIALS_DIRECTORY", "EVSCRYPT_DEBUG", "NOTIFY_SOCKET",
          "EVSCRYPT_HOME", "EVSCRYPT_RUNTIME_DIR")


def fuse_skip_reason() -> str | None:
    """Why daemon tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if FUSERMOUNT is None:
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "daemon tests need root (allow_other FUSE mounts, loop devices, mount)"
    if not os.path.exists(EVSCRYPT):
        return f"{EVSCRYPT} is not installed (run make install)"
    return None


def loop_skip_reason() -> str | None:
    if not os.path.exists("/dev/loop-control"):
        return "loop devices are not available (no /dev/loop-control)"
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        return "losetup or mkfs.ext4 is not installed"
    return None


def _quiet(*cmd: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(list(cmd), capture_output=True, timeout=30)


class Daemon:
    """One `evscrypt daemon` process and the CLI that talks to it."""

    def __init__(self, home: Path, runtime: Path | None = None, log_dir: Path | None = None,
                 extra_args: tuple[str, ...] = (), exe: str = EVSCRYPT, data_path: str | None = None,
                 prefix: tuple[str, ...] = ()):
        self.exe = exe
        self.data_path = data_path  # the data path start() requires, if given
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.runtime = Path(runtime) if runtime else Path(tempfile.mkdtemp(prefix="evs-", dir="/tmp"))
        self._own_runtime = runtime is None
        self.mountpoint = disks_dir(self.runtime)
        self.log_dir = Path(log_dir) if log_dir else self.runtime
        self.extra_args = tuple(extra_args)
        self.prefix = tuple(prefix)  # a command the daemon runs under (prlimit, setpriv)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(EVSCRYPT_HOME=str(self.home), EVSCRYPT_RUNTIME_DIR=str(self.runtime))
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.mount_dirs: list[Path] = []
        self.loops: list[str] = []
        self._starts = 0
        self.log_path: Path | None = None

    # -- lifecycle -------------------------------------------------------------
    def popen(self) -> subprocess.Popen:
        """Start a daemon process on this home/runtime without waiting for it."""
        self._starts += 1
        self.log_path = self.log_dir / f"daemon-{os.getpid()}-{id(self):x}-{self._starts}.log"
        log = open(self.log_path, "wb")
        try:
            return subprocess.Popen([*self.prefix, self.exe, "daemon", *self.extra_args], env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start(self, timeout: float = READY_TIMEOUT) -> "Daemon":
        assert not self.alive, "daemon already running"
        self.returncode = None
        self.proc = self.popen()
        self.wait_ready(timeout)
        if self.data_path is not None:
            got = self.status().get("data_path")
            assert got == self.data_path, f"{self.exe} runs the {got} data path, not {self.data_path}:\n{self.log}"
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise AssertionError(f"daemon exited with {self.proc.returncode} before it was ready:\n{self.log}")
            p = self.cli("status", check=False, timeout=10)
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {timeout} s; last status: {p.stderr}\n{self.log}")
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait, and require a clean exit."""
        assert self.alive, f"daemon is not running (exit {self.proc and self.proc.returncode})"
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not stop within {timeout} s after SIGTERM:\n{self.log}")
        assert rc == 0, f"daemon exited {rc} after SIGTERM:\n{self.log}"
        return rc

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.returncode = self.proc.wait(10)

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    # -- CLI -------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([self.exe, *map(str, args)], env=self.env, capture_output=True, text=True,
                           timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"evscrypt {' '.join(map(str, args))} exited {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}\ndaemon log:\n{self.log}")
        return p

    @property
    def socket(self) -> Path:
        return socket_path(self.runtime)

    def client(self, timeout: float | None = None) -> Client:
        """The daemon's control socket, in this process (no CLI start-up)."""
        return Client(self.socket, timeout)

    def attach(self, name: str, *args: str) -> Path:
        return Path(self.cli("attach", name, *args).stdout.strip().splitlines()[0])

    def attach_new(self, name: str, size: str) -> Path:
        """Create volume ``name`` of ``size`` (as `volume create --size` takes it) and attach it."""
        self.cli("volume", "create", name, "--size", size)
        return self.attach(name)

    def status(self) -> dict:
        import json
        return json.loads(self.cli("status", "--json").stdout)

    def disk(self, name: str) -> Path:
        return self.mountpoint / name

    def image(self, name: str) -> Path:
        return volume_image(self.home, name)

    # -- things a test sets up that teardown must undo -------------------------------
    def mount_dir(self, base: Path, name: str) -> Path:
        """A directory for `attach --mount`, unmounted lazily at teardown."""
        d = Path(base) / name
        d.mkdir(parents=True, exist_ok=True)
        self.mount_dirs.append(d)
        return d

    def losetup(self, path: Path) -> str:
        """Set up a loop device on ``path``; freed at teardown if the test does not."""
        loop = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip()
        self.loops.append(loop)
        return loop

    def cleanup(self) -> None:
        """Kill, then unmount and free everything this daemon or its test left."""
        self.kill()
        for d in reversed(self.mount_dirs):
            if is_mounted(d):
                _quiet("umount", "-l", str(d))
        stale = loops_under(self.mountpoint)
        for loop in stale:
            for mp in mounts_of(loop):
                _quiet("umount", "-l", mp)
        for loop in stale:
            _quiet("losetup", "-d", loop)
        for loop in self.loops:  # loops the test made: free them if still bound to our files
            with contextlib.suppress(OSError):
                backing = Path(f"/sys/block/{Path(loop).name}/loop/backing_file").read_text().strip()
                if backing.startswith(str(self.runtime)) or backing.startswith(str(self.home)):
                    _quiet("losetup", "-d", loop)
        if is_mounted(self.mountpoint):
            _quiet(FUSERMOUNT or "fusermount3", "-u", "-z", str(self.mountpoint))
            if is_mounted(self.mountpoint):
                _quiet("umount", "-l", str(self.mountpoint))
        if self._own_runtime and not is_mounted(self.mountpoint):
            shutil.rmtree(self.runtime, ignore_errors=True)


class DaemonFactory:
    """Makes daemons for one test and cleans up all of them."""

    def __init__(self, tmp_path: Path, exe: str = EVSCRYPT, data_path: str | None = None):
        self.tmp_path = Path(tmp_path)
        self.home = self.tmp_path / "home"
        self.exe, self.data_path = exe, data_path
        self.daemons: list[Daemon] = []

    def __call__(self, home: Path | None = None, runtime: Path | None = None, start: bool = True,
                 extra_args: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(home or self.home, runtime, log_dir=self.tmp_path, extra_args=extra_args, exe=self.exe,
                   data_path=self.data_path, prefix=prefix)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def cleanup(self) -> None:
        for d in self.daemons:
            d.kill()
        for d in reversed(self.daemons):
            d.cleanup()


#: Run a daemon test on both installs: patched pyfuse3 (threads) and stock
#: (trio); the ``evscrypt_exe`` fixture (conftest.py) takes the parameter.
both_pyfuse3 = pytest.mark.parametrize("evscrypt_exe", list(DATA_PATHS), indirect=True)


@pytest.fixture
def make_daemon(tmp_path, evscrypt_exe):
    """A factory: make_daemon(home=None, runtime=None, start=True) -> Daemon.
    All daemons share tmp_path/home unless told otherwise."""
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)
    factory = DaemonFactory(tmp_path, *evscrypt_exe)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A running daemon with a private home and runtime directory."""
    return make_daemon()


# -- I/O and identity helpers shared by the daemon tests ------------------------------
SECTOR = 4096


def pwrite_all(fd: int, data, off: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        assert n > 0
        mv, off = mv[n:], off + n


def write_at(path, off: int, data) -> None:
    """Write ``data`` at ``off`` into the file ``path`` (a disk, an image) and fsync it."""
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_all(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def rand(n: int, seed) -> bytes:
    """``n`` reproducible random bytes for ``seed``."""
    return random.Random(repr(seed)).randbytes(n)


def run_fio(path: Path, args: list[str]) -> dict:
    """fio on ``path`` (32 MiB, crc32c verify, fatal on a mismatch): its job's JSON."""
    import json

    cmd = ["fio", "--name=evs", f"--filename={path}", "--size=32M", "--fallocate=none",
           "--verify=crc32c", "--verify_fatal=1", "--output-format=json", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr}\n{p.stdout[-3000:]}"
    assert "verify" not in p.stderr.lower(), p.stderr
    out = json.loads(p.stdout[p.stdout.index("{"):])
    job = out["jobs"][0]
    assert job["error"] == 0, job
    return job


def expect_fail(d: Daemon, code: int, *args, match: str | None = None, alone: bool = False) -> str:
    """Run a CLI command that must fail with exit ``code``: one error line on
    stderr (``alone``: and nothing else there), nothing on stdout, no
    traceback.  Returns the error line."""
    p = d.cli(*args, check=False)
    assert p.returncode == code, (f"evscrypt {' '.join(map(str, args))}: expected exit {code}, got {p.returncode}\n"
                                  f"stdout: {p.stdout}\nstderr: {p.stderr}\ndaemon log:\n{d.log[-4000:]}")
    errors = [line for line in p.stderr.splitlines() if line.startswith("evscrypt: error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not alone or p.stderr == errors[0] + "\n", p.stderr
    assert p.stdout == "", p.stdout
    if match:
        assert match in errors[0], errors[0]
    return errors[0]


def read_direct(path, off: int, length: int) -> bytes:
    """Read with O_DIRECT (widened to whole sectors), so the bytes come from
    the daemon, not the page cache."""
    import mmap

    lo = off - off % SECTOR
    hi = -(-(off + length) // SECTOR) * SECTOR
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, hi - lo)
        done = 0
        while done < hi - lo:
            n = os.preadv(fd, [memoryview(buf)[done:]], lo + done)
            if n == 0:
                break
            done += n
        return bytes(buf[off - lo:off - lo + length])
    finally:
        os.close(fd)


def run_as(uid: int | None, gid: int | None, fn):
    """Run ``fn()`` in a forked child, as ``uid``/``gid`` unless None; return its
    outcome as {"ok": result}, {"error": class name, "message": ...},
    {"errno": n} or {"signal": n}.

    Forked rather than exec'd: the venv's interpreter lives under /root, which
    other users cannot execute.  A child killed by a signal (SIGBUS from a
    mapping) does not take the test process down.
    """
    import json

    from evscrypt.errors import EvscryptError

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            import faulthandler

            faulthandler.disable()  # an expected SIGBUS needs no stack dump
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            try:
                out = {"ok": fn()}
            except EvscryptError as e:
                out = {"error": type(e).__name__, "message": e.message}
            except OSError as e:
                out = {"errno": e.errno}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return json.loads(data)


#: Skip a test that needs fio where it is not installed.
needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


def pread_all(fd: int, length: int, off: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def volume_status(d: Daemon, name: str) -> dict | None:
    for v in d.status()["volumes"]:
        if v["name"] == name:
            return v
    return None
