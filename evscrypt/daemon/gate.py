"""The write gate of an attached volume: how the daemon quiesces writes.

Every request that changes the image (write, discard, fsync) passes through
the gate.  :meth:`WriteGate.quiesce` closes it (new changes wait), waits for
the changes already running to finish, and keeps it closed while its caller
takes a point-in-time copy; then the held requests go on.  A copy taken
inside is crash-consistent: it holds every write the kernel was told had
completed, and none that was still running.

Writes and fsyncs pass it from the FUSE worker thread (:meth:`try_enter`,
which never waits: a request that finds the gate closed goes the async way
and waits in the trio thread), discards from the trio thread
(``async with gate``); one small lock keeps the count and the closed state
consistent between them.  Passing an open gate costs no checkpoint.
Writes the C data path serves do not pass it: :attr:`WriteGate.hold`
stops those while the gate is closed (they then come here).
"""

from __future__ import annotations

import contextlib
import threading

import trio

#: How often quiesce looks whether the running changes have drained.
_DRAIN_POLL = 0.002


class WriteGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed: trio.Event | None = None  # set when the gate opens again
        self.active = 0  # changes running now
        #: Writers that do not pass this gate (the C data path): hold(True)
        #: stops them and waits for theirs that run, hold(False) lets them go.
        self.hold = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def try_enter(self) -> bool:
        """From any thread: count a change in, unless the gate is closed."""
        with self._lock:
            if self._closed is not None:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    async def __aenter__(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
                if closed is None:
                    self.active += 1
                    return
            await closed.wait()

    async def __aexit__(self, *exc) -> None:
        self.leave()

    @contextlib.asynccontextmanager
    async def quiesce(self):
        """Hold new changes and drain the running ones for the body's duration."""
        with self._lock:
            if self._closed is not None:
                raise RuntimeError("the write gate is already closed")  # callers hold the volume's lock
            self._closed = reopened = trio.Event()
        try:
            if self.hold is not None:
                await trio.to_thread.run_sync(self.hold, True)  # waits for writes running in C
            while self.active:
                await trio.sleep(_DRAIN_POLL)
            yield
        finally:
            if self.hold is not None:
                self.hold(False)
            with self._lock:
                self._closed = None
            reopened.set()
