"""`evscrypt snapshot ...`: point-in-time copies of volumes."""

from __future__ import annotations

import click

from ..snapshots import CopyStore, snapshots
from .common import Env, daemon_snapshot, emit_json, human_size, long_operation, pass_env, progress_bar, table


def show_copies(items: list[dict], as_json: bool, what: str) -> None:
    """The listing shared by `snapshot list` and `image list`."""
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo(f"no {what}s")
        return
    rows = []
    for d in items:
        if "error" in d:
            rows.append([d["name"], "?", "?", "?", "?", "error: " + d["error"]])
            continue
        rows.append([d["name"], d["volume"], human_size(d["size"]), "yes" if d["encrypted"] else "no",
                     human_size(d["allocated"]) if d.get("allocated") is not None else "?", d["created"]])
    table(rows, ["NAME", "VOLUME", "SIZE", "ENCRYPTED", "ALLOCATED", "CREATED"])


def show_one(env: Env, d: dict, as_json: bool) -> None:
    """`snapshot info` and `image info`, with the key's alias and state."""
    d["key_alias"] = d["key_state"] = None
    if d.get("encrypted"):
        d.update(env.store.key_status(d["kms"], d["key_id"]))
    if as_json:
        emit_json(d)
        return
    for k in ("name", "kind", "volume", "volume_uuid", "copied_from", "size", "encrypted", "kms", "key_id",
              "key_alias", "key_state", "created", "allocated", "path"):
        if k == "copied_from" and k not in d:
            continue
        v = d.get(k)
        if k in ("size", "allocated") and v is not None:
            v = f"{human_size(v)} ({v} bytes)"
        click.echo(f"{k + ':':13}{'-' if v is None else v}")


def take_copy(env: Env, copies: CopyStore, name: str, volume: str) -> dict:
    """Copy VOLUME into a new snapshot or image NAME, with a progress bar
    when the copy is made here (a detached volume)."""
    h = env.store.header(volume)
    with progress_bar(h.data_offset + h.size, f"copying {volume}") as bar:
        return copies.create(name, env.store, volume, daemon_snapshot(env), progress=bar.update)


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
    meta = take_copy(env, snapshots(env.home), name, volume)
    click.echo(f"created snapshot {name} of {volume} ({human_size(meta['size'])}, "
               f"{'encrypted' if meta['encrypted'] else 'not encrypted'})")


@snapshot.command("list")
@click.argument("volume", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def list_(env: Env, volume, as_json):
    """List snapshots (of VOLUME only, if given)."""
    show_copies(snapshots(env.home).list(volume), as_json, "snapshot")


@snapshot.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def info(env: Env, name, as_json):
    """Show snapshot NAME."""
    show_one(env, snapshots(env.home).info(name), as_json)


@snapshot.command()
@click.argument("name")
@pass_env
def delete(env: Env, name):
    """Delete snapshot NAME (volumes made from it are independent and stay)."""
    snapshots(env.home).delete(name)
    click.echo(f"deleted snapshot {name}")
