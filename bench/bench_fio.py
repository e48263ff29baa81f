#!/usr/bin/env python3
"""fio, side by side: evscrypt against its peers, each on a 256 MiB disk.

Run through ``make bench`` (which installs fio, qemu-utils, qemu-system-common,
gocryptfs and, into the venv only, matplotlib), or from the project root:

    .venv/bin/python bench/bench_fio.py

Systems, all backed by files on the same (non-tmpfs) filesystem:

  plain       a plain 256 MiB file, no FUSE, no encryption
  qemu-raw    qemu-storage-daemon, FUSE export of a raw file (cache.direct=off)
  qemu-luks   qemu-storage-daemon, FUSE export of a LUKS1 aes-xts-plain64 image
  gocryptfs   a 256 MiB image file inside a gocryptfs mount
  evscrypt    an evscrypt XTS-AES-256 volume (local KMS)
  evs-noenc   an evscrypt volume created with --no-encrypt
  evs-stock   evscrypt as `pip install` gives it: stock pyfuse3, the trio data
              path (.venv-stock, which scripts/bench.sh makes), encrypted;
              next to `evscrypt` it shows what the pyfuse3 patches buy

Every disk is set up first and prefilled once with a sequential 1 MiB write;
then each job runs on every system in turn (interleaved, so that a change in
background load hits all systems alike), after a sync.  Jobs: 4k randread and
randwrite at QD1/16/128, 4k randrw with 70% reads (rwmixread=70) at
QD1/16/128, 1M read and write at QD1/32, and a 4k randread QD1 latency job;
libaio, direct=1, numjobs=1, time based.  A mixed job is reported as read +
write IOPS (the throughput table and the ratios use the sum), with the p99
latency of each side.

Also measured on a fresh evscrypt daemon: attach latency (20 attach/detach
cycles through the CLI and 20 through the control socket in-process) and the
daemon's RSS idle, with 1 and with 32 attached 1 TiB volumes.

Writes bench/results/bench-<timestamp>.json, latest.json, latest.txt and
latest.png (the PNG needs matplotlib; it is skipped without it).

Environment:
  BENCH_RUNTIME  seconds per job (default 4)      BENCH_RAMP  ramp seconds (default 1)
  BENCH_DIR      parent of the scratch directory (default /var/tmp; not tmpfs)
  BENCH_SYSTEMS  comma list of systems to run (default: all)
  BENCH_JOBS     comma list of substrings selecting jobs (default: all), e.g.
                 BENCH_JOBS=4k-rand BENCH_SYSTEMS=qemu-luks,evscrypt for the
                 4 KiB jobs of the two systems the targets compare
  BENCH_ROUNDS   run the whole job list this many times, interleaved, and
                 report each cell's median (default 1); the JSON keeps every
                 round's figure, and the text shows the spread
  BENCH_KEEP=1   keep the scratch directory and logs
Everything it mounts or starts is torn down at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
SIZE = 256 * MIB
SIZE_ARG = "256M"
PASSPHRASE = "evscrypt-bench"


def luks_create(run, target: str, size: str, start_over=lambda: None, tries: int = 8) -> None:
    """``qemu-img create -f luks`` of *target* (a file or an ``rbd:`` URI)
    through *run* (a callable taking argv that raises RuntimeError on a
    failure), for every qemu-luks peer.  qemu-img times its PBKDF in the
    thread's CPU time and, on a busy machine, sometimes measures none and
    fails: so a fixed iteration time, and a few tries, with *start_over*
    removing what a failed try left."""
    argv = ["qemu-img", "create", "-f", "luks", "--object", f"secret,id=sec0,data={PASSPHRASE}",
            "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=100",
            target, size]
    for attempt in range(tries):
        try:
            run(argv)
            return
        except RuntimeError as e:
            if "Unable to get accurate CPU usage" not in str(e) or attempt == tries - 1:
                raise
            log(f"  qemu-img: {e}; trying again")
            start_over()
ATTACH_CYCLES = 20
RSS_VOLUMES = 32


def env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise SystemExit(f"bench: {name}={raw!r} is not an integer")
    if v < minimum:
        raise SystemExit(f"bench: {name} must be >= {minimum}")
    return v


RUNTIME = env_int("BENCH_RUNTIME", 4, 1)
RAMP = env_int("BENCH_RAMP", 1, 0)
ROUNDS = env_int("BENCH_ROUNDS", 1, 1)
#: The read share of the mixed jobs (fio rwmixread), as databases and VMs
#: mix them; the rest are writes.
RWMIXREAD = 70

# (name, rw, bs, iodepth); 4k jobs are reported in IOPS, 1M jobs in MiB/s;
# "randrw" jobs read RWMIXREAD% of the time.
JOBS = [
    ("4k-randread-qd1", "randread", "4k", 1),
    ("4k-randread-qd16", "randread", "4k", 16),
    ("4k-randread-qd128", "randread", "4k", 128),
    ("4k-randwrite-qd1", "randwrite", "4k", 1),
    ("4k-randwrite-qd16", "randwrite", "4k", 16),
    ("4k-randwrite-qd128", "randwrite", "4k", 128),
    ("4k-randrw70-qd1", "randrw", "4k", 1),
    ("4k-randrw70-qd16", "randrw", "4k", 16),
    ("4k-randrw70-qd128", "randrw", "4k", 128),
    ("1m-read-qd1", "read", "1M", 1),
    ("1m-read-qd32", "read", "1M", 32),
    ("1m-write-qd1", "write", "1M", 1),
    ("1m-write-qd32", "write", "1M", 32),
    ("lat-4k-randread-qd1", "randread", "4k", 1),
]

SYSTEMS = ["plain", "qemu-raw", "qemu-luks", "gocryptfs", "evscrypt", "evs-noenc", "evs-stock"]
DESCRIPTIONS = {
    "plain": "plain file on the scratch filesystem (no FUSE, no encryption)",
    "qemu-raw": "qemu-storage-daemon FUSE export of a raw file, cache.direct=off",
    "qemu-luks": "qemu-storage-daemon FUSE export of a LUKS image (aes-256 xts plain64)",
    "gocryptfs": "256 MiB image file inside a gocryptfs mount (scryptn 10)",
    "evscrypt": "evscrypt volume, XTS-AES-256, local KMS",
    "evs-noenc": "evscrypt volume created with --no-encrypt",
    "evs-stock": "evscrypt volume, XTS-AES-256, on stock pyfuse3 (the trio data path of a pip install)",
}
MAIN = "evscrypt"
PEERS = ["plain", "qemu-raw", "qemu-luks", "gocryptfs", "evs-noenc", "evs-stock"]
#: The `evscrypt` of a plain pip install (stock pyfuse3), for evs-stock.
STOCK_EXE = Path(os.environ.get("BENCH_STOCK_EVSCRYPT", str(ROOT / ".venv-stock" / "bin" / "evscrypt")))


def is_iops_job(job: str) -> bool:
    return "4k" in job.split("-")


def is_mixed_job(job: str) -> bool:
    return "-randrw" in job


# -- small helpers -------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, flush=True)


def _unescape(s: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit() and len(s[i + 1:i + 4]) == 3:
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) for every mount, in mount order."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                res.append((_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return res


def mount_of(path: str | Path) -> tuple[str, str, str]:
    """The mount that holds ``path`` (longest matching mountpoint, latest wins)."""
    p = os.path.abspath(str(path))
    best = ("/", "?", "?")
    for mp, fstype, src in mounts():
        if p == mp or p.startswith(mp.rstrip("/") + "/"):
            if len(mp) >= len(best[0]) or best[1] == "?":
                best = (mp, fstype, src)
    return best


def is_mounted(mountpoint: str | Path) -> bool:
    p = os.path.abspath(str(mountpoint))
    return any(mp == p for mp, _, _ in mounts())


def on_fuse(path: str | Path) -> bool:
    return mount_of(path)[1].startswith("fuse")


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, logf: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}{tail(logf)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out after {timeout:.0f} s{tail(logf)}")
        time.sleep(0.05)


def tail(logf: Path | None, n: int = 15) -> str:
    if logf is None or not logf.exists():
        return ""
    lines = logf.read_text(errors="replace").splitlines()[-n:]
    return ("\n  log " + str(logf) + ":\n    " + "\n    ".join(lines)) if lines else ""


def fusermount_u(mountpoint: Path) -> None:
    """Unmount a FUSE mount; fall back to a lazy unmount if it stays busy."""
    for attempt in range(10):
        if not is_mounted(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        if not is_mounted(mountpoint):
            return
        time.sleep(0.3)
    subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rpartition(")")[2].split()
        # fields after the command: state=0 ... utime=11 stime=12 (0-based here)
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) >= 2 else s[0]
    return {"n": len(s), "median": statistics.median(s), "p90": p90, "min": s[0], "max": s[-1],
            "samples": [round(x, 3) for x in samples]}


def version_of(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout or r.stderr).strip().splitlines()
    return text[0].strip() if text else None


def git_head() -> str | None:
    """The commit HEAD names (read from .git, without running git)."""
    g = ROOT / ".git"
    try:
        head = (g / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (g / ref).exists():
            return (g / ref).read_text().strip()
        packed = g / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def machine_info(scratch: Path) -> dict:
    cpu = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    mp, fstype, src = mount_of(scratch)
    try:
        import evscrypt
        evs_version = evscrypt.__version__
    except Exception as e:  # the package may be mid-edit; the bench still runs the others
        evs_version = f"import failed: {e}"
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "mem_total_mib": mem,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "fio": version_of(["fio", "--version"]),
        "qemu_storage_daemon": version_of(["qemu-storage-daemon", "--version"]),
        "qemu_img": version_of(["qemu-img", "--version"]),
        "gocryptfs": version_of(["gocryptfs", "-version"]),
        "openssl": version_of(["openssl", "version"]),
        "evscrypt": evs_version,
        "evscrypt_git_head": git_head(),
        "scratch_fs": {"path": str(scratch), "mountpoint": mp, "fstype": fstype, "source": src},
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def _os_release() -> str | None:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


# -- the bench ---------------------------------------------------------------------

class SystemState:
    def __init__(self, name: str):
        self.name = name
        self.description = DESCRIPTIONS.get(name, "")  # bench_multi has systems of its own
        self.commands: list[str] = []
        self.disk: Path | None = None
        self.server_pid: int | None = None  # the user-space process serving the disk
        self.alive = None  # callable -> str | None (why it is not usable)
        self.error: str | None = None
        self.setup_s: float | None = None
        self.prefill: dict | None = None

    def to_json(self) -> dict:
        return {"description": self.description, "commands": self.commands, "disk": str(self.disk) if self.disk else None,
                "setup_s": self.setup_s, "prefill": self.prefill, "error": self.error}


class Bench:
    def __init__(self):
        base = Path(os.environ.get("BENCH_DIR", "/var/tmp"))
        base.mkdir(parents=True, exist_ok=True)
        mp, fstype, _ = mount_of(base)
        if fstype in ("tmpfs", "ramfs") or fstype.startswith("fuse"):
            raise SystemExit(f"bench: {base} is on {fstype} ({mp}); set BENCH_DIR to a directory on a disk filesystem")
        self.scratch = Path(tempfile.mkdtemp(prefix="evscrypt-bench.", dir=base))
        # short: the control socket path must fit in sun_path
        self.runtime = Path(tempfile.mkdtemp(prefix="evsb.", dir="/tmp"))
        self.logs = self.scratch / "logs"
        self.logs.mkdir()
        self.cleanups: list[tuple[str, object]] = []
        self.systems = {n: SystemState(n) for n in SYSTEMS}
        self.evs_exe = str(ROOT / ".venv" / "bin" / "evscrypt")
        if not os.access(self.evs_exe, os.X_OK):
            self.evs_exe = shutil.which("evscrypt") or self.evs_exe
        self.evs_env = dict(os.environ, EVSCRYPT_HOME=str(self.scratch / "evs-home"),
                            EVSCRYPT_RUNTIME_DIR=str(self.runtime))
        self.evs_daemon: subprocess.Popen | None = None
        self.evs_pid: int | None = None
        self.procs: list[subprocess.Popen] = []

    # cleanup stack: callbacks run in reverse order, each at most once, errors reported
    def on_cleanup(self, what: str, fn) -> None:
        self.cleanups.append((what, fn))

    def cleanup(self) -> None:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave mounts behind
        try:
            while self.cleanups:
                what, fn = self.cleanups.pop()
                try:
                    fn()
                except Exception as e:
                    log(f"bench: cleanup: {what}: {e}")
            for p in self.procs:  # anything still running that we started
                if p.poll() is None:
                    stop_process(p, signal.SIGKILL, 5)
            leftover = [mp for mp, _, _ in mounts()
                        if mp.startswith(str(self.scratch) + "/") or mp.startswith(str(self.runtime) + "/")]
            for mp in reversed(leftover):
                subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
            still = [mp for mp, _, _ in mounts()
                     if mp.startswith(str(self.scratch) + "/") or mp.startswith(str(self.runtime) + "/")]
            if still:
                log(f"bench: cleanup: still mounted, not removing scratch: {still}")
                return
            if os.environ.get("BENCH_KEEP") == "1":
                log(f"bench: kept {self.scratch} and {self.runtime}")
            else:
                shutil.rmtree(self.scratch, ignore_errors=True)
                shutil.rmtree(self.runtime, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)

    def run(self, st: SystemState | None, argv: list[str], timeout: float = 300, env=None, record=True,
            **kw) -> subprocess.CompletedProcess:
        if st is not None and record:
            st.commands.append(shlex.join(argv))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} -> exit {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}")
        return r

    def spawn(self, st: SystemState, argv: list[str], logname: str, env=None) -> tuple[subprocess.Popen, Path]:
        st.commands.append(shlex.join(argv) + "   # in the background")
        logf = self.logs / logname
        with open(logf, "wb") as lf:
            # own session: a terminal Ctrl-C reaches us, and we tear the servers down in order
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, cwd=str(self.scratch))
        self.procs.append(p)
        return p, logf

    # -- systems ---------------------------------------------------------------
    def setup_plain(self, st: SystemState) -> None:
        img = self.scratch / "plain.img"
        self.run(st, ["truncate", "-s", SIZE_ARG, str(img)])
        st.disk = img
        st.alive = lambda: None if img.stat().st_size == SIZE else "size changed"

    def _qsd_common(self, st: SystemState, argv: list[str], mnt: Path, logname: str) -> None:
        mnt.touch()  # a FUSE export's mountpoint is a regular file
        p, logf = self.spawn(st, argv, logname)

        def stop():
            fusermount_u(mnt)
            stop_process(p)
        self.on_cleanup(f"{st.name}: unmount {mnt} and stop qemu-storage-daemon", stop)
        wait_until(lambda: is_mounted(mnt), 90, f"{st.name}: waiting for the FUSE export", p, logf)
        if mnt.stat().st_size != SIZE:
            raise RuntimeError(f"{st.name}: export is {mnt.stat().st_size} bytes, expected {SIZE}")
        st.disk, st.server_pid = mnt, p.pid
        st.alive = lambda: (f"qemu-storage-daemon exited ({p.returncode}){tail(logf)}" if p.poll() is not None
                            else None if is_mounted(mnt) else "export no longer mounted")

    def setup_qemu_raw(self, st: SystemState) -> None:
        img, mnt = self.scratch / "qemu-raw.img", self.scratch / "qemu-raw.disk"
        self.run(st, ["truncate", "-s", SIZE_ARG, str(img)])
        self._qsd_common(st, [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={img},cache.direct=off",
            "--export", f"type=fuse,id=e,node-name=f,mountpoint={mnt},writable=on",
        ], mnt, "qemu-raw.log")

    def setup_qemu_luks(self, st: SystemState) -> None:
        img, mnt = self.scratch / "qemu-luks.img", self.scratch / "qemu-luks.disk"
        luks_create(lambda argv: self.run(st, argv, timeout=120), str(img), SIZE_ARG,
                    lambda: img.unlink(missing_ok=True))
        self._qsd_common(st, [
            "qemu-storage-daemon",
            "--object", f"secret,id=sec0,data={PASSPHRASE}",
            "--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=luks,node-name=l,file=f,key-secret=sec0",
            "--export", f"type=fuse,id=e,node-name=l,mountpoint={mnt},writable=on",
        ], mnt, "qemu-luks.log")

    def setup_gocryptfs(self, st: SystemState) -> None:
        cipher, mnt = self.scratch / "gocryptfs.cipher", self.scratch / "gocryptfs.mnt"
        cipher.mkdir()
        mnt.mkdir()
        extpass = f"echo {PASSPHRASE}"
        self.run(st, ["gocryptfs", "-init", "-q", "-scryptn", "10", "-extpass", extpass, str(cipher)], timeout=120)
        p, logf = self.spawn(st, ["gocryptfs", "-fg", "-q", "-extpass", extpass, str(cipher), str(mnt)],
                             "gocryptfs.log")

        def stop():
            fusermount_u(mnt)
            try:
                p.wait(timeout=10)  # gocryptfs -fg exits once unmounted
            except subprocess.TimeoutExpired:
                stop_process(p)
        self.on_cleanup(f"gocryptfs: unmount {mnt}", stop)
        wait_until(lambda: is_mounted(mnt), 60, "gocryptfs: waiting for the mount", p, logf)
        disk = mnt / "disk.img"
        self.run(st, ["dd", "if=/dev/zero", f"of={disk}", "bs=1M", "count=256", "conv=fsync", "status=none"],
                 timeout=300)
        st.disk, st.server_pid = disk, p.pid
        st.alive = lambda: (f"gocryptfs exited ({p.returncode}){tail(logf)}" if p.poll() is not None
                            else None if is_mounted(mnt) else "gocryptfs no longer mounted")

    def evs(self, st: SystemState | None, *args: str, timeout: float = 120, record=True) -> str:
        return self.run(st, [self.evs_exe, *args], timeout=timeout, env=self.evs_env, record=record).stdout.strip()

    def start_evscrypt_daemon(self, st: SystemState) -> None:
        if self.evs_daemon is not None:
            if self.evs_daemon.poll() is not None:
                raise RuntimeError(f"evscrypt daemon exited ({self.evs_daemon.returncode})")
            return
        from evscrypt import client
        from evscrypt.paths import disks_dir, socket_path
        p, logf = self.spawn(st, [self.evs_exe, "daemon"], "evscrypt-daemon.log", env=self.evs_env)
        self.evs_daemon, self.evs_log = p, logf
        mnt = disks_dir(self.runtime)
        sock = socket_path(self.runtime)

        def stop():
            # SIGTERM: the daemon detaches everything (flush, wipe keys) and unmounts
            stop_process(p, signal.SIGTERM, 60)
            fusermount_u(mnt)
        self.on_cleanup("evscrypt: stop the daemon", stop)

        def pong():
            try:
                self.evs_pid = client.Client(sock).ping()["pid"]
                return True
            except Exception:
                return False
        wait_until(pong, 60, "evscrypt: waiting for the daemon", p, logf)
        wait_until(lambda: is_mounted(mnt), 30, "evscrypt: waiting for the disks mount", p, logf)

    def setup_evscrypt(self, st: SystemState, name: str, extra: list[str]) -> None:
        self.start_evscrypt_daemon(st)
        self.evs(st, "volume", "create", name, "--size", SIZE_ARG, *extra)
        disk = Path(self.evs(st, "attach", name, timeout=300).splitlines()[-1])

        def detach():
            if self.evs_daemon.poll() is None:
                self.evs(None, "detach", name, timeout=120)
        self.on_cleanup(f"evscrypt: detach {name}", detach)
        p, logf = self.evs_daemon, self.evs_log
        if not on_fuse(disk):
            raise RuntimeError(f"{st.name}: {disk} is not on a FUSE mount")
        st.disk, st.server_pid = disk, self.evs_pid
        st.alive = lambda: (f"evscrypt daemon exited ({p.returncode}){tail(logf)}" if p.poll() is not None
                            else None if on_fuse(disk) and disk.exists() else "disk file gone")

    def setup_evs_stock(self, st: SystemState) -> None:
        """A second daemon, from the stock venv, with its own home and runtime."""
        if not os.access(STOCK_EXE, os.X_OK):
            raise RuntimeError(f"{STOCK_EXE} not found (scripts/bench.sh makes .venv-stock)")
        runtime = Path(tempfile.mkdtemp(prefix="evss.", dir="/tmp"))
        env = dict(self.evs_env, EVSCRYPT_HOME=str(self.scratch / "evs-stock-home"), EVSCRYPT_RUNTIME_DIR=str(runtime))
        p, logf = self.spawn(st, [str(STOCK_EXE), "daemon"], "evscrypt-stock-daemon.log", env=env)
        mnt = runtime / "disks"

        def stop():
            stop_process(p, signal.SIGTERM, 60)
            fusermount_u(mnt)
            shutil.rmtree(runtime, ignore_errors=True)
        self.on_cleanup("evs-stock: stop the daemon", stop)

        def up():
            return subprocess.run([str(STOCK_EXE), "status"], env=env, capture_output=True).returncode == 0
        wait_until(up, 60, "evs-stock: waiting for the daemon", p, logf)
        evs = lambda *a: self.run(st, [str(STOCK_EXE), *a], env=env).stdout.strip()  # noqa: E731
        status = json.loads(evs("status", "--json"))
        if status.get("data_path") != "trio":
            raise RuntimeError(f"evs-stock runs the {status.get('data_path')} data path, not trio")
        evs("volume", "create", "s", "--size", SIZE_ARG)
        disk = Path(evs("attach", "s").splitlines()[-1])
        self.on_cleanup("evs-stock: detach s",
                        lambda: p.poll() is None and self.run(None, [str(STOCK_EXE), "detach", "s"], env=env))
        st.disk, st.server_pid = disk, p.pid
        st.alive = lambda: (f"evs-stock daemon exited ({p.returncode}){tail(logf)}" if p.poll() is not None
                            else None if on_fuse(disk) and disk.exists() else "disk file gone")

    def setup(self, st: SystemState) -> None:
        if st.name == "plain":
            self.setup_plain(st)
        elif st.name == "qemu-raw":
            self.setup_qemu_raw(st)
        elif st.name == "qemu-luks":
            self.setup_qemu_luks(st)
        elif st.name == "gocryptfs":
            self.setup_gocryptfs(st)
        elif st.name == "evscrypt":
            self.setup_evscrypt(st, "b", [])
        elif st.name == "evs-noenc":
            self.setup_evscrypt(st, "bp", ["--no-encrypt"])
        elif st.name == "evs-stock":
            self.setup_evs_stock(st)
        if st.name != "plain" and not on_fuse(st.disk):
            raise RuntimeError(f"{st.name}: {st.disk} is not on FUSE")
        if st.name == "plain" and on_fuse(st.disk):
            raise RuntimeError(f"plain: {st.disk} is on FUSE")

    # -- fio -------------------------------------------------------------------
    def fio(self, st: SystemState, name: str, rw: str, bs: str, qd: int, time_based: bool = True) -> dict:
        argv = ["fio", f"--name={name}", f"--filename={st.disk}", "--direct=1", "--ioengine=libaio",
                f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={SIZE_ARG}", "--numjobs=1",
                "--group_reporting", "--allow_file_create=0", "--norandommap", "--randrepeat=0",
                "--percentile_list=50:90:99:99.9", "--lat_percentiles=1", "--clat_percentiles=1",
                "--output-format=json"]
        if rw == "randrw":
            argv.append(f"--rwmixread={RWMIXREAD}")
        if time_based:
            argv += ["--time_based", f"--runtime={RUNTIME}", f"--ramp_time={RAMP}"]
        why = st.alive() if st.alive else None
        if why:
            raise RuntimeError(f"not usable before {name}: {why}")
        os.sync()  # start each job without the previous job's dirty pages
        cpu0, t0 = cpu_seconds(st.server_pid), time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=RUNTIME + RAMP + 300)
        cpu1, t1 = cpu_seconds(st.server_pid), time.monotonic()
        out = r.stdout
        if r.returncode != 0:
            raise RuntimeError(f"fio exit {r.returncode}: {r.stderr.strip()[-600:] or 'no message'}")
        j = json.loads(out[out.index("{"):])
        job = j["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']}: {r.stderr.strip()[-400:]}")
        if rw == "randrw":  # both sides; throughput is their sum
            res = {"read": fio_side(job["read"]), "write": fio_side(job["write"])}
            res["iops"] = round(res["read"]["iops"] + res["write"]["iops"], 1)
            res["mib_s"] = round(res["read"]["mib_s"] + res["write"]["mib_s"], 2)
        else:
            res = fio_side(job["write" if "write" in rw else "read"])
        res.update({
            "fio_usr_cpu": job.get("usr_cpu"), "fio_sys_cpu": job.get("sys_cpu"),
            "elapsed_s": round(t1 - t0, 2),
            "loadavg": open("/proc/loadavg").read().split()[0],
        })
        if cpu0 is not None and cpu1 is not None:
            res["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
        why = st.alive() if st.alive else None
        if why:
            raise RuntimeError(f"not usable after {name}: {why}")
        return res

    # -- evscrypt control plane ----------------------------------------------------
    def evscrypt_meta(self) -> dict:
        from evscrypt import client
        from evscrypt.paths import socket_path
        st = self.systems["evscrypt"]
        self.start_evscrypt_daemon(st)
        ctl = client.Client(socket_path(self.runtime))
        pid = self.evs_pid
        out: dict = {"daemon_pid": pid}
        time.sleep(0.5)
        out["rss_idle_kib"] = proc_status(pid)["VmRSS"]

        # CLI start-up alone, for scale
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            self.run(None, [self.evs_exe, "--help"], env=self.evs_env)
            t.append((time.perf_counter() - t0) * 1e3)
        out["cli_help_ms"] = summary(t)

        self.evs(None, "volume", "create", "att", "--size", "1T")
        a_cli, d_cli, a_sock, d_sock = [], [], [], []
        for _ in range(ATTACH_CYCLES):
            t0 = time.perf_counter()
            self.evs(None, "attach", "att")
            t1 = time.perf_counter()
            self.evs(None, "detach", "att")
            t2 = time.perf_counter()
            a_cli.append((t1 - t0) * 1e3)
            d_cli.append((t2 - t1) * 1e3)
        for _ in range(ATTACH_CYCLES):
            t0 = time.perf_counter()
            ctl.attach("att")
            t1 = time.perf_counter()
            ctl.detach("att")
            t2 = time.perf_counter()
            a_sock.append((t1 - t0) * 1e3)
            d_sock.append((t2 - t1) * 1e3)
        out["attach_cli_ms"], out["detach_cli_ms"] = summary(a_cli), summary(d_cli)
        out["attach_socket_ms"], out["detach_socket_ms"] = summary(a_sock), summary(d_sock)
        out["rss_after_attach_cycles_kib"] = proc_status(pid)["VmRSS"]

        names = [f"rss{i:02d}" for i in range(RSS_VOLUMES)]
        for n in names:
            self.evs(None, "volume", "create", n, "--size", "1T")
        ctl.attach(names[0])
        time.sleep(0.3)
        out["rss_1x1tib_kib"] = proc_status(pid)["VmRSS"]
        for n in names[1:]:
            ctl.attach(n)
        time.sleep(0.3)
        out["rss_32x1tib_kib"] = proc_status(pid)["VmRSS"]
        out["attached_bytes"] = sum(v["size"] for v in ctl.status()["volumes"])
        for n in names:
            ctl.detach(n)
        time.sleep(0.3)
        out["rss_after_detach_kib"] = proc_status(pid)["VmRSS"]
        # the first attach also loads code (one-off); the marginal cost is from volume 2 to 32
        out["rss_per_volume_kib"] = round((out["rss_32x1tib_kib"] - out["rss_1x1tib_kib"]) / (RSS_VOLUMES - 1), 1)
        for n in names + ["att"]:
            self.evs(None, "volume", "delete", n)
        return out


def fio_side(d: dict) -> dict:
    """Throughput and latency of one side (fio's "read" or "write") of a job."""
    def us(kind, key):
        v = d.get(kind, {}).get("percentile", {}).get(key)
        return round(v / 1000, 1) if v else None
    return {
        "iops": round(d["iops"], 1),
        "mib_s": round(d["bw_bytes"] / MIB, 2),
        # completion latency (io_submit -> completion), as fio's clat
        "clat_p50_us": us("clat_ns", "50.000000"), "clat_p90_us": us("clat_ns", "90.000000"),
        "clat_p99_us": us("clat_ns", "99.000000"), "clat_p99.9_us": us("clat_ns", "99.900000"),
        # total latency (submission + completion); what the table shows, see render()
        "lat_p50_us": us("lat_ns", "50.000000"), "lat_p90_us": us("lat_ns", "90.000000"),
        "lat_p99_us": us("lat_ns", "99.000000"), "lat_p99.9_us": us("lat_ns", "99.900000"),
        "clat_mean_us": round(d["clat_ns"]["mean"] / 1000, 1) if d.get("clat_ns") else None,
        "slat_mean_us": round(d["slat_ns"]["mean"] / 1000, 1) if d.get("slat_ns") else None,
        "io_mib": round(d["io_bytes"] / MIB, 1),
    }


def median_round(job: str, rounds: list[dict]) -> dict:
    """The round with the median throughput (the lower middle one of an even
    count), so that its latencies belong to it; with every round's figure."""
    ordered = sorted(rounds, key=lambda r: tp_value(job, r))
    res = dict(ordered[(len(ordered) - 1) // 2])
    if len(rounds) > 1:
        res["rounds"] = [tp_value(job, r) for r in rounds]
    return res


def spread(r: dict) -> float | None:
    """max/min - 1 of a cell's rounds."""
    v = r.get("rounds")
    return max(v) / min(v) - 1 if v and min(v) > 0 else None


# -- report --------------------------------------------------------------------------

def fmt_tp(job: str, r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['iops']:.0f}" if is_iops_job(job) else f"{r['mib_s']:.1f}"


def tp_value(job: str, r: dict | None) -> float | None:
    if not r:
        return None
    return r["iops"] if is_iops_job(job) else r["mib_s"]


def fmt_lat(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def ratios(results: dict, systems: list[str]) -> dict:
    out = {}
    for job, row in results.items():
        main = tp_value(job, row.get(MAIN))
        out[job] = {}
        for peer in PEERS:
            if peer not in systems:
                continue
            pv = tp_value(job, row.get(peer))
            out[job][peer] = round(main / pv, 3) if main and pv else None
    return out


def mixed_vs_randwrite(results: dict, systems: list[str]) -> dict:
    """Each system's mixed IOPS over its own randwrite IOPS at the same
    queue depth, in the same run."""
    out = {}
    for job, row in results.items():
        if not is_mixed_job(job):
            continue
        pure = results.get("4k-randwrite-qd" + job.rsplit("-qd", 1)[1], {})
        out[job] = {s: round(row[s]["iops"] / pure[s]["iops"], 3) for s in systems
                    if row.get(s) and pure.get(s) and pure[s]["iops"]}
    return out


def render(data: dict) -> str:
    systems = data["systems_run"]
    results, rat = data["results"], data["ratios"]
    peers = [p for p in PEERS if p in systems and MAIN in systems]
    lines = []
    W, JW, UW = 10, 20, 6
    lines.append(f"fio, direct=1, libaio, numjobs=1, {data['config']['size']} disk, "
                 f"{data['config']['runtime_s']} s + {data['config']['ramp_s']} s ramp per job; "
                 f"{data['machine']['nproc']} CPUs, kernel {data['machine']['kernel']}")
    lines.append("")
    head1 = " " * (JW + UW + 2) + "throughput: 4k jobs IOPS, 1M jobs MiB/s".ljust(W * len(systems))
    if peers:
        head1 += " | evscrypt / peer (>1: evscrypt faster)"
    lines.append(head1)
    h = f"{'job':<{JW}} {'unit':<{UW}} " + "".join(f"{s:>{W}}" for s in systems)
    if peers:
        h += " | " + "".join(f"{p:>{W}}" for p in peers)
    lines.append(h)
    lines.append("-" * len(h))
    for job in results:
        row = results[job]
        line = f"{job:<{JW}} {'IOPS' if is_iops_job(job) else 'MiB/s':<{UW}} "
        line += "".join(f"{fmt_tp(job, row.get(s)):>{W}}" for s in systems)
        if peers:
            line += " | " + "".join(f"{(f'{rat[job][p]:.2f}' if rat[job].get(p) else '-'):>{W}}" for p in peers)
        lines.append(line)
    lines.append("")
    LW = 14
    lines.append(" " * (JW + 1) + "latency p50 / p99, microseconds: total = submission + completion "
                 "(fio lat; clat alone is in the JSON)")
    h = f"{'job':<{JW}} " + "".join(f"{s:>{LW}}" for s in systems)
    lines.append(h)
    lines.append("-" * len(h))
    for job in results:
        if is_mixed_job(job):
            continue  # both sides: in the table below
        row = results[job]
        cells = []
        for s in systems:
            r = row.get(s)
            cells.append(f"{fmt_lat(r['lat_p50_us'])}/{fmt_lat(r['lat_p99_us'])}" if r else "-")
        lines.append(f"{job:<{JW}} " + "".join(f"{c:>{LW}}" for c in cells))
        if job.startswith("lat-"):  # the latency job: fio's completion latency too
            cells = [f"{fmt_lat(row[s]['clat_p50_us'])}/{fmt_lat(row[s]['clat_p99_us'])}" if row.get(s) else "-"
                     for s in systems]
            lines.append(f"{'  clat only':<{JW}} " + "".join(f"{c:>{LW}}" for c in cells))
    mixed = [j for j in results if is_mixed_job(j)]
    if mixed:
        MW = 15
        lines.append("")
        lines.append(" " * (JW + 1) + f"mixed jobs ({RWMIXREAD}% reads): IOPS read+write; p99 latency read/write, "
                     "microseconds (fio lat); IOPS / the same system's randwrite IOPS at that depth")
        h = f"{'job':<{JW}} " + "".join(f"{s:>{MW}}" for s in systems)
        lines.append(h)
        lines.append("-" * len(h))
        mvr = data.get("mixed_vs_randwrite", {})
        for job in mixed:
            row = results[job]
            cells = [f"{row[s]['read']['iops']:.0f}+{row[s]['write']['iops']:.0f}" if row.get(s) else "-"
                     for s in systems]
            lines.append(f"{job:<{JW}} " + "".join(f"{c:>{MW}}" for c in cells))
            cells = [f"{fmt_lat(row[s]['read']['lat_p99_us'])}/{fmt_lat(row[s]['write']['lat_p99_us'])}"
                     if row.get(s) else "-" for s in systems]
            lines.append(f"{'  p99 r/w':<{JW}} " + "".join(f"{c:>{MW}}" for c in cells))
            cells = [f"{mvr[job][s]:.2f}" if mvr.get(job, {}).get(s) else "-" for s in systems]
            lines.append(f"{'  / randwrite':<{JW}} " + "".join(f"{c:>{MW}}" for c in cells))
    if data["config"].get("rounds", 1) > 1:
        sp = sorted(x for row in results.values() for r in row.values() if (x := spread(r)) is not None)
        if sp:
            lines.append("")
            lines.append(f"{data['config']['rounds']} rounds, interleaved; each cell is the round with the median "
                         f"throughput. Spread of a cell's rounds (max/min - 1): median {100 * statistics.median(sp):.0f}%, "
                         f"largest {100 * sp[-1]:.0f}%.")
    errs = {s: e for s, e in data["errors"].items() if e}
    m = data.get("evscrypt_control")
    if m and "error" not in m:
        lines.append("")
        lines.append("evscrypt control plane (local KMS, 1 TiB volume):")
        for key, label in (("attach_cli_ms", "attach, `evscrypt attach` CLI call"),
                           ("detach_cli_ms", "detach, `evscrypt detach` CLI call"),
                           ("attach_socket_ms", "attach, control socket in-process (~daemon side)"),
                           ("detach_socket_ms", "detach, control socket in-process"),
                           ("cli_help_ms", "CLI start-up alone (`evscrypt --help`)")):
            s = m[key]
            lines.append(f"  {label:<50} median {s['median']:7.1f} ms   p90 {s['p90']:7.1f} ms   (n={s['n']})")
        marginal = (m["rss_32x1tib_kib"] - m["rss_1x1tib_kib"]) / (RSS_VOLUMES - 1)
        lines.append(f"  daemon RSS: idle {m['rss_idle_kib'] / 1024:.1f} MiB; 1 x 1 TiB attached "
                     f"{m['rss_1x1tib_kib'] / 1024:.1f} MiB; {RSS_VOLUMES} x 1 TiB attached "
                     f"{m['rss_32x1tib_kib'] / 1024:.1f} MiB ({m['attached_bytes'] / 2**40:.0f} TiB; "
                     f"{marginal:.0f} KiB per extra volume); after detach {m['rss_after_detach_kib'] / 1024:.1f} MiB")
        if "rss_after_fio_kib" in m:
            lines.append(f"  daemon RSS after the fio jobs {m['rss_after_fio_kib'] / 1024:.1f} MiB, "
                         f"peak (VmHWM) {m['hwm_after_fio_kib'] / 1024:.1f} MiB")
    elif m:
        errs["evscrypt control plane"] = m["error"]
    cell_errs = [(j, s, r["error"]) for j, row in data.get("job_errors", {}).items() for s, r in row.items()]
    if errs or cell_errs:
        lines.append("")
        lines.append("errors:")
        for s, e in errs.items():
            lines.append(f"  {s}: {e.splitlines()[0][:300]}")
        for j, s, e in cell_errs:
            lines.append(f"  {s} / {j}: {e.splitlines()[0][:300]}")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed; no PNG"
    systems = data["systems_run"]
    results = data["results"]
    iops_jobs = [j for j in results if is_iops_job(j)]
    bw_jobs = [j for j in results if not is_iops_job(j)]
    panels = [(iops_jobs, "IOPS (4 KiB, higher is better)"), (bw_jobs, "MiB/s (1 MiB, higher is better)")]
    panels = [(jobs, title) for jobs, title in panels if jobs]
    widths = [max(len(j), 2) for j, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 6.5), gridspec_kw={"width_ratios": widths}, squeeze=False)
    colors = {"plain": "#7f7f7f", "qemu-raw": "#1f77b4", "qemu-luks": "#17becf", "gocryptfs": "#2ca02c",
              "evscrypt": "#d62728", "evs-noenc": "#ff9896", "evs-stock": "#9467bd"}
    n = len(systems)
    bw = 0.8 / n
    for ax, (jobs, title) in zip(axes[0], panels):
        for i, s in enumerate(systems):
            xs, ys = [], []
            for k, j in enumerate(jobs):
                v = tp_value(j, results[j].get(s))
                if v is not None:
                    xs.append(k - 0.4 + bw * (i + 0.5))
                    ys.append(v)
            bars = ax.bar(xs, ys, bw, label=s, color=colors.get(s))
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in ys], rotation=90, fontsize=7, padding=2)
        ax.set_xticks(range(len(jobs)))
        ax.set_xticklabels(jobs, rotation=25, ha="right", fontsize=9)
        ax.set_title(title)
        ax.margins(y=0.12)  # room for the value labels
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(systems), fontsize=9,
               frameon=False)
    m = data["machine"]
    fig.suptitle(f"evscrypt vs peers: fio direct=1 libaio, {data['config']['size']} disk, "
                 f"{data['config']['runtime_s']}+{data['config']['ramp_s']} s per job, {m['nproc']} CPUs, "
                 f"kernel {m['kernel']}, {data['timestamp']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- main ----------------------------------------------------------------------------

def selected(env: str, names: list[str], exact: bool) -> list[str]:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return list(names)
    want = [w.strip() for w in raw.split(",") if w.strip()]
    if exact:
        bad = [w for w in want if w not in names]
        if bad:
            raise SystemExit(f"bench: {env}: unknown {bad}; choose from {names}")
        return [n for n in names if n in want]
    out = [n for n in names if any(w in n for w in want)]
    if not out:
        raise SystemExit(f"bench: {env}={raw!r} selects nothing from {names}")
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    if shutil.which("fio") is None:
        raise SystemExit("bench: fio not found (make bench installs it when run as root)")
    if shutil.which("fusermount3") is None:
        raise SystemExit("bench: fusermount3 not found (apt install fuse3)")
    systems = selected("BENCH_SYSTEMS", SYSTEMS, exact=True)
    job_names = selected("BENCH_JOBS", [j[0] for j in JOBS], exact=False)
    jobs = [j for j in JOBS if j[0] in job_names]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    b = Bench()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    est = ROUNDS * len(systems) * len(jobs) * (RUNTIME + RAMP + 0.8) + 40
    log(f"bench: {len(systems)} systems x {len(jobs)} jobs x {ROUNDS} round(s), {RUNTIME} s + {RAMP} s ramp each; "
        f"about {est / 60:.0f} min. Scratch {b.scratch}, runtime {b.runtime}")
    data: dict = {
        "timestamp": stamp,
        "config": {"size": SIZE_ARG, "runtime_s": RUNTIME, "ramp_s": RAMP, "ioengine": "libaio", "direct": 1,
                   "numjobs": 1, "rounds": ROUNDS, "rwmixread": RWMIXREAD,
                   "jobs": [{"name": n, "rw": rw, "bs": bs, "iodepth": qd} for n, rw, bs, qd in jobs],
                   "order": "each job runs on every system in turn (interleaved), after os.sync()"},
        "systems_run": systems,
    }
    results: dict = {j[0]: {} for j in jobs}
    job_errors: dict = {}
    interrupted = False
    try:
        data["machine"] = machine_info(b.scratch)
        log(f"bench: {data['machine']['nproc']} CPUs, kernel {data['machine']['kernel']}, scratch on "
            f"{data['machine']['scratch_fs']['fstype']} ({data['machine']['scratch_fs']['source']}), "
            f"load {' '.join(data['machine']['loadavg_start'])}")

        if MAIN in systems or "evs-noenc" in systems:
            log("bench: evscrypt control plane: attach latency, daemon RSS")
            try:
                data["evscrypt_control"] = b.evscrypt_meta()
                m = data["evscrypt_control"]
                log(f"  attach CLI median {m['attach_cli_ms']['median']:.1f} ms, socket "
                    f"{m['attach_socket_ms']['median']:.1f} ms; RSS idle {m['rss_idle_kib']} KiB, "
                    f"32 x 1 TiB {m['rss_32x1tib_kib']} KiB")
            except Exception as e:
                data["evscrypt_control"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  FAILED: {e}")

        for name in systems:
            st = b.systems[name]
            t0 = time.monotonic()
            log(f"bench: setting up {name}")
            try:
                if name in ("qemu-raw", "qemu-luks") and not shutil.which("qemu-storage-daemon"):
                    raise RuntimeError("qemu-storage-daemon not found (apt install qemu-system-common)")
                if name == "qemu-luks" and not shutil.which("qemu-img"):
                    raise RuntimeError("qemu-img not found (apt install qemu-utils)")
                if name == "gocryptfs" and not shutil.which("gocryptfs"):
                    raise RuntimeError("gocryptfs not found (apt install gocryptfs)")
                b.setup(st)
                st.setup_s = round(time.monotonic() - t0, 2)
                p0 = time.monotonic()
                pre = b.fio(st, "prefill", "write", "1M", 32, time_based=False)
                st.commands.append(f"fio --name=prefill --filename={st.disk} --rw=write --bs=1M --iodepth=32 "
                                   f"--size={SIZE_ARG} --direct=1 --ioengine=libaio   # prefill, once")
                st.prefill = {"mib_s": pre["mib_s"], "seconds": round(time.monotonic() - p0, 2)}
                log(f"  {name}: ready in {st.setup_s:.1f} s, disk {st.disk}, prefill {pre['mib_s']:.0f} MiB/s")
            except Exception as e:
                st.error = f"setup: {type(e).__name__}: {e}"
                log(f"  {name}: SETUP FAILED: {e}")

        live = [s for s in systems if b.systems[s].error is None]
        samples: dict = {j[0]: {} for j in jobs}  # job -> system -> one result per round
        for rnd in range(ROUNDS):
            if ROUNDS > 1:
                log(f"bench: round {rnd + 1} of {ROUNDS}")
            for name, rw, bs, qd in jobs:
                parts = []
                for s in live:
                    st = b.systems[s]
                    if st.error:
                        continue
                    try:
                        r = b.fio(st, name, rw, bs, qd)
                        samples[name].setdefault(s, []).append(r)
                        parts.append(f"{s} {fmt_tp(name, r)}")
                    except Exception as e:
                        job_errors.setdefault(name, {})[s] = {"error": f"{type(e).__name__}: {e}"}
                        parts.append(f"{s} ERROR")
                        log(f"  {s} / {name}: {e}")
                        why = st.alive() if st.alive else None
                        if why:
                            st.error = f"died during {name}: {why}"
                unit = "IOPS" if is_iops_job(name) else "MiB/s"
                log(f"  {name:<20} {unit:<5} " + ", ".join(parts))
        for name, row in samples.items():
            for s, rounds in row.items():
                results[name][s] = median_round(name, rounds)

        m = data.get("evscrypt_control")
        if b.evs_pid and m is not None and "error" not in m and b.evs_daemon.poll() is None:
            s = proc_status(b.evs_pid)
            m["rss_after_fio_kib"], m["hwm_after_fio_kib"] = s["VmRSS"], s["VmHWM"]
    except KeyboardInterrupt:
        interrupted = True
        log("\nbench: interrupted; cleaning up")
    finally:
        log("bench: tearing down (unmount, stop daemons, remove scratch)")
        b.cleanup()
    if interrupted:
        return 130

    data["systems"] = {s: b.systems[s].to_json() for s in systems}
    data["errors"] = {s: b.systems[s].error for s in systems}
    data["results"] = results
    data["job_errors"] = job_errors
    data["ratios"] = ratios(results, systems)
    data["mixed_vs_randwrite"] = mixed_vs_randwrite(results, systems)
    data["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    data["wall_s"] = round(time.monotonic() - t_start, 1)

    RESULTS.mkdir(parents=True, exist_ok=True)
    text = render(data)
    for fname in (f"bench-{stamp}.json", "latest.json"):
        (RESULTS / fname).write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "latest.txt").write_text(text + "\n")
    note = None
    try:
        note = plot(data, RESULTS / "latest.png")
        if note is None:
            shutil.copyfile(RESULTS / "latest.png", RESULTS / f"bench-{stamp}.png")
    except Exception as e:
        note = f"PNG failed: {e}"
        traceback.print_exc()
    log("")
    log(text)
    log("")
    log(f"bench: wrote {RESULTS / f'bench-{stamp}.json'}, latest.json, latest.txt"
        + ("" if note else ", latest.png") + f" in {data['wall_s'] / 60:.1f} min")
    if note:
        log(f"bench: {note}")
    failed = any(data["errors"].values()) or bool(job_errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
