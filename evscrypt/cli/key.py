"""`evscrypt key ...`: customer master keys and their lifecycle."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InvalidArgument
from ..kms import BACKENDS
from ..names import DEFAULT_ALIAS
from ..kms.local import DEFAULT_DELETION_DAYS, MAX_DELETION_DAYS, MIN_DELETION_DAYS
from .common import Env, emit_json, pass_env, resolve_owner, table, user_uid

kms_option = click.option("--kms", type=click.Choice(BACKENDS), default="local", show_default=True,
                          help="KMS backend.")


def _show(info, as_json: bool) -> None:
    if as_json:
        emit_json(info.to_dict())
        return
    for k, v in info.to_dict().items():
        click.echo(f"{k + ':':15}{'-' if v in (None, '') else v}")


def _lifecycle(env: Env, kms: str):
    if kms != "local":
        raise InvalidArgument(f"manage the lifecycle of {kms} keys with that provider's own tools")
    return env.store.backend(kms)


@click.group()
def key():
    """Customer master keys (CMKs)."""


def key_command(name: str | None = None, **kw):
    """``key NAME KEY [its own options] --kms``: put the command's own
    options between this and :func:`with_kms`, which must come last."""
    def decorate(fn):
        return key.command(name, **kw)(click.argument("key_ref", metavar="KEY")(fn))
    return decorate


def with_kms(fn):
    """The --kms option and the Env: the last decorators of a key command."""
    return kms_option(pass_env(fn))


@key.command()
@click.argument("alias")
@click.option("--description", default="", help="Free text.")
@click.option("--owner", "owner_name", metavar="USER", default=None,
              help="Create the key for USER, who may then use it (root only).")
@kms_option
@pass_env
def create(env: Env, alias, description, owner_name, kms):
    """Create a CMK called ALIAS."""
    owner = resolve_owner(owner_name)
    info = _lifecycle(env, kms).create_key(alias, description, owner=owner or None)
    click.echo(f"created key {info.alias} ({info.key_id})")


@key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@kms_option
@pass_env
def list_(env: Env, as_json, kms):
    """List CMKs."""
    keys = env.store.backend(kms).list_keys()
    if as_json:
        emit_json([k.to_dict() for k in keys])
        return
    table([[k.alias, k.key_id, k.state.value, k.deletion_date, k.description] for k in keys],
          ["ALIAS", "KEY ID", "STATE", "DELETION DATE", "DESCRIPTION"])


@key_command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_kms
def describe(env: Env, key_ref, as_json, kms):
    """Describe KEY (id, ARN or alias)."""
    _show(env.store.backend(kms).describe(key_ref), as_json)


def _state_change(name: str, change: str, doc: str) -> click.Command:
    """A command that makes one lifecycle change ``change`` (the backend's
    method) to KEY and says the key's state afterwards."""
    @key_command(name, help=doc)
    @with_kms
    def command(env: Env, key_ref, kms):
        info = getattr(_lifecycle(env, kms), change)(key_ref)
        click.echo(f"key {info.alias or info.key_id} is {info.state}")
    return command


enable = _state_change("enable", "enable", "Enable KEY.")
disable = _state_change("disable", "disable",
                        "Disable KEY: attached volumes keep working; detached ones cannot attach.")
cancel_deletion = _state_change("cancel-deletion", "cancel_deletion",
                                "Cancel a scheduled deletion; the key returns to Disabled.")


@key_command("schedule-deletion")
@click.option("--days", type=int, default=DEFAULT_DELETION_DAYS, show_default=True,
              help=f"Waiting period, {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} days.")
@with_kms
def schedule_deletion(env: Env, key_ref, days, kms):
    """Schedule KEY for deletion.  When it is deleted, its volumes are lost."""
    info = _lifecycle(env, kms).schedule_deletion(key_ref, days)
    click.echo(f"key {info.alias or info.key_id} is {info.state}; it will be deleted on {info.deletion_date}")


@key.command("purge-due")
@kms_option
@pass_env
def purge_due(env: Env, kms):
    """Destroy keys whose deletion date has passed."""
    purged = _lifecycle(env, kms).purge_due()
    for k in purged:
        click.echo(f"deleted key {k.alias or k.key_id}")
    if not purged:
        click.echo("no key is due for deletion")


@key.command("seal-root")
@click.option("--passphrase-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Seal the local root key with this passphrase (scrypt).")
@click.option("--unseal", is_flag=True, help="Store the root key unsealed again.")
@pass_env
def seal_root(env: Env, passphrase_file, unseal):
    """Seal the local keystore's root key with a passphrase."""
    if bool(passphrase_file) == bool(unseal):
        raise click.UsageError("give exactly one of --passphrase-file and --unseal")
    _lifecycle(env, "local").seal_root(None if unseal else passphrase_file)
    click.echo("root key unsealed" if unseal else "root key sealed; set EVSCRYPT_PASSPHRASE_FILE "
               "or the systemd credential evscrypt-passphrase to use it")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@key_command()
@click.option("--to", "user", required=True, metavar="USER", help="The user who may use the key.")
@with_kms
def grant(env: Env, key_ref, user, kms):
    """Let USER use KEY for their volumes (the cloud's cross-account grant)."""
    backend = _lifecycle(env, kms)
    if backend.describe(key_ref).alias == DEFAULT_ALIAS:
        raise click.UsageError(f"{DEFAULT_ALIAS} is everyone's key: there is nothing to grant")
    info = backend.grant(key_ref, user_uid(user))
    click.echo(f"granted key {info.alias or info.key_id} to {user}")


@key_command()
@click.option("--from", "user", required=True, metavar="USER", help="The user to take the grant from.")
@with_kms
def revoke(env: Env, key_ref, user, kms):
    """Take back a grant: USER's volumes under KEY no longer attach."""
    info = _lifecycle(env, kms).revoke(key_ref, user_uid(user))
    click.echo(f"revoked the grant of key {info.alias or info.key_id} from {user}")


@key_command("list-grants")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@with_kms
def list_grants(env: Env, key_ref, as_json, kms):
    """Show who was granted KEY."""
    uids = _lifecycle(env, kms).list_grants(key_ref)
    if as_json:
        emit_json([{"uid": u, "user": _user_name(u)} for u in uids])
    elif uids:
        table([[_user_name(u), u] for u in uids], ["USER", "UID"])
    else:
        click.echo("no grants")
