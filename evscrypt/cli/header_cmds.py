"""`evscrypt volume header-backup | header-restore | adopt`: save and repair
headers, and record an image in the catalog."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import AlreadyExists, PermissionDenied
from .common import Env, pass_env, warn


@click.command("header-backup")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_env
def header_backup(env: Env, name, file):
    """Save the header of volume NAME (both copies) to FILE."""
    loaded = env.store.backup_header(name, file)
    if loaded.damaged:
        warn(f"one header copy of {name} is damaged; the backup holds the valid one")
    click.echo(f"saved the header of {name} to {file}")


@click.command("header-restore")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@pass_env
def header_restore(env: Env, name, file):
    """Write the header saved in FILE back into volume NAME (must be detached).

    FILE must be this volume's header: the catalog refuses any other, so a
    restore never changes the volume's uuid, encryption or key."""
    env.store.restore_header(name, file)
    click.echo(f"restored the header of {name} from {file}")


def _describe(entry) -> str:
    enc = f"encrypted, kms {entry.kms}, key {entry.key_id}" if entry.encrypted else "not encrypted"
    return f"uuid {entry.uuid}, {enc}, data offset {entry.data_offset}, size at least {entry.size}"


@click.command()
@click.argument("name")
@click.option("--replace", is_flag=True, help="Replace the catalog entry the volume already has.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_env
def adopt(env: Env, name, replace, yes):
    """Record the image of volume NAME in the catalog, trusting its header as
    it is now (root only).

    For an image made elsewhere, or one that had no entry when the catalog
    was first created (its header was damaged then).  Whoever could write
    the image chose what its header says: adopt only an image you trust."""
    if os.geteuid() != 0:
        raise PermissionDenied("only root can adopt a volume into the catalog")
    entry, old = env.store.adoption(name)
    if old is not None and not replace:
        if old == entry:
            click.echo(f"volume {name} is already in the catalog as it is")
            return
        raise AlreadyExists(f"volume {name!r} already has a catalog entry ({_describe(old)}); "
                            "use --replace to trust its image instead")
    click.echo(f"volume {name}: will trust its image's header: {_describe(entry)}", err=True)
    if old is not None:
        click.echo(f"volume {name}: replacing the catalog entry: {_describe(old)}", err=True)
    if not yes:
        click.confirm("Record it in the catalog?", abort=True, err=True)
    env.store.adopt(name, entry)
    click.echo(f"adopted volume {name}")


def register(volume_group: click.Group) -> None:
    volume_group.add_command(header_backup)
    volume_group.add_command(header_restore)
    volume_group.add_command(adopt)
