"""Split one large piece of sector work across the cores.

A 1 MiB request at queue depth 1 would otherwise run on one core while the
other idles.  :func:`split_run` cuts a run of sectors into one part per core
and runs the parts at once: the caller's thread takes the first, a small
shared pool the others.  The work must release the GIL (the C sector loop,
pread and pwrite do).

A run splits only when it is the only one in progress.  With several
large requests in flight they already keep the cores busy, and splitting
them too would only make them queue for the pool (measured: 1M requests at
QD32 got slower).  Nested calls (the engine splits a read, and each part's
decryption asks again) find a run in progress and run whole.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .format import SECTOR_SIZE

#: The smallest part a run is cut into (256 KiB).
MIN_PART_SECTORS = 64
#: The split threshold: a shorter run makes fewer than two parts and always
#: runs whole.  Callers on the hot path test it themselves (in sectors or in
#: bytes) before building the closure split_run needs.
MIN_SPLIT_SECTORS = 2 * MIN_PART_SECTORS
MIN_SPLIT_BYTES = MIN_SPLIT_SECTORS * SECTOR_SIZE
_CPUS = os.cpu_count() or 1
_pool_obj: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()  # guards the lazy creation of _pool_obj
_busy = 0  # runs in progress, split or whole
_busy_lock = threading.Lock()  # guards _busy


def _pool() -> ThreadPoolExecutor:
    global _pool_obj
    if _pool_obj is None:
        with _pool_lock:
            if _pool_obj is None:
                _pool_obj = ThreadPoolExecutor(max_workers=max(1, _CPUS - 1), thread_name_prefix="split")
    return _pool_obj


def split_run(count: int, fn) -> None:
    """Call ``fn(lo, hi)`` over sectors ``[0, count)``: once, or in parallel
    parts that together cover the range, each exactly once."""
    global _busy
    parts = min(_CPUS, count // MIN_PART_SECTORS)
    with _busy_lock:
        _busy += 1
        alone = _busy == 1
    try:
        if parts < 2 or not alone:
            fn(0, count)
            return
        step = -(-count // parts)
        futures = [_pool().submit(fn, lo, min(count, lo + step)) for lo in range(step, count, step)]
        try:
            fn(0, step)
        finally:
            for f in futures:
                f.result()  # wait for all, even if the first part failed; re-raises a part's error
    finally:
        with _busy_lock:
            _busy -= 1


def shutdown() -> None:
    """Stop the pool's threads once its parts are done (the daemon, as it
    stops); a later split_run starts a new pool."""
    global _pool_obj
    with _pool_lock:
        pool, _pool_obj = _pool_obj, None
    if pool is not None:
        pool.shutdown(wait=True)
