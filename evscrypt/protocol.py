"""Control-socket messages, shared by the client and the daemon.

One request and one response per connection, each a single line of UTF-8 JSON
of at most MAX_MESSAGE bytes:

    request:  {"v": 1, "op": "attach", "args": {...}}
    response: {"v": 1, "ok": true, "result": {...}}
              {"v": 1, "ok": false, "error": {"type": "Busy", "message": "...", "details": {...}}}

The error type is the name of a class in evscrypt.errors, so the client
re-raises the same class and the CLI prints the same exit code as it would
for a local error.  ``details`` (optional) carries an error's structured
facts, for the CLI's --json output.
"""

from __future__ import annotations

import json

from .errors import EvscryptError, ProtocolError, error_classes

VERSION = 1
MAX_MESSAGE = 64 * 1024
OPS = ("ping", "status", "attach", "detach", "snapshot", "resize", "stop")


def encode(obj: dict) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    return data


def decode(line: bytes) -> dict:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("message is not valid JSON")
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r}; this side speaks {VERSION}")
    return obj


def request(op: str, **args) -> dict:
    return {"v": VERSION, "op": op, "args": args}


def parse_request(obj: dict) -> tuple[str, dict]:
    op, args = obj.get("op"), obj.get("args", {})
    if op not in OPS:
        raise ProtocolError(f"unknown operation {op!r}")
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be an object")
    return op, args


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
