"""Control-socket messages, shared by the client and the daemon.

One request and one response per connection, each a single line of UTF-8 JSON
of at most MAX_MESSAGE bytes:

    request:  {"v": 1, "op": "attach", "args": {...}}
    response: {"v": 1, "ok": true, "result": {...}}
              {"v": 1, "ok": false, "error": {"type": "Busy", "message": "...", "details": {...}}}

The operations and their arguments are the table :data:`OPS`: the client
builds its requests from it (evscrypt.client) and the daemon checks them
against it before it calls an operation's handler (evscrypt.daemon.control).
An operation's name appears nowhere else.

The error type is the name of a class in evscrypt.errors, so the client
re-raises the same class and the CLI prints the same exit code as it would
for a local error.  ``details`` (optional) carries an error's structured
facts, for the CLI's --json output.
"""

from __future__ import annotations

import json

from .errors import EvscryptError, ProtocolError, error_classes
from .jsondoc import load_object

VERSION = 1
MAX_MESSAGE = 64 * 1024
#: How long a client waits for an answer, unless the operation says
#: otherwise: an attach may wait for a KMS (bounded by the backend) and a mkfs.
DEFAULT_TIMEOUT = 600.0


class Arg:
    """One argument of an operation: its name, its JSON type, and whether it
    must be given (a null counts as not given; the default then stands)."""

    __slots__ = ("name", "type", "required", "default")

    def __init__(self, name: str, type_: type, required: bool = False, default=None):
        self.name, self.type, self.required, self.default = name, type_, required, default

    def check(self, op: str, args: dict):
        v = args.get(self.name)
        if v is None:
            if self.required:
                raise ProtocolError(f"{op}: missing argument {self.name!r}")
            return self.default
        # JSON true is no number: bool is a subclass of int only in Python
        if not isinstance(v, self.type) or (self.type is not bool and isinstance(v, bool)):
            raise ProtocolError(f"{op}: argument {self.name!r} has the wrong type")
        return v


class Op:
    """One operation: its name on the wire, its arguments (checked in this
    order; others are ignored) and how long a client waits for its answer."""

    __slots__ = ("name", "args", "timeout")

    def __init__(self, name: str, *args: Arg, timeout: float = DEFAULT_TIMEOUT):
        self.name, self.args, self.timeout = name, args, timeout

    def __repr__(self) -> str:
        return f"<Op {self.name}>"

    def request(self, **args) -> dict:
        return {"v": VERSION, "op": self.name, "args": args}

    def parse(self, args: dict) -> dict:
        """The arguments as the handler takes them: checked, defaults filled in."""
        return {a.name: a.check(self.name, args) for a in self.args}


PING = Op("ping", timeout=5.0)  # is a daemon up? (the daemon asks it at start)
STATUS = Op("status", timeout=60.0)
ATTACH = Op("attach", Arg("name", str, required=True), Arg("mount", str), Arg("mkfs", str),
            Arg("break_lock", bool, default=False))
DETACH = Op("detach", Arg("name", str, required=True), Arg("force", bool, default=False))
#: A quiesced copy of an attached volume can take a while on a filesystem
#: without reflinks; the daemon stops by itself if the CLI goes away.
SNAPSHOT = Op("snapshot", Arg("name", str, required=True), Arg("dest", str, required=True), Arg("uuid", str),
              timeout=6 * 3600.0)
RESIZE = Op("resize", Arg("size", int, required=True), Arg("name", str, required=True))
STOP = Op("stop", Arg("force", bool, default=False))

#: Every operation, by its name on the wire.
OPS = {op.name: op for op in (PING, STATUS, ATTACH, DETACH, SNAPSHOT, RESIZE, STOP)}


def encode(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    return data


def decode(line: bytes) -> dict:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
    obj = load_object(line, ProtocolError, "message")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r}; this side speaks {VERSION}")
    return obj


def parse_request(obj: dict) -> tuple[Op, dict]:
    """The operation a request names and its checked arguments."""
    name, args = obj.get("op"), obj.get("args", {})
    op = OPS.get(name) if isinstance(name, str) else None
    if op is None:
        raise ProtocolError(f"unknown operation {name!r}")
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be an object")
    return op, op.parse(args)


def ok(result) -> dict:
    return {"v": VERSION, "ok": True, "result": result}


def error(exc: EvscryptError) -> dict:
    err = {"type": type(exc).__name__, "message": exc.message}
    if exc.details is not None:
        err["details"] = exc.details
    return {"v": VERSION, "ok": False, "error": err}


def raise_error(resp: dict) -> None:
    """Re-raise a daemon error response as its own class."""
    err = resp.get("error") or {}
    cls = error_classes().get(err.get("type"), EvscryptError)
    details = err.get("details")
    raise cls(str(err.get("message", "the daemon reported an error")),
              details=details if isinstance(details, dict) else None)
