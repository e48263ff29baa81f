"""`evscrypt daemon | attach | detach | status`: talk to the running daemon."""

from __future__ import annotations

from pathlib import Path

import click

from .. import client, entry
from ..errors import DaemonUnavailable
from ..paths import socket_path
from .common import Env, emit_json, human_size, pass_env, table


@click.command()
@click.option("--mountpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to mount the disks directory (default: RUNTIME_DIR/disks).")
@click.option("--socket-group", default=None, help="Let this group use the control socket (mode 0660).")
@click.option("--allow-swappable-keys", is_flag=True,
              help="Run even if memory cannot be locked (RLIMIT_MEMLOCK): keys may then reach swap.")
@pass_env
def daemon(env: Env, mountpoint, socket_group, allow_swappable_keys):
    """Run the daemon in the foreground (systemd Type=notify)."""
    from ..daemon.main import run

    raise SystemExit(run(env.home, env.runtime, mountpoint, socket_group, env.debug, allow_swappable_keys))


@click.command()
@click.argument("name")
@click.option("--mount", "mount_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also set up a loop device and mount its filesystem here.")
@click.option("--mkfs", type=click.Choice(["ext4", "xfs"]), default=None,
              help="With --mount: create this filesystem if the disk is blank.")
@pass_env
def attach(env: Env, name, mount_dir, mkfs):
    """Attach volume NAME: unwrap its key and expose it as a disk file."""
    if mkfs and not mount_dir:
        raise click.UsageError("--mkfs needs --mount")
    entry.attach(env.runtime, name, str(mount_dir.absolute()) if mount_dir else None, mkfs)


@click.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Detach even if open, in use, or its key can no longer attach it.")
@pass_env
def detach(env: Env, name, force):
    """Detach volume NAME: unmount, flush, and wipe its key from memory."""
    entry.detach(env.runtime, name, force)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def status(env: Env, as_json):
    """Show whether the daemon is up and what is attached (exit 0 only if it answers)."""
    try:
        r = client.call(socket_path(env.runtime), "status", timeout=60)
    except DaemonUnavailable as e:
        if as_json:
            emit_json({"running": False, "error": e.message})
        raise
    r["running"] = True
    if as_json:
        emit_json(r)
        return
    click.echo(f"daemon running (pid {r['pid']}), disks at {r['mountpoint']}")
    rows = [[v["name"], human_size(v["size"]), v["state"], v["key_state"] or "-", v["open_handles"],
             v["io"]["reads"], v["io"]["writes"], v["mount"]["mountpoint"] if v["mount"] else "-", v["path"]]
            for v in r["volumes"]]
    if rows:
        table(rows, ["NAME", "SIZE", "STATE", "KEY STATE", "OPEN", "READS", "WRITES", "MOUNT", "PATH"])
    else:
        click.echo("no volumes attached")

