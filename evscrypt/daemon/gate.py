"""The write gate of an attached volume: how the daemon quiesces writes.

Every request that changes the image (write, discard, fsync) passes through
the gate.  :meth:`WriteGate.quiesce` closes it (new changes wait), waits for
the changes already running to finish, and keeps it closed while its caller
takes a point-in-time copy; then the held requests go on.  A copy taken
inside is crash-consistent: it holds every write the kernel was told had
completed, and none that was still running.

Trio-thread only, like all the daemon's bookkeeping, so it needs no lock.
Passing an open gate costs no checkpoint: the hot path stays synchronous.
"""

from __future__ import annotations

import contextlib

import trio

#: How often quiesce looks whether the running changes have drained.
_DRAIN_POLL = 0.002


class WriteGate:
    def __init__(self) -> None:
        self._closed: trio.Event | None = None  # set when the gate opens again
        self.active = 0  # changes running now

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def __aenter__(self) -> None:
        while self._closed is not None:
            await self._closed.wait()
        self.active += 1

    async def __aexit__(self, *exc) -> None:
        self.active -= 1

    @contextlib.asynccontextmanager
    async def quiesce(self):
        """Hold new changes and drain the running ones for the body's duration."""
        if self._closed is not None:
            raise RuntimeError("the write gate is already closed")  # callers hold the volume's lock
        self._closed = reopened = trio.Event()
        try:
            while self.active:
                await trio.sleep(_DRAIN_POLL)
            yield
        finally:
            self._closed = None
            reopened.set()
