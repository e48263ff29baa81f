"""The `evscrypt` command line under click: the root group.

Each group lives in its own module; this one builds the root group and is the
one place that turns errors into a one-line message and an exit code (with
evscrypt.cli.core, which the quick path shares).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click

from .. import __version__
from .core import EXIT_INTERRUPTED, EXIT_USAGE, report_error
from ..paths import default_home
from .common import Env



#: Command name -> "module:attribute".  Groups are imported only when used, so
#: `evscrypt attach` starts without loading the crypto and storage stack.
COMMANDS = {
    "volume": ".volume:volume",
    "key": ".key:key",
    "snapshot": ".snapshot:snapshot",
    "image": ".image:image",
    "backup": ".backup:backup",
    "daemon": ".daemon_cmds:daemon",
    "attach": ".daemon_cmds:attach",
    "detach": ".daemon_cmds:detach",
    "stop": ".daemon_cmds:stop",
    "gc": ".gc_cmd:gc",
    "status": ".daemon_cmds:status",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        if name in COMMANDS and name not in self.commands:
            module, attr = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module, __package__), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory (default: $EVSCRYPT_HOME, /var/lib/evscrypt for root, "
                   "~/.local/share/evscrypt otherwise).")
@click.option("--store", "store_spec", envvar="EVSCRYPT_STORE", default=None, metavar="SPEC",
              help="Where the state directory keeps its volumes: rbd://POOL[/NAMESPACE] (a Ceph RBD pool "
                   "many hosts share) or local (files in the state directory, the default).  Recorded in "
                   "the state directory by its first use; $EVSCRYPT_STORE.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=lambda c, p, v: _version(c, v),
              help="Show the version, the FUSE data path and the XTS backend, and exit.")
@click.pass_context
def cli(ctx: click.Context, home, debug, store_spec):
    """evscrypt: encrypted block volumes with cloud-style key management."""
    ctx.obj = Env(home=home or default_home(), debug=debug, store_spec=store_spec)




class _LineFormatter(logging.Formatter):
    """Library warnings (the catalog's adoption notice) in the CLI's own
    one-line form; the daemon replaces this with its log format."""

    def format(self, record: logging.LogRecord) -> str:
        return f"evscrypt: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def _version(ctx: click.Context, value: bool) -> None:
    """--version: what this installation runs, as the daemon would run it."""
    if not value or ctx.resilient_parsing:
        return
    from ..crypto import backend
    from ..daemon import datapath
    from ..errors import EvscryptError

    click.echo(f"evscrypt, version {__version__}")
    try:
        click.echo(f"data path: {datapath.probe().describe()}")
    except ImportError as e:
        click.echo(f"data path: none: pyfuse3 cannot be imported ({e})")
    except EvscryptError as e:
        click.echo(f"data path: refused: {e.message}")
    try:
        click.echo(f"XTS backend: {backend.describe(backend.choose())}")
    except EvscryptError as e:
        click.echo(f"XTS backend: refused: {e.message}")
    ctx.exit()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("EVSCRYPT_DEBUG"))
    _setup_logging()
    try:
        rv = cli.main(args=argv, prog_name="evscrypt", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"evscrypt: usage error: {e.format_message()}{hint}", err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"evscrypt: error: {e.format_message()}", err=True)
        return e.exit_code
    except click.Abort:
        click.echo("evscrypt: aborted", err=True)
        return EXIT_INTERRUPTED
    except (Exception, KeyboardInterrupt) as e:  # EvscryptError: one line; a bug: one line unless --debug
        return report_error(e, debug)


def entry() -> None:
    """The CLI as a process of its own.  Its memory is locked first where
    the process may lock without limit (root, or RLIMIT_MEMLOCK unlimited),
    so the keys a command holds (and OpenSSL's key schedules) never reach
    swap; elsewhere each key's pages are locked (evscrypt.secret)."""
    from ..errors import MemoryProtectionError
    from ..secret import lock_all_memory

    try:
        lock_all_memory()
    except MemoryProtectionError:
        pass
    sys.exit(main())
