"""`evscrypt volume ...`: create, list, inspect, delete volumes; dump a DK."""

from __future__ import annotations

from pathlib import Path

import click

from .. import clone
from ..backup import open_store, parse_source, reader
from ..errors import NotFound
from ..kms import BACKENDS
from ..offline import offline_or_daemon
from ..snapshots import images, snapshots
from ..volumes import check_grow, cryptsetup_command
from .common import (
    Env, emit_json, encryption_wanted, human_size, long_operation, parse_size, pass_env, progress_bar, resolve_owner,
    table, warn,
)


@click.group()
def volume():
    """Create, list, inspect and delete volumes."""


@volume.command()
@click.argument("name")
@click.option("--size", default=None,
              help="Logical size, e.g. 20G or 512M (a multiple of 4 KiB).  With --from-*: optional, "
                   "and it may only grow the source's size.")
@click.option("--encrypt", is_flag=True,
              help="Encrypt the volume (the default, except from an unencrypted source).  This can never "
                   "change afterwards.")
@click.option("--no-encrypt", is_flag=True, help="Do not encrypt the volume (with --from-*: only as the rules allow).")
@click.option("--kms", type=click.Choice(BACKENDS), default=None,
              help="KMS backend (default: local; with --from-*: the source's).")
@click.option("--key", default=None, help="CMK id, ARN or alias (default: evs/default; with --from-*: the source's).")
@click.option("--preallocate", is_flag=True, help="Fill the data area with encrypted zeros now.")
@click.option("--from-snapshot", metavar="SNAP", default=None,
              help="Clone snapshot SNAP: encrypted exactly when it is, with its key.")
@click.option("--from-image", metavar="IMG", default=None,
              help="Create from image IMG: encrypted exactly when it is, with its key (for an encrypted volume "
                   "from an unencrypted image, 'image copy --encrypt' it first).")
@click.option("--from-backup", metavar="SRC", default=None,
              help="Restore backup SRC (DEST::ID, as 'backup list DEST' prints it); --encrypt/--no-encrypt and "
                   "--key may choose another encryption.")
@click.option("--owner", "owner_name", metavar="USER", default=None,
              help="Give the volume to USER, who may then attach and detach it (root only).")
@pass_env
@long_operation
def create(env: Env, name, size, encrypt, no_encrypt, kms, key, preallocate, from_snapshot, from_image, from_backup,
           owner_name):
    """Create volume NAME, empty or from a snapshot, an image or a backup."""
    encrypt = encryption_wanted(encrypt, no_encrypt, kms, key)
    owner = resolve_owner(owner_name)
    sources = [s for s in (from_snapshot, from_image, from_backup) if s is not None]
    if len(sources) > 1:
        raise click.UsageError("--from-snapshot, --from-image and --from-backup are mutually exclusive")
    if sources:
        if preallocate:
            raise click.UsageError("--preallocate cannot be combined with --from-snapshot/--from-image/--from-backup")
        h, what = _create_from(env, name, parse_size(size) if size else None, clone.Want(encrypt, kms, key),
                               from_snapshot, from_image, from_backup, owner)
        click.echo(f"created volume {name} ({human_size(h.size)}, "
                   f"{'encrypted' if h.encrypted else 'not encrypted'}) from {what}")
        return
    if size is None:
        raise click.UsageError("Missing option '--size'.")
    nbytes = parse_size(size)
    encrypt = True if encrypt is None else encrypt
    if encrypt:
        backend = env.store.backend(kms or "local")
        backend.check_access(key or backend.default_key(), owner)  # the owner must be allowed the key
    with progress_bar(nbytes if preallocate else 0, f"preallocating {name}") as bar:
        env.store.create(name, nbytes, encrypted=encrypt, kms=kms or "local", key=key, preallocate=preallocate,
                         owner=owner, progress=bar.update)
    click.echo(f"created volume {name} ({human_size(nbytes)}, {'encrypted' if encrypt else 'not encrypted'})")


def _create_from(env: Env, name: str, size, want, from_snapshot, from_image, from_backup, owner: int):
    if from_backup is not None:
        dest, bid = parse_source(from_backup)
        store = open_store(dest)
        m = reader.load_manifest(store, bid)
        with progress_bar(m.image_size, f"restoring {bid}") as bar:
            h = clone.from_backup(env.store, store, m, name, want, size=size, owner=owner,
                                  progress=bar.update)
        return h, f"backup {bid}"
    copies, source = (snapshots(env.home), from_snapshot) if from_snapshot is not None else \
        (images(env.home), from_image)
    try:
        length = copies.image_size(source)
    except NotFound:
        length = 0  # clone.from_copy reports the missing source
    with progress_bar(length, f"copying {copies.kind} {source}") as bar:
        h = clone.from_copy(env.store, copies, name, source, want, size=size, owner=owner,
                            progress=bar.update)
    return h, f"{copies.kind} {source}"


@volume.command()
@click.argument("name")
@click.option("--size", required=True, help="The new size (e.g. 40G), or +SIZE to add that much.  Volumes only grow.")
@pass_env
@long_operation
def resize(env: Env, name, size):
    """Grow volume NAME, attached or not.

    An attached disk file grows at once; a filesystem mounted with
    'attach --mount' is grown too (resize2fs, xfs_growfs).  On a loop device
    of your own, run 'losetup -c LOOP' and then resize2fs."""
    current = env.store.header(name).size
    new = current + parse_size(size[1:]) if size.startswith("+") else parse_size(size)
    check_grow(current, new)

    def offline() -> None:
        h = env.store.grow(name, new)
        click.echo(f"resized volume {name} to {human_size(h.size)}")

    def by_daemon() -> None:
        r = env.daemon.resize(name, new)
        click.echo(f"resized volume {name} to {human_size(r['size'])} (attached: {r['path']} has grown)")
        for w in r.get("warnings", []):
            warn(w)
        if r.get("mount") and not r.get("warnings"):
            m = r["mount"]
            click.echo(f"grew the {m['fstype']} filesystem on {m['loop']} at {m['mountpoint']}", err=True)

    offline_or_daemon(name, offline, by_daemon)


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
    image = env.store.dump_key(name, key_file)
    warn(f"{key_file} holds the plaintext data key of {name}: anyone who reads it can read the volume")
    if env.store.images.shared:  # cryptsetup opens a file: `rbd export` makes one, byte for byte
        warn(f"the image is in an RBD pool: run 'rbd export {image.split(':', 1)[1]} {name}.img' "
             f"and open that file")
        image = f"{name}.img"
    click.echo(cryptsetup_command(image, key_file, h))


from .header_cmds import register as _register_header  # noqa: E402  (the header-* subcommands)

_register_header(volume)
