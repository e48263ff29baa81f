"""The `evscrypt` program: a quick path for the hottest commands, then the CLI.

`evscrypt attach NAME` and `evscrypt detach NAME` are what scripts and
units run most, and the attach is a control-socket round trip of ~2 ms.
Importing the click CLI costs ~30 ms more than the command itself, so these
two, when given with no option at all, run here without click.  Anything
else (an option, --help, --home, a typo) goes to the full CLI, which parses
and answers exactly as before.  Both paths share the commands' behaviour
(:func:`attach`, :func:`detach`) and the error reporting
(:func:`report_error`), so they cannot drift apart.
"""

from __future__ import annotations

import os
import sys

#: Exit codes outside the error tree.
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


def attach(runtime, name: str, mount: str | None = None, mkfs: str | None = None) -> None:
    from .client import call
    from .paths import socket_name

    r = call(socket_name(os.fspath(runtime)), "attach", name=name, mount=mount, mkfs=mkfs)
    print(r["path"], flush=True)
    if r.get("mount"):
        m = r["mount"]
        print(f"mounted {m['fstype']} on {m['loop']} at {m['mountpoint']}", file=sys.stderr)


def detach(runtime, name: str, force: bool = False, as_json: bool = False) -> None:
    from .client import call
    from .paths import socket_name

    r = call(socket_name(os.fspath(runtime)), "detach", name=name, force=force)
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
    from .errors import EvscryptError

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


QUICK = {"attach": attach, "detach": detach}


def quick(argv: list[str]) -> int | None:
    """Run ``attach NAME`` / ``detach NAME`` without click; None if argv is
    anything else (or EVSCRYPT_DEBUG is set), for the full CLI to handle."""
    if len(argv) != 2 or argv[0] not in QUICK or argv[1].startswith("-") or os.environ.get("EVSCRYPT_DEBUG"):
        return None
    from .paths import runtime_dir_name

    try:
        QUICK[argv[0]](runtime_dir_name(), argv[1])
        return 0
    except (Exception, KeyboardInterrupt) as e:
        return report_error(e, debug=False)


def main() -> None:
    rc = quick(sys.argv[1:])
    if rc is None:
        from .cli import entry as cli_entry

        cli_entry()
    sys.exit(rc)
