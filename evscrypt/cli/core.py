"""What the command line does without click: its exit codes outside the
error tree, its one-line error report, and the attach and detach commands.

Both ways into the CLI use it: the quick path (evscrypt.entry, which runs a
bare `evscrypt attach NAME` or `detach NAME` without importing click) and
the click commands (evscrypt.cli.root and its groups).  So the two answer
alike and cannot drift apart.  Nothing here imports click, pathlib or
typing: they would cost the quick path a visible share of its start-up.
"""

from __future__ import annotations

import os
import sys

#: Exit codes outside the error tree (each error class has its own: evscrypt.errors).
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def _client(runtime):
    from ..client import Client
    from ..paths import socket_name

    return Client(socket_name(os.fspath(runtime)))


def attach(runtime, name: str, mount: str | None = None, mkfs: str | None = None, break_lock: bool = False) -> None:
    """`evscrypt attach`: the disk path on stdout; where it was mounted, if it was, on stderr."""
    r = _client(runtime).attach(name, mount=mount, mkfs=mkfs, break_lock=break_lock)
    print(r["path"], flush=True)
    if r.get("mount"):
        m = r["mount"]
        print(f"mounted {m['fstype']} on {m['loop']} at {m['mountpoint']}", file=sys.stderr)


def detach(runtime, name: str, force: bool = False, as_json: bool = False) -> None:
    """`evscrypt detach`: each warning on stderr, then one line (or the daemon's answer as JSON)."""
    r = _client(runtime).detach(name, force=force)
    for w in r.get("warnings", []):
        warn(w)
    if as_json:
        import json

        print(json.dumps(r, indent=2, sort_keys=True), flush=True)
    else:
        print(f"detached {name}", flush=True)


def warn(msg: str) -> None:
    print(f"evscrypt: warning: {msg}", file=sys.stderr)


def report_error(e: BaseException, debug: bool) -> int:
    """One line on stderr for a failed command, and its exit code."""
    from ..errors import EvscryptError

    if isinstance(e, KeyboardInterrupt):
        print("evscrypt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if debug:
        import traceback  # only here: it costs start-up time of every command

        traceback.print_exception(e)
    if isinstance(e, EvscryptError):
        print(f"evscrypt: error: {e.message}", file=sys.stderr)
        return e.exit_code
    print(f"evscrypt: internal error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
    return EXIT_INTERNAL
