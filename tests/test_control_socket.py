"""The daemon's control socket, spoken to directly with `socket`.

Malformed, hostile, slow and numerous clients must each get an error
response (or nothing, if they left) and must never take the daemon down or
stop it from serving everyone else.  Runs a real `evscrypt daemon` subprocess
(tests/daemon_fixture.py).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import threading
import time

import pytest

from daemon_fixture import Daemon, daemon, make_daemon  # noqa: F401  (fixtures are used by name)
from evscrypt import client, protocol
from evscrypt.daemon.control import HANDLERS
from evscrypt.errors import DaemonUnavailable, error_classes
from evscrypt.paths import socket_path

pytestmark = pytest.mark.fuse

READ_TIMEOUT = 10.0  # evscrypt.daemon.control.READ_TIMEOUT


# -- helpers ---------------------------------------------------------------------
def connect(d: Daemon, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(socket_path(d.runtime)))
    return s


def read_response(s: socket.socket) -> dict | None:
    """One response line, parsed; None if the daemon closed without answering."""
    buf = bytearray()
    while b"\n" not in buf:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
        assert len(buf) <= protocol.MAX_MESSAGE
    if not buf:
        return None
    line, _, rest = bytes(buf).partition(b"\n")
    assert rest == b"", "more than one response line"
    return json.loads(line)


def raw(d: Daemon, data: bytes, timeout: float = 10.0) -> dict | None:
    """Send raw bytes as a request and return the parsed response."""
    with connect(d, timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading: its answer is already queued
        return read_response(s)


def req(op, args=None, v=1) -> bytes:
    obj = {"v": v, "op": op}
    if args is not None:
        obj["args"] = args
    return json.dumps(obj).encode() + b"\n"


def assert_error(resp: dict | None, etype: str, *fragments: str) -> str:
    """An error response with a known type and a one-line message."""
    assert resp is not None, "the daemon closed the connection without answering"
    assert resp.get("v") == 1 and resp.get("ok") is False, resp
    err = resp["error"]
    assert set(err) == {"type", "message"}, err
    assert err["type"] in error_classes(), err
    assert err["type"] == etype, err
    msg = err["message"]
    assert isinstance(msg, str) and msg.strip() and "\n" not in msg and "\r" not in msg, err
    assert "Traceback" not in msg and "internal" not in msg, err
    for frag in fragments:
        assert frag in msg, err
    return msg


def assert_ok(resp: dict | None) -> dict:
    assert resp is not None and resp.get("v") == 1 and resp.get("ok") is True, resp
    return resp["result"]


def status_works(d: Daemon) -> None:
    assert d.alive, d.log
    p = d.cli("status", check=False, timeout=30)
    assert p.returncode == 0, p.stderr
    assert f"pid {d.pid}" in p.stdout


# -- tests -------------------------------------------------------------------------
BAD_REQUESTS = [
    # (id, raw bytes, error type, message fragments)
    ("malformed-json", b'{"v": 1, "op": "status"\n', "ProtocolError", ("not valid JSON",)),
    ("not-utf8", b'{"v": 1, "op": "\xff\xfe"}\n', "ProtocolError", ("not valid JSON",)),
    ("empty-line", b"\n", "ProtocolError", ("not valid JSON",)),
    ("deep-nesting", b"[" * 60000 + b"\n", "ProtocolError", ("not valid JSON",)),
    ("array", b'["status"]\n', "ProtocolError", ("not a JSON object",)),
    ("string", b'"status"\n', "ProtocolError", ("not a JSON object",)),
    ("number", b"1\n", "ProtocolError", ("not a JSON object",)),
    ("null", b"null\n", "ProtocolError", ("not a JSON object",)),
    ("version-2", req("status", v=2), "ProtocolError", ("protocol version", "2")),
    ("version-0", req("status", v=0), "ProtocolError", ("protocol version",)),
    ("version-string", req("status", v="1"), "ProtocolError", ("protocol version",)),
    ("version-missing", b'{"op": "status"}\n', "ProtocolError", ("protocol version",)),
    ("unknown-op", req("format-all-disks"), "ProtocolError", ("unknown operation", "format-all-disks")),
    ("op-missing", b'{"v": 1}\n', "ProtocolError", ("unknown operation",)),
    ("op-not-string", b'{"v": 1, "op": ["status"]}\n', "ProtocolError", ("unknown operation",)),
    ("op-internal", req("quiesce", {"name": "x"}), "ProtocolError", ("unknown operation",)),
    ("args-array", req("status", ["x"]), "ProtocolError", ("'args' must be an object",)),
    ("args-string", req("attach", "x"), "ProtocolError", ("'args' must be an object",)),
    ("attach-no-args", req("attach"), "ProtocolError", ("missing argument 'name'",)),
    ("attach-name-missing", req("attach", {}), "ProtocolError", ("missing argument 'name'",)),
    ("attach-name-null", req("attach", {"name": None}), "ProtocolError", ("missing argument 'name'",)),
    ("attach-name-int", req("attach", {"name": 5}), "ProtocolError", ("'name'", "wrong type")),
    ("attach-name-list", req("attach", {"name": ["v"]}), "ProtocolError", ("'name'", "wrong type")),
    ("attach-mount-int", req("attach", {"name": "v", "mount": 1}), "ProtocolError", ("'mount'", "wrong type")),
    ("attach-mkfs-bool", req("attach", {"name": "v", "mkfs": True}), "ProtocolError", ("'mkfs'", "wrong type")),
    ("attach-bad-name", req("attach", {"name": "../../etc/passwd"}), "InvalidArgument", ()),
    ("attach-empty-name", req("attach", {"name": ""}), "InvalidArgument", ()),
    ("attach-unknown", req("attach", {"name": "nosuchvolume"}), "NotFound", ("nosuchvolume",)),
    ("detach-name-missing", req("detach", {"force": True}), "ProtocolError", ("missing argument 'name'",)),
    ("detach-force-string", req("detach", {"name": "v", "force": "yes"}), "ProtocolError",
     ("'force'", "wrong type")),
    ("detach-not-attached", req("detach", {"name": "v"}), "NotFound", ("not attached",)),
    ("resize-size-bool", req("resize", {"name": "v", "size": True}), "ProtocolError", ("'size'", "wrong type")),
    ("resize-size-string", req("resize", {"name": "v", "size": "1G"}), "ProtocolError", ("'size'", "wrong type")),
    ("resize-name-missing", req("resize", {"size": 4096}), "ProtocolError", ("missing argument 'name'",)),
    ("snapshot-dest-missing", req("snapshot", {"name": "v"}), "ProtocolError", ("missing argument 'dest'",)),
    ("snapshot-uuid-int", req("snapshot", {"name": "v", "dest": "/x", "uuid": 1}), "ProtocolError",
     ("'uuid'", "wrong type")),
    ("stop-force-string", req("stop", {"force": "yes"}), "ProtocolError", ("'force'", "wrong type")),
]


def test_bad_requests_get_one_line_errors(daemon):
    daemon.cli("volume", "create", "v", "--size", "1M")
    for rid, data, etype, frags in BAD_REQUESTS:
        try:
            assert_error(raw(daemon, data), etype, *frags)
        except AssertionError as e:
            raise AssertionError(f"request {rid!r}: {e}") from None
    # the same requests without the final newline (client half-closes instead)
    for rid, data, etype, frags in BAD_REQUESTS[:8]:
        with connect(daemon) as s:
            s.sendall(data.rstrip(b"\n"))
            s.shutdown(socket.SHUT_WR)
            assert_error(read_response(s), etype, *frags)
    # only the first line counts
    assert_ok(raw(daemon, req("ping") + b"garbage after the request\n"))
    assert daemon.status()["volumes"] == []
    assert "Traceback" not in daemon.log and "control request failed" not in daemon.log, daemon.log
    status_works(daemon)


def test_oversized_requests_are_refused(daemon):
    limit = protocol.MAX_MESSAGE
    # a well-formed request padded past the limit, ending in a newline
    big = json.dumps({"v": 1, "op": "status", "args": {"pad": "x" * (limit + 10)}}).encode() + b"\n"
    assert_error(raw(daemon, big), "ProtocolError", "larger than")
    # a flood with no newline at all: the daemon stops reading and answers
    assert_error(raw(daemon, b"x" * (4 * limit)), "ProtocolError", "larger than")
    # the limit counts the newline: MAX_MESSAGE bytes in all fit, one more does not
    def padded(n: int) -> bytes:
        line = json.dumps({"v": 1, "op": "ping", "args": {"pad": ""}}, separators=(",", ":")).encode()
        line = line.replace(b'"pad":""', b'"pad":"' + b"y" * (n - len(line)) + b'"')
        assert len(line) == n
        return line + b"\n"

    assert assert_ok(raw(daemon, padded(limit - 1)))["pong"] is True
    assert_error(raw(daemon, padded(limit)), "ProtocolError", "larger than")
    status_works(daemon)


def test_errors_echoing_huge_arguments_do_not_crash_the_daemon(daemon):
    """An error message may quote the caller's argument; a response that
    would outgrow the protocol limit must be cut short, not crash the server
    (it used to end the daemon: the encode error escaped the handler)."""
    limit = protocol.MAX_MESSAGE
    huge_ascii = "o" * (limit - 100)
    huge_utf8 = "\u00e9" * 30000  # 60000 bytes in, six bytes each once JSON-escaped
    cases = [
        ({"v": 1, "op": huge_ascii}, "ProtocolError", "unknown operation"),
        ({"v": 1, "op": huge_utf8}, "ProtocolError", "unknown operation"),
        ({"v": 1, "op": "attach", "args": {"name": huge_utf8}}, "InvalidArgument", "invalid volume name"),
        ({"v": 1, "op": "detach", "args": {"name": huge_ascii[:-100]}}, "InvalidArgument", "invalid volume name"),
    ]
    for obj, etype, frag in cases:
        data = json.dumps(obj, ensure_ascii=False).encode() + b"\n"
        assert len(data) <= limit
        msg = assert_error(raw(daemon, data), etype, frag)
        assert len(msg.encode()) < limit
        assert daemon.alive, daemon.log
    status_works(daemon)


def test_clients_that_vanish(daemon):
    path = str(socket_path(daemon.runtime))
    for _ in range(50):  # connect and close at once
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.close()
    for _ in range(20):  # send a request and leave before the answer
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(req("status"))
        s.close()
    for _ in range(20):  # half a request, then leave
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"v": 1, "op": "sta')
        s.close()
    for _ in range(5):  # reset: close with unread data queued on our side
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(req("status"))
        select.select([s], [], [])  # the answer is now queued on our side, unread
        s.close()
    assert_ok(raw(daemon, req("ping")))
    status_works(daemon)
    time.sleep(0.2)
    assert "Traceback" not in daemon.log and "control request failed" not in daemon.log, daemon.log


def test_stalled_clients_do_not_block_others(daemon):
    daemon.cli("volume", "create", "v", "--size", "1M")
    stalled = []
    t0 = time.monotonic()
    for i in range(20):
        s = connect(daemon, timeout=READ_TIMEOUT + 120)  # the bound only catches a hang
        if i % 2:
            s.sendall(b'{"v": 1, "op": "sta')  # half a line, then nothing
        stalled.append(s)  # even ones: connected, sent nothing
    try:
        # everyone else is served while the stalled clients wait: a ping is
        # answered while no stalled client has had its answer yet (had the
        # daemon waited on them, they would have been answered first).  An
        # event, not a time bound: how slowly the machine answers is no matter.
        for _ in range(10):
            assert assert_ok(raw(daemon, req("ping"), timeout=120))["pid"] == daemon.pid
        pending = select.select(stalled, [], [], 0)[0]
        if time.monotonic() - t0 < READ_TIMEOUT:  # else the timeouts may have fired: nothing to conclude
            assert pending == [], "a stalled client was answered before the others were served"
        status_works(daemon)
        path = daemon.attach("v")
        assert path.exists()
        daemon.cli("detach", "v")
        # after its read timeout the daemon answers each stalled client with an
        # error and hangs up, and not before
        for s in stalled:
            resp = read_response(s)
            assert_error(resp, "ProtocolError", "not received within")
            assert s.recv(1) == b""  # closed
        assert time.monotonic() - t0 >= READ_TIMEOUT - 1
    finally:
        for s in stalled:
            s.close()
    status_works(daemon)


def test_300_concurrent_status_clients(daemon):
    daemon.cli("volume", "create", "v", "--size", "1M")
    daemon.attach("v")
    n = 300
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int) -> None:
        try:
            barrier.wait(30)
            # the CLI's own client code: what 300 `evscrypt status` would do
            results[i] = daemon.client().status()
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    failures = [r for r in results if not isinstance(r, dict)]
    assert not failures, f"{len(failures)} of {n} failed, e.g. {failures[0]!r}"
    for r in results:
        assert r["pid"] == daemon.pid
        assert [v["name"] for v in r["volumes"]] == ["v"]
    status_works(daemon)
    assert "Traceback" not in daemon.log, daemon.log
    daemon.cli("detach", "v")


def test_client_with_full_backlog_is_not_an_internal_error(tmp_path):
    """No daemon needed: a listener that never accepts, its backlog full.
    (The daemon's own backlog is now SOMAXCONN, so it takes a burst far
    larger than this suite's 300 clients to get there.)"""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    path = socket_path(runtime)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fill = []
    try:
        srv.bind(str(path))
        srv.listen(0)
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fill.append(s)
            try:
                s.connect(str(path))
            except BlockingIOError:
                break
        else:
            pytest.skip("could not fill the listen backlog")
        with pytest.raises(DaemonUnavailable):
            client.Client(path, timeout=2).status()
    finally:
        for s in fill:
            s.close()
        srv.close()


def test_socket_is_0600_and_owned_by_root(daemon):
    path = socket_path(daemon.runtime)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == 0 and st.st_gid == 0
    # with the directory open to all, the socket's mode alone keeps others out
    os.chmod(daemon.runtime, 0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                out = b"connected"
            except OSError as e:
                out = str(e.errno).encode()
            os.write(w, out)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out == str(errno.EACCES).encode(), out
    status_works(daemon)


def test_every_operation_has_a_handler():
    assert set(HANDLERS) == set(protocol.OPS.values())
    assert all(protocol.OPS[op.name] is op for op in HANDLERS)


def test_client_requests_on_the_wire(tmp_path):
    """What each typed client method sends, written out by hand: the wire
    format a daemon of another version reads (no daemon needed)."""
    path = tmp_path / "control.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    seen: list = []

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = srv.accept()
            with conn:
                seen.append(json.loads(read_line(conn)))
                conn.sendall(b'{"v": 1, "ok": true, "result": {"echo": true}}\n')

    def read_line(conn) -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            buf += conn.recv(4096)
        return buf

    c = client.Client(path)
    calls = [
        (lambda: c.ping(), {"op": "ping", "args": {}}),
        (lambda: c.status(), {"op": "status", "args": {}}),
        (lambda: c.attach("v"), {"op": "attach", "args": {"name": "v", "mount": None, "mkfs": None,
                                                          "break_lock": False}}),
        (lambda: c.attach("v", mount="/m", mkfs="ext4", break_lock=True),
         {"op": "attach", "args": {"name": "v", "mount": "/m", "mkfs": "ext4", "break_lock": True}}),
        (lambda: c.detach("v", force=True), {"op": "detach", "args": {"name": "v", "force": True}}),
        (lambda: c.snapshot("v", "/h/s", "u-1"), {"op": "snapshot", "args": {"name": "v", "dest": "/h/s", "uuid": "u-1"}}),
        (lambda: c.resize("v", 1 << 30), {"op": "resize", "args": {"name": "v", "size": 1 << 30}}),
        (lambda: c.stop(), {"op": "stop", "args": {"force": False}}),
    ]
    t = threading.Thread(target=serve, args=(len(calls),), daemon=True)
    t.start()
    try:
        for call, _ in calls:
            assert call() == {"echo": True}
    finally:
        t.join(60)
        srv.close()
    assert seen == [{"v": 1, **want} for _, want in calls]
