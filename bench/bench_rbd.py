"""RBD benchmarks: the peers evscrypt's RBD store is measured against.

Starts a throw-away cluster (scripts/ceph-cluster.sh) under BENCH_DIR, then
runs 4k random read and write at queue depth 16 on a prefilled 256 MiB image:

  rbd-bench      `rbd bench`: librbd without encryption, the upper limit
  fio-rbd        fio's rbd engine: the same limit, measured by fio
  qsd-rbd        qemu-storage-daemon driver=rbd, FUSE export, fio libaio
  qsd-rbd-luks   the same with a luks layer (aes-256-xts-plain64): the peer
  evs-rbd        an evscrypt daemon whose store is the pool (EVSCRYPT_STORE),
                 an XTS-AES-256 volume (local KMS), its disk file, fio libaio;
                 aligned I/O in the C data path (librbd's aio from C)
  evs-rbd-py     the same with EVSCRYPT_CPATH=0: every request through
                 python-rbd, its completions taking the GIL
  store-threads  evscrypt's RBD store in-process, no FUSE: 16 threads each
                 doing XTS + pread_into/pwrite (the engine's per-request work)
  store-aio      the same, one thread keeping 16 aio requests in flight

Every system runs with librbd's cache in writeback mode (rbd bench and fio
flush once; qemu's default cache mode; the store flushes at its start), the
way evscrypt's local store writes through the page cache until fsync.

Each job runs BENCH_ROUNDS times, the systems alternating within each
round (the machine's load drifts; alternating spreads the drift over all of
them), and the table shows the median of the rounds; the JSON keeps every
round.  It prints a table and writes bench/results/rbd-latest.json;
`make bench` runs it after bench_fio.py.

  BENCH_RUNTIME  seconds per job (default 10)   BENCH_DIR  parent of the scratch dir (/var/tmp)
  BENCH_SYSTEMS  comma list (default: all)      BENCH_KEEP=1  keep the scratch dir
  BENCH_ROUNDS   rounds (default 3)

Needs ceph-mon ceph-osd ceph-common (make install), fio, qemu-utils,
qemu-system-common (qemu-storage-daemon) and qemu-block-extra (its rbd driver).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_fio  # noqa: E402  (the qemu-luks image, shared with make bench)

CLUSTER = ROOT / "scripts" / "ceph-cluster.sh"
POOL = "bench"
SIZE = 256 << 20
BS = 4096
QD = 16
RUNTIME = int(os.environ.get("BENCH_RUNTIME", "10"))
PASSPHRASE = bench_fio.PASSPHRASE
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SYSTEMS = ["rbd-bench", "fio-rbd", "qsd-rbd", "qsd-rbd-luks", "evs-rbd", "evs-rbd-py", "store-threads", "store-aio"]
EVSCRYPT = ROOT / ".venv" / "bin" / "evscrypt"
JOBS = ["randread", "randwrite"]


def log(msg: str) -> None:
    print(f"bench-rbd: {msg}", file=sys.stderr, flush=True)


def run(argv, **kw) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode:
        raise RuntimeError(f"{argv[0]} exit {r.returncode}: {r.stderr.strip()[-800:]}")
    return r.stdout


class Bench:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.cdir = scratch / "ceph"
        self.conf = str(self.cdir / "ceph.conf")
        self.env = dict(os.environ, CEPH_CONF=self.conf)
        self.cleanups = []
        self.pids: dict[str, int] = {}  # the process serving each FUSE disk, for its CPU time

    def start(self) -> None:
        t0 = time.monotonic()
        run([str(CLUSTER), "start", str(self.cdir), POOL])
        self.cleanups.append(lambda: run([str(CLUSTER), "stop", str(self.cdir)]))
        log(f"cluster up in {time.monotonic() - t0:.1f} s")

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log(f"cleanup: {e}")

    def rbd(self, *args: str) -> str:
        return run(["rbd", "-c", self.conf, *args])

    def prefilled(self, name: str) -> str:
        """A SIZE image written end to end, so reads hit data, not holes."""
        self.rbd("create", "--size", str(SIZE >> 20), f"{POOL}/{name}")
        self.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-threads", "4", "--io-total", str(SIZE),
                 "--io-pattern", "seq", f"{POOL}/{name}")
        return name

    # -- the systems -------------------------------------------------------------
    def rbd_bench(self, job: str) -> dict:
        img = self.image
        ops = 16384 if job == "randwrite" else 65536  # a few seconds each here
        t0 = time.monotonic()
        out = self.rbd("bench", "--io-type", job[4:], "--io-size", str(BS), "--io-threads", str(QD),
                       "--io-total", str(ops * BS), "--io-pattern", "rand", f"{POOL}/{img}")
        dt = time.monotonic() - t0
        last = [ln for ln in out.splitlines() if ln.startswith("elapsed")][-1]
        iops = float(last.split("ops/sec:")[1].split()[0])
        return {"iops": round(iops), "seconds": round(dt, 1)}

    def fio(self, job: str, extra: list[str]) -> dict:
        argv = ["fio", "--name=j", f"--rw={job}", f"--bs={BS}", f"--iodepth={QD}", "--numjobs=1",
                "--time_based", f"--runtime={RUNTIME}", "--ramp_time=1", "--norandommap", "--randrepeat=0",
                "--output-format=json", *extra]
        out = run(argv, env=self.env, timeout=RUNTIME + 300)
        j = json.loads(out[out.index("{"):])["jobs"][0]
        d = j["write" if "write" in job else "read"]
        return {"iops": round(d["iops"]), "p99_us": round(d["clat_ns"]["percentile"]["99.000000"] / 1000)}

    def fio_rbd(self, job: str) -> dict:
        return self.fio(job, ["--ioengine=rbd", "--clientname=admin", f"--pool={POOL}", f"--rbdname={self.image}"])

    def setup_qsd(self, name: str, luks: bool) -> Path:
        """qemu-storage-daemon: blockdev driver=rbd (qemu-block-extra), a luks
        layer if asked, exported over FUSE as a regular file; returns it."""
        mnt = self.scratch / f"{name}.disk"
        mnt.touch()
        # qemu's default cache mode (writeback): librbd's cache on, as for the
        # qemu-luks peer of make bench and the store below
        rbd_node = f"driver=rbd,node-name=r,pool={POOL},image={name},conf={self.conf},user=admin"
        argv = ["qemu-storage-daemon", "--blockdev", rbd_node]
        if luks:
            secret = f"secret,id=sec0,data={PASSPHRASE}"
            bench_fio.luks_create(lambda argv: run(argv, timeout=120),
                                  f"rbd:{POOL}/{name}:conf={self.conf}:id=admin", str(SIZE),
                                  lambda: self.rbd("rm", f"{POOL}/{name}"))
            argv += ["--object", secret, "--blockdev", "driver=luks,node-name=l,file=r,key-secret=sec0"]
        else:
            self.rbd("create", "--size", str(SIZE >> 20), f"{POOL}/{name}")
        argv += ["--export", f"type=fuse,id=e,node-name={'l' if luks else 'r'},mountpoint={mnt},writable=on"]
        logf = open(self.scratch / f"{name}.log", "w")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        self.pids[str(mnt)] = p.pid

        def stop():
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            p.terminate()
            p.wait(30)
        self.cleanups.append(stop)
        deadline = time.monotonic() + 90
        while not os.path.ismount(mnt):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon for {name} did not export: "
                                   f"{(self.scratch / f'{name}.log').read_text()[-800:]}")
            time.sleep(0.05)
        # prefill through the export, so reads decrypt real data
        run(["fio", "--name=fill", f"--filename={mnt}", "--rw=write", "--bs=1M", "--direct=1",
             "--ioengine=libaio", "--iodepth=4", f"--size={os.stat(mnt).st_size}"], timeout=600)
        return mnt

    def setup_evs(self, name: str, cpath: bool = True) -> Path:
        """An evscrypt daemon on the pool: a volume of SIZE (XTS-AES-256, local
        KMS), attached; its disk file, prefilled as the qsd disks are.  Without
        cpath, EVSCRYPT_CPATH=0: every request in Python."""
        runtime = Path(tempfile.mkdtemp(prefix="evsr.", dir="/tmp"))  # the socket path must stay short
        env = dict(self.env, EVSCRYPT_HOME=str(self.scratch / f"{name}-home"), EVSCRYPT_RUNTIME_DIR=str(runtime),
                   EVSCRYPT_STORE=f"rbd://{POOL}", EVSCRYPT_RBD_CLIENT="admin", EVSCRYPT_CPATH="1" if cpath else "0")
        logf = open(self.scratch / f"{name}.log", "w")
        p = subprocess.Popen([str(EVSCRYPT), "daemon"], stdout=logf, stderr=subprocess.STDOUT, env=env)
        self.pids[name] = p.pid

        def stop():
            subprocess.run([str(EVSCRYPT), "detach", name], env=env, capture_output=True, timeout=120)
            p.terminate()
            p.wait(60)
            shutil.rmtree(runtime, ignore_errors=True)
        self.cleanups.append(stop)
        deadline = time.monotonic() + 90
        while subprocess.run([str(EVSCRYPT), "status"], env=env, capture_output=True).returncode:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"evscrypt daemon did not start: {(self.scratch / f'{name}.log').read_text()[-800:]}")
            time.sleep(0.1)
        run([str(EVSCRYPT), "volume", "create", name, "--size", f"{SIZE >> 20}M"], env=env, timeout=120)
        disk = Path(run([str(EVSCRYPT), "attach", name], env=env, timeout=120).strip())
        self.pids[str(disk)] = p.pid
        run(["fio", "--name=fill", f"--filename={disk}", "--rw=write", "--bs=1M", "--direct=1",
             "--ioengine=libaio", "--iodepth=4", f"--size={SIZE}"], timeout=600)
        return disk

    def qsd(self, job: str, disk: Path) -> dict:
        """fio on a FUSE disk, and the CPU time its server spent per I/O (a
        figure the machine's other load disturbs less than IOPS)."""
        pid = self.pids[str(disk)]
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        r = self.fio(job, [f"--filename={disk}", "--direct=1", "--ioengine=libaio", f"--size={os.stat(disk).st_size}"])
        ios = r["iops"] * (time.monotonic() - t0)  # ramp and start-up included: an estimate
        r["cpu_us_per_io"] = round((cpu_seconds(pid) - cpu0) * 1e6 / max(ios, 1), 1)
        return r

    def store(self, job: str, mode: str) -> dict:
        """The evscrypt RBD store in-process: XTS per 4 KiB sector plus the
        store's I/O, at QD16, random offsets in the data area."""
        from evscrypt.crypto.xts import SectorCipher
        from evscrypt.secret import Secret
        from evscrypt.store.rbd import RBDStore

        st = RBDStore(POOL, conf=self.conf)
        img = st.open(self.image, write=True)
        # librbd's cache writes through until the first flush, then back: a
        # guest's first fsync flips it, so start as a running disk would
        img.flush()
        cipher = SectorCipher(Secret.random(64))
        sectors = SIZE // BS
        stop = time.monotonic() + RUNTIME
        counts = []

        def one(rng, buf, out):
            s = rng.randrange(sectors)
            if job == "randread":
                img.pread_into(buf, s * BS)
                cipher.decrypt_into(s, buf, out)
            else:
                cipher.encrypt_into(s, buf, out)
                img.pwrite(out, s * BS)

        def worker(seed):
            rng, n = random.Random(seed), 0
            buf, out = bytearray(os.urandom(BS)), bytearray(BS)
            while time.monotonic() < stop:
                one(rng, buf, out)
                n += 1
            counts.append(n)

        def aio_loop():
            rng, n = random.Random(1), 0
            plain, out = bytearray(os.urandom(BS)), bytearray(BS)
            pending = []
            while time.monotonic() < stop or pending:
                while len(pending) < QD and time.monotonic() < stop:
                    s = rng.randrange(sectors)
                    if job == "randread":
                        pending.append((s, img.aio_read(s * BS, BS)))
                    else:
                        cipher.encrypt_into(s, plain, out)
                        pending.append((s, img.aio_write(bytes(out), s * BS)))
                s, p = pending.pop(0)
                data = p.wait()
                if data is not None:
                    cipher.decrypt_into(s, data, out)
                n += 1
            counts.append(n)

        t0 = time.monotonic()
        threads = ([threading.Thread(target=worker, args=(i,)) for i in range(QD)] if mode == "threads"
                   else [threading.Thread(target=aio_loop)])
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        img.flush()  # what the cache holds is part of the run
        dt = time.monotonic() - t0
        cipher.close()
        img.close()
        st.close()
        return {"iops": round(sum(counts) / dt)}


#: What each system needs beyond the cluster, and the package that brings it.
NEEDS = {"fio-rbd": [("fio", "fio")],
         "qsd-rbd": [("qemu-storage-daemon", "qemu-system-common"), ("qemu-img", "qemu-utils"),
                     ("/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so", "qemu-block-extra")]}
NEEDS["qsd-rbd-luks"] = NEEDS["qsd-rbd"]


def missing(system: str) -> list[str]:
    return [pkg for tool, pkg in NEEDS.get(system, [])
            if not (os.path.exists(tool) if tool.startswith("/") else shutil.which(tool))]


def main() -> None:
    base = Path(os.environ.get("BENCH_DIR", "/var/tmp"))
    wanted = os.environ.get("BENCH_SYSTEMS", ",".join(SYSTEMS)).split(",")
    for system in list(wanted):
        if missing(system):
            log(f"{system}: skipped, missing apt packages: {' '.join(missing(system))}")
            wanted.remove(system)
    scratch = Path(tempfile.mkdtemp(prefix="evscrypt-bench-rbd.", dir=base))
    b = Bench(scratch)
    rounds: dict[str, dict[str, list]] = {}
    errors: dict[str, str] = {}
    try:
        b.start()
        b.image = b.prefilled("raw")
        disks = {}
        for system in wanted:
            try:
                if system in ("qsd-rbd", "qsd-rbd-luks"):
                    disks[system] = b.setup_qsd(system, luks=system.endswith("luks"))
                elif system in ("evs-rbd", "evs-rbd-py"):
                    disks[system] = b.setup_evs(system.replace("-", ""), cpath=system == "evs-rbd")
            except Exception as e:
                log(f"{system}: set-up failed: {e}")
                errors[system] = str(e)
        for i in range(ROUNDS):
            for job in JOBS:
                for system in (s for s in wanted if s not in errors):
                    log(f"round {i + 1}/{ROUNDS}: {system} {job}")
                    try:
                        r = one(b, system, job, disks)
                    except Exception as e:
                        log(f"{system}: failed: {e}")
                        errors[system] = str(e)
                        continue
                    rounds.setdefault(system, {}).setdefault(job, []).append(r)
                    log(f"  {r}")
    finally:
        b.close()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(scratch, ignore_errors=True)
    results = {s: {j: {"iops": round(statistics.median(r["iops"] for r in rs)), "rounds": rs}
                   for j, rs in jobs.items()} for s, jobs in rounds.items()}
    for s, e in errors.items():
        results.setdefault(s, {})["error"] = e
    out = {"size": SIZE, "bs": BS, "qd": QD, "runtime": RUNTIME, "rounds": ROUNDS, "results": results,
           "nproc": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3]}
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "rbd-latest.json").write_text(json.dumps(out, indent=1))
    print(f"median of {ROUNDS} round(s)")
    print(f"{'system':<16}{'4k randread QD16':>20}{'4k randwrite QD16':>20}")
    for system, r in results.items():
        cells = [f"{r[j]['iops']:>14} IOPS" if j in r else f"{'-':>19}" for j in JOBS]
        print(f"{system:<16}{cells[0]:>20}{cells[1]:>20}")
    peer = results.get("qsd-rbd-luks", {})
    for name in ("evs-rbd", "evs-rbd-py"):
        evs = results.get(name, {})
        for j in JOBS:
            if j in peer and j in evs:
                # the median of each round's ratio: a round's two runs saw the same load
                per = [e["iops"] / q["iops"] for e, q in zip(evs[j]["rounds"], peer[j]["rounds"])]
                cpu = [r.get("cpu_us_per_io") for r in evs[j]["rounds"]]
                print(f"{name} / qsd-rbd-luks, {j}: {statistics.median(per):.2f}x (rounds: "
                      f"{', '.join(f'{x:.2f}' for x in per)}; server CPU per I/O {statistics.median(cpu)} us)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(b: Bench, system: str, job: str, disks: dict) -> dict:
    if system == "rbd-bench":
        return b.rbd_bench(job)
    if system == "fio-rbd":
        return b.fio_rbd(job)
    if system in disks:
        return b.qsd(job, disks[system])
    return b.store(job, system.split("-")[1])


if __name__ == "__main__":
    main()
