"""A moto KMS server behind a controllable TCP proxy, for the aws backend.

``moto_kms`` starts ``.venv/bin/moto_server`` on a free 127.0.0.1 port and, in
front of it, :class:`TcpProxy`, a small relay on another 127.0.0.1 port that
the code under test talks to (``AWS_ENDPOINT_URL_KMS`` points at the proxy).
The proxy can simulate the ways an endpoint goes away:

* ``down()``       close the listener and every connection: connects are refused;
* ``blackhole()``  accept connections (and keep the open ones) but never answer;
* ``up()``         serve again, on the SAME port;
* ``restart_backend()``  kill moto_server and start a fresh one (moto keeps its
  state in memory, so every key vanishes) and relay to it from then on.

The fixture's ``client`` is a boto3 KMS client that talks to moto DIRECTLY,
bypassing the proxy, so a test can change key states while the proxy is down.
Everything listens on 127.0.0.1 only, and everything stops at teardown.

Import the fixture into a test module: ``from kms_fixtures import moto_kms``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"
REGION = "us-east-1"
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
MOTO_READY_TIMEOUT = 30.0

#: AWS settings that must not leak from the caller's environment into a test:
#: profiles, other credentials, a generic endpoint, HTTP proxies.
_AWS_SCRUB = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_CA_BUNDLE",
    "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "EVSCRYPT_AWS_CONNECT_TIMEOUT", "EVSCRYPT_AWS_READ_TIMEOUT", "EVSCRYPT_AWS_MAX_ATTEMPTS",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
)
#: Everything that could supply credentials; a test that wants "no
#: credentials at all" removes these (see :func:`no_credentials_env`).
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                   "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                   "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def no_credentials_env(env: dict) -> dict:
    """A copy of ``env`` in which boto3 finds no credentials anywhere (and
    never tries the instance metadata service)."""
    out = {k: v for k, v in env.items() if k not in CREDENTIAL_VARS}
    out.update(AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_CONFIG_FILE="/dev/null",
               AWS_EC2_METADATA_DISABLED="true")
    return out


# -- the proxy ------------------------------------------------------------------
class TcpProxy:
    """A TCP relay on 127.0.0.1 run by one selector thread.

    All socket changes happen on the proxy thread; the public methods post a
    command, wake the thread and wait until it has been carried out, so when
    ``down()`` returns the port refuses connections.
    """

    UP, DOWN, BLACKHOLE = "up", "down", "blackhole"

    def __init__(self, backend_port: int, port: int = 0):
        self.backend = (HOST, backend_port)
        self.mode = self.UP
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._peer: dict[socket.socket, socket.socket] = {}  # relayed pairs, both directions
        self._holes: set[socket.socket] = set()  # client sockets that never get an answer
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._cmds: list[tuple] = []
        self._lock = threading.Lock()
        self._stopping = False
        self.connections = 0  # accepted so far, for tests of the proxy itself
        self._listen(port)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=f"kms-proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- public control (any thread) --------------------------------------------
    def down(self) -> None:
        """Close the listener and every connection: connects are refused."""
        self._do("down")

    def blackhole(self) -> None:
        """Accept connections but never answer; open connections go silent too."""
        self._do("blackhole")

    def up(self) -> None:
        """Relay again on the same port; silenced connections are closed."""
        self._do("up")

    def set_backend(self, port: int) -> None:
        """Relay to another backend port from now on (open pairs are closed)."""
        self._do("backend", port)

    def close(self) -> None:
        if self._stopping:
            return
        self._do("stop")
        self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    # -- internals (proxy thread, except _listen at construction) ----------------
    def _do(self, *cmd) -> None:
        done = threading.Event()
        errors: list[BaseException] = []
        with self._lock:
            if self._stopping:
                return
            self._cmds.append((cmd, done, errors))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"proxy did not carry out {cmd[0]!r}")
        if errors:
            raise errors[0]

    def _listen(self, port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        s.listen(64)
        s.setblocking(False)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "accept")

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _drop(self, s: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def _close_pair(self, s: socket.socket) -> None:
        other = self._peer.pop(s, None)
        self._drop(s)
        if other is not None:
            self._peer.pop(other, None)
            self._drop(other)

    def _close_pairs(self) -> None:
        for s in list(self._peer):
            if s in self._peer:
                self._close_pair(s)

    def _close_holes(self) -> None:
        for s in list(self._holes):
            self._drop(s)
        self._holes.clear()

    def _silence_pairs(self) -> None:
        """Blackhole the open connections: drop the backend side, keep the
        client side open and swallow whatever it sends."""
        clients = [s for s, kind in ((k.fileobj, k.data) for k in self._sel.get_map().values())
                   if kind == "client"]
        for c in clients:
            b = self._peer.pop(c, None)
            if b is not None:
                self._peer.pop(b, None)
                self._drop(b)
            self._sel.modify(c, selectors.EVENT_READ, "hole")
            self._holes.add(c)

    def _command(self, cmd: tuple) -> None:
        op = cmd[0]
        if op == "down":
            self._unlisten()
            self._close_pairs()
            self._close_holes()
        elif op == "blackhole":
            if self._listener is None:
                self._listen(self.port)
            self._silence_pairs()
        elif op == "up":
            self._close_holes()
            if self._listener is None:
                self._listen(self.port)
        elif op == "backend":
            self.backend = (HOST, cmd[1])
            self._close_pairs()
        elif op == "stop":
            self._unlisten()
            self._close_pairs()
            self._close_holes()
            self._stopping = True
        self.mode = {"down": self.DOWN, "blackhole": self.BLACKHOLE, "up": self.UP}.get(op, self.mode)

    def _accept(self) -> None:
        try:
            c, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.connections += 1
        c.setblocking(True)
        if self.mode == self.BLACKHOLE:
            self._holes.add(c)
            self._sel.register(c, selectors.EVENT_READ, "hole")
            return
        try:
            b = socket.create_connection(self.backend, timeout=5)
        except OSError:
            self._drop(c)  # backend not there: the client sees the connection close
            return
        b.settimeout(None)
        self._peer[c], self._peer[b] = b, c
        self._sel.register(c, selectors.EVENT_READ, "client")
        self._sel.register(b, selectors.EVENT_READ, "backend")

    @staticmethod
    def _receive(s: socket.socket) -> bytes:
        """What ``s`` has to read; b"" once it is closed or broken."""
        try:
            return s.recv(65536)
        except OSError:
            return b""

    def _relay(self, s: socket.socket) -> None:
        data = self._receive(s)
        if not data:
            self._close_pair(s)
            return
        other = self._peer.get(s)
        if other is None:
            self._drop(s)
            return
        try:
            other.sendall(data)
        except OSError:
            self._close_pair(s)

    def _swallow(self, s: socket.socket) -> None:
        data = self._receive(s)
        if not data:
            self._holes.discard(s)
            self._drop(s)

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select(timeout=1.0):
                kind = key.data
                if kind == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    with self._lock:
                        cmds, self._cmds = self._cmds, []
                    for cmd, done, errors in cmds:
                        try:
                            self._command(cmd)
                        except BaseException as e:  # reported to the caller of _do
                            errors.append(e)
                        done.set()
                    if self._stopping:
                        return
                    break  # the selector map may have changed under the other events
                s = key.fileobj
                if kind == "accept":
                    if s is self._listener:
                        self._accept()
                elif kind in ("client", "backend"):
                    if s in self._peer:
                        self._relay(s)
                elif kind == "hole":
                    if s in self._holes:
                        self._swallow(s)


# -- moto_server -------------------------------------------------------------------
class MotoServer:
    """One ``moto_server`` process on a free 127.0.0.1 port."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "MotoServer":
        self._starts += 1
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in _AWS_SCRUB}
        log = open(self.log_dir / f"moto-{self._starts}.log", "wb")
        try:
            self.proc = subprocess.Popen([MOTO_SERVER, "-H", HOST, "-p", str(self.port)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + MOTO_READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}; see {self.log_dir}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                try:
                    conn.request("GET", "/moto-api/data.json")
                    conn.getresponse().read()
                    return
                finally:
                    conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server not answering on {self.url} after {MOTO_READY_TIMEOUT} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class MotoKMS:
    """What ``moto_kms`` yields: the proxy URL the code under test uses, a
    direct boto3 client for the harness, and key helpers.

    Key references (``ref``) may be a key id, an ARN or ``alias/NAME``.
    """

    def __init__(self, server: MotoServer, proxy: TcpProxy):
        self.server = server
        self.proxy = proxy
        self._client = None

    @property
    def endpoint(self) -> str:
        """What AWS_ENDPOINT_URL_KMS points at: the proxy."""
        return self.proxy.url

    @property
    def backend_url(self) -> str:
        return self.server.url

    @property
    def client(self):
        """boto3 KMS client straight to moto_server (not through the proxy)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "kms", endpoint_url=self.server.url, region_name=REGION,
                aws_access_key_id="testing", aws_secret_access_key="testing",
                config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}))
        return self._client

    # -- the endpoint ------------------------------------------------------------
    def down(self) -> None:
        self.proxy.down()

    def blackhole(self) -> None:
        self.proxy.blackhole()

    def up(self) -> None:
        self.proxy.up()

    def restart_backend(self) -> None:
        """Kill moto_server and start an empty one behind the same proxy port."""
        self.server.stop()
        self.server.start()
        self._client = None
        self.proxy.set_backend(self.server.port)

    # -- keys ----------------------------------------------------------------------
    def create_key(self, alias: str | None = None, description: str = "") -> dict:
        """A new symmetric CMK (optionally with ``alias/NAME``); its KeyMetadata."""
        meta = self.client.create_key(Description=description)["KeyMetadata"]
        if alias:
            self.client.create_alias(AliasName=alias if alias.startswith("alias/") else f"alias/{alias}",
                                     TargetKeyId=meta["KeyId"])
        return meta

    def key_id(self, ref: str) -> str:
        return self.describe(ref)["KeyId"]

    def describe(self, ref: str) -> dict:
        return self.client.describe_key(KeyId=ref)["KeyMetadata"]

    def state(self, ref: str) -> str:
        return self.describe(ref)["KeyState"]

    def disable(self, ref: str) -> None:
        self.client.disable_key(KeyId=self.key_id(ref))

    def enable(self, ref: str) -> None:
        self.client.enable_key(KeyId=self.key_id(ref))

    def schedule_deletion(self, ref: str, days: int = 7):
        """Schedule deletion; returns the deletion date (a datetime)."""
        self.client.schedule_key_deletion(KeyId=self.key_id(ref), PendingWindowInDays=days)
        return self.describe(ref)["DeletionDate"]

    def cancel_deletion(self, ref: str) -> None:
        self.client.cancel_key_deletion(KeyId=self.key_id(ref))

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()


def set_aws_env(monkeypatch, endpoint: str) -> None:
    """Point boto3 (in this process and in every child started after this) at
    ``endpoint`` with dummy credentials, and nothing else."""
    for k in _AWS_SCRUB:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    # no ~/.aws files, no instance metadata service: only 127.0.0.1 is contacted
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), HOST, "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)


@pytest.fixture
def moto_kms(tmp_path, monkeypatch):
    """A fresh moto KMS behind a controllable proxy; AWS_* env points at the
    proxy.  Set up before starting any daemon that should use it."""
    if not os.path.exists(MOTO_SERVER):
        pytest.skip(f"{MOTO_SERVER} is not installed (pip install 'moto[server]')")
    log_dir = tmp_path / "moto-logs"
    log_dir.mkdir(exist_ok=True)
    server = MotoServer(log_dir)
    proxy = None
    try:
        server.start()
        proxy = TcpProxy(server.port)
        kms = MotoKMS(server, proxy)
        set_aws_env(monkeypatch, kms.endpoint)
        yield kms
    finally:
        if proxy is not None:
            proxy.close()
        server.stop()
