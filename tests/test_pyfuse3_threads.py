"""pyfuse3.main_threads(): worker threads, the sync handlers, lifecycle.

patches/pyfuse3-3.5.0-threads.patch (installed by scripts/build-pyfuse3.sh)
adds pyfuse3.main_threads(threads=1): worker threads receive the FUSE
requests; READ, WRITE, GETATTR, FSYNC and FLUSH are answered right in the
worker by the operations' read_sync(fh, off, size), write_sync(fh, off, buf),
getattr_sync(inode), fsync_sync(fh, datasync) and flush_sync(fh), which may
return the result, a concurrent.futures.Future of it (the completing thread
replies), or None (the request goes to the async handler in the trio
thread).  Every other request runs its async handler as a trio task.
terminate() makes main_threads() return, close() joins the workers and
unmounts, and an exception other than FUSEError from an async handler ends
main_threads().  pyfuse3.request_counts() counts what the workers received,
by opcode.

Like test_pyfuse3_fallocate.py these tests mount a tiny in-memory pyfuse3
filesystem in a subprocess and make real syscalls on the real mount.  Every
file is opened with direct_io, so each pread/pwrite reaches the daemon (as one
READ/WRITE request, unless the kernel splits a big one).  Each file's name
selects how read_sync and write_sync answer it (see the table in DAEMON); the
daemon logs every call, with the thread it ran in, to a JSON-lines file.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import fuse_attrs

from daemon_fixture import is_mounted

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 is missing"),
]

SIZE = 256 * 1024
#: The write handlers store at most this many bytes of a request and return
#: the count they stored, so the count the caller gets proves whose it is.
ACCEPT = 3001
#: How long after pyfuse3 added its done callback the Futures of the
#: "future*" files are completed.
FUTURE_DELAY = 0.05
#: How long each read of "slow-future" takes (in an executor thread).
SLOW_FUTURE_DELAY = 0.3
#: The errnos the daemon's handlers raise as FUSEError.
ERRNOS = {
    "read_sync": errno.ENOSPC,
    "write_sync": errno.EDQUOT,
    "read_future": errno.ENOLINK,
    "write_future": errno.EROFS,
    "barrier": errno.ETIMEDOUT,
    "getattr_sync": errno.ENOMSG,
    "getattr_future": errno.EBADMSG,
    "fsync_sync": errno.ENOLCK,
    "fsync_future": errno.ENOSR,
    "flush_sync": errno.ENOTUNIQ,
    "flush_future": errno.EREMCHG,
}
#: The st_mtime_ns of the attributes that getattr_sync gives (the async
#: getattr and lookup give the time of day), so a caller's fstat shows whose
#: answer it got.
SYNC_MTIME_NS = 1_234_567_890_123_456_789
#: Bound on every wait for the daemon or for a request.
TIMEOUT = 120.0  # bounds that only catch a hang, with a busy machine's margin
#: The files whose read_sync/write_sync answer (see the daemon script).
PATHS = ("direct", "future", "future-done", "async")
NAMES = ["direct", "future", "future-done", "async", "error", "future-error",
         "crash", "future-crash", "badret", "future-badret", "barrier", "slow-future", "slow-open",
             "flush-error", "flush-crash"]


def initial(name: str, size: int = SIZE) -> bytes:
    """A file's initial contents: distinct for each file (same in the daemon)."""
    return hashlib.shake_256(name.encode()).digest(size)


#: The filesystem, run as a script; fuse_attrs.py goes first (its source, so
#: the script needs nothing from this directory, whichever interpreter runs it).
DAEMON = inspect.getsource(fuse_attrs) + textwrap.dedent(
    r"""
    import errno, hashlib, json, logging, os, signal, stat, sys, threading, time
    from concurrent.futures import Future, ThreadPoolExecutor
    import pyfuse3, trio

    mountpoint, log_path, config = sys.argv[1:4]
    config = json.loads(config)
    SIZE, ACCEPT, ERRNOS = config["size"], config["accept"], config["errnos"]
    SYNC_MTIME_NS = config["sync_mtime_ns"]
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(threadName)s %(levelname)s %(name)s: %(message)s")
    log = open(log_path, "a", buffering=1)
    log_lock = threading.Lock()

    def in_trio():
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return False
        return True

    def record(**kw):
        kw["thread"] = threading.current_thread().name
        kw["trio"] = in_trio()
        kw["t"] = time.monotonic()
        line = json.dumps(kw) + "\n"
        with log_lock:
            log.write(line)

    # How read_sync/write_sync answer each file (by its name):
    #   direct        return the result
    #   future        return a Future that an executor thread completes later
    #   future-done   return a Future that is already completed
    #   async         return None: the async read/write handler answers
    #   error         raise FUSEError
    #   future-error  return a Future that completes with a FUSEError
    #   crash         raise RuntimeError / ValueError (-> EIO)
    #   future-crash  return a Future that completes with RuntimeError (-> EIO)
    #   badret        return neither data (read) nor a count (write) (-> EIO)
    #   future-badret the same, through a Future (-> EIO)
    #   barrier       (read) wait on a 2-party threading.Barrier, then the result
    #   slow-future   (read) return a Future completed slow_future_delay later
    #   slow-open     like direct, but its async open waits until a lookup of
    #                 "release" (30 s at most)
    # getattr_sync and fsync_sync answer "direct", "future", "future-done",
    # "async" (None), "error", "future-error", "crash" and "future-crash" the
    # same way, and getattr_sync "badret" and "future-badret" too; any other
    # file, and the root, go to the async handler (None).  The failing ones
    # fail getattr only once the file is open (open() itself asks for the
    # attributes first, to check permissions).  flush_sync, which
    # every close() calls, answers "direct", "future", "future-done" and
    # "async" so, "flush-error" like "future-error" and "flush-crash" like
    # "crash", and leaves every other file to the async flush.
    # A lookup of "boom" raises Boom (not a FUSEError) in the async handler;
    # a lookup of "release" releases the slow opens and answers ENOENT; a
    # lookup of "counts" logs pyfuse3.request_counts() and answers ENOENT.
    NAMES = ["direct", "future", "future-done", "async", "error", "future-error",
             "crash", "future-crash", "badret", "future-badret", "barrier", "slow-future", "slow-open",
             "flush-error", "flush-crash"]

    class Boom(Exception):
        pass

    def initial(name):
        return hashlib.shake_256(name.encode()).digest(SIZE)

    def store(data, off, buf):
        n = min(len(buf), ACCEPT)
        data[off:off + n] = buf[:n]
        return n

    class TracedFuture(Future):
        # Logs when pyfuse3 adds its done callback (and whether the Future was
        # still pending then); callback_added lets late() complete it only after.
        def __init__(self, kind, name, off):
            super().__init__()
            self.kind, self.name, self.off = kind, name, off
            self.callback_added = threading.Event()

        def add_done_callback(self, fn):
            record(op=self.kind + "_add_done_callback", name=self.name, off=self.off,
                   pending=not self.done())
            super().add_done_callback(fn)
            self.callback_added.set()

    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="completer")

    def late(fut, produce):
        # Complete fut with produce() in an executor thread, future_delay after
        # pyfuse3 added its done callback: the callback (the reply) runs there.
        def run():
            if not fut.callback_added.wait(30):
                record(op="no_done_callback", name=fut.name, off=fut.off)
            time.sleep(config["future_delay"])
            try:
                result = produce()
            except BaseException as e:
                fut.set_exception(e)
            else:
                fut.set_result(result)
            record(op=fut.kind + "_completed", name=fut.name, off=fut.off)
        pool.submit(run)
        return fut

    class Fs(pyfuse3.Operations):
        enable_writeback_cache = False

        def __init__(self):
            super().__init__()
            self.name_ino = {n: pyfuse3.ROOT_INODE + 1 + i for i, n in enumerate(NAMES)}
            self.ino_name = {i: n for n, i in self.name_ino.items()}
            self.data = {n: bytearray(initial(n)) for n in NAMES}
            self.fh_name = {}
            self.next_fh = 10
            self.barrier = threading.Barrier(2, timeout=config["barrier_timeout"])
            self.inflight = 0
            self.inflight_lock = threading.Lock()
            self.release_event = None  # a trio.Event, made in the trio thread

        # -- synchronous data path (worker threads) -------------------------

        def _produce_read(self, name, off, size):
            record(op="read_done", name=name, off=off, size=size)
            if name == "future-error":
                raise pyfuse3.FUSEError(ERRNOS["read_future"])
            if name == "future-crash":
                raise RuntimeError("future-crash read")
            if name == "future-badret":
                return 12345
            return bytes(self.data[name][off:off + size])

        def _slow_read(self, name, off, size):
            try:
                time.sleep(config["slow_future_delay"])
                return self._produce_read(name, off, size)
            finally:
                with self.inflight_lock:
                    self.inflight -= 1

        #: The files whose read_sync and write_sync behave alike (_shared).
        SHARED = ("future", "future-error", "future-crash", "future-badret", "future-done",
                  "async", "error", "crash", "badret")

        def _shared(self, kind, name, off, produce):
            # The behaviours read_sync and write_sync share, by file name: a late
            # or already-done future, the async path, a FUSE error, a crash and a
            # wrong return type.
            if name in ("future", "future-error", "future-crash", "future-badret"):
                return late(TracedFuture(kind, name, off), produce)
            if name == "future-done":
                fut = TracedFuture(kind, name, off)
                fut.set_result(produce())
                return fut
            if name == "error":
                raise pyfuse3.FUSEError(ERRNOS[f"{kind}_sync"])
            if name == "crash":
                raise (RuntimeError if kind == "read" else ValueError)(f"{kind}_sync crash")
            if name == "badret":
                return 12345 if kind == "read" else "not a count"
            return None  # "async": the reply comes later, from the test

        def read_sync(self, fh, off, size):
            name = self.fh_name[fh]
            record(op="read_sync", name=name, off=off, size=size)
            if name in ("direct", "slow-open"):
                return bytes(self.data[name][off:off + size])
            if name in self.SHARED:
                return self._shared("read", name, off, lambda: self._produce_read(name, off, size))
            if name == "barrier":
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    record(op="barrier_broken", name=name)
                    raise pyfuse3.FUSEError(ERRNOS["barrier"])
                record(op="barrier_passed", name=name)
                return bytes(self.data[name][off:off + size])
            if name == "slow-future":
                with self.inflight_lock:
                    self.inflight += 1
                    record(op="inflight", name=name, n=self.inflight)
                return pool.submit(self._slow_read, name, off, size)
            raise AssertionError(name)

        def _produce_write(self, name, off, buf):
            record(op="write_done", name=name, off=off, len=len(buf))
            if name == "future-error":
                raise pyfuse3.FUSEError(ERRNOS["write_future"])
            if name == "future-crash":
                raise RuntimeError("future-crash write")
            if name == "future-badret":
                return "not a count"
            return store(self.data[name], off, buf)

        def write_sync(self, fh, off, buf):
            name = self.fh_name[fh]
            record(op="write_sync", name=name, off=off, len=len(buf))
            if name == "direct":
                return store(self.data[name], off, buf)
            if name in self.SHARED:
                return self._shared("write", name, off, lambda: self._produce_write(name, off, buf))
            raise pyfuse3.FUSEError(errno.EPERM)

        def _answer(self, kind, name, produce):
            # getattr_sync, fsync_sync and flush_sync: the same outcomes by file
            if kind == "flush":
                name = {"flush-error": "future-error", "flush-crash": "crash"}.get(
                    name, name if name in ("direct", "future", "future-done") else "async")
            def failing(exc):
                def raise_():
                    raise exc
                return raise_
            if name in ("direct", "future", "future-done"):
                pass
            elif name in ("error", "future-error"):
                produce = failing(pyfuse3.FUSEError(ERRNOS[kind + ("_sync" if name == "error" else "_future")]))
            elif name in ("crash", "future-crash"):
                produce = failing(RuntimeError(f"{kind} {name}"))
            elif name in ("badret", "future-badret") and kind == "getattr":
                produce = lambda: "not attributes"
            else:
                return None  # "async", the root, any other file
            if name.startswith("future-done"):
                fut = TracedFuture(kind, name, 0)
                fut.set_result(produce())
                return fut
            if name.startswith("future"):
                return late(TracedFuture(kind, name, 0), produce)
            return produce()

        def getattr_sync(self, ino):
            name = self.ino_name.get(ino, "/")
            record(op="getattr_sync", name=name)
            if name not in self.fh_name.values() and name not in ("future", "future-done", "async"):
                name = "direct" if name in self.data else name  # not open yet: answer
            def attr():
                a = self._attr(ino)
                a.st_mtime_ns = SYNC_MTIME_NS
                return a
            return self._answer("getattr", name, attr)

        def fsync_sync(self, fh, datasync):
            name = self.fh_name[fh]
            record(op="fsync_sync", name=name, datasync=datasync)
            return self._answer("fsync", name, lambda: True)

        def flush_sync(self, fh):
            name = self.fh_name[fh]
            record(op="flush_sync", name=name)
            return self._answer("flush", name, lambda: True)

        # -- async handlers (trio thread) -------------------------------------

        async def read(self, fh, off, size):
            name = self.fh_name[fh]
            record(op="read", name=name, off=off, size=size)
            if name != "async":
                raise pyfuse3.FUSEError(errno.EXDEV)  # read_sync should have answered
            await trio.sleep(0)
            return bytes(self.data[name][off:off + size])

        async def write(self, fh, off, buf):
            name = self.fh_name[fh]
            record(op="write", name=name, off=off, len=len(buf))
            if name != "async":
                raise pyfuse3.FUSEError(errno.EXDEV)  # write_sync should have answered
            await trio.sleep(0)
            return store(self.data[name], off, buf)

        def _attr(self, ino):
            return entry_attrs(ino, 0 if ino == pyfuse3.ROOT_INODE else len(self.data[self.ino_name[ino]]))

        async def getattr(self, ino, ctx=None):
            if ino != pyfuse3.ROOT_INODE and ino not in self.ino_name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            record(op="getattr", name=self.ino_name.get(ino, "/"))
            return self._attr(ino)

        async def lookup(self, parent, name, ctx=None):
            name = name.decode()
            record(op="lookup", name=name)
            if name == "boom":
                raise Boom("lookup of boom")
            if name == "release":
                self.release_event.set()
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name == "counts":
                record(op="counts", counts=pyfuse3.request_counts())
                raise pyfuse3.FUSEError(errno.ENOENT)
            if parent != pyfuse3.ROOT_INODE or name not in self.name_ino:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(self.name_ino[name])

        async def opendir(self, ino, ctx):
            return ino

        async def readdir(self, fh, start_id, token):
            for i, name in enumerate(NAMES[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name.encode(),
                                             self._attr(self.name_ino[name]), i):
                    break

        async def releasedir(self, fh):
            pass

        async def open(self, ino, flags, ctx):
            if ino not in self.ino_name:
                raise pyfuse3.FUSEError(errno.EISDIR)
            name = self.ino_name[ino]
            if name == "slow-open":
                record(op="open_start", name=name)
                with trio.move_on_after(30):
                    await self.release_event.wait()
                record(op="open_end", name=name)
            self.next_fh += 1
            self.fh_name[self.next_fh] = name
            record(op="open", name=name, fh=self.next_fh)
            return pyfuse3.FileInfo(fh=self.next_fh, direct_io=True)

        async def flush(self, fh):
            record(op="flush", name=self.fh_name[fh])

        async def fsync(self, fh, datasync):
            record(op="fsync", name=self.fh_name[fh], datasync=datasync)

        async def release(self, fh):
            pass

    def leaves(e):
        if isinstance(e, BaseExceptionGroup):
            return [t for sub in e.exceptions for t in leaves(sub)]
        return [type(e).__name__]

    def mounted():
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == os.path.realpath(mountpoint) for line in f)

    async def watch_signals():
        with trio.open_signal_receiver(signal.SIGUSR1) as signals:
            async for _ in signals:
                record(op="terminate")
                pyfuse3.terminate()

    async def run():
        ops.release_event = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            record(op="main_threads_start", threads=config["threads"])
            await pyfuse3.main_threads(config["threads"])
            record(op="main_threads_returned")
            nursery.cancel_scope.cancel()

    def close():
        pyfuse3.close(unmount=True)
        record(op="closed", mounted=mounted(),
               workers=sorted(t.name for t in threading.enumerate()
                              if t.name.startswith("pyfuse3-worker")))
        pool.shutdown(wait=False)

    ops = Fs()
    opts = set(pyfuse3.default_options)
    opts.add("fsname=threadstest")
    pyfuse3.init(ops, mountpoint, opts)
    try:
        trio.run(run)
    except BaseException as e:
        record(op="main_threads_raised", type=type(e).__name__, leaves=leaves(e))
        close()
        sys.exit(3)
    close()
    """
)



class Mount:
    """The daemon subprocess, its mountpoint and its call log."""

    def __init__(self, tmp_path: Path, label: str, threads: int, barrier_timeout: float):
        self.dir = tmp_path / f"mnt-{label}"
        self.dir.mkdir()
        self.log = tmp_path / f"calls-{label}.jsonl"
        self.log.touch()
        self.stderr = tmp_path / f"daemon-{label}.err"
        script = tmp_path / "threads_daemon.py"
        script.write_text(DAEMON)
        config = dict(threads=threads, size=SIZE, accept=ACCEPT, errnos=ERRNOS, sync_mtime_ns=SYNC_MTIME_NS,
                      barrier_timeout=barrier_timeout, future_delay=FUTURE_DELAY,
                      slow_future_delay=SLOW_FUTURE_DELAY)
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(self.dir), str(self.log), json.dumps(config)],
                stdout=err, stderr=err,
            )
        deadline = time.monotonic() + TIMEOUT
        while not os.path.ismount(self.dir):
            if self.proc.poll() is not None:
                self.close()
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.err()}")
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"mount did not appear:\n{self.err()}")
            time.sleep(0.05)

    def path(self, name: str) -> Path:
        return self.dir / name

    def err(self) -> str:
        return self.stderr.read_text()

    def entries(self, op: str | None = None, name: str | None = None) -> list[dict]:
        """The log so far (complete lines only), optionally only one op / file."""
        lines = self.log.read_text().split("\n")[:-1]
        out = [json.loads(line) for line in lines]
        return [e for e in out
                if (op is None or e["op"] == op) and (name is None or e.get("name") == name)]

    def wait_for(self, op: str, name: str | None = None, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + TIMEOUT
        while len(found := self.entries(op, name)) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"no {count} x {op} {name} in the daemon log:\n"
                            f"{self.log.read_text()}\n{self.err()}")
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.err()}")
            time.sleep(0.02)
        return found

    def terminate(self, timeout: float = TIMEOUT) -> int:
        """SIGUSR1: the daemon calls pyfuse3.terminate(), then close()."""
        self.proc.send_signal(signal.SIGUSR1)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop the daemon, whatever state it is in, and leave no mount behind."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], check=False)
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        if is_mounted(self.dir):
            subprocess.run(["fusermount3", "-u", "-z", str(self.dir)], check=False)


@pytest.fixture
def start(tmp_path):
    """start(threads=1): mount a daemon; all are stopped and unmounted at teardown,
    and each must have exited 0 unless the test set its ``expect_rc``."""
    mounts: list[Mount] = []

    def _start(threads: int = 1, barrier_timeout: float = TIMEOUT) -> Mount:
        m = Mount(tmp_path, f"{len(mounts)}-t{threads}", threads, barrier_timeout)
        m.expect_rc = 0
        mounts.append(m)
        return m

    try:
        yield _start
    finally:
        for m in mounts:
            m.close()
    for m in mounts:
        assert not is_mounted(m.dir)
        assert m.proc.returncode == m.expect_rc, (
            f"daemon failed ({m.proc.returncode}):\n{m.err()}")


@pytest.fixture
def mount(start):
    return start()


def open_fd(m: Mount, name: str, flags: int = os.O_RDONLY) -> int:
    return os.open(m.path(name), flags)


def run_threads(target, args_list, timeout: float = TIMEOUT) -> list:
    """Run target(*args) in one thread per args; return each result (or exception)."""
    results: list = [None] * len(args_list)
    go = threading.Barrier(len(args_list))

    def body(i, args):
        try:
            go.wait(timeout)
            results[i] = target(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            results[i] = e

    threads = [threading.Thread(target=body, args=(i, a), daemon=True)
               for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a request never completed"
    return results


def errno_of(call) -> int | None:
    try:
        call()
    except OSError as e:
        return e.errno
    return None


def is_worker(thread: str) -> bool:
    return thread.startswith("pyfuse3-worker-")


def spans(calls: list[dict]) -> list[tuple[int, int]]:
    """(offset, length) of the requests in ``calls``, where requests that
    continue the one before are merged (the kernel splits big reads)."""
    out: list[list[int]] = []
    for c in calls:
        size = c["size"] if "size" in c else c["len"]
        if out and out[-1][0] + out[-1][1] == c["off"]:
            out[-1][1] += size
        else:
            out.append([c["off"], size])
    return [tuple(x) for x in out]


def test_pyfuse3_has_main_threads():
    import pyfuse3

    assert hasattr(pyfuse3, "main_threads"), (
        f"pyfuse3 has no main_threads: run scripts/build-pyfuse3.sh {sys.prefix}")


# -- 1. read_sync ----------------------------------------------------------------

#: (offset, size) of the preads in test_read_sync_paths: unaligned; the kernel
#: splits the last one, and its replies (over 64 KiB) are sent without the GIL.
READS = [(12345, 5000), (SIZE - 100, 100), (1000, 3 * 65536 + 7)]


def test_read_sync_paths(mount):
    """What pread returns is what read_sync produced: directly, through a
    Future that an executor thread completes later, through a Future already
    completed, or (None) through the async read in the trio thread."""
    for name in PATHS:
        fd = open_fd(mount, name)
        try:
            for off, size in READS:
                assert os.pread(fd, size, off) == initial(name)[off:off + size], (name, off)
        finally:
            os.close(fd)

    for name in PATHS:
        # Every READ reached read_sync, in a worker thread (not in trio).
        calls = mount.entries("read_sync", name)
        assert spans(calls) == READS, (name, calls)
        assert max(c["size"] for c in calls) > 65536
        assert all(is_worker(c["thread"]) and not c["trio"] for c in calls), calls

    # future: pyfuse3 added its done callback while the Future was pending; the
    # data was produced, and the Future completed (so the reply sent), later in
    # an executor thread.
    n = len(mount.entries("read_sync", "future"))
    callbacks = mount.entries("read_add_done_callback", "future")
    assert len(callbacks) == n
    assert all(c["pending"] and is_worker(c["thread"]) for c in callbacks), callbacks
    done = mount.entries("read_done", "future")
    assert spans(done) == READS
    assert all(d["thread"].startswith("completer_") for d in done), done
    # (logged after the Future's callbacks ran: maybe after pread returned)
    assert len(mount.wait_for("read_completed", "future", n)) == n
    assert mount.entries("no_done_callback") == []

    # future-done: complete when returned, so the worker replied at once.
    callbacks = mount.entries("read_add_done_callback", "future-done")
    assert len(callbacks) == len(mount.entries("read_sync", "future-done"))
    assert all(not c["pending"] and is_worker(c["thread"]) for c in callbacks), callbacks

    # async: read_sync returned None and the async read answered, in the trio
    # (main) thread; it saw no other file's request.
    reads = mount.entries("read")
    assert {r["name"] for r in reads} == {"async"}
    assert spans(reads) == READS
    assert all(r["thread"] == "MainThread" and r["trio"] for r in reads), reads


# -- 2. write_sync ---------------------------------------------------------------


def test_write_sync_paths(mount):
    """A pwrite lands in the file and returns the count that write_sync gave
    directly, through a Future, or (None) through the async write."""
    big, small = os.urandom(4096), b"xyz" * 33
    for name in PATHS:
        expect = bytearray(initial(name))
        fd = open_fd(mount, name, os.O_RDWR)
        try:
            # The handlers store ACCEPT bytes at most: the caller gets that count.
            assert os.pwrite(fd, big, 1000) == ACCEPT, name
            expect[1000:1000 + ACCEPT] = big[:ACCEPT]
            assert os.pwrite(fd, small, 100_000) == len(small), name
            expect[100_000:100_000 + len(small)] = small
            assert os.pread(fd, SIZE, 0) == expect, name
        finally:
            os.close(fd)
        with open(mount.path(name), "rb") as f:  # a new open sees it too
            assert f.read() == expect, name

        calls = mount.entries("write_sync", name)
        assert [(c["off"], c["len"]) for c in calls] == [(1000, 4096), (100_000, 99)], name
        assert all(is_worker(c["thread"]) and not c["trio"] for c in calls), calls

    callbacks = mount.entries("write_add_done_callback", "future")
    assert [c["off"] for c in callbacks
            if c["pending"] and is_worker(c["thread"])] == [1000, 100_000]
    assert [c["off"] for c in mount.wait_for("write_completed", "future", 2)] == [1000, 100_000]
    done = mount.entries("write_done", "future")
    assert [(d["off"], d["len"]) for d in done] == [(1000, 4096), (100_000, 99)]
    assert all(d["thread"].startswith("completer_") for d in done), done

    callbacks = mount.entries("write_add_done_callback", "future-done")
    assert [c["off"] for c in callbacks if not c["pending"] and is_worker(c["thread"])] == [
        1000, 100_000]

    writes = mount.entries("write")
    assert [(w["name"], w["off"], w["len"]) for w in writes] == [
        ("async", 1000, 4096), ("async", 100_000, 99)]
    assert all(w["thread"] == "MainThread" and w["trio"] for w in writes), writes


# -- 3. errors ---------------------------------------------------------------------


def test_sync_errors_reach_the_caller(mount):
    """FUSEError from read_sync/write_sync, or from the Future they return,
    gives the caller exactly that errno; any other exception gives EIO (and is
    logged with its traceback)."""
    expected = {
        "error": (ERRNOS["read_sync"], ERRNOS["write_sync"]),
        "future-error": (ERRNOS["read_future"], ERRNOS["write_future"]),
        "crash": (errno.EIO, errno.EIO),
        "future-crash": (errno.EIO, errno.EIO),
        "badret": (errno.EIO, errno.EIO),
        "future-badret": (errno.EIO, errno.EIO),
    }
    for name, (read_errno, write_errno) in expected.items():
        fd = open_fd(mount, name, os.O_RDWR)
        try:
            assert errno_of(lambda: os.pread(fd, 4096, 0)) == read_errno, name
            assert errno_of(lambda: os.pwrite(fd, b"x" * 4096, 0)) == write_errno, name
        finally:
            os.close(fd)
        assert len(mount.entries("read_sync", name)) == 1, name
        assert len(mount.entries("write_sync", name)) == 1, name
    # Answered in the worker / by the Future: the async handlers never ran.
    assert mount.entries("read") == [] and mount.entries("write") == []
    for name in ("future-error", "future-crash"):
        for kind in ("read", "write"):
            callbacks = mount.entries(kind + "_add_done_callback", name)
            assert [c["pending"] for c in callbacks] == [True], (kind, name)
            assert len(mount.wait_for(kind + "_completed", name)) == 1

    err = mount.err()
    assert "read_sync failed" in err and "RuntimeError: read_sync crash" in err, err
    assert "write_sync failed" in err and "ValueError: write_sync crash" in err, err
    assert "RuntimeError: future-crash read" in err, err
    assert "RuntimeError: future-crash write" in err, err
    assert "FUSEError" not in err, err  # FUSEError is an answer, not a failure


def test_unexpected_exception_keeps_the_daemon_serving(mount):
    """After read_sync raised RuntimeError (EIO), the daemon answers later
    requests on every path, and the same file fails the same way again."""
    crash = open_fd(mount, "crash")
    try:
        for _ in range(3):
            assert errno_of(lambda: os.pread(crash, 4096, 0)) == errno.EIO
            for name in PATHS:
                with open(mount.path(name), "rb") as f:
                    assert f.read() == initial(name), name
            assert os.stat(mount.path("direct")).st_size == SIZE
    finally:
        os.close(crash)
    assert len(mount.entries("read_sync", "crash")) == 3
    assert mount.proc.poll() is None
    assert mount.err().count("RuntimeError: read_sync crash") == 3


# -- 4. concurrency ---------------------------------------------------------------


def _pread(m: Mount, name: str, size: int, off: int) -> bytes:
    fd = open_fd(m, name)
    try:
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


def test_two_workers_serve_in_parallel(start):
    """threads=2: two reads whose read_sync waits on a 2-party barrier both
    complete, so two workers were in read_sync at the same time."""
    m = start(threads=2)
    results = run_threads(_pread, [(m, "barrier", 4096, 0), (m, "barrier", 4096, 8192)])
    assert results == [initial("barrier")[:4096], initial("barrier")[8192:12288]]
    calls = m.entries("read_sync", "barrier")
    assert len(calls) == 2 and len(m.entries("barrier_passed")) == 2
    assert {c["thread"] for c in calls} == {"pyfuse3-worker-1", "pyfuse3-worker-2"}


def test_one_worker_serves_one_sync_read_at_a_time(start):
    """Control for the test above: with threads=1 the barrier never fills (the
    second READ waits for the only worker), so both reads fail."""
    m = start(threads=1, barrier_timeout=1.0)
    results = run_threads(_pread, [(m, "barrier", 4096, 0), (m, "barrier", 4096, 8192)])
    assert [getattr(r, "errno", r) for r in results] == [ERRNOS["barrier"]] * 2
    assert m.entries("barrier_passed") == []
    assert {c["thread"] for c in m.entries("read_sync", "barrier")} == {"pyfuse3-worker-1"}


def test_futures_let_one_worker_serve_many_requests(start):
    """threads=1, read_sync returns Futures that take SLOW_FUTURE_DELAY each:
    32 concurrent reads all complete, overlapped (the worker does not wait)."""
    m = start(threads=1)
    n = 32
    fds = [open_fd(m, "slow-future") for _ in range(n)]
    try:
        results = run_threads(lambda fd, off: os.pread(fd, 1000, off),
                              [(fd, i * 1000) for i, fd in enumerate(fds)])
    finally:
        for fd in fds:
            os.close(fd)
    assert results == [initial("slow-future")[i * 1000:(i + 1) * 1000] for i in range(n)]
    calls = m.entries("read_sync", "slow-future")
    assert sorted(c["off"] for c in calls) == [i * 1000 for i in range(n)]
    assert {c["thread"] for c in calls} == {"pyfuse3-worker-1"}
    # Overlapped: the daemon saw several of them in flight at once (not a
    # wall-clock bound, which a busy machine could break).
    assert max(e["n"] for e in m.entries("inflight")) >= 4


# -- 5. lifecycle ----------------------------------------------------------------


def test_terminate_returns_and_close_unmounts(start):
    """terminate() makes main_threads() return; close() stops every worker and
    unmounts; the process exits 0 promptly."""
    m = start(threads=4)
    with open(m.path("direct"), "rb") as f:
        assert f.read(4096) == initial("direct")[:4096]
    assert len(m.entries("read_sync")) == 1
    assert m.terminate(timeout=TIMEOUT) == 0, m.err()
    assert not is_mounted(m.dir)
    ops = [e["op"] for e in m.entries()]
    assert ops[-3:] == ["terminate", "main_threads_returned", "closed"], ops
    closed = m.entries("closed")[0]
    assert closed["workers"] == [] and closed["mounted"] is False, closed
    assert "did not stop" not in m.err() and "Traceback" not in m.err(), m.err()


def test_async_handler_exception_ends_main_threads(start):
    """A lookup handler raising a non-FUSEError exception makes main_threads()
    raise it; close() then stops the workers and unmounts, and the request
    that was never answered is aborted."""
    m = start(threads=2)
    m.expect_rc = 3
    assert os.stat(m.path("direct")).st_size == SIZE
    outcome: list = []

    def stat_boom():
        try:
            outcome.append(os.stat(m.path("boom")))
        except OSError as e:
            outcome.append(e)

    t = threading.Thread(target=stat_boom, daemon=True)
    t.start()
    assert m.proc.wait(timeout=TIMEOUT) == 3, m.err()
    t.join(TIMEOUT)
    assert not t.is_alive(), "stat of boom never returned"
    assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome
    assert outcome[0].errno in (errno.ECONNABORTED, errno.ENOTCONN), outcome
    assert not is_mounted(m.dir)
    raised = m.entries("main_threads_raised")
    assert len(raised) == 1 and raised[0]["leaves"] == ["Boom"], raised
    assert m.entries("main_threads_returned") == []
    closed = m.entries("closed")[0]
    assert closed["workers"] == [] and closed["mounted"] is False, closed
    assert [e["name"] for e in m.entries("lookup")][-1] == "boom"


def test_replies_of_pending_futures_are_sent_before_close_destroys_the_session(start):
    """terminate() while Future replies are outstanding: close() waits for
    them (they use the session it frees), so every read the daemon accepted
    gets its data, and nothing replies after close()."""
    m = start(threads=1)
    fd = open_fd(m, "slow-future")
    results: list = []

    def read(i):
        try:
            results.append(os.pread(fd, 4096, i * 4096) == initial("slow-future")[i * 4096:(i + 1) * 4096])
        except OSError as e:
            results.append(e.errno)

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(8)]
    try:
        for t in threads:
            t.start()
        m.wait_for("inflight", "slow-future", count=4)
        assert m.terminate(timeout=TIMEOUT) == 0, m.err()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        os.close(fd) if m.proc.poll() is None else None
    accepted = len(m.entries("read_sync", "slow-future"))
    assert accepted >= 4 and results.count(True) == accepted, (accepted, results)
    # the rest were still queued in the kernel: aborted by the unmount
    assert all(r is True or r in (errno.ECONNABORTED, errno.ENOTCONN) for r in results), results
    err = m.err()
    assert "after close()" not in err and "failed with" not in err and "still pending" not in err, err


def test_async_handler_exception_under_load_is_raised_not_a_trio_crash(start):
    """Requests keep arriving while main_threads() ends with a handler's
    exception: they must not be started in the closing nursery (that would end
    the run with TrioInternalError instead of the handler's exception)."""
    m = start(threads=2)
    m.expect_rc = 3
    stop = threading.Event()

    def hammer(i):
        n = 0
        while not stop.is_set():
            try:
                os.stat(m.path(f"missing-{i}-{n}"))  # a lookup the kernel does not cache
            except OSError:
                pass
            n += 1

    hammers = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(6)]
    for t in hammers:
        t.start()
    try:
        time.sleep(0.2)
        try:
            os.stat(m.path("boom"))
        except OSError:
            pass
        assert m.proc.wait(timeout=TIMEOUT) == 3, m.err()
    finally:
        stop.set()
        for t in hammers:
            t.join(TIMEOUT)
    raised = m.entries("main_threads_raised")
    assert len(raised) == 1 and raised[0]["leaves"] == ["Boom"], (raised, m.err())
    assert "TrioInternalError" not in m.err(), m.err()


def test_external_unmount_ends_main_threads(start):
    """`fusermount3 -u` of the mount ends main_threads(), as it ends main()."""
    m = start(threads=2)
    with open(m.path("direct"), "rb") as f:
        assert f.read(10) == initial("direct")[:10]
    subprocess.run(["fusermount3", "-u", str(m.dir)], check=True)
    assert m.proc.wait(timeout=5) == 0
    assert m.entries("main_threads_returned")


# -- 6. workers do not wait for async handlers ----------------------------------------


def test_requests_answered_while_async_open_waits(start):
    """With one worker, while an async open is still waiting in trio, lookups,
    getattrs, a directory listing and read_sync reads are answered."""
    m = start(threads=1)
    direct = open_fd(m, "direct")
    opened: list = []

    def open_slow():
        try:
            opened.append(os.open(m.path("slow-open"), os.O_RDONLY))
        except OSError as e:
            opened.append(e)

    t = threading.Thread(target=open_slow, daemon=True)
    try:
        t.start()
        m.wait_for("open_start", "slow-open")
        for _ in range(5):
            assert os.stat(m.path("direct")).st_size == SIZE
            assert os.pread(direct, 4096, 4096) == initial("direct")[4096:8192]
            assert os.pread(direct, 10, 0) == initial("direct")[:10]
        assert sorted(os.listdir(m.dir)) == sorted(NAMES)
        assert t.is_alive() and opened == [] and m.entries("open_end") == []
        with pytest.raises(FileNotFoundError):
            os.stat(m.path("release"))  # this lookup lets the open go on
        t.join(TIMEOUT)
        assert not t.is_alive()
    finally:
        os.close(direct)
        for fd in opened:
            if isinstance(fd, int):
                os.close(fd)
    assert len(opened) == 1 and isinstance(opened[0], int), opened
    log = m.entries()
    start_i = next(i for i, e in enumerate(log) if e["op"] == "open_start")
    end_i = next(i for i, e in enumerate(log) if e["op"] == "open_end")
    between = log[start_i + 1:end_i]
    reads = [e for e in between if e["op"] == "read_sync"]
    assert len(reads) == 10 and {e["thread"] for e in reads} == {"pyfuse3-worker-1"}
    assert len([e for e in between if e["op"] == "lookup" and e["name"] == "direct"]) >= 5
    assert [e["name"] for e in between if e["op"] == "lookup"][-1] == "release"
    assert any(e["op"] == "getattr" for e in between)


# -- 7. getattr_sync, fsync_sync, flush_sync ---------------------------------------


def test_getattr_sync_paths(mount):
    """fstat (attr_timeout is 0: one GETATTR each) gets the attributes that
    getattr_sync gave, directly or through a Future, from a worker thread;
    None goes to the async getattr; errors reach the caller as for reads."""
    outcome = {}
    for name in ("direct", "future", "future-done", "async", "error", "future-error", "crash",
                 "future-crash", "badret", "future-badret"):
        fd = open_fd(mount, name)
        try:
            try:
                st = os.fstat(fd)
                outcome[name] = (st.st_size, st.st_mtime_ns == SYNC_MTIME_NS)
            except OSError as e:
                outcome[name] = e.errno
        finally:
            os.close(fd)
    assert outcome == {
        "direct": (SIZE, True), "future": (SIZE, True), "future-done": (SIZE, True),
        "async": (SIZE, False),
        "error": ERRNOS["getattr_sync"], "future-error": ERRNOS["getattr_future"],
        "crash": errno.EIO, "future-crash": errno.EIO, "badret": errno.EIO, "future-badret": errno.EIO,
    }
    calls = mount.entries("getattr_sync")
    assert {c["name"] for c in calls} >= set(outcome), calls
    assert all(is_worker(c["thread"]) and not c["trio"] for c in calls), calls
    # only the declined request reached the async getattr (and the root's, if any)
    assert {g["name"] for g in mount.entries("getattr")} <= {"async", "/"}
    # (two: open() asks first, to check permissions)
    assert [g["thread"] for g in mount.entries("getattr", "async")] == ["MainThread"] * 2
    callbacks = mount.entries("getattr_add_done_callback", "future")
    assert callbacks and all(c["pending"] and is_worker(c["thread"]) for c in callbacks), callbacks
    err = mount.err()
    assert "getattr_sync failed" in err and "RuntimeError: getattr crash" in err, err
    assert "RuntimeError: getattr future-crash" in err, err


def test_fsync_sync_paths(mount):
    """fsync and fdatasync reach fsync_sync in a worker thread (with the
    datasync flag); a Future delays the reply until it completes; None goes
    to the async fsync; errors reach the caller."""
    outcome = {}
    for name in ("direct", "future", "future-done", "async", "error", "future-error", "crash",
                 "future-crash"):
        fd = open_fd(mount, name, os.O_RDWR)
        try:
            outcome[name] = (errno_of(lambda: os.fsync(fd)), errno_of(lambda: os.fdatasync(fd)))
        finally:
            os.close(fd)
    assert outcome == {
        "direct": (None, None), "future": (None, None), "future-done": (None, None), "async": (None, None),
        "error": (ERRNOS["fsync_sync"],) * 2, "future-error": (ERRNOS["fsync_future"],) * 2,
        "crash": (errno.EIO, errno.EIO), "future-crash": (errno.EIO, errno.EIO),
    }
    for name in outcome:
        calls = mount.entries("fsync_sync", name)
        assert [c["datasync"] for c in calls] == [False, True], (name, calls)
        assert all(is_worker(c["thread"]) and not c["trio"] for c in calls), calls
    assert [(f["name"], f["datasync"], f["thread"]) for f in mount.entries("fsync")] == [
        ("async", False, "MainThread"), ("async", True, "MainThread")]
    # the caller got its answer only once the Future had completed
    assert len(mount.entries("fsync_completed", "future")) == 2
    callbacks = mount.entries("fsync_add_done_callback", "future")
    assert [c["pending"] for c in callbacks] == [True, True], callbacks


def test_flush_sync_paths(mount):
    """close() sends FLUSH: flush_sync answers it in a worker thread, an
    error it raises is what close() returns, None goes to the async flush."""
    outcome = {}
    for name in ("direct", "future", "future-done", "async", "flush-error", "flush-crash"):
        fd = open_fd(mount, name)
        outcome[name] = errno_of(lambda: os.close(fd))  # the fd is closed even when this fails
    assert outcome == {"direct": None, "future": None, "future-done": None, "async": None,
                       "flush-error": ERRNOS["flush_future"], "flush-crash": errno.EIO}
    for name in outcome:
        calls = mount.entries("flush_sync", name)
        assert len(calls) == 1 and is_worker(calls[0]["thread"]), (name, calls)
    assert [(f["name"], f["thread"]) for f in mount.entries("flush")] == [("async", "MainThread")]
    assert mount.entries("flush_add_done_callback", "future")[0]["pending"] is True


# -- 8. request_counts -------------------------------------------------------------


def counts(m: Mount) -> dict[int, int]:
    """pyfuse3.request_counts() in the daemon, by way of a lookup of "counts"
    (itself one LOOKUP, counted before the handler runs)."""
    with pytest.raises(FileNotFoundError):
        os.stat(m.path("counts"))
    return {int(k): v for k, v in m.entries("counts")[-1]["counts"].items()}


READ, WRITE, FSYNC, FLUSH, GETATTR, LOOKUP, INIT = 15, 16, 20, 25, 3, 1, 26  # linux/fuse.h


def test_request_counts_count_every_request_by_opcode(mount):
    """Each request the workers receive is counted once, by its opcode,
    whoever answers it: a sync handler, an async one, or libfuse (INIT)."""
    fd = open_fd(mount, "direct", os.O_RDWR)
    async_fd = open_fd(mount, "async", os.O_RDWR)
    try:
        before = counts(mount)
        for i in range(7):  # the file is direct_io: one READ/WRITE per call
            assert os.pread(fd, 4096, i * 4096) == initial("direct")[i * 4096:(i + 1) * 4096]
        for i in range(5):
            assert os.pwrite(fd, b"w" * 100, i * 8192) == 100
        assert os.pread(async_fd, 4096, 0) == initial("async")[:4096]  # the async read
        for _ in range(3):
            os.fstat(fd)
            os.fsync(fd)
        after = counts(mount)
    finally:
        os.close(fd)
        os.close(async_fd)
    assert before.get(INIT) == 1
    delta = {op: after.get(op, 0) - before.get(op, 0) for op in after}
    assert delta[READ] == 8 and delta[WRITE] == 5 and delta[FSYNC] == 3, delta
    # the handlers saw as many as were counted (a stray stat of the mount by
    # another process would show on both sides)
    log = mount.entries()
    marks = [i for i, e in enumerate(log) if e["op"] == "counts"]
    seen = [e["op"] for e in log[marks[-2] + 1:marks[-1] + 1]]
    assert delta[GETATTR] == seen.count("getattr_sync") >= 3, (delta, seen)
    assert delta[LOOKUP] == seen.count("lookup") >= 1, (delta, seen)
    assert seen.count("read_sync") == 8 and seen.count("read") == 1 and seen.count("fsync_sync") == 3, seen
