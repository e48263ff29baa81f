"""`evscrypt daemon | attach | detach | stop | status`: talk to the running daemon."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .. import client
from ..errors import DaemonUnavailable, EvscryptError
from . import core
from .common import Env, emit_json, human_size, pass_env, table, warn


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

    raise SystemExit(run(env.home, env.runtime, mountpoint, socket_group, env.debug, allow_swappable_keys,
                         env.store_spec))


@click.command()
@click.argument("name")
@click.option("--mount", "mount_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also set up a loop device and mount its filesystem here.")
@click.option("--mkfs", type=click.Choice(["ext4", "xfs"]), default=None,
              help="With --mount: create this filesystem if the disk is blank.")
@click.option("--break-lock", is_flag=True,
              help="Root only: take the lock of a crashed host that still holds the volume (it is fenced first); "
                   "refused while the holder answers.")
@pass_env
def attach(env: Env, name, mount_dir, mkfs, break_lock):
    """Attach volume NAME: unwrap its key and expose it as a disk file."""
    if mkfs and not mount_dir:
        raise click.UsageError("--mkfs needs --mount")
    core.attach(env.runtime, name, str(mount_dir.absolute()) if mount_dir else None, mkfs, break_lock)


@click.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Detach even if open, in use, or its key can no longer attach it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def detach(env: Env, name, force, as_json):
    """Detach volume NAME: unmount, flush, and wipe its key from memory."""
    core.detach(env.runtime, name, force, as_json)


@click.command()
@click.option("--force", is_flag=True,
              help="Stop even if some attached volume could not be attached again (one warning each).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def stop(env: Env, force, as_json):
    """Detach every volume and stop the daemon; wait until it has exited.

    Refused (exit 12) while an attached volume could not be attached again:
    its CMK is Disabled, PendingDeletion or Deleted, or its owner may no
    longer use the key.  The daemon then keeps running, I/O unaffected."""
    fd = None
    try:
        pid = env.daemon.daemon_pid()
        fd = client.pidfd(pid)
        r = env.daemon.stop(force=force)
    except EvscryptError as e:
        if fd is not None:
            os.close(fd)
        if as_json:
            emit_json({"stopped": False, "error": {"type": type(e).__name__, "message": e.message,
                                                   "exit_code": e.exit_code},
                       "blocked": (e.details or {}).get("blocked", [])})
        raise
    for w in r.get("warnings", []):
        warn(w)
    if not client.wait_exit(pid, fd):
        raise DaemonUnavailable(f"the daemon (pid {pid}) detached everything but has not exited")
    if as_json:
        emit_json(r)
        return
    click.echo(f"stopped the daemon (pid {pid}); detached {len(r['detached'])} volume(s)"
               + (f": {', '.join(r['detached'])}" if r["detached"] else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_env
def status(env: Env, as_json):
    """Show whether the daemon is up and what is attached (exit 0 only if it answers)."""
    try:
        r = env.daemon.status()
    except DaemonUnavailable as e:
        if as_json:
            emit_json({"running": False, "error": e.message})
        raise
    r["running"] = True
    if as_json:
        emit_json(r)
        return
    click.echo(f"daemon running (pid {r['pid']}), disks at {r['mountpoint']}")
    rows = [[v["name"], human_size(v["size"]), v["state"], v["key_state"] or "-", _reattach(v.get("reattach")),
             v["open_handles"], v["io"]["reads"], v["io"]["writes"],
             v["mount"]["mountpoint"] if v["mount"] else "-", v["path"]]
            for v in r["volumes"]]
    if rows:
        table(rows, ["NAME", "SIZE", "STATE", "KEY STATE", "REATTACH", "OPEN", "READS", "WRITES", "MOUNT", "PATH"])
        for v in r["volumes"]:
            why = (v.get("reattach") or {}).get("message")
            if why:
                click.echo(f"{v['name']}: {why}")
    else:
        click.echo("no volumes attached")



def _reattach(verdict: dict | None) -> str:
    """The REATTACH column: "yes", "no (key Disabled)", or "?" (not checked yet)."""
    return verdict["summary"] if verdict else "?"
