"""`evscrypt volume header-backup | header-restore`: save and repair headers."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import NotFound
from ..image import headerfile
from ..image.backing import lock_exclusive
from .common import Env, pass_env, warn


def _open_image(env: Env, name: str) -> int:
    path = env.store.path(name)
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"volume {name!r} not found")


@click.command("header-backup")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_env
def header_backup(env: Env, name, file):
    """Save the header of volume NAME (both copies) to FILE."""
    fd = _open_image(env, name)
    try:
        loaded = headerfile.backup(fd, file)
    finally:
        os.close(fd)
    if loaded.damaged:
        warn(f"one header copy of {name} is damaged; the backup holds the valid one")
    click.echo(f"saved the header of {name} to {file}")


@click.command("header-restore")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@pass_env
def header_restore(env: Env, name, file):
    """Write the header saved in FILE back into volume NAME (must be detached)."""
    fd = _open_image(env, name)
    try:
        lock_exclusive(fd, name)
        headerfile.restore(fd, file)
    finally:
        os.close(fd)
    click.echo(f"restored the header of {name} from {file}")


def register(volume_group: click.Group) -> None:
    volume_group.add_command(header_backup)
    volume_group.add_command(header_restore)
