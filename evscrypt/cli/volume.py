"""`evscrypt volume ...`: create, list, inspect, delete volumes; dump a DK."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import KMSError
from ..kms import BACKENDS
from ..volumes import cryptsetup_command
from .common import Env, emit_json, human_size, parse_size, pass_env, progress_bar, table, warn


@click.group()
def volume():
    """Create, list, inspect and delete volumes."""


@volume.command()
@click.argument("name")
@click.option("--size", required=True, help="Logical size, e.g. 20G or 512M (a multiple of 4 KiB).")
@click.option("--encrypt/--no-encrypt", default=True, show_default=True,
              help="Encrypt the volume.  This can never change afterwards.")
@click.option("--kms", type=click.Choice(BACKENDS), default="local", show_default=True, help="KMS backend.")
@click.option("--key", default=None, help="CMK id, ARN or alias (default: evs/default).")
@click.option("--preallocate", is_flag=True, help="Fill the data area with encrypted zeros now.")
@pass_env
def create(env: Env, name, size, encrypt, kms, key, preallocate):
    """Create volume NAME."""
    nbytes = parse_size(size)
    if not encrypt and key:
        raise click.UsageError("--key makes no sense with --no-encrypt")
    with progress_bar(nbytes if preallocate else 0, f"preallocating {name}") as bar:
        env.store.create(name, nbytes, encrypted=encrypt, kms=kms, key=key, preallocate=preallocate,
                         owner=os.geteuid(), progress=bar.update)
    click.echo(f"created volume {name} ({human_size(nbytes)}, {'encrypted' if encrypt else 'not encrypted'})")


@volume.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def list_(env: Env, as_json):
    """List volumes."""
    infos = []
    for name in env.store.names():
        try:
            infos.append(env.store.info(name))
        except Exception as e:  # one damaged image must not hide the others
            infos.append({"name": name, "error": getattr(e, "message", str(e))})
    if as_json:
        emit_json(infos)
        return
    rows = []
    for i in infos:
        if "error" in i:
            rows.append([i["name"], "?", "?", "?", "?", "?", "error: " + i["error"]])
            continue
        rows.append([i["name"], human_size(i["size"]), "yes" if i["encrypted"] else "no", i["kms"],
                     i["key_alias"] or i["key_id"], i["key_state"], "attached" if i["attached"] else "detached"])
    if rows:
        table(rows, ["NAME", "SIZE", "ENCRYPTED", "KMS", "KEY", "KEY STATE", "STATUS"])
    else:
        click.echo("no volumes")


@volume.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def info(env: Env, name, as_json):
    """Show volume NAME."""
    d = env.store.info(name)
    if as_json:
        emit_json(d)
        return
    for k in ("name", "uuid", "size", "encrypted", "cipher", "sector_size", "data_offset", "kms", "key_id",
              "key_alias", "key_state", "image_path", "allocated", "created", "origin", "features", "attached",
              "header_copies_valid"):
        v = d[k]
        if k in ("size", "allocated"):
            v = f"{human_size(v)} ({v} bytes)"
        elif k == "origin":
            v = v["type"] + (f" ({v['source']})" if v.get("source") else "")
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) or "-"
        click.echo(f"{k + ':':21}{'-' if v is None else v}")


@volume.command()
@click.argument("name")
@pass_env
def delete(env: Env, name):
    """Delete volume NAME and its data (it must be detached)."""
    env.store.delete(name)
    click.echo(f"deleted volume {name}")


@volume.command("dump-key")
@click.argument("name")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the raw 64-byte data key (created with mode 0600).")
@pass_env
def dump_key(env: Env, name, key_file):
    """Write the volume's raw data key, for disaster recovery with dm-crypt."""
    h = env.store.header(name)
    if not h.encrypted:
        raise KMSError(f"volume {name!r} is not encrypted; it has no data key")
    image = env.store.dump_key(name, key_file)
    warn(f"{key_file} holds the plaintext data key of {name}: anyone who reads it can read the volume")
    click.echo(cryptsetup_command(image, key_file, h))
