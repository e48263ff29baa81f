"""`evscrypt image ...`: images made from volumes, to create volumes from."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .. import clone
from ..catalog import IMAGE
from ..kms import BACKENDS
from ..snapshots import images
from .common import Env, encryption_wanted, human_size, long_operation, pass_env, progress_bar
from .copies import add_info_and_delete, show_copies, take_copy


@click.group()
def image():
    """Images made from volumes, to create volumes from."""


@image.command()
@click.argument("name")
@click.option("--from-volume", "volume", required=True, metavar="VOL", help="The volume to make the image of.")
@pass_env
@long_operation
def create(env: Env, name, volume):
    """Make image NAME of volume VOL (it keeps the volume's encryption and key)."""
    take_copy(env, images(env.home), name, volume, "from")


@image.command()
@click.argument("src")
@click.argument("dst")
@click.option("--encrypt", is_flag=True, help="Encrypt the copy of an unencrypted image, under a new data key.")
@click.option("--no-encrypt", is_flag=True,
              help="Keep the copy unencrypted (refused for an encrypted image, exit 25).")
@click.option("--kms", type=click.Choice(BACKENDS), default=None,
              help="KMS of the copy's CMK (default: the image's; local for an unencrypted image).")
@click.option("--key", default=None,
              help="CMK of the copy.  Another CMK than an encrypted image's re-encrypts the copy under a "
                   "new data key.")
@pass_env
@long_operation
def copy(env: Env, src, dst, encrypt, no_encrypt, kms, key):
    """Replicate image SRC as DST, as the cloud replicates images.

    An encrypted image stays encrypted: with its own data key and CMK, or,
    given another --key/--kms, re-encrypted under a new data key and that
    CMK.  An unencrypted image stays unencrypted, or with --encrypt (or
    --key/--kms) becomes encrypted under a new data key; volumes made from
    the copy are then encrypted.  Encrypted images never become unencrypted."""
    want = clone.Want(encryption_wanted(encrypt, no_encrypt, kms, key), kms, key)
    store = images(env.home)
    meta = store.meta(src)
    with progress_bar(meta.get("size", 0), f"copying image {src}") as bar:
        new = clone.copy_image(env.store, store, src, dst, want, progress=bar.update)
    how = "encrypted" if new["encrypted"] else "not encrypted"
    click.echo(f"copied image {src} to {dst} ({human_size(new['size'])}, {how})")


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def list_(env: Env, as_json):
    """List images."""
    show_copies(images(env.home), as_json)


@image.command()
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@pass_env
@long_operation
def export(env: Env, name, dest):
    """Write image NAME's disk as a raw file DEST (or DEST/NAME.raw if DEST is a
    directory).  Encrypted images cannot be exported."""
    store = images(env.home)
    meta = store.meta(name)
    length = meta["size"] if not meta.get("encrypted") else 0
    with progress_bar(length, f"exporting {name}") as bar:
        out = store.export(name, dest, progress=bar.update)
    click.echo(f"exported image {name} to {os.fspath(out)} ({human_size(meta['size'])}, raw)")


add_info_and_delete(image, IMAGE, images)
