"""`evscrypt gc`: remove what interrupted operations left in the state directory."""

from __future__ import annotations

import click

from ..errors import EvscryptError
from ..store.base import STALE_TEMP_AGE
from ..tempentry import collect
from .common import Env, emit_json, pass_env, warn


@click.command()
@click.option("--older-than", "min_age", type=click.IntRange(min=0), default=STALE_TEMP_AGE, show_default=True,
              metavar="SECONDS", help="In a shared store: remove a temporary image only once it has been "
                                      "neither made nor written for this long.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def gc(env: Env, min_age, as_json):
    """Remove temporary entries that a killed snapshot, image, restore or
    create left behind (hidden .NAME.*-XXXXXXXX entries; in a shared store,
    hidden .NAME.tmp-XXXXXXXX images).  Entries of operations still running
    are left alone: locked ones in the state directory, and images that a
    client has open or that are younger than --older-than in a shared
    store.  The daemon does this too when it starts."""
    r = collect(env.home)
    try:
        r.merge(env.store.images.collect_temporary(min_age))
    except EvscryptError as e:  # a store that cannot be reached: the state directory's are done
        r.errors.append(str(e))
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
