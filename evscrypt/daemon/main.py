"""Daemon start-up and teardown.

Start: make the process non-dumpable, lock all its memory (or refuse to
run: keys must not reach swap), refuse if another daemon answers on the
socket, clean up a stale FUSE mount (and loops over it) left by a crash and
the temporary entries that killed operations left in the state directory,
mount, start the control socket, then tell systemd READY=1.
Stop: `evscrypt stop` (the control op, which may refuse: see
VolumeManager.stop) detaches everything and answers; SIGTERM/SIGINT cannot
refuse, so the daemon first warns about each volume that could not be
attached again, then detaches everything (flush, unmount, wipe keys).
Either way: STOPPING=1, leave the FUSE loop and unmount.  Exit 0.  The
signal receiver stays open until the end, so a second SIGTERM during the
teardown is ignored instead of killing the daemon half-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pyfuse3
import trio

from .. import client, tempentry
from ..crypto import backend
from ..errors import Busy, DaemonUnavailable, EvscryptError, MemoryProtectionError
from ..paths import disks_dir, socket_path
from ..secret import lock_all_memory, set_nondumpable
from ..volumes import VolumeStore
from . import cpath, datapath, loopmount
from .control import ControlServer
from .kernel import FuseKernel
from .manager import VolumeManager
from .notify import sd_notify
from .ops import Operations
from .pools import Pools, fuse_threads

log = logging.getLogger("evscrypt.daemon")


def cleanup_stale(mountpoint: Path) -> None:
    for what in loopmount.cleanup_stale(mountpoint):
        log.warning("stale state from a previous run: %s", what)
    if loopmount.is_mountpoint(mountpoint):
        log.warning("unmounting stale FUSE mount at %s", mountpoint)
        p = subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, text=True)
        if p.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    if loopmount.is_mountpoint(mountpoint):
        raise Busy(f"{mountpoint} is still mounted and cannot be cleaned up")


def collect_temporary(home: Path, images) -> None:
    """What `evscrypt gc` does, at start: entries of operations still running
    are left alone; so are a shared store's temporary images until they are
    an hour old (the store's STALE_TEMP_AGE)."""
    r = tempentry.collect(home).merge(images.collect_temporary())
    for p in r.removed:
        log.warning("removed %s, left by an interrupted operation", p)
    for e in r.errors:
        log.warning("cannot remove a temporary entry: %s", e)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


async def _serve(manager: VolumeManager, control: ControlServer, fuse_main) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fuse_main)
        await nursery.start(control.serve)
        sd_notify("READY=1")
        log.info("ready: disks at %s, control socket %s", manager.disks, control.path)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            why = await _stop_reason(signals, control.stop_requested)
            sd_notify("STOPPING=1")
            if why is not None:
                log.info("received %s: detaching everything", why)
                await manager.detach_all(why)
            pyfuse3.terminate()
            nursery.cancel_scope.cancel()


async def _stop_reason(signals, stop_requested: trio.Event) -> str | None:
    """Wait for a stop signal (its name) or an answered `stop` request (None)."""
    why: list[str] = []
    async with trio.open_nursery() as n:
        async def on_signal() -> None:
            async for sig in signals:
                why.append(signal.Signals(sig).name)
                break
            n.cancel_scope.cancel()

        async def on_request() -> None:
            await stop_requested.wait()
            n.cancel_scope.cancel()

        n.start_soon(on_signal)
        n.start_soon(on_request)
    return why[0] if why else None


#: The daemon option that runs it anyway when its memory cannot be locked.
ALLOW_SWAPPABLE_FLAG = "--allow-swappable-keys"


def lock_memory(allow_swappable_keys: bool) -> None:
    """Lock all the daemon's memory before any key or thread exists, so that
    DKs, MAC keys, round keys (ours and OpenSSL's), CMKs and the root key
    never reach swap, and wiping one key never unlocks another
    (docs/SECURITY.md, "Keys in memory").  Refuse to start if that fails,
    unless told to run with swappable keys."""
    try:
        lock_all_memory()
    except MemoryProtectionError as e:
        if not allow_swappable_keys:
            raise MemoryProtectionError(f"{e.message}; or start the daemon with {ALLOW_SWAPPABLE_FLAG} "
                                        "to run with keys that may be swapped out")
        log.warning("%s; running anyway (%s): keys are locked page by page where the limit allows, "
                    "OpenSSL's key schedules not at all, and may be swapped out", e.message, ALLOW_SWAPPABLE_FLAG)


#: glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8


def one_malloc_arena() -> None:
    """One malloc arena for all the daemon's threads, before any starts.

    glibc gives each thread that allocates an arena of its own (up to 8 per
    core), and in locked memory (lock_memory) what an arena has freed stays
    resident: it cannot be handed back with MADV_DONTNEED.  With a worker
    thread per core and 1 MiB requests on eight disks at once, the daemon
    grew to 224 MiB; with one arena, 101 MiB.  Python allocates with the GIL
    held, so the threads never contended for arenas anyway, and the C data
    path allocates nothing per request.  Nothing to do on a libc without
    mallopt."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def run(home: Path, runtime: Path, mountpoint: Path | None = None, socket_group: str | None = None,
        debug: bool = False, allow_swappable_keys: bool = False, store: str | None = None) -> int:
    setup_logging(debug)
    set_nondumpable()
    one_malloc_arena()
    lock_memory(allow_swappable_keys)
    dp, xts = datapath.probe(), backend.describe(backend.choose())
    log.info("data path: %s; XTS: %s", dp.describe(), xts)
    runtime.mkdir(mode=0o755, parents=True, exist_ok=True)
    mountpoint = Path(mountpoint or disks_dir(runtime))
    sock = socket_path(runtime)
    try:
        client.Client(sock).ping()
    except DaemonUnavailable:
        pass
    else:
        raise Busy(f"another evscrypt daemon is already serving {sock}")
    cleanup_stale(mountpoint)
    volumes = VolumeStore(home, store)
    collect_temporary(home, volumes.images)
    mountpoint.mkdir(mode=0o755, parents=True, exist_ok=True)

    pools = Pools.sized()
    manager = VolumeManager(volumes, mountpoint, FuseKernel(), pools)
    no_c = cpath.unavailable_reason() if dp.name == "threads" else "the trio data path"
    manager.c_path = no_c is None
    threads = fuse_threads(manager.c_path, aio_store=volumes.images.aio)
    log.info("FUSE worker threads: %d; aligned I/O of encrypted volumes in C: %s", threads,
             "yes" if no_c is None else f"no ({no_c})")
    manager.facts.update(data_path=dp.name, discard=dp.discard, xts_backend=xts, c_path=manager.c_path,
                         fuse_threads=threads)
    ops = Operations(manager, c_path=manager.c_path)
    options = set(pyfuse3.default_options)
    options |= {"fsname=evscrypt", "subtype=evscrypt", "allow_other"}
    # Teardown in the reverse order of set-up (S3QL's mount.py does the
    # same): the pools drain the requests they still reply to, then the
    # FUSE mount goes.  By then every key is wiped (_serve detaches all).
    with contextlib.ExitStack() as teardown:
        try:
            pyfuse3.init(ops, str(mountpoint), options)
        except RuntimeError as e:
            raise EvscryptError(f"cannot mount FUSE at {mountpoint}: {e}")
        teardown.callback(pyfuse3.close, unmount=True)
        if manager.c_path:
            cpath.install(pyfuse3)
            teardown.callback(cpath.uninstall, pyfuse3)
        teardown.callback(pools.close)
        trio.run(_serve, manager, ControlServer(manager, sock, socket_group), dp.main(threads))
    log.info("stopped")
    return 0
