"""The `evscrypt` program: a quick path for the hottest commands, then the CLI.

`evscrypt attach NAME` and `evscrypt detach NAME` are what scripts and
units run most, and the attach is a control-socket round trip of ~2 ms.
Importing the click CLI costs ~30 ms more than the command itself, so these
two, when given with no option at all, run here without click.  Anything
else (an option, --help, --home, a typo) goes to the full CLI, which parses
and answers exactly as before.  Both paths run the commands and report
errors through evscrypt.cli.core, so they cannot drift apart.
"""

from __future__ import annotations

import os
import sys

from .cli import core

QUICK = {"attach": core.attach, "detach": core.detach}


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
        return core.report_error(e, debug=False)


def main() -> None:
    rc = quick(sys.argv[1:])
    if rc is None:
        from .cli.root import entry as cli_entry

        cli_entry()
    sys.exit(rc)
