"""Every thread the daemon runs besides the trio thread, declared here.

* FUSE worker threads (``pyfuse3.main_threads``, the threads data path):
  they receive every request (:func:`fuse_threads`).
* ``io``: large reads and writes the workers hand off (at least
  ops.OFFLOAD_MIN), so several run at once while a worker goes on receiving.
* ``fsync``: fsyncs the workers hand off.  A pool of its own: an fsync waits
  for the disk (milliseconds) and must not hold a thread large I/O needs.
* ``io_limiter``: engine calls from the trio thread (the trio data path,
  discards, requests that waited for a snapshot), the fsync at detach,
  snapshot copies and resizes.
* ``slow_limiter``: calls that wait on something outside the daemon: the
  KMS (unwrap at attach, key states), losetup, mkfs, mount and resize2fs.
* the split pool (evscrypt.parallel): one thread per extra core, for one
  large run of sectors at a time; it computes, so cores size it, not this.

All but the split pool are sized from one setting, ``EVSCRYPT_IO_THREADS``
(default :data:`IO_THREADS`).  :meth:`Pools.close` drains them in order
(the FUSE-facing pools first, which may still be replying), as the daemon
stops, before the FUSE mount goes away (main.run).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import trio

from .. import parallel
from ..errors import InvalidArgument

#: FUSE worker threads per core with the C data path (see fuse_threads).
WORKERS_PER_CORE = 2


def fuse_threads(c_path: bool, aio_store: bool = False) -> int:
    """FUSE worker threads, which receive every request and serve small
    reads and writes themselves (large ones go to the ``io`` pool).

    With the C data path (cpath.py), two per core: they serve aligned I/O
    without the GIL, in parallel, and a second one per core keeps the core
    busy while the first waits (in pread or pwrite, or preempted by the
    clients on a busy machine): 4 KiB IOPS rose by 5-15% over one per core
    (docs/PERFORMANCE.md, "Many busy volumes").  Without it one: a second
    one mostly trades the GIL back and forth.  With a store whose I/O is
    asynchronous (``aio_store``: an RBD pool) one as well: a worker hands
    each request to librbd and never waits for it, and more workers only
    wake each other and contend in librbd (4 KiB writes: 60 against 94-113
    us of CPU per request with four; docs/PERFORMANCE.md, "RBD").
    ``EVSCRYPT_FUSE_THREADS`` overrides all of these (a knob for benchmarks)."""
    raw = os.environ.get("EVSCRYPT_FUSE_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise InvalidArgument(f"EVSCRYPT_FUSE_THREADS={raw!r}: give a whole number of threads, at least 1")
        return int(raw)
    return WORKERS_PER_CORE * len(os.sched_getaffinity(0)) if c_path and not aio_store else 1
#: The one setting of the I/O threads: 2 cores here, but I/O waits overlap, so a few more
#: threads than cores keep the disk busy.
IO_THREADS = 8
ENV = "EVSCRYPT_IO_THREADS"


def io_threads() -> int:
    """The setting, from the environment or the default."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return IO_THREADS
    if not raw.isdigit() or int(raw) < 2:
        raise InvalidArgument(f"{ENV}={raw!r}: give a whole number of threads, at least 2")
    return int(raw)


@dataclass
class Pools:
    io: ThreadPoolExecutor
    fsync: ThreadPoolExecutor
    io_limiter: trio.CapacityLimiter
    slow_limiter: trio.CapacityLimiter

    @classmethod
    def sized(cls, n: int | None = None) -> Pools:
        """Pools for ``n`` I/O threads (the setting if None): the limiter
        gets all, each pool and the slow calls half."""
        n = io_threads() if n is None else n
        half = max(1, n // 2)
        return cls(io=ThreadPoolExecutor(half, thread_name_prefix="io"),
                   fsync=ThreadPoolExecutor(half, thread_name_prefix="fsync"),
                   io_limiter=trio.CapacityLimiter(n), slow_limiter=trio.CapacityLimiter(half))

    def close(self) -> None:
        """Wait for the handed-off requests (they reply to FUSE, so before
        the mount goes), then stop the split pool."""
        self.io.shutdown(wait=True)
        self.fsync.shutdown(wait=True)
        parallel.shutdown()
