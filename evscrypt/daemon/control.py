"""The control socket server: versioned JSON requests from the CLI.

Each connection carries one request.  The caller is identified by
SO_PEERCRED, never by anything it says.  A slow or broken client only ties
up its own task: reads are bounded in size and time, and every error becomes
an error response rather than a crash.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct
from pathlib import Path

import trio

from .. import protocol
from ..errors import EvscryptError, ProtocolError
from .manager import VolumeManager

log = logging.getLogger("evscrypt.control")
READ_TIMEOUT = 10.0
MAX_CLIENTS = 512


def peer_uid(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class ControlServer:
    def __init__(self, manager: VolumeManager, path: Path, group: str | None = None):
        self.m = manager
        self.path = path
        self.group = group
        self._clients = trio.CapacityLimiter(MAX_CLIENTS)
        #: set once a `stop` request has been answered: the daemon then exits
        self.stop_requested = trio.Event()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self.group:
            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(self.path, 0o660)
        # A burst of clients must queue, not fail: a client with a timeout
        # connects non-blocking, and a full backlog gives it EAGAIN at once.
        # The kernel caps this at net.core.somaxconn.
        sock.listen(socket.SOMAXCONN)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _read_request(self, stream) -> bytes:
        buf = bytearray()
        with trio.fail_after(READ_TIMEOUT):
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > protocol.MAX_MESSAGE:
                    raise ProtocolError(f"request larger than {protocol.MAX_MESSAGE} bytes")
        return bytes(buf.split(b"\n", 1)[0])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with self._clients, stream:
            op = None
            try:
                _, uid, _ = peer_uid(stream.socket)
                try:
                    line = await self._read_request(stream)
                except trio.TooSlowError:
                    raise ProtocolError(f"request not received within {READ_TIMEOUT:.0f} s")
                op, args = protocol.parse_request(protocol.decode(line))
                result = await self.dispatch(op, args, uid)
                resp = protocol.ok(result)
            except EvscryptError as e:
                resp = protocol.error(e)
            except Exception as e:  # a bug must not take the daemon down
                log.exception("control request failed")
                resp = protocol.error(EvscryptError(f"internal daemon error: {type(e).__name__}"))
            try:
                await stream.send_all(self._encode(resp))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away
            if op is protocol.STOP and resp["ok"]:
                # only now: exiting earlier would cancel this very answer
                self.stop_requested.set()

    @staticmethod
    def _encode(resp: dict) -> bytes:
        """The response line.  Never raises: an exception escaping a handler
        would end serve_listeners' nursery and with it the whole daemon."""
        try:
            return protocol.encode(resp)
        except ProtocolError:  # too large: an error message may echo a huge argument back
            err = resp.get("error")
            if err:
                resp = dict(resp, error=dict(err, message=err["message"][:1024] + " [...]"))
            else:
                resp = protocol.error(ProtocolError(f"response larger than {protocol.MAX_MESSAGE} bytes"))
        except (TypeError, ValueError):  # a result that is not JSON: a bug
            log.exception("cannot encode a control response")
            resp = protocol.error(EvscryptError("internal daemon error: response is not JSON"))
        return protocol.encode(resp)

    async def dispatch(self, op: protocol.Op, args: dict, uid: int):
        """Serve one request of user ``uid``, its arguments checked (protocol.parse_request)."""
        return await HANDLERS[op](self.m, uid=uid, **args)


async def _ping(manager: VolumeManager, uid: int) -> dict:
    return {"pong": True, "pid": os.getpid()}


#: What serves each operation of evscrypt.protocol (which says its
#: arguments): ``handler(manager, uid=caller, **arguments)``.
HANDLERS = {
    protocol.PING: _ping,
    protocol.STATUS: VolumeManager.status,
    protocol.ATTACH: VolumeManager.attach,
    protocol.DETACH: VolumeManager.detach,
    protocol.SNAPSHOT: VolumeManager.snapshot,
    protocol.RESIZE: VolumeManager.resize,
    protocol.STOP: VolumeManager.stop,
}
