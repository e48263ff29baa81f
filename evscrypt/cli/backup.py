"""`evscrypt backup ...`: backups of volumes to a directory or to S3."""

from __future__ import annotations

import click

from ..backup import open_store, parse_source
from ..backup import reader
from ..backup.writer import backup_volume
from ..errors import EvscryptError
from .common import Env, daemon_snapshot, emit_json, human_size, long_operation, pass_env, progress_bar, table


@click.group()
def backup():
    """Backups to a directory or S3 (incremental, verified on restore)."""


@backup.command()
@click.argument("volume")
@click.argument("dest")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
@long_operation
def create(env: Env, volume, dest, as_json):
    """Back up VOLUME to DEST (a directory or s3://BUCKET/PREFIX).

    Only chunks not yet in DEST are written.  An attached volume is copied
    first with its writes held (crash-consistent)."""
    h = env.store.header(volume)
    store = open_store(dest, create=True)
    with progress_bar(h.data_offset + h.size, f"backing up {volume}") as bar:
        r = backup_volume(env.store, volume, store, daemon_snapshot(env), progress=bar.update)
    m = r.manifest
    stored = sum(1 for c in m.chunks if c)
    if as_json:
        emit_json({"id": m.id, "source": r.source, "volume": volume, "chunks": len(m.chunks),
                   "chunks_stored": stored, "chunks_written": r.chunks_written, "bytes_written": r.bytes_written})
        return
    click.echo(f"backup {m.id} of {volume}: {stored} data chunk(s) of {len(m.chunks)}, "
               f"{r.chunks_written} new ({human_size(r.bytes_written)} written)")
    click.echo(f"restore with: evscrypt volume create NAME --from-backup {r.source}")


@backup.command("list")
@click.argument("dest")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def list_(env: Env, dest, as_json):
    """List the backups in DEST, with the SRC to restore each from."""
    store = open_store(dest)
    items = []
    for bid in store.manifest_ids():
        try:
            m = reader.load_manifest(store, bid)
            items.append({"id": m.id, "volume": m.volume, "created": m.created, "size": m.size,
                          "encrypted": m.encrypted, "kms": m.kms, "key_id": m.key_id, "chunks": len(m.chunks),
                          "source": store.source(m.id)})
        except EvscryptError as e:  # one damaged manifest must not hide the others
            items.append({"id": bid, "error": e.message, "source": store.source(bid)})
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo("no backups")
        return
    table([[i["id"], i.get("volume", "?"), human_size(i["size"]) if "size" in i else "?",
            ("yes" if i["encrypted"] else "no") if "encrypted" in i else "?", i.get("created", i.get("error")),
            i["source"]] for i in items],
          ["ID", "VOLUME", "SIZE", "ENCRYPTED", "CREATED", "SRC"])


@backup.command()
@click.argument("src")
@pass_env
@long_operation
def verify(env: Env, src):
    """Read every chunk of backup SRC and check it against its checksum."""
    dest, bid = parse_source(src)
    store = open_store(dest)
    m = reader.load_manifest(store, bid)
    with progress_bar(m.image_size, f"verifying {bid}") as bar:
        reader.verify(store, m, progress=bar.update)
    click.echo(f"backup {bid} is intact ({len(m.chunks)} chunks)")
