"""`evscrypt gc`: remove what interrupted operations left in the state directory."""

from __future__ import annotations

import click

from ..tempentry import collect
from .common import Env, emit_json, pass_env, warn


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def gc(env: Env, as_json):
    """Remove temporary entries that a killed snapshot, image, restore or
    create left behind (hidden .NAME.*-XXXXXXXX entries).  Entries of
    operations still running are left alone.  The daemon does this too when
    it starts."""
    r = collect(env.home)
    if as_json:
        emit_json(r.to_dict())
        return
    for p in r.removed:
        click.echo(f"removed {p}")
    for p in r.busy:
        click.echo(f"in use, left alone: {p}")
    for e in r.errors:
        warn(f"cannot remove {e}")
    if not (r.removed or r.busy or r.errors):
        click.echo("nothing to remove")
