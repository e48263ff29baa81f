"""The CLI's side of the control socket: one request, one response.

:class:`Client` has one typed method per operation of evscrypt.protocol,
so callers never spell an operation's name or its arguments themselves.
"""

from __future__ import annotations

import os
import socket
import time

from . import protocol
from .errors import DaemonUnavailable, ProtocolError


def _connect(s: socket.socket, sock_path: str | os.PathLike, timeout: float) -> None:
    """connect(), waiting while the daemon's listen backlog is full: with a
    timeout set the socket is non-blocking, and a full backlog is EAGAIN."""
    deadline = time.monotonic() + min(timeout, 30.0)
    delay = 0.01
    while True:
        try:
            s.connect(str(sock_path))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise DaemonUnavailable(f"the evscrypt daemon is too busy to accept a connection on {sock_path}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class Client:
    """The daemon listening on ``sock_path``.  ``timeout`` (seconds) replaces
    each operation's own bound on the wait for its answer."""

    def __init__(self, sock_path: str | os.PathLike, timeout: float | None = None):
        self.path = sock_path
        self.timeout = timeout

    # -- the operations ----------------------------------------------------------
    def ping(self) -> dict:
        """{"pong": true, "pid": the daemon's pid as it sees it}."""
        return self.call(protocol.PING)

    def status(self) -> dict:
        return self.call(protocol.STATUS)

    def attach(self, name: str, mount: str | None = None, mkfs: str | None = None, break_lock: bool = False) -> dict:
        return self.call(protocol.ATTACH, name=name, mount=mount, mkfs=mkfs, break_lock=break_lock)

    def detach(self, name: str, force: bool = False) -> dict:
        return self.call(protocol.DETACH, name=name, force=force)

    def snapshot(self, name: str, dest: str, uuid: str) -> dict:
        """A quiesced copy of attached volume ``name`` (whose uuid is
        ``uuid``) into the new file ``dest``, an absolute path."""
        return self.call(protocol.SNAPSHOT, name=name, dest=dest, uuid=uuid)

    def resize(self, name: str, size: int) -> dict:
        return self.call(protocol.RESIZE, name=name, size=size)

    def stop(self, force: bool = False) -> dict:
        return self.call(protocol.STOP, force=force)

    # -- the wire ------------------------------------------------------------------
    def _open(self, timeout: float) -> socket.socket:
        """A socket connected to the daemon, or DaemonUnavailable."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            _connect(s, self.path, timeout)
        except BaseException as e:
            s.close()
            if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
                raise DaemonUnavailable(f"the evscrypt daemon is not running (no socket at {self.path})")
            if isinstance(e, PermissionError):
                raise DaemonUnavailable(f"permission denied on {self.path}")
            raise
        return s

    def call(self, op: protocol.Op, **args):
        """Send one request of ``op`` and return its result, or raise the
        error the daemon answered with as its own class."""
        timeout = op.timeout if self.timeout is None else self.timeout
        s = self._open(timeout)
        try:
            try:
                s.sendall(protocol.encode(op.request(**args)))
                buf = bytearray()
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > protocol.MAX_MESSAGE:
                        raise ProtocolError("daemon response too large")
            except socket.timeout:
                raise DaemonUnavailable(f"the evscrypt daemon did not answer within {timeout:.0f} s")
            except OSError as e:
                raise DaemonUnavailable(f"lost the connection to the daemon: {e.strerror or e}")
        finally:
            s.close()
        if not buf:
            raise DaemonUnavailable("the evscrypt daemon closed the connection without answering")
        resp = protocol.decode(bytes(buf))
        if not resp.get("ok"):
            protocol.raise_error(resp)
        return resp.get("result")

    def daemon_pid(self) -> int:
        """The daemon's pid as this process sees it: SO_PEERCRED of the control
        socket, which the kernel translates across pid namespaces."""
        import struct

        s = self._open(30.0 if self.timeout is None else self.timeout)
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", raw)[0]
        finally:
            s.close()


def pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, taken before asking it to exit (so a reused pid
    cannot fool the wait); None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def wait_exit(pid: int, fd: int | None, timeout: float = protocol.DEFAULT_TIMEOUT) -> bool:
    """Wait until process ``pid`` (with pidfd ``fd``, which is closed) has
    exited; False if it is still there after ``timeout``.  The pidfd wakes
    us at the exit itself; without one, /proc is looked at now and then."""
    if fd is not None:
        import select

        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            return bool(p.poll(timeout * 1000))
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
