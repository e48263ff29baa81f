"""The `evscrypt` command line.

Each group lives in its own module; this one builds the root group and is the
one place that turns errors into a one-line message and an exit code.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from .. import __version__
from ..entry import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, report_error  # noqa: F401  (re-exported)
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
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="evscrypt")
@click.pass_context
def cli(ctx: click.Context, home, debug):
    """evscrypt: encrypted block volumes with cloud-style key management."""
    ctx.obj = Env(home=home or default_home(), debug=debug)




def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("EVSCRYPT_DEBUG"))
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
    sys.exit(main())
