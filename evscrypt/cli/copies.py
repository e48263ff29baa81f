"""What `evscrypt snapshot` and `evscrypt image` share: both are copies of a
volume in the state directory (evscrypt.snapshots), made, listed, shown and
deleted alike."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from ..snapshots import CopyStore
from .common import Env, daemon_snapshot, emit_json, human_size, pass_env, progress_bar, table


def show_copies(copies: CopyStore, as_json: bool, volume: str | None = None) -> None:
    """`snapshot list` and `image list`: the copies (of ``volume`` only, if given)."""
    items = copies.list(volume)
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo(f"no {copies.kind}s")
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


def take_copy(env: Env, copies: CopyStore, name: str, volume: str, of: str) -> None:
    """Copy VOLUME into a new snapshot or image NAME, with a progress bar
    when the copy is made here (a detached volume), and say what was made:
    "created snapshot NAME of VOLUME (SIZE, encrypted)" (``of`` is "of" there)."""
    h = env.store.header(volume)
    with progress_bar(h.data_offset + h.size, f"copying {volume}") as bar:
        meta = copies.create(name, env.store, volume, daemon_snapshot(env), progress=bar.update)
    click.echo(f"created {copies.kind} {name} {of} {volume} ({human_size(meta['size'])}, "
               f"{'encrypted' if meta['encrypted'] else 'not encrypted'})")


def add_info_and_delete(group: click.Group, kind: str, copies: Callable[[Path], CopyStore]) -> None:
    """`GROUP info NAME` and `GROUP delete NAME` for the copies of ``kind``,
    ``copies(home)`` being their store."""
    @group.command(help=f"Show {kind} NAME.")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @pass_env
    def info(env: Env, name, as_json):
        show_one(env, copies(env.home).info(name), as_json)

    @group.command(help=f"Delete {kind} NAME (volumes made from it are independent and stay).")
    @click.argument("name")
    @pass_env
    def delete(env: Env, name):
        copies(env.home).delete(name)
        click.echo(f"deleted {kind} {name}")
