#!/usr/bin/env python3
"""fio on many busy disks at once: aggregate 4 KiB IOPS of 1, 4 and 8 volumes.

Run by ``make bench`` after bench_fio.py (scripts/bench.sh), or alone from
the project root:

    .venv/bin/python bench/bench_multi.py

Each system serves N disks of 128 MiB from one process, prefilled with a
sequential 1 MiB write; one fio job per disk runs at once (one fio process,
one job section per disk), 4 KiB, libaio, direct=1, QD16 each; the figure
is the sum of the jobs' IOPS.  Jobs: randread, randwrite, randrw with 70%
reads, at N = 1, 4, 8.  Systems:

  plain       N plain files (no FUSE, no encryption)
  fuse-null   the kernel FUSE ceiling: bench/fuse_null.c, a libfuse3 server
              with N files that answers reads with zeros and writes with
              their size and does nothing else, on evscrypt's mount
              settings and worker count.  What the kernel's FUSE client and
              fio cost on this machine when the server does no work.
              Compiled into the scratch directory with gcc and
              pkg-config fuse3 (libfuse3-dev); BENCH_FUSE_NULL_OPTS adds
              libfuse options (e.g. "-o io_uring" with a libfuse that has it)
  qemu-luks   one qemu-storage-daemon with N FUSE exports of LUKS1 images
              (aes-256 xts plain64)
  evscrypt    one evscrypt daemon, N volumes: the C data path, two FUSE
              worker threads per core
  evs-python  the same with EVSCRYPT_CPATH=0: every request in Python, one
              worker thread

BENCH_EVS_VARIANTS adds evscrypt daemons with other settings, for levers
measured in the same rounds: "NAME:VAR=VALUE[,VAR=VALUE];..." gives a system
evscrypt+NAME whose daemon has those variables, e.g.
"spin0:EVSCRYPT_SPIN_US=0;w2:EVSCRYPT_FUSE_THREADS=2".

Rounds alternate the systems (BENCH_ROUNDS, default 3) and every cell is the
median of its rounds.  Besides IOPS, over the timed part of each job: for
the serving process, CPU time per I/O (us) and context switches per second
(all its threads, voluntary and not); for fio (its process and the job
processes it forks) the same; for the whole machine (/proc/stat), busy CPU
time per I/O and context switches per second, and the load average at the
end.  The whole machine's figures include anything else running on it.

Writes bench/results/multi-<timestamp>.json, multi-latest.json and
multi-latest.txt.  Environment: BENCH_RUNTIME (default 4), BENCH_RAMP
(default 1), BENCH_ROUNDS (default 3), BENCH_DIR, BENCH_SYSTEMS,
BENCH_VOLUMES (comma list, default 1,4,8), BENCH_KEEP=1, as bench_fio.py;
BENCH_EVS_VARIANTS and BENCH_FUSE_NULL_OPTS above.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_fio as bf  # noqa: E402  (the shared helpers)

SIZE_ARG = "128M"
SIZE = 128 * bf.MIB
QD = 16
RUNTIME = bf.env_int("BENCH_RUNTIME", 4, 1)
RAMP = bf.env_int("BENCH_RAMP", 1, 0)
ROUNDS = bf.env_int("BENCH_ROUNDS", 3, 1)
VOLUMES = [int(x) for x in os.environ.get("BENCH_VOLUMES", "1,4,8").split(",") if x.strip()]
JOBS = [("randread", "randread"), ("randwrite", "randwrite"), ("randrw70", "randrw")]
SYSTEMS = ["plain", "fuse-null", "qemu-luks", "evscrypt", "evs-python"]
DESCRIPTIONS = {
    "plain": "N plain files on the scratch filesystem (no FUSE, no encryption)",
    "fuse-null": "bench/fuse_null.c: N files that read as zeros and drop writes (the kernel FUSE ceiling)",
    "qemu-luks": "one qemu-storage-daemon, N FUSE exports of LUKS images (aes-256 xts plain64)",
    "evscrypt": "one evscrypt daemon, N XTS-AES-256 volumes, C data path",
    "evs-python": "one evscrypt daemon, N XTS-AES-256 volumes, EVSCRYPT_CPATH=0 (all in Python)",
}


def variants(spec: str) -> dict[str, dict[str, str]]:
    """BENCH_EVS_VARIANTS: "NAME:VAR=VALUE[,VAR=VALUE];..." -> {"evscrypt+NAME": {VAR: VALUE}}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, assigns = part.partition(":")
        env = dict(a.strip().split("=", 1) for a in assigns.split(",") if "=" in a)
        if not name.strip() or not env:
            raise SystemExit(f"bench: BENCH_EVS_VARIANTS: {part!r}: give NAME:VAR=VALUE[,VAR=VALUE]")
        out[f"evscrypt+{name.strip()}"] = env
    return out


VARIANTS = variants(os.environ.get("BENCH_EVS_VARIANTS", ""))
SYSTEMS += list(VARIANTS)
for _name, _env in VARIANTS.items():
    DESCRIPTIONS[_name] = "evscrypt with " + " ".join(f"{k}={v}" for k, v in _env.items())
FUSE_NULL_OPTS = os.environ.get("BENCH_FUSE_NULL_OPTS", "").split()


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (fio forks a process per job)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_usage(pid: int) -> tuple[float, int]:
    """CPU seconds and context switches of ``pid`` and its descendants so far."""
    pids = tree(pid)
    return (sum(bf.cpu_seconds(p) or 0.0 for p in pids), sum(ctx_switches(p) or 0 for p in pids))


def machine_usage() -> tuple[float, int]:
    """The whole machine's busy CPU seconds (all but idle and iowait) and context switches so far."""
    busy, ctxt = 0.0, 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # user..steal, less idle, iowait
            elif line.startswith("ctxt "):
                ctxt = int(line.split()[1])
    return busy, ctxt


def ctx_switches(pid: int | None) -> int | None:
    """Context switches of every thread of ``pid`` so far."""
    if pid is None:
        return None
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    except OSError:
        return None
    return total


class Multi(bf.Bench):
    """bench_fio's Bench (scratch directory, cleanup, process handling) with
    systems of many disks."""

    def __init__(self):
        super().__init__()
        self.disks: dict[str, list[Path]] = {}
        self.pids: dict[str, int | None] = {}
        self.daemons: dict[str, tuple] = {}

    def setup_plain_n(self, n: int) -> None:
        out = []
        for i in range(n):
            img = self.scratch / f"plain{i}.img"
            self.run(None, ["truncate", "-s", SIZE_ARG, str(img)])
            out.append(img)
        self.disks["plain"], self.pids["plain"] = out, None

    def setup_qemu_luks_n(self, n: int) -> None:
        st = bf.SystemState("qemu-luks")
        args = ["qemu-storage-daemon", "--object", f"secret,id=sec0,data={bf.PASSPHRASE}"]
        mnts = []
        for i in range(n):
            img, mnt = self.scratch / f"luks{i}.img", self.scratch / f"luks{i}.disk"
            bf.luks_create(lambda argv: self.run(st, argv, timeout=120), str(img), SIZE_ARG,
                           lambda img=img: img.unlink(missing_ok=True))
            mnt.touch()
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={img}",
                     "--blockdev", f"driver=luks,node-name=l{i},file=f{i},key-secret=sec0",
                     "--export", f"type=fuse,id=e{i},node-name=l{i},mountpoint={mnt},writable=on"]
            mnts.append(mnt)
        p, logf = self.spawn(st, args, "qemu-luks-multi.log")

        def stop():
            for m in mnts:
                bf.fusermount_u(m)
            bf.stop_process(p)
        self.on_cleanup("qemu-luks: unmount the exports and stop qemu-storage-daemon", stop)
        bf.wait_until(lambda: all(bf.is_mounted(m) for m in mnts), 120, "qemu-luks: waiting for the exports", p, logf)
        self.disks["qemu-luks"], self.pids["qemu-luks"] = mnts, p.pid

    def setup_fuse_null_n(self, n: int) -> None:
        from evscrypt.daemon.pools import fuse_threads
        st = bf.SystemState("fuse-null")
        exe, mnt = self.scratch / "fuse_null", self.scratch / "fuse-null.mnt"
        flags = self.run(st, ["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
        self.run(st, ["gcc", "-O2", "-o", str(exe), str(HERE / "fuse_null.c"), *flags, "-lpthread"])
        mnt.mkdir()
        threads = fuse_threads(True)  # as many workers as evscrypt's daemon runs with the C path
        p, logf = self.spawn(st, [str(exe), str(mnt), str(n), str(threads), *FUSE_NULL_OPTS], "fuse-null.log")

        def stop():
            bf.stop_process(p)
            bf.fusermount_u(mnt)
        self.on_cleanup("fuse-null: stop the server", stop)
        bf.wait_until(lambda: bf.is_mounted(mnt), 30, "fuse-null: waiting for the mount", p, logf)
        self.disks["fuse-null"], self.pids["fuse-null"] = [mnt / str(i) for i in range(n)], p.pid
        lib = self.run(None, ["pkg-config", "--modversion", "fuse3"]).stdout.strip()
        self.daemons["fuse-null"] = (threads, f"libfuse {lib} {' '.join(FUSE_NULL_OPTS)}".strip())

    def setup_evs_n(self, name: str, n: int, cpath: bool, extra_env: dict[str, str] | None = None) -> None:
        from evscrypt import client
        from evscrypt.paths import disks_dir, socket_path
        st = bf.SystemState("evscrypt")
        runtime = Path(tempfile.mkdtemp(prefix="evsm.", dir="/tmp"))
        env = dict(self.evs_env, EVSCRYPT_HOME=str(self.scratch / f"{name}-home"), EVSCRYPT_RUNTIME_DIR=str(runtime))
        if not cpath:
            env["EVSCRYPT_CPATH"] = "0"
        env.update(extra_env or {})
        p, logf = self.spawn(st, [self.evs_exe, "daemon"], f"{name}-daemon.log", env=env)
        mnt, sock = disks_dir(runtime), socket_path(runtime)

        def stop():
            bf.stop_process(p, signal.SIGTERM, 60)
            bf.fusermount_u(mnt)
            shutil.rmtree(runtime, ignore_errors=True)
        self.on_cleanup(f"{name}: stop the daemon", stop)
        pid: list[int] = []

        def pong():
            try:
                pid.append(client.Client(sock).ping()["pid"])
                return True
            except Exception:
                return False
        bf.wait_until(pong, 60, f"{name}: waiting for the daemon", p, logf)
        ctl = client.Client(sock)
        out = []
        for i in range(n):
            self.run(st, [self.evs_exe, "volume", "create", f"m{i}", "--size", SIZE_ARG], env=env)
            out.append(Path(ctl.attach(f"m{i}")["path"]))
        status = ctl.status()
        want = cpath
        if bool(status.get("c_path")) != want or any(v.get("c_path") != want for v in status["volumes"]):
            raise RuntimeError(f"{name}: the C data path is {'off' if want else 'on'}: {status.get('c_path')}")
        self.disks[name], self.pids[name] = out, pid[0]
        self.daemons[name] = (status.get("fuse_threads"), status.get("xts_backend"))

    def prefill(self, disks: list[Path]) -> None:
        argv = ["fio", "--direct=1", "--ioengine=libaio", "--rw=write", "--bs=1M", "--iodepth=16",
                f"--size={SIZE_ARG}", "--allow_file_create=0", "--output-format=terse"]
        for i, d in enumerate(disks):
            argv += [f"--name=p{i}", f"--filename={d}"]
        self.run(None, argv, timeout=600)

    def fio_many(self, system: str, n: int, rw: str) -> dict:
        disks, pid = self.disks[system][:n], self.pids[system]
        argv = ["fio", "--direct=1", "--ioengine=libaio", f"--rw={rw}", "--bs=4k", f"--iodepth={QD}",
                f"--size={SIZE_ARG}", "--allow_file_create=0", "--norandommap", "--randrepeat=0",
                "--time_based", f"--runtime={RUNTIME}", f"--ramp_time={RAMP}", "--output-format=json"]
        if rw == "randrw":
            argv.append(f"--rwmixread={bf.RWMIXREAD}")
        for i, d in enumerate(disks):
            argv += [f"--name=j{i}", f"--filename={d}"]
        os.sync()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(RAMP)  # measure the server over the timed part only
        cpu0, cs0, t0 = bf.cpu_seconds(pid), ctx_switches(pid), time.monotonic()
        fio0, all0 = tree_usage(proc.pid), machine_usage()
        time.sleep(RUNTIME * 0.9)
        cpu1, cs1, t1 = bf.cpu_seconds(pid), ctx_switches(pid), time.monotonic()
        fio1, all1 = tree_usage(proc.pid), machine_usage()
        load = float(open("/proc/loadavg").read().split()[0])
        out, err = proc.communicate(timeout=RUNTIME + RAMP + 300)
        if proc.returncode != 0:
            raise RuntimeError(f"fio exit {proc.returncode}: {err.strip()[-600:]}")
        jobs = json.loads(out[out.index("{"):])["jobs"]
        if any(j.get("error") for j in jobs):
            raise RuntimeError(f"fio job error: {err.strip()[-400:]}")
        iops = sum(j["read"]["iops"] + j["write"]["iops"] for j in jobs)
        res = {"iops": round(iops, 1)}
        if cpu0 is not None and cpu1 is not None:
            res["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
            res["cpu_us_per_io"] = round(1e6 * (cpu1 - cpu0) / (t1 - t0) / iops, 2) if iops else None
        if cs0 is not None and cs1 is not None:
            res["ctx_per_s"] = round((cs1 - cs0) / (t1 - t0))
        dt = t1 - t0
        if iops:
            res["fio_cpu_us_per_io"] = round(1e6 * (fio1[0] - fio0[0]) / dt / iops, 2)
            res["all_cpu_us_per_io"] = round(1e6 * (all1[0] - all0[0]) / dt / iops, 2)
        res["fio_ctx_per_s"] = round((fio1[1] - fio0[1]) / dt)
        res["all_ctx_per_s"] = round((all1[1] - all0[1]) / dt)
        res["load1"] = load
        return res


MEASURES = ("iops", "server_cpu_pct", "cpu_us_per_io", "ctx_per_s", "fio_cpu_us_per_io", "fio_ctx_per_s",
            "all_cpu_us_per_io", "all_ctx_per_s", "load1")


def med(rounds: list[dict], key: str):
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _table(data: dict, title: str, cell) -> list[str]:
    """One table: a row per job and volume count, a column per system; ``cell(r)`` formats a median."""
    res, systems = data["results"], data["systems"]
    w = max([12] + [len(s) + 2 for s in systems])
    lines = [title, f"{'job':18s}" + "".join(f"{s:>{w}s}" for s in systems)]
    for job, _ in JOBS:
        for n in data["config"]["volumes"]:
            key = f"{job}-x{n}"
            for i, fmt in enumerate(cell):
                row = f"{key if i == 0 else '':18s}"
                for s in systems:
                    r = res.get(s, {}).get(key)
                    row += f"{fmt(r) if r else '-':>{w}s}"
                lines.append(row)
    return lines + [""]


def _num(v, scale=1.0, unit=""):
    return f"{v / scale:.1f}{unit}" if v else "-"


def render(data: dict) -> str:
    systems = data["systems"]
    lines = [f"many busy disks: one fio job per disk, 4k, libaio, direct=1, QD{QD} each, {SIZE_ARG} disks, "
             f"{data['config']['runtime']} s per job, median of {data['config']['rounds']} alternating rounds",
             f"machine: {data['machine']['nproc']} CPUs, {data['machine']['cpu_model']}, "
             f"kernel {data['machine']['kernel']}; load average at the end of the jobs: "
             f"{data['load1_range'][0]}-{data['load1_range'][1]}", ""]
    for s in systems:
        lines.append(f"  {s:11s} {DESCRIPTIONS[s]}")
    lines.append("")
    lines += _table(data, "aggregate IOPS (server CPU us per I/O; ctx switches per second)", [
        lambda r: _num(r["iops"], 1000, "k"),
        lambda r: _num(r.get("cpu_us_per_io")) + "/" + _num(r.get("ctx_per_s"), 1000, "k")])
    lines += _table(data, "whole machine: busy CPU us per I/O (fio's share); ctx switches per second "
                    "(whole machine/fio)", [
        lambda r: _num(r.get("all_cpu_us_per_io")) + f" ({_num(r.get('fio_cpu_us_per_io'))})",
        lambda r: _num(r.get("all_ctx_per_s"), 1000, "k") + "/" + _num(r.get("fio_ctx_per_s"), 1000, "k")])
    lines += ["ratios (targets: evscrypt x8/x1 >= 1.0 for randread and randwrite; "
              "evscrypt x8 / qemu-luks x8 >= 1.5)"]
    for k, v in data["ratios"].items():
        lines.append(f"  {k:40s} {v if v is not None else '-'}")
    return "\n".join(lines) + "\n"


def ratios(res: dict, volumes: list[int]) -> dict:
    def iops(s, key):
        r = res.get(s, {}).get(key)
        return r["iops"] if r else None

    out = {}
    top = max(volumes)
    for job, _ in JOBS:
        for s in [s for s in SYSTEMS if s not in ("plain", "qemu-luks", "evs-python")]:
            e1, en = iops(s, f"{job}-x1"), iops(s, f"{job}-x{top}")
            out[f"{s} {job} x{top}/x1"] = round(en / e1, 2) if e1 and en else None
        e1, en, q = iops("evscrypt", f"{job}-x1"), iops("evscrypt", f"{job}-x{top}"), iops("qemu-luks", f"{job}-x{top}")
        p1, pn = iops("evs-python", f"{job}-x1"), iops("evs-python", f"{job}-x{top}")
        out[f"evscrypt/qemu-luks {job} x{top}"] = round(en / q, 2) if q and en else None
        out[f"evscrypt/evs-python {job} x1"] = round(e1 / p1, 2) if e1 and p1 else None
        out[f"evscrypt/evs-python {job} x{top}"] = round(en / pn, 2) if en and pn else None
    return {k: v for k, v in out.items() if v is not None}


def main() -> int:
    if shutil.which("fio") is None:
        raise SystemExit("bench: fio not found")
    want = [s for s in os.environ.get("BENCH_SYSTEMS", "").split(",") if s.strip()]
    systems = [s for s in SYSTEMS if not want or s in want]
    b = Multi()
    signal.signal(signal.SIGINT, bf._raise_interrupt)
    signal.signal(signal.SIGTERM, bf._raise_interrupt)
    top = max(VOLUMES)
    results: dict = {s: {} for s in systems}
    rounds: dict = {s: {} for s in systems}
    errors: dict = {}
    try:
        for s in list(systems):
            bf.log(f"setting up {s} with {top} disks")
            try:
                if s == "plain":
                    b.setup_plain_n(top)
                elif s == "qemu-luks":
                    b.setup_qemu_luks_n(top)
                elif s == "fuse-null":
                    b.setup_fuse_null_n(top)
                else:
                    b.setup_evs_n(s, top, cpath=(s != "evs-python"), extra_env=VARIANTS.get(s))
                b.prefill(b.disks[s])
            except Exception as e:
                errors[s] = str(e)
                bf.log(f"  {s}: skipped: {e}")
                systems.remove(s)
        for r in range(ROUNDS):
            order = systems if r % 2 == 0 else list(reversed(systems))
            for job, rw in JOBS:
                for n in VOLUMES:
                    for s in order:
                        key = f"{job}-x{n}"
                        res = b.fio_many(s, n, rw)
                        rounds[s].setdefault(key, []).append(res)
                        bf.log(f"round {r + 1}/{ROUNDS} {key:14s} {s:11s} {res['iops'] / 1000:7.1f}k IOPS "
                               f"cpu {res.get('cpu_us_per_io')} us/io, {res.get('ctx_per_s')} ctx/s; "
                               f"machine {res.get('all_cpu_us_per_io')} us/io, {res.get('all_ctx_per_s')} ctx/s, "
                               f"load {res['load1']}")
        for s in systems:
            for key, rs in rounds[s].items():
                results[s][key] = {k: med(rs, k) for k in MEASURES}
                results[s][key]["rounds"] = rs
        loads = [r["load1"] for s in systems for rs in rounds[s].values() for r in rs]
        data = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "config": {"runtime": RUNTIME, "ramp": RAMP, "rounds": ROUNDS, "volumes": VOLUMES, "qd": QD,
                           "size": SIZE_ARG},
                "machine": bf.machine_info(b.scratch), "systems": systems, "errors": errors,
                "fuse_null": b.daemons.pop("fuse-null", None), "evscrypt_daemons": b.daemons,
                "load1_range": [min(loads, default=None), max(loads, default=None)],
                "results": results, "ratios": ratios(results, VOLUMES)}
        bf.RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        text = render(data)
        for p in (bf.RESULTS / f"multi-{stamp}.json", bf.RESULTS / "multi-latest.json"):
            p.write_text(json.dumps(data, indent=1) + "\n")
        (bf.RESULTS / "multi-latest.txt").write_text(text)
        print(text)
        return 0
    except KeyboardInterrupt:
        bf.log("bench: interrupted")
        return 130
    finally:
        b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
