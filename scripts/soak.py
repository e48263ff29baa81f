"""make soak: a bounded load run (default 8 minutes; SOAK_SECONDS to change).

- 8 volumes attached, each under mixed fio verify workloads (random 4k and
  sequential 1M writes with crc32c verification, readers alongside);
- meanwhile other volumes are attached and detached in a loop, and the CMK of
  one churn volume is disabled and enabled again and again;
- pass criteria: every fio run exits 0 with no verify error; the daemon's open
  fds return to where they started; its RSS grows by at most RSS_BOUND_MIB.
Prints the daemon's RSS and fd counts at the end.  Exit 0 only on a pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVS = str(ROOT / ".venv/bin/evscrypt")
SECONDS = float(os.environ.get("SOAK_SECONDS", "480"))
RSS_BOUND_MIB = float(os.environ.get("SOAK_RSS_BOUND_MIB", "64"))
WORKLOADS = 8
CHURN = 4


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="evscrypt-soak-", dir="/var/tmp"))
    runtime = Path(tempfile.mkdtemp(prefix="evsk-", dir="/tmp"))
    env = dict(os.environ, EVSCRYPT_HOME=str(home), EVSCRYPT_RUNTIME_DIR=str(runtime))

    def cli(*args, check=True):
        p = subprocess.run([EVS, *args], env=env, capture_output=True, text=True)
        if check and p.returncode:
            raise RuntimeError(f"evscrypt {' '.join(args)}: {p.stderr.strip()}")
        return p

    failures: list[str] = []
    stop = threading.Event()
    log = open(runtime / "daemon.log", "wb")
    daemon = subprocess.Popen([EVS, "daemon"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if cli("status", check=False).returncode == 0:
                break
            time.sleep(0.1)
        cli("key", "create", "flip")
        for i in range(WORKLOADS):
            cli("volume", "create", f"w{i}", "--size", "128M")
        for i in range(CHURN):
            cli("volume", "create", f"c{i}", "--size", "32M", *(["--key", "flip"] if i == 0 else []))
        disks = [cli("attach", f"w{i}").stdout.strip() for i in range(WORKLOADS)]
        # warm-up: the daemon creates some things once, on first use (worker
        # threads, a crypto pool and its wakeup pipe); the baseline comes after
        for args in (["--rw=write", "--bs=1M"], ["--rw=randwrite", "--bs=4k"]):
            subprocess.run(["fio", "--name=warmup", f"--filename={disks[0]}", "--direct=1", "--ioengine=libaio",
                            "--size=16M", "--iodepth=4", *args], capture_output=True, check=True)
        cli("attach", "c1")
        cli("detach", "c1", "--force")
        time.sleep(1)
        base_rss, base_fds = rss_mib(daemon.pid), fds(daemon.pid)
        print(f"soak: {WORKLOADS} volumes under fio, {CHURN} churning, key flips; {SECONDS:.0f} s; "
              f"daemon RSS {base_rss:.1f} MiB, {base_fds} fds at start", flush=True)

        def fio_loop(i: int, disk: str) -> None:
            jobs = [["--rw=randwrite", "--bs=4k", "--iodepth=16"], ["--rw=write", "--bs=1M", "--iodepth=4"]]
            n = 0
            while not stop.is_set():
                args = jobs[n % 2]
                n += 1
                p = subprocess.run(["fio", "--name=soak", f"--filename={disk}", "--direct=1", "--ioengine=libaio",
                                    "--size=64M", f"--offset={(n % 2) * 64}M", "--verify=crc32c",
                                    "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                                    "--output-format=json", *args], capture_output=True, text=True)
                try:
                    err = json.loads(p.stdout)["jobs"][0]["error"]
                except (ValueError, KeyError, IndexError):
                    err = -1
                if p.returncode or err:
                    failures.append(f"fio on w{i} failed (exit {p.returncode}, error {err}): {p.stderr.strip()[-300:]}")
                    return

        def churn_loop() -> None:
            k = 0
            while not stop.is_set():
                name = f"c{k % CHURN}"
                k += 1
                if cli("attach", name, check=False).returncode not in (0, 12):  # 12: key disabled right now
                    failures.append(f"attach {name} failed")
                    return
                cli("detach", name, "--force", check=False)

        def key_loop() -> None:
            while not stop.is_set():
                cli("key", "disable", "flip")
                time.sleep(0.5)
                cli("key", "enable", "flip")
                time.sleep(0.5)

        threads = [threading.Thread(target=fio_loop, args=(i, d)) for i, d in enumerate(disks)]
        threads += [threading.Thread(target=churn_loop), threading.Thread(target=key_loop)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + SECONDS
        peak = base_rss
        while time.monotonic() < deadline and not failures and daemon.poll() is None:
            time.sleep(5)
            peak = max(peak, rss_mib(daemon.pid))
        stop.set()
        for t in threads:
            t.join(timeout=300)
        if daemon.poll() is not None:
            failures.append(f"the daemon died (exit {daemon.returncode})")
        else:
            for i in range(CHURN):
                cli("detach", f"c{i}", "--force", check=False)
            time.sleep(1)
            end_rss, end_fds = rss_mib(daemon.pid), fds(daemon.pid)
            print(f"soak: daemon RSS {end_rss:.1f} MiB at end (start {base_rss:.1f}, peak {peak:.1f}); "
                  f"fds {end_fds} (start {base_fds})")
            if end_rss - base_rss > RSS_BOUND_MIB:
                failures.append(f"RSS grew by {end_rss - base_rss:.1f} MiB (bound {RSS_BOUND_MIB:.0f})")
            if end_fds > base_fds:
                failures.append(f"fd leak: {end_fds - base_fds} more fds than at start")
            for i in range(WORKLOADS):
                cli("detach", f"w{i}")
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(runtime / "disks")], capture_output=True)
        log.close()
        shutil.rmtree(home, ignore_errors=True)
    for f in failures:
        print(f"soak: FAIL: {f}")
    if failures:
        print(f"soak: daemon log kept in {runtime / 'daemon.log'}")
        return 1
    shutil.rmtree(runtime, ignore_errors=True)
    print("soak: PASS (no verify error, no fd leak, RSS within bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
