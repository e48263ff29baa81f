"""The `evscrypt` command line.

Each group lives in its own module; this one builds the root group and is the
one place that turns errors into a one-line message and an exit code.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from .. import __version__
from ..errors import EvscryptError
from ..paths import default_home
from .backup import backup
from .common import Env
from .header_cmds import register as _register_header
from .image import image
from .key import key
from .snapshot import snapshot
from .volume import volume

#: Exit codes outside the error tree.
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory (default: $EVSCRYPT_HOME, /var/lib/evscrypt for root, "
                   "~/.local/share/evscrypt otherwise).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="evscrypt")
@click.pass_context
def cli(ctx: click.Context, home, debug):
    """evscrypt: encrypted block volumes with cloud-style key management."""
    ctx.obj = Env(home=home or default_home(), debug=debug)


cli.add_command(volume)
cli.add_command(key)
cli.add_command(snapshot)
cli.add_command(image)
cli.add_command(backup)
_register_header(volume)

try:  # the daemon commands arrive with the daemon package
    from .daemon_cmds import register as _register_daemon

    _register_daemon(cli)
except ImportError:  # pragma: no cover
    pass


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
    except KeyboardInterrupt:
        click.echo("evscrypt: interrupted", err=True)
        return EXIT_INTERRUPTED
    except EvscryptError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"evscrypt: error: {e.message}", err=True)
        return e.exit_code
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"evscrypt: internal error: {type(e).__name__}: {e} (run with --debug for details)", err=True)
        return EXIT_INTERNAL


def entry() -> None:
    sys.exit(main())
