"""`evscrypt snapshot ...`: point-in-time copies of volumes."""

from __future__ import annotations

import click

from ..catalog import SNAPSHOT
from ..snapshots import snapshots
from .common import Env, long_operation, pass_env
from .copies import add_info_and_delete, show_copies, take_copy


@click.group()
def snapshot():
    """Snapshots: cheap point-in-time copies of volumes."""


@snapshot.command()
@click.argument("volume")
@click.argument("name")
@pass_env
@long_operation
def create(env: Env, volume, name):
    """Snapshot VOLUME as NAME (attached or not; writes are held while the copy point is taken)."""
    take_copy(env, snapshots(env.home), name, volume, "of")


@snapshot.command("list")
@click.argument("volume", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def list_(env: Env, volume, as_json):
    """List snapshots (of VOLUME only, if given)."""
    show_copies(snapshots(env.home), as_json, volume)


add_info_and_delete(snapshot, SNAPSHOT, snapshots)
