"""The CLI's side of the control socket: one request, one response."""

from __future__ import annotations

import os
import socket
import time

from . import protocol
from .errors import DaemonUnavailable, ProtocolError

#: Attach may wait for a KMS (bounded by the backend) and a mkfs; status is fast.
DEFAULT_TIMEOUT = 600.0


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


def call(sock_path: str | os.PathLike, op: str, timeout: float = DEFAULT_TIMEOUT, **args):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            _connect(s, sock_path, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(f"the evscrypt daemon is not running (no socket at {sock_path})")
        except PermissionError:
            raise DaemonUnavailable(f"permission denied on {sock_path}")
        try:
            s.sendall(protocol.encode(protocol.request(op, **args)))
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



def daemon_pid(sock_path: str | os.PathLike, timeout: float = 30.0) -> int:
    """The daemon's pid as this process sees it: SO_PEERCRED of the control
    socket, which the kernel translates across pid namespaces."""
    import struct

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            _connect(s, sock_path, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(f"the evscrypt daemon is not running (no socket at {sock_path})")
        except PermissionError:
            raise DaemonUnavailable(f"permission denied on {sock_path}")
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


def wait_exit(pid: int, fd: int | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
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
